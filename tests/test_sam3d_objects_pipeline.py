"""SAM 3D Objects end to end in process on the tiny random release: scene placement, splat transform, precision."""

from __future__ import annotations

import io

import numpy as np
import pytest
import roma
import torch

from models.sam3d_objects.checkpoint import load_sam3d_objects
from models.sam3d_objects.predictor import PRESETS, ObjectResult, Sam3DObjectsPredictor
from models.sam3d_objects.preprocess import structure_inputs
from pipeline.mesh_io import read_ply
from pipeline.object_outputs import PYTORCH3D_TO_GLTF, artifacts_zip, scene_glb, scene_splat
from tests.conftest import noise_image
from tests.test_sam3d_objects_contract import glb_json, splat_header

IMAGE = noise_image(80, 112, seed=9)
MASK = np.zeros((80, 112), dtype=bool)
MASK[15:60, 25:85] = True


def _load(weights, dtype: torch.dtype) -> Sam3DObjectsPredictor:
    release = weights / "sam-3d-objects" / "checkpoints"
    return Sam3DObjectsPredictor(load_sam3d_objects(release, weights / "moge" / "model.pt", "cpu", dtype))


@pytest.fixture(scope="module")
def predictor(objects_weights_dir) -> Sam3DObjectsPredictor:
    return _load(objects_weights_dir, torch.float32)


@pytest.fixture(scope="module")
def result(predictor) -> ObjectResult:
    return predictor.reconstruct(IMAGE, MASK, predictor.pointmap(IMAGE), seed=11)


def test_the_glb_holds_the_mesh_placed_by_the_layout(result):
    """Vertices go through the release's row-vector placement (X·s)·R + t, then PyTorch3D -> glTF axes."""
    glb = scene_glb([result])
    gltf = glb_json(glb)
    (accessor,) = [a for a in gltf["accessors"] if a.get("type") == "VEC3" and "min" in a]
    expected = result.pose.apply(result.mesh.vertices.float()).double().numpy() @ PYTORCH3D_TO_GLTF.T
    assert accessor["count"] == len(expected)
    np.testing.assert_allclose(accessor["min"], expected.min(axis=0), atol=1e-5)
    np.testing.assert_allclose(accessor["max"], expected.max(axis=0), atol=1e-5)


def test_splat_gaussians_keep_their_shape_in_the_scene(result):
    """Each scene covariance equals L Σ Lᵀ of the object-frame one, L the placement's linear part."""
    _, _, obj = splat_header(artifacts_member(result, "object_0/gaussians.ply"))
    _, _, scene = splat_header(scene_splat([result]))
    linear = PYTORCH3D_TO_GLTF @ result.pose.object_to_camera().double().numpy()[:3, :3]

    def covariances(rows: np.ndarray) -> np.ndarray:
        rotation = roma.unitquat_to_rotmat(
            torch.nn.functional.normalize(torch.from_numpy(rows[:, [14, 15, 16, 13]]).double(), dim=1)
        )
        scales = torch.from_numpy(np.exp(rows[:, 10:13])).double()
        return (rotation @ torch.diag_embed(scales**2) @ rotation.transpose(1, 2)).numpy()

    expected = linear @ covariances(obj) @ linear.T
    got = covariances(scene)
    np.testing.assert_allclose(got, expected, atol=1e-6 * np.abs(expected).max())
    centres = obj[:, :3] @ linear.T + (PYTORCH3D_TO_GLTF @ result.pose.translation.double().numpy())
    np.testing.assert_allclose(scene[:, :3], centres, atol=1e-5)
    np.testing.assert_array_equal(scene[:, 6:10], obj[:, 6:10])  # colour and opacity unchanged


def artifacts_member(result: ObjectResult, name: str) -> bytes:
    import zipfile

    data = artifacts_zip([MASK], np.zeros((80, 112, 3)), np.eye(3), [result], {"seed": 11})
    return zipfile.ZipFile(io.BytesIO(data)).read(name)


def test_artifact_mesh_is_the_object_frame_mesh_with_colours(result):
    mesh = read_ply(artifacts_member(result, "object_0/mesh.ply"))
    np.testing.assert_allclose(mesh.vertices, result.mesh.vertices.numpy(), atol=1e-6)
    assert mesh.faces.shape == tuple(result.mesh.faces.shape) and mesh.colors.shape == (len(mesh.vertices), 3)
    assert np.abs(mesh.vertices).max() <= 0.5 + 1e-3  # the decoders' [-0.5, 0.5]³ frame


def test_a_seed_gives_one_result_and_the_fast_preset_fewer_steps(predictor, result):
    pointmap = predictor.pointmap(IMAGE)
    again = predictor.reconstruct(IMAGE, MASK, pointmap, seed=11)
    assert torch.equal(again.gaussians._xyz, result.gaussians._xyz) and torch.equal(again.voxels, result.voxels)
    assert not torch.equal(predictor.reconstruct(IMAGE, MASK, pointmap, seed=12).pose.rotation, result.pose.rotation)
    fast = predictor.resolve(PRESETS["fast"])
    assert (fast.geometry_steps, fast.geometry_shortcut, fast.latent_steps) == (4, True, 12)


def test_bfloat16_weights_run_every_stage(objects_weights_dir, predictor):
    """Matrices in bf16 under autocast, as served on GPUs; norms, biases and code constants stay fp32.

    The condition tokens of the same inputs stay within 3% of fp32. (Whole results are not compared: the tiny
    random networks, guided sampling and MoGe's shift solve amplify bf16 rounding beyond any useful bound.)
    """
    half = _load(objects_weights_dir, torch.bfloat16)
    flow = half.models.ss_flow
    assert flow.blocks[0].cross_attn["shape"].to_q.weight.dtype == torch.bfloat16
    assert flow.t_embedder.freqs.dtype == torch.float32 and flow.blocks[0].norm2["shape"].weight.dtype == torch.float32
    pointmap = predictor.pointmap(IMAGE)
    rgb = torch.from_numpy(IMAGE).permute(2, 0, 1).float() / 255
    inputs = structure_inputs(rgb, torch.from_numpy(MASK).float(), pointmap.points, half.models.settings.ss_image_size)
    tokens = {}
    for name, model in (("fp32", predictor), ("bf16", half)):
        with model._precision():
            tokens[name] = model.models.ss_embedder(**inputs).float()
    error = (tokens["bf16"] - tokens["fp32"]).abs().max() / tokens["fp32"].abs().max()
    assert error < 0.03
    out = half.reconstruct(IMAGE, MASK, half.pointmap(IMAGE), seed=11)
    assert len(out.voxels) > 0 and len(out.mesh.faces) > 0 and len(out.gaussians._xyz) > 0
    assert all(torch.isfinite(v).all() for v in (out.pose.scale, out.pose.rotation, out.pose.translation))
