"""Automatic mask generation ("segment everything") on the SAM 3 tracker, with SAM 2's semantics.

A `points_per_side` x `points_per_side` grid of single foreground clicks, spread evenly over
each axis of the image, is decoded in batches (three masks per click). Masks are kept when
their predicted IoU passes `pred_iou_thresh` and their stability score (IoU between the mask
thresholded at +1 and at -1 logit) passes `stability_score_thresh`; box NMS then removes
duplicates. Memory stays bounded whatever the grid: a batch keeps only each survivor's click,
mask index, score and box, and the final masks are decoded again from their clicks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import batched_nms

from models.sam3.predictor import ImageEmbedding, MaskPrediction, Sam3Predictor

STABILITY_OFFSET = 1.0
BOX_NMS_THRESH = 0.7
POINTS_PER_BATCH = 64


@dataclass
class AutomaticMaskConfig:
    points_per_side: int = 32
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    max_masks: int = 0  # 0: no limit
    points_per_batch: int = POINTS_PER_BATCH


def point_grid(points_per_side: int, image_size: tuple[int, int]) -> np.ndarray:
    """Click positions `[n*n, 2]` (x, y pixels): cell centres of an n x n grid over each axis.

    Scaling each axis by its own length (not by the longer side) covers non-square images evenly.
    """
    height, width = image_size
    offset = 1.0 / (2 * points_per_side)
    ticks = np.linspace(offset, 1 - offset, points_per_side)
    xs, ys = np.meshgrid(ticks * width, ticks * height)
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def stability_scores(logits: torch.Tensor, offset: float = STABILITY_OFFSET) -> torch.Tensor:
    """IoU of each mask thresholded at +offset and at -offset (the first lies inside the second)."""
    inner = (logits > offset).flatten(1).sum(1)
    outer = (logits > -offset).flatten(1).sum(1)
    return torch.where(outer > 0, inner / outer.clamp(min=1), torch.zeros_like(inner, dtype=torch.float32))


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes `[N, 4]` of boolean masks `[N, h, w]`: inclusive pixel xyxy, zeros when empty."""
    if len(masks) == 0:
        return torch.zeros(0, 4)
    rows, cols = masks.any(2), masks.any(1)
    h, w = masks.shape[1:]
    nonempty = rows.any(1)
    y0 = rows.float().argmax(1)
    y1 = h - 1 - rows.flip(1).float().argmax(1)
    x0 = cols.float().argmax(1)
    x1 = w - 1 - cols.flip(1).float().argmax(1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    return boxes * nonempty[:, None]


@torch.inference_mode()
def generate_masks(
    predictor: Sam3Predictor, embedding: ImageEmbedding, config: AutomaticMaskConfig
) -> tuple[MaskPrediction, np.ndarray]:
    """Masks for everything in the image, best first, and the click that produced each."""
    height, width = embedding.image_size
    features = predictor.tracker_features(embedding)
    grid = torch.from_numpy(point_grid(config.points_per_side, embedding.image_size)).float()

    clicks, choices, scores, boxes = [], [], [], []
    for start in range(0, len(grid), config.points_per_batch):
        points = grid[start : start + config.points_per_batch]
        labels = torch.ones(len(points), 1, dtype=torch.int64)
        logits, iou = predictor.decode(features, embedding.image_size, points[:, None], labels, None, True)
        logits, iou = logits.flatten(0, 1), iou.flatten().cpu()  # [B*3, h, w]
        keep = iou > config.pred_iou_thresh
        keep &= stability_scores(logits).cpu() >= config.stability_score_thresh
        binary = (logits[keep.to(logits.device)] > 0).cpu()
        nonempty = binary.flatten(1).any(1).tolist()
        h, w = logits.shape[1:]
        # Inclusive low-resolution pixels -> extents in image pixels (only NMS uses these).
        low_res = (mask_boxes(binary) + torch.tensor([0, 0, 1, 1])) * torch.tensor([width / w, height / h] * 2)
        index = torch.nonzero(keep).flatten()
        for j, flat in enumerate(index.tolist()):
            if nonempty[j]:
                clicks.append(start + flat // 3)
                choices.append(flat % 3)
                scores.append(float(iou[flat]))
                boxes.append(low_res[j])

    if not clicks:
        return MaskPrediction(torch.zeros(0, 1, 1), torch.zeros(0), 0.0), np.zeros((0, 2))
    scores_t = torch.tensor(scores)
    kept = batched_nms(torch.stack(boxes), scores_t, torch.zeros(len(scores), dtype=torch.int64), BOX_NMS_THRESH)
    if config.max_masks:
        kept = kept[: config.max_masks]

    # Decode the survivors again, one click each, to get their mask logits back.
    maps = []
    click_ids = torch.tensor(clicks)[kept]
    choice_ids = torch.tensor(choices)[kept]
    for start in range(0, len(kept), config.points_per_batch):
        points = grid[click_ids[start : start + config.points_per_batch]]
        labels = torch.ones(len(points), 1, dtype=torch.int64)
        logits, _ = predictor.decode(features, embedding.image_size, points[:, None], labels, None, True)
        picked = choice_ids[start : start + config.points_per_batch].to(logits.device)
        maps.append(logits[torch.arange(len(points), device=logits.device), picked])
    return MaskPrediction(torch.cat(maps), scores_t[kept], 0.0), grid[click_ids].numpy()
