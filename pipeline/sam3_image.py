"""sam3-image: promptable segmentation of one image (Segmind's parameters), best masks first.

Prompts and what answers them:
- `text_prompt`: every instance of the concept (SAM 3 detector), scored above `threshold`.
- `boxes_input` with `box_prompt_mode="object"` (default): each box selects one object (tracker).
  With `box_prompt_mode="exemplar"`: the boxes are visual examples of the concept and the
  detector returns every instance like them, together with `text_prompt` when given.
- `points_input` (+ `point_labels_input`, 1 foreground / 0 background): one object (tracker).
  In object mode with exactly one box, the clicks refine that box's object.
- No prompt: automatic mask generation over a `points_per_side` grid.
A concept prompt and object prompts may be combined: their masks are pooled, best first.
"""

from __future__ import annotations

from models.sam3.automatic import AutomaticMaskConfig, generate_masks, mask_boxes
from models.sam3.predictor import ImageEmbedding, MaskPrediction, ObjectPrompt, Sam3Predictor
from pipeline.render import MaskCanvas, mask_png
from pipeline.schemas import Sam3ImageParams
from pipeline.task import TaskInput, TaskOutput
from pipeline.timing import StageTimer

# Full-size float maps resized per chunk: about 128 MB at a time, whatever the image size.
RENDER_BUDGET_BYTES = 128 * 2**20


def _predict(
    predictor: Sam3Predictor, embedding: ImageEmbedding, p: Sam3ImageParams, stages: StageTimer
) -> tuple[MaskPrediction, list]:
    """Every mask the prompts ask for, with the prompt that produced each."""
    parts: list[MaskPrediction] = []
    sources: list[str] = []
    exemplars = p.boxes_input if p.box_prompt_mode == "exemplar" else None
    if p.text_prompt or exemplars:
        with stages("detect"):
            found = predictor.detect(embedding, p.text_prompt, exemplars or (), p.threshold)
        parts.append(found)
        sources += ["text_prompt" if p.text_prompt else "boxes_input"] * len(found)

    objects: list[ObjectPrompt] = []
    object_boxes = p.boxes_input if p.box_prompt_mode == "object" else None
    if p.points_input and object_boxes and len(object_boxes) == 1:
        objects.append(ObjectPrompt(p.points_input, p.point_labels, tuple(object_boxes[0])))
        sources.append("points_input+boxes_input[0]")
    else:
        for i, box in enumerate(object_boxes or []):
            objects.append(ObjectPrompt(box=tuple(box)))
            sources.append(f"boxes_input[{i}]")
        if p.points_input:
            objects.append(ObjectPrompt(p.points_input, p.point_labels))
            sources.append("points_input")
    if objects:
        with stages("mask"):
            parts.append(predictor.segment(embedding, objects))

    if not (p.text_prompt or p.points_input or p.boxes_input):
        config = AutomaticMaskConfig(p.points_per_side, p.pred_iou_thresh, p.stability_score_thresh, p.max_masks)
        with stages("mask"):
            found, _ = generate_masks(predictor, embedding, config)
        parts.append(found)
        sources += ["auto"] * len(found)

    masks = MaskPrediction.concat(parts)
    order = masks.scores.argsort(descending=True, stable=True)
    if p.max_masks:
        order = order[: p.max_masks]
    return masks.select(order.to(masks.maps.device)), [sources[i] for i in order.tolist()]


def _render(item: TaskInput, masks: MaskPrediction, sources: list[str]) -> TaskOutput:
    p: Sam3ImageParams = item.params
    height, width = item.image.shape[:2]
    count = len(masks)
    canvas = MaskCanvas(item.image, count)
    boxes: list[list[int]] = []
    areas: list[int] = []
    mask_files: list[str] = []
    chunk = max(1, RENDER_BUDGET_BYTES // (height * width * 4))
    for start in range(0, count, chunk):
        binary = masks.to_image((height, width), slice(start, start + chunk))
        boxes += mask_boxes(binary).int().tolist()
        areas += binary.flatten(1).sum(1).tolist()
        binary = binary.numpy()
        canvas.paint(start, binary)
        if p.return_masks:
            for offset, mask in enumerate(binary):
                name = f"mask_{start + offset:03d}.png"
                item.save(name, mask_png(mask), "image/png")
                mask_files.append(name)

    files: dict[str, str | list[str]] = {}
    if p.return_preview:
        item.save("preview.png", canvas.preview(), "image/png")
        files["preview"] = "preview.png"
    if p.return_overlay:
        item.save("overlay.png", canvas.overlay(), "image/png")
        files["overlay"] = "overlay.png"
    if p.return_masks:
        files["masks"] = mask_files
    primary = files.get("preview") or files.get("overlay") or (mask_files[0] if mask_files else None)
    data = {
        "num_masks": count,
        "boxes": boxes,
        "scores": [round(float(s), 6) for s in masks.scores],
        "areas": areas,
        "sources": sources,
        "image_size": [width, height],
    }
    return TaskOutput(primary=primary, files=files, data=data)


def run(predictor: Sam3Predictor, items: list[TaskInput]) -> list[TaskOutput]:
    """Segment a batch of images: one batched ViT pass over the images not in the cache."""
    embeddings = predictor.embed([(item.image_key, item.image) for item in items])
    outputs = []
    for item, embedding in zip(items, embeddings):
        stages = StageTimer()
        if not embedding.cached:
            stages.add("embed", embedding.seconds)
        masks, sources = _predict(predictor, embedding, item.params, stages)
        with stages("encode"):
            output = _render(item, masks, sources)
        output.metrics.update(embedding_cache_hit=embedding.cached, stages=stages.rounded())
        outputs.append(output)
    return outputs
