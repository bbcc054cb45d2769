"""sam-3d-body: every person in an image as an MHR mesh in camera space (Segmind's parameters).

People come from the SAM 3 already loaded for sam3-image (text prompt "person", boxes enlarged
1.2x about their centre as the release's SAM 3 detector does), or, when `mask` is given, one
person whose box is the mask's bounding box and whose mask conditions the model. All people of
all images in a batch share the model's passes (one call per inference mode).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from models.sam3.predictor import Sam3Predictor
from models.sam3d_body.crop import default_intrinsics
from models.sam3d_body.predictor import BodyRequest, Mode, Sam3DBodyPredictor
from models.sam3d_body.smplx_fit import fit_smplx
from models.sam3d_body.topology import SMPLX_MAPPING, TopologyMapping, load_mapping
from pipeline.body_outputs import keypoints_json, person_ply, scene_glb, visualization_png
from pipeline.schemas import Sam3DBodyParams
from pipeline.task import TaskInput, TaskOutput
from pipeline.timing import StageTimer

PERSON_PROMPT = "person"
BOX_ENLARGE = 1.2
SMPLX_FIT_SECONDS = 20.0


def enlarge_boxes(boxes: np.ndarray, factor: float = BOX_ENLARGE) -> np.ndarray:
    """Scale xyxy boxes about their centres; the top-left corner is kept on the image, as released."""
    center = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) * factor / 2
    return np.concatenate([np.maximum(center - half, 0), center + half], axis=1).astype(np.float32)


def mask_box(mask: np.ndarray) -> np.ndarray:
    """[1, 4] xyxy box of a mask's foreground: (x, y, x + w, y + h) of its pixel bounding rectangle."""
    ys, xs = np.nonzero(mask)
    return np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=np.float32)


def _intrinsics(p: Sam3DBodyParams, width: int, height: int) -> np.ndarray:
    cam = default_intrinsics(width, height)
    if p.focal_length is not None:
        cam[0, 0] = cam[1, 1] = p.focal_length
    return cam


def _metadata(people: list[dict], scores: list[float | None], p: Sam3DBodyParams, mode: Mode) -> dict:
    entries = []
    for i, (person, score) in enumerate(zip(people, scores)):
        entry = {
            "person_id": i,
            "bbox": np.asarray(person["bbox"], dtype=np.float64).round(2).tolist(),
            "score": None if score is None else round(float(score), 4),
            "focal_length": round(float(person["focal_length"]), 3),
            "pred_cam_t": np.asarray(person["pred_cam_t"], dtype=np.float64).round(6).tolist(),
        }
        if p.include_keypoints:
            entry.update(keypoints_json(person))
        entries.append(entry)
    return {"num_people": len(people), "inference_mode": mode, "people": entries}


@functools.cache
def _smplx_mapping() -> TopologyMapping:
    """MHR -> SMPL-X barycentric mapping, read once per worker rather than per request."""
    return load_mapping(SMPLX_MAPPING)


def _smplx_json(people: list[dict], faces: np.ndarray, smplx_model: Path | None) -> bytes:
    """Per person: the mesh in SMPL-X vertex order (camera space, OpenCV axes, metres), and a fit if possible."""
    mapping = _smplx_mapping()
    vertices = [mapping.apply(np.asarray(p["pred_vertices"]) + np.asarray(p["pred_cam_t"]), faces) for p in people]
    entries: list[dict] = [{"person_id": i, "vertices": v.round(5).tolist()} for i, v in enumerate(vertices)]
    if smplx_model is not None and people:
        for entry, fit in zip(entries, fit_smplx(np.stack(vertices), smplx_model, max_seconds=SMPLX_FIT_SECONDS)):
            entry["faces"] = fit["faces"].tolist()
            entry["params"] = {k: np.asarray(v).round(6).tolist() for k, v in fit["params"].items()}
            entry["mean_error_m"] = round(float(fit["mean_error_m"]), 6)
    return json.dumps({"vertex_order": "smplx", "frame": "camera, OpenCV axes, metres", "people": entries}).encode()


def _render(
    item: TaskInput,
    people: list[dict],
    scores: list[float | None],
    faces: np.ndarray,
    mode: Mode,
    cam: np.ndarray,
    smplx_model: Path | None,
) -> TaskOutput:
    p: Sam3DBodyParams = item.params
    item.save("scene.glb", scene_glb(people, faces), "model/gltf-binary")
    principal = (float(cam[0, 2]), float(cam[1, 2]))
    item.save("visualization.png", visualization_png(item.image, people, faces, principal), "image/png")
    files: dict[str, str | list[str]] = {"visualization": "visualization.png"}
    if p.return_individual_meshes:
        names = [f"person_{i}.ply" for i in range(len(people))]
        for name, person in zip(names, people):
            item.save(name, person_ply(person, faces), "application/octet-stream")
        files["meshes"] = names
    if p.return_smplx:
        item.save("smplx.json", _smplx_json(people, faces, smplx_model), "application/json")
        files["smplx"] = "smplx.json"
    return TaskOutput(primary="scene.glb", files=files, data={"metadata": _metadata(people, scores, p, mode)})


def run(
    body: Sam3DBodyPredictor,
    sam3: Sam3Predictor | None,
    items: list[TaskInput],
    default_mode: Mode,
    smplx_model: Path | None = None,
) -> list[TaskOutput]:
    """Reconstruct the people of a batch of images."""
    timers = [StageTimer() for _ in items]
    boxes: list[np.ndarray] = []
    scores: list[list[float | None]] = []
    to_detect = [i for i, item in enumerate(items) if "mask" not in item.masks]
    embeddings = sam3.embed([(items[i].image_key, items[i].image) for i in to_detect]) if to_detect else []
    found = dict(zip(to_detect, embeddings))
    for i, item in enumerate(items):
        p: Sam3DBodyParams = item.params
        if i in found:
            if not found[i].cached:
                timers[i].add("embed", found[i].seconds)
            with timers[i]("detect"):
                detected, detected_scores = sam3.detect_boxes(found[i], PERSON_PROMPT, p.detection_threshold)
            boxes.append(enlarge_boxes(detected[: p.max_people]))
            scores.append([float(s) for s in detected_scores[: p.max_people]])
        else:
            boxes.append(mask_box(item.masks["mask"]))
            scores.append([None])

    requests = []
    for item, item_boxes in zip(items, boxes):
        height, width = item.image.shape[:2]
        masks = item.masks["mask"][None] if "mask" in item.masks else None
        requests.append(BodyRequest(item.image, item_boxes, masks, _intrinsics(item.params, width, height)))
    modes: list[Mode] = [item.params.inference_mode or default_mode for item in items]
    people: list[list[dict]] = [[] for _ in items]
    for mode in dict.fromkeys(modes):
        members = [i for i, m in enumerate(modes) if m == mode]
        shared = StageTimer()  # one pass for all the images of this mode
        with shared("mesh"):
            results = body.predict([requests[i] for i in members], mode=mode)
        for i, result in zip(members, results):
            people[i] = result
            timers[i].add("mesh", shared.seconds["mesh"])

    outputs = []
    for i, item in enumerate(items):
        with timers[i]("encode"):
            output = _render(item, people[i], scores[i], body.faces, modes[i], requests[i].cam_int, smplx_model)
        output.metrics.update(num_people=len(people[i]), stages=timers[i].rounded())
        outputs.append(output)
    return outputs
