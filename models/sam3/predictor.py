"""Single-image SAM 3 inference: one ViT pass per image, shared by every prompt on it.

The ViT (about 95% of the compute) runs batched over the images of a request batch and its
output is kept in an LRU cache keyed by the image's content hash. Two heads read it:
- the detector (`Sam3Model`): text and/or exemplar boxes -> every instance of the concept;
- the tracker (`Sam3TrackerModel`, SAM 2 style): points and/or a box -> that one object.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers.models.sam3.modeling_sam3 import Sam3ImageSegmentationOutput, Sam3VisionEncoderOutput

from models.sam3.checkpoint import Sam3Models

# What the processor uses as the text of a prompt made of exemplar boxes only.
VISUAL_PROMPT_TEXT = "visual"
TEXT_CONTEXT = 32


@dataclass
class ImageEmbedding:
    """ViT output for one image, `[1, grid*grid, width]` on the model's device."""

    key: str
    features: torch.Tensor
    image_size: tuple[int, int]  # original (height, width)
    cached: bool
    seconds: float  # the ViT pass that computed it (shared by the images of a batched pass); 0 when cached


@dataclass
class MaskPrediction:
    """Low-resolution mask maps with their scores, best first.

    A pixel is in mask `i` when `maps[i]`, resized bilinearly to the image, exceeds `threshold`:
    the detector's maps are probabilities (0.5), the tracker's are logits (0.0), as in the
    official post-processing of each head.
    """

    maps: torch.Tensor  # [N, h, w] float32
    scores: torch.Tensor  # [N] float32, on the CPU
    threshold: float

    def __len__(self) -> int:
        return len(self.scores)

    def select(self, index: torch.Tensor | slice) -> MaskPrediction:
        return MaskPrediction(self.maps[index], self.scores[index], self.threshold)

    def to_image(self, size: tuple[int, int], index: slice = slice(None)) -> torch.Tensor:
        """Binary masks `[n, height, width]` (bool, CPU) at the original image size."""
        maps = self.maps[index]
        if len(maps) == 0:
            return torch.zeros((0, *size), dtype=torch.bool)
        resized = F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]
        return (resized > self.threshold).cpu()

    @staticmethod
    def concat(parts: Sequence[MaskPrediction]) -> MaskPrediction:
        """Concatenate predictions of one image, converting every part to logits if they differ."""
        if len({p.threshold for p in parts}) > 1:
            parts = [p.as_logits() for p in parts]
        return MaskPrediction(
            torch.cat([p.maps for p in parts]), torch.cat([p.scores for p in parts]), parts[0].threshold
        )

    def as_logits(self) -> MaskPrediction:
        if self.threshold == 0.0:
            return self
        return MaskPrediction(torch.logit(self.maps.clamp(1e-6, 1 - 1e-6)), self.scores, 0.0)


@dataclass
class ObjectPrompt:
    """One object for the tracker: clicks (`labels` 1 foreground, 0 background) and/or a box, in image pixels."""

    points: list[tuple[float, float]] | None = None
    labels: list[int] | None = None
    box: tuple[float, float, float, float] | None = None


