"""Compare our models with the official implementations' recorded outputs.

    python tests/parity/run.py sam3d-body FIXTURE_DIR
    python tests/parity/run.py sam3d-objects FIXTURE_DIR

A sam3d-body fixture folder holds the model files in release layout, an `input.json` and the official
outputs (`expected.npz` for "body" mode, `expected_full.npz` for "full"). A sam3d-objects folder is a set
(e.g. parity_a) with one subfolder per component (condition_embedder, moge, ss_generator, ...; see
`sam3d_objects.py`); absent components are skipped. Prints the max error of every compared array and exits
1 when one is above its tolerance (2 when the folder is unusable).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script: make `tests.parity` importable
    sys.path.insert(0, str(REPO))

from tests.parity.sam3d_objects import FixtureError, components_in, run_sam3d_objects  # noqa: E402

# Tolerances from the fixtures' READMEs: fp32 noise of the official runs is <= 5e-5 px and <= 6e-7 m.
TOL_2D_PX = 1e-3
TOL_3D = 1e-5
TOL_FEATURES = 1e-4
PIXEL_KEYS = {"pred_keypoints_2d", "lhand_bbox", "rhand_bbox", "bbox", "batch/affine_trans"}


def _tolerance(key: str) -> float:
    key = key.split(":", 1)[-1]
    if key in PIXEL_KEYS or key.endswith("keypoints_2d"):
        return TOL_2D_PX
    if key.startswith(("interm/", "batch/")):
        return TOL_FEATURES
    return TOL_3D


def _load_masks(folder: Path, spec: object, count: int, size: tuple[int, int]) -> np.ndarray | None:
    """Masks named in input.json: one .npy/.npz [N, H, W], or image file(s), one per box.

    Values are passed on as stored (uint8), as the official estimator takes them: it casts to uint8
    and expects 0/1.
    """
    if spec is None:
        return None
    if isinstance(spec, dict):  # {"file": ..., ...}
        spec = spec.get("file") or spec.get("path") or spec.get("files")
    names = spec if isinstance(spec, list) else [spec]
    if len(names) == 1 and str(names[0]).endswith((".npy", ".npz")):
        loaded = np.load(folder / names[0])
        masks = loaded[loaded.files[0]] if isinstance(loaded, np.lib.npyio.NpzFile) else loaded
    else:
        masks = np.stack([np.array(Image.open(folder / n).convert("L")) for n in names])
    masks = masks.reshape(-1, size[1], size[0]).astype(np.uint8)
    print(f"masks: {masks.shape}, values {np.unique(masks).tolist()[:8]}")
    if len(masks) != count:
        raise SystemExit(f"{folder}: {len(masks)} masks for {count} boxes")
    return masks


def run_sam3d_body(folder: Path) -> list[tuple[str, float, float]]:
    from models.sam3d_body.checkpoint import load_sam3d_body
    from models.sam3d_body.crop import crop_rays
    from models.sam3d_body.predictor import BodyRequest, Sam3DBodyPredictor

    spec = json.loads((folder / "input.json").read_text())
    image = np.array(Image.open(folder / spec["image"]).convert("RGB"))
    boxes = np.asarray(spec["bboxes_xyxy"], dtype=np.float32)
    mask_spec = spec.get("mask", spec.get("masks"))
    masks = _load_masks(folder, mask_spec, len(boxes), (image.shape[1], image.shape[0]))
    cam_int = None if spec.get("cam_int") is None else np.asarray(spec["cam_int"], dtype=np.float32).reshape(3, 3)
    model = load_sam3d_body(folder, mhr_path=folder / "mhr_stub.pt")
    predictor = Sam3DBodyPredictor(model)
    request = BodyRequest(image, boxes, masks, cam_int)

    rows: list[tuple[str, float, float]] = []

    def compare(key: str, ours: np.ndarray, expected: np.ndarray) -> None:
        ours = np.asarray(ours, dtype=np.float64).reshape(expected.shape)
        rows.append((key, float(np.abs(ours - expected).max()) if expected.size else 0.0, _tolerance(key)))

    for mode, file in (("body", "expected.npz"), ("full", "expected_full.npz")):
        if not (folder / file).is_file():
            continue
        expected = np.load(folder / file)
        people = predictor.predict([request], mode=mode)[0]
        for key in people[0]:
            if key in expected.files:
                compare(f"{mode}:{key}", np.stack([p[key] for p in people]), expected[key])
        compare(f"{mode}:faces", predictor.faces, expected["faces"])
        if mode == "body":
            # The first stages, so that a mismatch points at its cause.
            from models.sam3d_body.crop import BODY_PADDING, crop_people

            crops = crop_people(image, boxes, model.image_size, BODY_PADDING, masks)
            compare("batch/img", crops.images, expected["batch/img"])
            compare("batch/affine_trans", crops.affines, expected["batch/affine_trans"])
            cams = torch.from_numpy(request.intrinsics())[None].expand(len(boxes), -1, -1)
            with torch.inference_mode():
                compare("batch/ray_cond", crop_rays(crops.affines, cams, model.image_size), expected["batch/ray_cond"])
                features = model.encode(crops.images)
                compare("interm/backbone_call0/features", features, expected["interm/backbone_call0/features"])
    return rows


RUNNERS: dict[str, Callable[[Path], list[tuple[str, float, float]]]] = {
    "sam3d-body": run_sam3d_body,
    "sam3d-objects": run_sam3d_objects,
}


def _unusable(model: str, folder: Path) -> str | None:
    """Why `folder` is not a fixture folder for `model`, or None."""
    if model == "sam3d-objects":
        if not components_in(folder):
            return f"{folder}: no SAM 3D Objects component folder, not a parity set"
    elif not (folder / "input.json").is_file():
        return f"{folder}: no input.json, not a fixture folder"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=sorted(RUNNERS))
    parser.add_argument("fixture", type=Path)
    args = parser.parse_args(argv)
    problem = _unusable(args.model, args.fixture)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    torch.set_num_threads(min(2, torch.get_num_threads()))
    try:
        rows = RUNNERS[args.model](args.fixture)
    except FixtureError as error:
        print(error, file=sys.stderr)
        return 2
    if not rows:
        print(f"{args.fixture}: no expected outputs found", file=sys.stderr)
        return 2
    failed = 0
    width = max(45, *(len(key) for key, _, _ in rows))
    for key, error, tol in rows:
        ok = error <= tol
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {key:{width}s} max abs {error:.3e}  (tol {tol:.0e})")
    print(f"{len(rows) - failed}/{len(rows)} within tolerance")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
