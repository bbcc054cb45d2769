"""Files of a sam-3d-objects result: the posed scene as GLB and as a 3D Gaussian splat, and the artifacts ZIP.

Scene frame: the camera's, in glTF axes (x right, y up, the camera looking down -z, metres up to MoGe's
scale), the same frame as sam-3d-body's GLB. Objects come out of the decoders in their own frame
([-0.5, 0.5]³, Z up) and are placed by their predicted layout, which the release gives in the PyTorch3D
camera frame (x left, y up, z forward): a 180-degree turn about y away from glTF's.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Sequence

import numpy as np
import roma
import torch

from models.sam3d_objects.gaussian_decoder import splat_ply, splat_table
from models.sam3d_objects.predictor import ObjectResult
from pipeline.mesh_io import MeshNode, glb_bytes, write_ply
from pipeline.render import mask_png

PYTORCH3D_TO_GLTF = np.diag([-1.0, 1.0, -1.0])


def object_to_scene(result: ObjectResult) -> np.ndarray:
    """4x4 matrix taking object-frame points (column vectors) to the scene frame (glTF camera axes)."""
    to_scene = np.eye(4)
    to_scene[:3, :3] = PYTORCH3D_TO_GLTF
    return to_scene @ result.pose.object_to_camera().double().cpu().numpy()


def _transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def _vertex_colours(result: ObjectResult) -> np.ndarray:
    attrs = result.mesh.vertex_attrs
    colours = attrs[:, :3].float().cpu().numpy() if attrs is not None else np.full((len(result.mesh.vertices), 3), 0.8)
    return (np.clip(colours, 0.0, 1.0) * 255).round().astype(np.uint8)


def scene_glb(results: Sequence[ObjectResult]) -> bytes:
    """One node `object_i` per object: its mesh with vertex colours, placed in the scene frame."""
    nodes = []
    for i, result in enumerate(results):
        vertices = _transform(object_to_scene(result), result.mesh.vertices.double().cpu().numpy())
        faces = result.mesh.faces.cpu().numpy()
        nodes.append(MeshNode(f"object_{i}", vertices.astype(np.float32), faces, _vertex_colours(result)))
    return glb_bytes(nodes)


def scene_splat(results: Sequence[ObjectResult]) -> bytes:
    """Every object's Gaussians placed in the scene frame, in one standard 3DGS PLY.

    A Gaussian's centre is transformed, its rotation composed with the placement's and its log-scale
    shifted by the placement's (uniform) scale, so each splat keeps its shape in the scene.
    """
    tables = []
    for result in results:
        table = splat_table(result.gaussians).astype(np.float64)
        matrix = object_to_scene(result)
        linear = matrix[:3, :3]
        scale = float(np.cbrt(abs(np.linalg.det(linear))))
        turn = torch.from_numpy(linear / scale)
        table[:, 0:3] = _transform(matrix, table[:, 0:3])
        table[:, 10:13] += np.log(scale)
        wxyz = torch.nn.functional.normalize(torch.from_numpy(table[:, 13:17]), dim=1)
        composed = roma.quat_product(roma.rotmat_to_unitquat(turn)[None], wxyz[:, [1, 2, 3, 0]])
        table[:, 13:17] = composed[:, [3, 0, 1, 2]].numpy()
        tables.append(table)
    return splat_ply(np.concatenate(tables).astype(np.float32) if tables else np.zeros((0, 17), np.float32))


def object_metadata(results: Sequence[ObjectResult], scores: Sequence[float | None]) -> list[dict]:
    """Per object: its layout as the release reports it (PyTorch3D camera frame, rotation as a (w, x, y, z)
    unit quaternion) and `camera_pose`, the 4x4 object-to-camera matrix in that frame."""
    entries = []
    for i, (result, score) in enumerate(zip(results, scores, strict=True)):
        pose = result.pose
        entries.append(
            {
                "object_index": i,
                "score": None if score is None else round(float(score), 4),
                "scale": pose.scale.double().cpu().numpy().round(6).tolist(),
                "rotation": pose.rotation.double().cpu().numpy().round(6).tolist(),
                "translation": pose.translation.double().cpu().numpy().round(6).tolist(),
                "camera_pose": pose.object_to_camera().double().cpu().numpy().round(6).tolist(),
                "num_voxels": len(result.voxels),
                "num_gaussians": len(result.gaussians._xyz),
                "num_vertices": len(result.mesh.vertices),
                "num_faces": len(result.mesh.faces),
            }
        )
    return entries


def artifacts_zip(
    masks: Sequence[np.ndarray],
    pointmap: np.ndarray,
    intrinsics: np.ndarray,
    results: Sequence[ObjectResult],
    parameters: dict,
) -> bytes:
    """The processing artifacts: per object its mask, voxels, splat and mesh (object frame, as the release
    writes them), plus the image's pointmap and intrinsics and a JSON of the parameters and timings."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("pointmap.npy", _npy(pointmap.astype(np.float32)))
        archive.writestr("intrinsics.npy", _npy(intrinsics.astype(np.float32)))
        for i, (mask, result) in enumerate(zip(masks, results, strict=True)):
            archive.writestr(f"object_{i}/mask.png", mask_png(mask))
            archive.writestr(f"object_{i}/voxels.npy", _npy(result.voxels.cpu().numpy().astype(np.int32)))
            archive.writestr(f"object_{i}/gaussians.ply", splat_ply(splat_table(result.gaussians)))
            mesh = io.BytesIO()
            write_ply(
                mesh,
                result.mesh.vertices.float().cpu().numpy(),
                result.mesh.faces.cpu().numpy(),
                _vertex_colours(result),
            )
            archive.writestr(f"object_{i}/mesh.ply", mesh.getvalue())
        archive.writestr("parameters.json", json.dumps(parameters, indent=2))
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()
