"""Object layout (pose) of SAM 3D Objects: the geometry flow's pose latents -> scale, rotation, translation.

The official `pose_decoder("ScaleShiftInvariant")` (pipeline/inference_utils.py, data/dataset/tdfy/pose_target.py):
the normalised 6D rotation is de-standardised and orthonormalised (Gram-Schmidt) into a rotation matrix, the scale is
exp(prediction), and the pose, predicted in the normalised pointmap space, is composed with the pointmap's
normalisation (scale, then shift) to land in the camera frame. Everything is in the PyTorch3D camera frame (x left,
y up, z forward) and, like PyTorch3D's `Transform3d`, acts on row vectors: X_cam = (scale ⊙ X_obj) @ R + t.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Statistics of the 6D rotation targets (official `ROTATION_6D_MEAN` / `ROTATION_6D_STD`).
ROTATION_6D_MEAN = (
    -0.06366084883674913,
    0.008438224692279752,
    0.00017084786438302483,
    0.0007126610473540038,
    -0.0030916726538816417,
    0.5166093753457688,
)
ROTATION_6D_STD = (
    0.6656971967514863,
    0.6787012271867754,
    0.30345010594844524,
    0.4394504420678794,
    0.39817973931717104,
    0.6176286868761914,
)


def rotation_6d_to_matrix(rot6d: torch.Tensor) -> torch.Tensor:
    """(..., 6) -> (..., 3, 3) with columns b1, b2, b3: b1 = a1/|a1|, b2 = the normalised part of a2 orthogonal to
    b1, b3 = b1 × b2 (a1 = rot6d[:3], a2 = rot6d[3:])."""
    a1, a2 = rot6d[..., :3], rot6d[..., 3:]
    b1 = F.normalize(a1, dim=-1)
    b2 = F.normalize(a2 - (b1 * a2).sum(dim=-1, keepdim=True) * b1, dim=-1)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1)


def matrix_to_quaternion(matrix: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) rotation matrices -> (..., 4) unit quaternions (w, x, y, z) with w >= 0 (PyTorch3D semantics).

    Of the four algebraically equal formulas (each divides by 4·|w|, 4·|x|, 4·|y| or 4·|z|), the one with the largest
    denominator is used; the result is negated when w < 0.
    """
    m = matrix.reshape(*matrix.shape[:-2], 9).unbind(-1)
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = m
    squares = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], dim=-1)
    q_abs = torch.sqrt(squares.clamp(min=0))
    # Row k equals 4·q_k·q and q_abs[k] = 2·|q_k|, so row k / (2·q_abs[k]) = ±q.
    by_component = torch.stack(
        [
            torch.stack([q_abs[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01], dim=-1),
            torch.stack([m21 - m12, q_abs[..., 1] ** 2, m10 + m01, m02 + m20], dim=-1),
            torch.stack([m02 - m20, m10 + m01, q_abs[..., 2] ** 2, m12 + m21], dim=-1),
            torch.stack([m10 - m01, m20 + m02, m21 + m12, q_abs[..., 3] ** 2], dim=-1),
        ],
        dim=-2,
    )
    candidates = by_component / (2 * q_abs[..., None].clamp(min=0.1))
    best = q_abs.argmax(dim=-1)[..., None, None].expand(*q_abs.shape[:-1], 1, 4)
    quat = candidates.gather(-2, best).squeeze(-2)
    return torch.where(quat[..., :1] < 0, -quat, quat)


def quaternion_to_matrix(quat: torch.Tensor) -> torch.Tensor:
    """(..., 4) quaternions (w, x, y, z), not necessarily unit -> (..., 3, 3) rotation matrices (PyTorch3D)."""
    w, x, y, z = quat.unbind(-1)
    two_s = 2.0 / (quat * quat).sum(-1)
    rows = (
        1 - two_s * (y * y + z * z),
        two_s * (x * y - z * w),
        two_s * (x * z + y * w),
        two_s * (x * y + z * w),
        1 - two_s * (x * x + z * z),
        two_s * (y * z - x * w),
        two_s * (x * z - y * w),
        two_s * (y * z + x * w),
        1 - two_s * (x * x + y * y),
    )
    return torch.stack(rows, dim=-1).reshape(*quat.shape[:-1], 3, 3)


@dataclass(frozen=True)
class ObjectPose:
    """Object-to-camera similarity in the PyTorch3D camera frame (x left, y up, z forward).

    scale (3,) (the official pipeline makes it isotropic), rotation (4,) unit quaternion (w, x, y, z), translation
    (3,). Object points are the decoders' [-0.5, 0.5]³ frame; they map as X_cam = (scale ⊙ X_obj) @ R + t (row
    vectors), R = `quaternion_to_matrix(rotation)`, as the official `make_scene` places the Gaussians.
    """

    scale: torch.Tensor
    rotation: torch.Tensor
    translation: torch.Tensor

    def rotation_matrix(self) -> torch.Tensor:
        """R (3, 3) of the row-vector convention X @ R."""
        return quaternion_to_matrix(self.rotation)

    def apply(self, points: torch.Tensor) -> torch.Tensor:
        """(N, 3) object-frame points -> (N, 3) camera-frame points."""
        return (points * self.scale) @ self.rotation_matrix() + self.translation

    def object_to_camera(self) -> torch.Tensor:
        """4x4 matrix M for column vectors, [X_cam; 1] = M [X_obj; 1]: M[:3, :3] = Rᵀ diag(scale), M[:3, 3] = t."""
        matrix = torch.eye(4, dtype=self.scale.dtype, device=self.scale.device)
        matrix[:3, :3] = self.rotation_matrix().T * self.scale
        matrix[:3, 3] = self.translation
        return matrix


def decode_pose(
    latents: Mapping[str, torch.Tensor],
    pointmap_scale: torch.Tensor,
    pointmap_shift: torch.Tensor,
    downsample_factor: int = 1,
) -> ObjectPose:
    """The geometry flow's final latents (batch 1) -> the object's camera-frame pose.

    Reads "6drotation_normalized" (6), "translation" (3) and "scale" (3, log-space); "translation_scale" is unused by
    this convention. `pointmap_scale` / `pointmap_shift` (3 values each) are the pointmap normalisation of
    `preprocess.structure_inputs`. scale = mean_xyz(exp(scale)·pointmap_scale)·downsample_factor (isotropic, as the
    official pipeline returns it); translation = translation·pointmap_scale + pointmap_shift.
    """
    rot6d = latents["6drotation_normalized"].reshape(6).float()
    rot6d = rot6d * rot6d.new_tensor(ROTATION_6D_STD) + rot6d.new_tensor(ROTATION_6D_MEAN)
    scene_scale, scene_shift = pointmap_scale.reshape(3).float(), pointmap_shift.reshape(3).float()
    scale = latents["scale"].reshape(3).float().exp() * scene_scale
    translation = latents["translation"].reshape(3).float() * scene_scale + scene_shift
    return ObjectPose(
        scale=scale.mean().expand(3) * downsample_factor,
        rotation=matrix_to_quaternion(rotation_6d_to_matrix(rot6d)),
        translation=translation,
    )
