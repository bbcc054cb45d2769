"""MHR meshes to SMPL / SMPL-X vertex order, by barycentric interpolation on the MHR surface.

Each target vertex is a fixed point of one MHR triangle (triangle id + barycentric weights), from the
precomputed mappings of facebookresearch/MHR (`assets/`, Apache-2.0). Interpolation is linear, so it
works on vertices in any frame and unit; SAM 3D Body outputs (metres, camera space) give SMPL(-X)
vertices in metres, camera space.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

ASSETS = Path(__file__).resolve().parent / "assets"
SMPLX_MAPPING = ASSETS / "mhr2smplx_mapping.npz"  # 10,475 SMPL-X vertices
SMPL_MAPPING = ASSETS / "mhr2smpl_mapping.npz"  # 6,890 SMPL vertices


@dataclass(frozen=True)
class TopologyMapping:
    """Target vertex i = sum_k barycentric[i, k] * vertices[faces[triangle_ids[i], k]]."""

    triangle_ids: np.ndarray  # (n_target,) int64, indices into the MHR faces
    barycentric: np.ndarray  # (n_target, 3) float64, rows sum to 1

    @property
    def n_target(self) -> int:
        return len(self.triangle_ids)

    def apply(self, vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
        """`vertices` (..., V, 3) on the MHR mesh `faces` (F, 3) -> (..., n_target, 3), in their dtype."""
        vertices = np.asarray(vertices)
        faces = np.asarray(faces)
        if vertices.ndim < 2 or vertices.shape[-1] != 3 or faces.ndim != 2 or faces.shape[1] != 3:
            raise ValueError(f"expected vertices (..., V, 3) and faces (F, 3), got {vertices.shape} and {faces.shape}")
        if self.triangle_ids.max() >= len(faces):
            raise ValueError(f"the mapping needs at least {self.triangle_ids.max() + 1} faces, got {len(faces)}")
        corners = faces[self.triangle_ids]  # (n, 3)
        weights = self.barycentric.astype(vertices.dtype if vertices.dtype.kind == "f" else np.float64)
        return np.einsum("...nkc,nk->...nc", vertices[..., corners, :], weights)


def load_mapping(path: str | Path) -> TopologyMapping:
    """Reads a MHR mapping `.npz` (`triangle_ids` (n,), `baryc_coords` (n, 3)), checking its shapes and weights."""
    with np.load(path, allow_pickle=False) as data:
        triangle_ids = data["triangle_ids"].astype(np.int64)
        barycentric = data["baryc_coords"].astype(np.float64)
    if triangle_ids.ndim != 1 or barycentric.shape != (len(triangle_ids), 3):
        raise ValueError(f"{path}: triangle_ids {triangle_ids.shape} and baryc_coords {barycentric.shape} disagree")
    if triangle_ids.min() < 0 or not np.allclose(barycentric.sum(axis=1), 1.0, atol=1e-6):
        raise ValueError(f"{path}: negative triangle ids or barycentric weights not summing to 1")
    return TopologyMapping(triangle_ids, barycentric)
