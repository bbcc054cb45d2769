"""Optional SMPL-X parameters for SAM 3D Body people, fitted to their meshes mapped to SMPL-X topology.

Works only when the user has put the SMPL-X model files (licensed separately by MPI, not shipped) in
`weights/smplx/`, e.g. `weights/smplx/SMPLX_NEUTRAL.npz`. Only `.npz` files are read, and only their
numeric arrays (no pickled objects), so a model file is loaded as data.

The fit: map the MHR vertices to the SMPL-X vertex order (`topology.py`), start from the closed-form
rigid alignment (Kabsch) of the rest-pose template to them, then minimise the mean squared vertex
distance over betas, global_orient, body_pose, both hands' full axis-angle poses and transl with Adam,
for a bounded number of steps and seconds. All people of an image are fitted as one batch.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TypedDict

import numpy as np
import smplx
import torch

# Arrays smplx.SMPLX reads from a model file (without the optional face-contour landmarks).
MODEL_KEYS = (
    "v_template",
    "shapedirs",
    "posedirs",
    "J_regressor",
    "weights",
    "kintree_table",
    "f",
    "hands_componentsl",
    "hands_componentsr",
    "hands_meanl",
    "hands_meanr",
    "lmk_faces_idx",
    "lmk_bary_coords",
)
FIT_PARAMS = ("betas", "global_orient", "body_pose", "left_hand_pose", "right_hand_pose", "transl")
NUM_BETAS = 10
SMPLX_VERTICES = 10475


class SmplxFit(TypedDict):
    faces: np.ndarray  # (20908, 3) SMPL-X triangles
    params: dict[str, np.ndarray]  # FIT_PARAMS, axis-angle poses, hand poses flat (not relative to a mean)
    fitted_vertices: np.ndarray  # (10475, 3), same frame and units as the targets
    mean_error_m: float  # mean distance between fitted and target vertices


def find_smplx_model(weights_dir: str | Path, gender: str = "neutral") -> Path | None:
    """`<weights_dir>/smplx/SMPLX_<GENDER>.npz` if the user has placed it there, else None."""
    path = Path(weights_dir) / "smplx" / f"SMPLX_{gender.upper()}.npz"
    return path if path.is_file() else None


def load_smplx(model_path: str | Path, batch_size: int, device: str | torch.device = "cpu") -> smplx.SMPLX:
    """An `smplx.SMPLX` body model for `batch_size` people, built from the numeric arrays of `model_path`.

    smplx itself would unpickle whatever the file holds; the arrays it needs are copied to a temporary
    `.npz` first (`allow_pickle=False`), which also drops the object arrays real model files carry.
    """
    with np.load(model_path, allow_pickle=False) as data:
        missing = [key for key in MODEL_KEYS if key not in data.files]
        if missing:
            raise ValueError(f"{model_path} is not an SMPL-X model file: missing {', '.join(missing)}")
        arrays = {key: data[key] for key in MODEL_KEYS}
    with tempfile.TemporaryDirectory() as tmp:
        clean = Path(tmp) / "SMPLX_MODEL.npz"
        np.savez(clean, **arrays)
        model = smplx.SMPLX(
            str(clean),
            ext="npz",
            batch_size=batch_size,
            num_betas=NUM_BETAS,
            use_pca=False,
            flat_hand_mean=True,
        )
    return model.to(device)


def kabsch(source: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotations R (B, 3, 3) and translations t (B, 3) minimising |R source + t - target|, per target."""
    source_mean = source.mean(axis=0)
    target_means = targets.mean(axis=1)
    covariance = np.einsum("vi,bvj->bij", source - source_mean, targets - target_means[:, None])
    u, _, vt = np.linalg.svd(covariance)
    sign = np.sign(np.linalg.det(np.einsum("bij,bjk->bik", u, vt)))
    fix = np.stack([np.ones_like(sign), np.ones_like(sign), sign], axis=1)
    rotations = np.einsum("bji,bj,bkj->bik", vt, fix, u)
    return rotations, target_means - np.einsum("bij,j->bi", rotations, source_mean)


