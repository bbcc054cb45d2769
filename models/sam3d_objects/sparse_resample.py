"""Sparse voxel down/upsampling by an integer factor, as the official `SparseDownsample` / `SparseUpsample`
(tdfy_dit/modules/sparse/spatial.py): average pooling onto the coarse cells and nearest-neighbour copy back.

The official pooling is `torch.scatter_reduce(zeros, ..., reduce="mean")` with the default `include_self=True`, so
the zero initial value counts in the mean: a coarse cell holding n fine voxels gets sum / (n + 1). That is kept for
parity. Coarse voxels are ordered by their linearised (batch, x, y, z) code, as in the official `unique`.
"""

from __future__ import annotations

import torch

from models.sam3d_objects.sparse_attention import SparseVoxels


def downsample(x: SparseVoxels, factor: int = 2) -> tuple[SparseVoxels, torch.Tensor]:
    """Coarse voxels (coords // factor, pooled feats) and the (N_fine,) index of each fine voxel's coarse cell."""
    coord = list(x.coords.unbind(dim=-1))
    for i in range(1, 4):
        coord[i] = coord[i] // factor
    size = [int(coord[i].max()) + 1 for i in range(1, 4)]
    offset = [size[0] * size[1] * size[2], size[1] * size[2], size[2], 1]
    code = sum(c.long() * o for c, o in zip(coord, offset, strict=True))
    code, idx = code.unique(return_inverse=True)
    feats = torch.scatter_reduce(
        x.feats.new_zeros(code.shape[0], x.feats.shape[1]),
        dim=0,
        index=idx.unsqueeze(1).expand(-1, x.feats.shape[1]),
        src=x.feats,
        reduce="mean",
    )
    coords = torch.stack([code // offset[0]] + [(code // offset[i + 1]) % size[i] for i in range(3)], dim=-1)
    return SparseVoxels(coords.to(x.coords.dtype), feats), idx


def upsample(x: SparseVoxels, fine_coords: torch.Tensor, idx: torch.Tensor) -> SparseVoxels:
    """Inverse of `downsample`: every fine voxel takes the feats of its coarse cell."""
    return SparseVoxels(fine_coords, x.feats[idx])