class Sam3Predictor:
    """Embeds images once and answers concept (detector) and object (tracker) prompts on them."""

    def __init__(self, models: Sam3Models, cache_size: int = 16, max_vit_batch: int = 8) -> None:
        self.detector = models.detector
        self.tracker = models.tracker
        self.processor = models.processor
        self.cache_size = cache_size
        self.max_vit_batch = max_vit_batch
        param = next(self.detector.parameters())
        self.device, self.dtype = param.device, param.dtype
        backbone = self.detector.config.vision_config.backbone_config
        self.grid = backbone.image_size // backbone.patch_size
        self.input_size = backbone.image_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._text_cache: OrderedDict[str, tuple[object, torch.Tensor]] = OrderedDict()
        self.vit_batches = 0  # ViT forward passes run; what the cache saves is visible here

    @torch.inference_mode()
    def embed(self, images: Sequence[tuple[str, np.ndarray]]) -> list[ImageEmbedding]:
        """Embed `(content_key, HxWx3 uint8)` images: cache hits skip the ViT, misses share batched passes."""
        found: dict[str, torch.Tensor] = {}
        seconds: dict[str, float] = {}
        hits = set()
        for key, _ in images:
            if key in self._cache:
                self._cache.move_to_end(key)
                found[key] = self._cache[key]
                hits.add(key)
        misses = list({key: image for key, image in images if key not in found}.items())
        for start in range(0, len(misses), self.max_vit_batch):
            chunk = misses[start : start + self.max_vit_batch]
            pixels = self.processor.image_processor(images=[image for _, image in chunk], return_tensors="pt")
            start = time.perf_counter()
            pixel_values = pixels["pixel_values"].to(self.device, self.dtype)
            features = self.detector.vision_encoder.backbone(pixel_values).last_hidden_state
            if features.is_cuda:
                torch.cuda.synchronize(features.device)
            elapsed = time.perf_counter() - start
            self.vit_batches += 1
            for i, (key, _) in enumerate(chunk):
                found[key], seconds[key] = features[i : i + 1].clone(), elapsed
                self._remember(key, found[key])
        return [
            ImageEmbedding(key, found[key], image.shape[:2], cached=key in hits, seconds=seconds.get(key, 0.0))
            for key, image in images
        ]

    def _remember(self, key: str, features: torch.Tensor) -> None:
        if self.cache_size <= 0:
            return
        self._cache[key] = features
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _spatial(self, embedding: ImageEmbedding) -> torch.Tensor:
        return embedding.features.view(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)

    def _text_features(self, text: str) -> tuple[object, torch.Tensor]:
        if text in self._text_cache:
            self._text_cache.move_to_end(text)
            return self._text_cache[text]
        tokens = self.processor.tokenizer(
            [text], padding="max_length", max_length=TEXT_CONTEXT, truncation=True, return_tensors="pt"
        )
        mask = tokens["attention_mask"].to(self.device)
        features = self.detector.get_text_features(input_ids=tokens["input_ids"].to(self.device), attention_mask=mask)
        self._text_cache[text] = (features, mask)
        while len(self._text_cache) > 64:
            self._text_cache.popitem(last=False)
        return features, mask

    def _detect(
        self, embedding: ImageEmbedding, text: str | None, exemplar_boxes: Sequence[Sequence[float]], threshold: float
    ) -> tuple[Sam3ImageSegmentationOutput, torch.Tensor, torch.Tensor]:
        """The detector's output, and the queries scoring above `threshold` (best first) with their scores."""
        fpn, pos = self.detector.vision_encoder.neck(self._spatial(embedding))
        vision = Sam3VisionEncoderOutput(
            last_hidden_state=embedding.features, fpn_hidden_states=fpn, fpn_position_encoding=pos
        )
        text_features, text_mask = self._text_features(text or VISUAL_PROMPT_TEXT)
        boxes = {}
        if exemplar_boxes:
            height, width = embedding.image_size
            xyxy = torch.tensor(exemplar_boxes, dtype=torch.float32) / torch.tensor([width, height, width, height])
            cxcywh = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], dim=1)
            boxes = {
                "input_boxes": cxcywh[None].to(self.device, self.dtype),
                "input_boxes_labels": torch.ones(1, len(xyxy), dtype=torch.long, device=self.device),
            }
        out = self.detector(vision_embeds=vision, text_embeds=text_features, attention_mask=text_mask, **boxes)
        scores = (out.pred_logits[0].float().sigmoid() * out.presence_logits[0].float().sigmoid()).cpu()
        keep = torch.nonzero(scores > threshold).flatten()
        keep = keep[scores[keep].argsort(descending=True)]
        return out, keep, scores[keep]

    @torch.inference_mode()
    def detect(
        self,
        embedding: ImageEmbedding,
        text: str | None,
        exemplar_boxes: Sequence[Sequence[float]] = (),
        threshold: float = 0.5,
    ) -> MaskPrediction:
        """Every instance of a concept given by text and/or exemplar boxes (xyxy pixels), score > threshold."""
        out, keep, scores = self._detect(embedding, text, exemplar_boxes, threshold)
        return MaskPrediction(out.pred_masks[0][keep.to(self.device)].float().sigmoid(), scores, 0.5)

    @torch.inference_mode()
    def detect_boxes(
        self, embedding: ImageEmbedding, text: str, threshold: float = 0.5
    ) -> tuple[np.ndarray, np.ndarray]:
        """The detector's boxes [N, 4] (xyxy image pixels, float32) for every instance of `text`, best first."""
        out, keep, scores = self._detect(embedding, text, (), threshold)
        height, width = embedding.image_size
        boxes = out.pred_boxes[0][keep.to(self.device)].float().cpu() * torch.tensor([width, height, width, height])
        return boxes.numpy(), scores.numpy()

    @torch.inference_mode()
    def tracker_features(self, embedding: ImageEmbedding) -> list[torch.Tensor]:
        """The tracker's three feature levels `[1, C, H, W]` for the mask decoder.

        Like Meta's tracker (and transformers' video tracker), the lowest-resolution FPN level is
        dropped and the "no memory" embedding is added to the coarsest level kept. transformers'
        image-only `Sam3TrackerModel` adds it to the dropped level instead.
        """
        fpn, _ = self.tracker.vision_encoder.neck(self._spatial(embedding))
        levels = list(fpn[:-1])
        levels[0] = self.tracker.mask_decoder.conv_s0(levels[0])
        levels[1] = self.tracker.mask_decoder.conv_s1(levels[1])
        levels[-1] = levels[-1] + self.tracker.no_memory_embedding.view(1, -1, 1, 1)
        return levels

    def _to_model_frame(self, xy: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Pixel coordinates -> the square model input frame (each axis scaled on its own)."""
        height, width = image_size
        scale = torch.tensor([self.input_size / width, self.input_size / height], dtype=torch.float32)
        return (xy.reshape(*xy.shape[:-1], -1, 2) * scale).reshape(xy.shape)

    @torch.inference_mode()
    def decode(
        self,
        features: list[torch.Tensor],
        image_size: tuple[int, int],
        points: torch.Tensor | None,
        labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        multimask: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the tracker's decoder on P objects at once.

        `points` `[P, n, 2]`, `labels` `[P, n]`, `boxes` `[P, 4]` in image pixels.
        Returns mask logits `[P, K, h, w]` and predicted IoUs `[P, K]` (K = 3 with `multimask`, else 1).
        """
        prompt = {}
        if points is not None:
            prompt["input_points"] = self._to_model_frame(points, image_size)[None].to(self.device, self.dtype)
            prompt["input_labels"] = labels[None].to(self.device, torch.int32)
        if boxes is not None:
            prompt["input_boxes"] = self._to_model_frame(boxes, image_size)[None].to(self.device, self.dtype)
        out = self.tracker(image_embeddings=features, multimask_output=multimask, **prompt)
        return out.pred_masks[0].float(), out.iou_scores[0].float()

    @torch.inference_mode()
    def segment(self, embedding: ImageEmbedding, objects: Sequence[ObjectPrompt]) -> MaskPrediction:
        """One mask per object prompt, in the order given; the score is the predicted IoU.

        As in SAM 2, a lone click is ambiguous: three masks are decoded and the best kept.
        """
        features = self.tracker_features(embedding)
        maps, scores = [], []
        for prompt in objects:
            points = labels = boxes = None
            if prompt.points:
                points = torch.tensor([prompt.points], dtype=torch.float32)
                labels = torch.tensor([prompt.labels], dtype=torch.int64)
            if prompt.box is not None:
                boxes = torch.tensor([prompt.box], dtype=torch.float32)
            multimask = prompt.box is None and len(prompt.points or ()) == 1
            logits, iou = self.decode(features, embedding.image_size, points, labels, boxes, multimask)
            best = int(iou[0].argmax())
            maps.append(logits[0, best])
            scores.append(iou[0, best].cpu())
        if not maps:
            return MaskPrediction(torch.zeros(0, 1, 1, device=self.device), torch.zeros(0), 0.0)
        return MaskPrediction(torch.stack(maps), torch.stack(scores), 0.0)
