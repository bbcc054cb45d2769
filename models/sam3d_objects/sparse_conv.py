"""Submanifold sparse 3-D convolution in plain torch (replaces spconv's `SubMConv3d`).

Voxels are `coords` (N, 4) int [batch, x, y, z] with features `feats` (N, C). A submanifold conv keeps the input
voxel set: out[p] = bias + Σ_o W[o] · feats[p + o − r] over the kernel offsets o whose neighbour is active.

Neighbours are found by hashing coordinates into int64 keys, sorting them once and `searchsorted`-ing every
voxel+offset key (`submanifold_neighbors`). The conv then loops over the K³ offsets: it gathers the voxels whose
neighbour at that offset is active, does one matmul with that offset's (C_in, C_out) weight slice and adds the
rows into the output with `index_add_`. Within one offset every output row is hit at most once and the offsets are
summed in a fixed order, so results are deterministic on CPU and CUDA and independent of the thread count. The
neighbour map depends only on the coords, so compute it once per resolution and share it.

Weights use spconv's layout (C_out, kx, ky, kz, C_in), so official checkpoints load unchanged; the equivalent
dense `F.conv3d` weight is `weight.permute(0, 4, 1, 2, 3)`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _keys(batch: Tensor, xyz: Tensor, size: int) -> Tensor:
    """Unique int64 key of (batch, x, y, z) with 0 <= x, y, z < size."""
    return ((batch * size + xyz[..., 0]) * size + xyz[..., 1]) * size + xyz[..., 2]


def submanifold_neighbors(coords: Tensor, kernel_size: int = 3) -> Tensor:
    """(N, K³) long index of each voxel's neighbour at every kernel offset, or N where that neighbour is inactive.

    Offsets run over (kx, ky, kz) in row-major order, matching the weight layout. `coords` must be unique.
    """
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    n = coords.shape[0]
    r = kernel_size // 2
    c = coords.long()
    if n == 0:
        return torch.empty(0, kernel_size**3, dtype=torch.long, device=coords.device)
    if int(c.min()) < 0:
        raise ValueError("coords must be non-negative")
    xyz = c[:, 1:] + r
    size = int(xyz.max()) + r + 1
    if (int(c[:, 0].max()) + 1) * size**3 >= 2**62:
        raise ValueError("coordinate range too large for int64 keys")
    sorted_keys, order = torch.sort(_keys(c[:, 0], xyz, size))
    span = torch.arange(-r, r + 1, device=coords.device)
    offsets = torch.stack(torch.meshgrid(span, span, span, indexing="ij"), dim=-1).reshape(-1, 3)
    query = _keys(c[:, :1], xyz[:, None, :] + offsets, size)  # (N, K³)
    pos = torch.searchsorted(sorted_keys, query).clamp_(max=n - 1)
    return torch.where(sorted_keys[pos] == query, order[pos], n)


def submanifold_conv3d(feats: Tensor, neighbors: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Submanifold conv of `feats` (N, C_in) with spconv-layout `weight` (C_out, kx, ky, kz, C_in) → (N, C_out)."""
    n, c_in = feats.shape
    c_out, k = weight.shape[0], math.prod(weight.shape[1:4])
    if weight.shape[4] != c_in or neighbors.shape != (n, k):
        raise ValueError(
            f"shape mismatch: feats {tuple(feats.shape)}, weight {tuple(weight.shape)}, "
            f"neighbors {tuple(neighbors.shape)}"
        )
    w = weight.reshape(c_out, k, c_in)
    # The K³ partial products are summed in fp32 at least, whatever precision the products ran in (autocast).
    out = feats.new_zeros(n, c_out, dtype=torch.promote_types(feats.dtype, torch.float32))
    if bias is not None:
        out += bias
    for o in range(k):
        rows = (neighbors[:, o] < n).nonzero().squeeze(1)
        out.index_add_(0, rows, (feats[neighbors[rows, o]] @ w[:, o].t()).to(out.dtype))
    return out


class SubMConv3d(nn.Module):
    """Drop-in for spconv's `SubMConv3d` parameters: `weight` (C_out, k, k, k, C_in) and optional `bias` (C_out)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        k = kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, k, k, k, in_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        bound = 1.0 / math.sqrt(in_channels * k**3)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, feats: Tensor, neighbors: Tensor) -> Tensor:
        """`neighbors` from `submanifold_neighbors(coords, self.kernel_size)`."""
        return submanifold_conv3d(feats, neighbors, self.weight, self.bias)


class SparseConv3d(nn.Module):
    """The release's `SparseConv3d` at stride 1: a submanifold conv stored under `.conv` (checkpoint keys `conv.*`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = SubMConv3d(in_channels, out_channels, kernel_size)

    def forward(self, feats: torch.Tensor, neighbors: torch.Tensor) -> torch.Tensor:
        return self.conv(feats, neighbors)