def matrix_to_axis_angle(rotations: np.ndarray) -> np.ndarray:
    """(B, 3, 3) rotation matrices to axis-angle (B, 3), through quaternions (exact at 180 degrees too)."""
    m = rotations
    trace = np.trace(m, axis1=1, axis2=2)
    candidates = np.stack([trace, m[:, 0, 0], m[:, 1, 1], m[:, 2, 2]], axis=1)
    best = candidates.argmax(axis=1)
    quaternions = np.empty((len(m), 4))  # w, x, y, z
    for i, (rot, k) in enumerate(zip(m, best)):
        if k == 0:
            s = np.sqrt(1.0 + trace[i]) * 2
            q = [s / 4, (rot[2, 1] - rot[1, 2]) / s, (rot[0, 2] - rot[2, 0]) / s, (rot[1, 0] - rot[0, 1]) / s]
        else:
            a, b, c = k - 1, k % 3, (k + 1) % 3
            s = np.sqrt(1.0 + rot[a, a] - rot[b, b] - rot[c, c]) * 2
            q = np.empty(4)
            q[0] = (rot[c, b] - rot[b, c]) / s
            q[1 + a] = s / 4
            q[1 + b] = (rot[b, a] + rot[a, b]) / s
            q[1 + c] = (rot[c, a] + rot[a, c]) / s
        quaternions[i] = q
    quaternions *= np.where(quaternions[:, :1] < 0, -1.0, 1.0)
    sin_half = np.linalg.norm(quaternions[:, 1:], axis=1)
    angle = 2 * np.arctan2(sin_half, quaternions[:, 0])
    scale = np.where(sin_half > 1e-12, angle / np.maximum(sin_half, 1e-12), 2.0)
    return quaternions[:, 1:] * scale[:, None]


def fit_smplx(
    targets: np.ndarray,
    model_path: str | Path,
    *,
    steps: int = 400,
    max_seconds: float = 60.0,
    learning_rate: float = 0.02,
    device: str | torch.device = "cpu",
) -> list[SmplxFit]:
    """SMPL-X fits to `targets` (B, 10475, 3): vertices in SMPL-X order, metres, any rigid frame.

    Stops after `steps` Adam steps or `max_seconds`, whichever comes first; returns one fit per target.
    """
    targets = np.asarray(targets, dtype=np.float64)
    if targets.ndim != 3 or targets.shape[1:] != (SMPLX_VERTICES, 3):
        raise ValueError(f"targets must be (B, {SMPLX_VERTICES}, 3), got {targets.shape}")
    started = time.monotonic()
    batch = len(targets)
    model = load_smplx(model_path, batch, device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    with torch.no_grad():
        rest = model()
    template = rest.vertices[0].double().cpu().numpy()
    root = rest.joints[0, 0].double().cpu().numpy()
    rotations, translations = kabsch(template, targets)
    # The model turns about its root joint: v = R (v_rest - root) + root + transl.
    initial = {
        "global_orient": matrix_to_axis_angle(rotations),
        "transl": translations + np.einsum("bij,j->bi", rotations, root) - root,
    }
    params = {name: getattr(model, name) for name in FIT_PARAMS}
    with torch.no_grad():
        for name, value in initial.items():
            params[name].copy_(torch.as_tensor(value, dtype=params[name].dtype))
    for parameter in params.values():
        parameter.requires_grad_(True)

    target_tensor = torch.as_tensor(targets, dtype=torch.float32, device=device)
    optimizer = torch.optim.Adam(params.values(), lr=learning_rate)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1), eta_min=learning_rate / 20)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = (model().vertices - target_tensor).square().sum(dim=-1).mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if time.monotonic() - started > max_seconds:
            break

    with torch.no_grad():
        fitted = model().vertices.double().cpu().numpy()
    errors = np.linalg.norm(fitted - targets, axis=-1).mean(axis=1)
    faces = np.asarray(model.faces, dtype=np.int64)
    values = {name: parameter.detach().double().cpu().numpy() for name, parameter in params.items()}
    return [
        SmplxFit(
            faces=faces,
            params={name: value[i] for name, value in values.items()},
            fitted_vertices=fitted[i],
            mean_error_m=float(errors[i]),
        )
        for i in range(batch)
    ]
