"""SAM 3D Objects pose decoding (models/sam3d_objects/layout.py) and the sparse-structure post-processing
(`prune_interior`, `downsample_coords` in sparse_structure_decoder.py).

The official reference values live in tests/fixtures/sam3d_objects_preprocess.npz (see the docstring of
tests/test_sam3d_objects_preprocess.py for the script that made it: official sam-3d-objects @ cf06676 with pytorch3d
@ 75ebeea transforms, CPU):
- pose_*: 8 seeded random latents (6drotation_normalized, translation, log scale, translation_scale), pointmap scale
  (isotropic) and shift, run through `inference_utils.pose_decoder("ScaleShiftInvariant")`, the output scale then
  multiplied by a downsample factor (1 or 2) as `InferencePipelinePointMap.run` does, and 5 object points per pose
  mapped with `compose_transform(scale, quaternion_to_matrix(rotation), translation).transform_points` (`make_scene`).
- ss_*: the occupied cells of a noisy ellipsoid in the 64³ grid (5067 rows), `prune_sparse_structure` with
  max_neighbor_axes_dist 1 and 2, and `downsample_sparse_structure` of the pruned rows with max_coords 1500 (no random
  subset) and 300 after `torch.manual_seed(11)` (random subset).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import roma
import torch

from models.sam3d_objects.layout import (
    ROTATION_6D_MEAN,
    ROTATION_6D_STD,
    ObjectPose,
    decode_pose,
    matrix_to_quaternion,
    quaternion_to_matrix,
    rotation_6d_to_matrix,
)
from models.sam3d_objects.sparse_structure_decoder import downsample_coords, prune_interior

FIXTURE = Path(__file__).parent / "fixtures" / "sam3d_objects_preprocess.npz"


@pytest.fixture(scope="module")
def official() -> dict[str, torch.Tensor]:
    with np.load(FIXTURE) as data:
        return {key: torch.from_numpy(data[key]) for key in data.files if key.startswith(("pose_", "ss_"))}


def random_rotations(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return roma.random_rotmat(n, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def test_rotation_6d_to_matrix_by_hand():
    a1, a2 = np.array([2.0, -1.0, 0.5]), np.array([0.3, 1.5, -2.0])
    b1 = a1 / np.linalg.norm(a1)
    b2 = a2 - b1.dot(a2) * b1
    b2 /= np.linalg.norm(b2)
    expected = np.stack([b1, b2, np.cross(b1, b2)], axis=1)  # columns
    ours = rotation_6d_to_matrix(torch.tensor(np.concatenate([a1, a2]), dtype=torch.float64))
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-12)
    assert math.isclose(np.linalg.det(ours.numpy()), 1.0, abs_tol=1e-12)


def test_matrix_to_quaternion_matches_roma():
    rotations = random_rotations(500, dtype=torch.float64)
    ours = matrix_to_quaternion(rotations)
    xyzw = roma.rotmat_to_unitquat(rotations)
    ref = torch.cat([xyzw[:, 3:], xyzw[:, :3]], dim=1)
    ref = torch.where(ref[:, :1] < 0, -ref, ref)  # PyTorch3D returns the w >= 0 representative
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)
    assert torch.all(ours[:, 0] >= 0)


def test_quaternion_matrix_round_trip():
    rotations = random_rotations(200, seed=1)
    quat = matrix_to_quaternion(rotations)
    torch.testing.assert_close(quaternion_to_matrix(quat), rotations, atol=1e-6, rtol=0)
    xyzw = torch.cat([quat[:, 1:], quat[:, :1]], dim=1)
    torch.testing.assert_close(quaternion_to_matrix(quat), roma.unitquat_to_rotmat(xyzw), atol=1e-6, rtol=0)
    # Non-unit quaternions give the same rotation; a half turn about z has w = 0 and stays as computed.
    torch.testing.assert_close(quaternion_to_matrix(3 * quat), rotations, atol=1e-6, rtol=0)
    half_turn = torch.diag(torch.tensor([-1.0, -1.0, 1.0]))
    assert torch.equal(matrix_to_quaternion(half_turn), torch.tensor([0.0, 0.0, 0.0, 1.0]))


def test_decode_pose_matches_official(official):
    for i in range(len(official["pose_rot6d"])):
        latents = {
            "6drotation_normalized": official["pose_rot6d"][i].view(1, 1, 6),
            "translation": official["pose_translation_in"][i].view(1, 1, 3),
            "scale": official["pose_scale_in"][i].view(1, 1, 3),
            "translation_scale": official["pose_translation_scale_in"][i].view(1, 1, 1),
        }
        scale, shift = official["pose_pointmap_scale"][i].expand(3)[None], official["pose_pointmap_shift"][i][None]
        pose = decode_pose(latents, scale, shift, int(official["pose_factor"][i]))
        torch.testing.assert_close(pose.rotation, official["pose_rotation"][i], atol=1e-6, rtol=0)
        torch.testing.assert_close(pose.translation, official["pose_translation"][i], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(pose.scale, official["pose_scale"][i], atol=1e-6, rtol=1e-6)
        cam = pose.apply(official["pose_points_obj"][i])
        torch.testing.assert_close(cam, official["pose_points_cam"][i], atol=1e-5, rtol=1e-6)


def test_decode_pose_composition_by_hand():
    # a1 = x axis, a2 = y axis give R = I once de-standardised.
    rot6d = (torch.tensor([1.0, 0, 0, 0, 1, 0]) - torch.tensor(ROTATION_6D_MEAN)) / torch.tensor(ROTATION_6D_STD)
    log_scale = torch.tensor([0.1, -0.2, 0.4])
    translation = torch.tensor([0.5, -1.0, 2.0])
    latents = {"6drotation_normalized": rot6d.view(1, 1, 6), "translation": translation, "scale": log_scale}
    pose = decode_pose(latents, torch.full((1, 3), 1.5), torch.tensor([[0.1, 0.2, 3.0]]), downsample_factor=2)
    torch.testing.assert_close(pose.rotation, torch.tensor([1.0, 0, 0, 0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(pose.scale, (log_scale.exp().mean() * 1.5 * 2).expand(3))
    torch.testing.assert_close(pose.translation, translation * 1.5 + torch.tensor([0.1, 0.2, 3.0]))


def test_object_pose_apply_and_matrix():
    rotation = random_rotations(1, seed=2)[0]
    pose = ObjectPose(torch.tensor([2.0, 2.0, 2.0]), matrix_to_quaternion(rotation), torch.tensor([0.1, -0.3, 4.0]))
    points = torch.rand(10, 3, generator=torch.Generator().manual_seed(3)) - 0.5
    expected = (2.0 * points) @ rotation + pose.translation  # row vectors
    torch.testing.assert_close(pose.apply(points), expected, atol=1e-6, rtol=0)
    matrix = pose.object_to_camera()
    homogeneous = torch.cat([points, torch.ones(10, 1)], dim=1)
    torch.testing.assert_close((homogeneous @ matrix.T)[:, :3], expected, atol=1e-6, rtol=0)
    back = ((expected - pose.translation) @ rotation.T) / pose.scale
    torch.testing.assert_close(back, points, atol=1e-6, rtol=0)


def test_prune_interior_matches_official(official):
    coords = official["ss_coords"].int()
    assert torch.equal(prune_interior(coords), official["ss_pruned"].int())
    assert torch.equal(prune_interior(coords, 2), official["ss_pruned_d2"].int())


def test_prune_interior_cube():
    cells = torch.stack(torch.meshgrid(*[torch.arange(3)] * 3, indexing="ij"), -1).reshape(-1, 3) + 10
    coords = torch.cat([torch.zeros(27, 1, dtype=torch.int32), cells.int()], dim=1)
    pruned = prune_interior(coords)
    assert len(pruned) == 26 and not (pruned[:, 1:] == 11).all(dim=1).any()
    assert pruned.dtype == torch.int32


def test_downsample_coords_matches_official(official):
    pruned = official["ss_pruned"].int()
    rows, factor = downsample_coords(pruned, max_coords=1500)
    assert factor == 2 and torch.equal(rows, official["ss_down_1500"].int())
    rows, factor = downsample_coords(pruned, max_coords=300, generator=torch.Generator().manual_seed(11))
    assert factor == 2 and torch.equal(rows, official["ss_down_300_seed11"].int())
    rows, factor = downsample_coords(pruned, max_coords=len(pruned))
    assert factor == 1 and rows is pruned
