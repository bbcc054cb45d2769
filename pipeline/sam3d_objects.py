"""sam-3d-objects: the prompted object(s) of an image as a posed 3D mesh and Gaussian splat (Segmind's parameters).

The object comes from `mask`, or from the SAM 3 already loaded for sam3-image: a text `prompt` gives the
best-scoring instance (up to `max_objects` of them), `bounding_box` and/or `point_coords` give the one object
they select. The pointmap is computed once per image and shared by its objects; each object is then
reconstructed with the request's seed, so its result does not depend on the rest of the batch.
"""

from __future__ import annotations

from dataclasses import asdict, replace

import numpy as np

from models.sam3.predictor import ImageEmbedding, ObjectPrompt, Sam3Predictor
from models.sam3d_objects.predictor import (
    PRESETS,
    EmptyStructureError,
    ObjectResult,
    Sam3DObjectsPredictor,
    SamplingPlan,
)
from pipeline.object_outputs import artifacts_zip, object_metadata, scene_glb, scene_splat
from pipeline.schemas import Sam3DObjectsParams
from pipeline.task import TaskError, TaskInput, TaskOutput
from pipeline.timing import StageTimer

GLB_TYPE = "model/gltf-binary"
PLY_TYPE = "application/octet-stream"


def sampling_plan(p: Sam3DObjectsParams) -> SamplingPlan:
    plan = PRESETS[p.preset]
    return replace(
        plan,
        geometry_steps=p.geometry_steps or plan.geometry_steps,
        latent_steps=p.latent_steps or plan.latent_steps,
    )


def _usable(mask: np.ndarray) -> bool:
    """The release crops around the mask and needs its pixel bounds to span at least 2 on each axis."""
    ys, xs = np.nonzero(mask)
    return len(xs) > 0 and xs.max() - xs.min() >= 2 and ys.max() - ys.min() >= 2


def _object_masks(
    sam3: Sam3Predictor, item: TaskInput, embedding: ImageEmbedding | None, timer: StageTimer
) -> tuple[list[np.ndarray], list[float | None]] | TaskError:
    """The masks (H, W bool) of the objects to reconstruct, best first, with their SAM 3 scores. `embedding`
    is the image's SAM 3 embedding, None when the request gives its mask."""
    p: Sam3DObjectsParams = item.params
    if embedding is None:
        if not _usable(item.masks["mask"]):
            return TaskError("mask: the object must span at least 3 pixels across and down")
        return [item.masks["mask"].astype(bool)], [None]
    if not embedding.cached:
        timer.add("embed", embedding.seconds)
    size = item.image.shape[:2]
    with timer("segment"):
        if p.prompt:
            found = sam3.detect(embedding, p.prompt, threshold=p.detection_threshold)
            masks = found.to_image(size, slice(0, p.max_objects)).numpy()
            scores = found.scores[: p.max_objects].tolist()
            keep = [i for i, m in enumerate(masks) if _usable(m)]
            if not keep:
                return TaskError(f"no object matched prompt {p.prompt!r} (detection_threshold {p.detection_threshold})")
            return [masks[i] for i in keep], [scores[i] for i in keep]
        points = [tuple(xy) for xy in p.point_coords] if p.point_coords else None
        prompt = ObjectPrompt(points, p.labels if points else None, tuple(p.bounding_box) if p.bounding_box else None)
        found = sam3.segment(embedding, [prompt])
        mask = found.to_image(size)[0].numpy()
    if not _usable(mask):
        return TaskError("the bounding_box / point_coords prompt selected no object (an empty or tiny mask)")
    return [mask], [float(found.scores[0])]


def _run_one(
    predictor: Sam3DObjectsPredictor, sam3: Sam3Predictor, item: TaskInput, embedding: ImageEmbedding | None
) -> TaskOutput | TaskError:
    p: Sam3DObjectsParams = item.params
    timer = StageTimer()
    selected = _object_masks(sam3, item, embedding, timer)
    if isinstance(selected, TaskError):
        return selected
    masks, scores = selected
    plan = predictor.resolve(sampling_plan(p))
    with timer("pointmap"):
        pointmap = predictor.pointmap(item.image)
    results: list[ObjectResult] = []
    for index, mask in enumerate(masks):
        try:
            result = predictor.reconstruct(item.image, mask, pointmap, p.seed, plan)
        except EmptyStructureError as exc:
            return TaskError(f"object {index}: {exc}")
        for stage, seconds in result.seconds.items():
            timer.add(stage, seconds)
        results.append(result)

    metadata = object_metadata(results, scores)
    with timer("encode"):
        item.save("scene.glb", scene_glb(results), GLB_TYPE)
        item.save("scene.ply", scene_splat(results), PLY_TYPE)
        files: dict[str, str | list[str]] = {"gaussian_splat": "scene.ply"}
        if len(results) > 1:
            files["individual_glbs"] = [f"object_{i}.glb" for i in range(len(results))]
            files["individual_splats"] = [f"object_{i}.ply" for i in range(len(results))]
            for i, result in enumerate(results):
                item.save(f"object_{i}.glb", scene_glb([result]), GLB_TYPE)
                item.save(f"object_{i}.ply", scene_splat([result]), PLY_TYPE)
        if p.include_artifacts:
            parameters = {
                "params": p.model_dump(),
                "sampling": asdict(plan),
                "metadata": metadata,
                "stages": timer.rounded(),
            }
            archive = artifacts_zip(
                masks, pointmap.points.cpu().numpy(), pointmap.intrinsics.cpu().numpy(), results, parameters
            )
            item.save("artifacts.zip", archive, "application/zip")
            files["artifacts"] = "artifacts.zip"
    output = TaskOutput(primary="scene.glb", files=files, data={"metadata": metadata})
    output.metrics.update(num_objects=len(results), stages=timer.rounded())
    return output


def run(predictor: Sam3DObjectsPredictor, sam3: Sam3Predictor, items: list[TaskInput]) -> list[TaskOutput | TaskError]:
    """Reconstruct the prompted objects of a batch of images, one object after another. The images that need
    SAM 3 share one embedding call (a batched ViT pass where the device gains from it)."""
    prompted = [i for i, item in enumerate(items) if "mask" not in item.masks]
    embeddings = sam3.embed([(items[i].image_key, items[i].image) for i in prompted]) if prompted else []
    found = dict(zip(prompted, embeddings))
    return [_run_one(predictor, sam3, item, found.get(i)) for i, item in enumerate(items)]
