"""Sparse voxel tensors and swin-style window self-attention over the active voxels, in plain torch (no spconv).

Follows the official `sparse_windowed_scaled_dot_product_self_attention` (tdfy_dit/modules/sparse/attention/
windowed_attn.py, from TRELLIS): coordinates are shifted by `shift` on every axis, cut into `window_size`³ cells per
batch item, and each non-empty cell attends only to itself. The order of voxels inside a window does not matter
(attention is permutation-equivariant there), so windows are formed by a stable sort of the cell id and run as padded
batches with a key mask, chunked to bound memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Padded (window × length) rows per attention call; bounds the q/k/v gather for unbalanced windows.
_MAX_TOKENS_PER_CALL = 1 << 16


@dataclass(frozen=True)
class SparseVoxels:
    """Active voxels: `coords` (N, 4) int [batch, x, y, z] sorted by batch, `feats` (N, C)."""

    coords: torch.Tensor
    feats: torch.Tensor

    def __post_init__(self) -> None:
        if self.coords.dim() != 2 or self.coords.shape[1] != 4:
            raise ValueError(f"coords must be (N, 4) [b, x, y, z], got {tuple(self.coords.shape)}")
        if self.feats.dim() != 2 or self.feats.shape[0] != self.coords.shape[0]:
            raise ValueError(f"feats must be (N, C) with N={self.coords.shape[0]}, got {tuple(self.feats.shape)}")

    def replace(self, feats: torch.Tensor) -> SparseVoxels:
        """Same voxels, new features (the official `SparseTensor.replace`)."""
        return SparseVoxels(self.coords, feats)

    def batch_slices(self) -> list[slice]:
        """Row range of each batch item 0..max(b); rows must be sorted by batch, as the official layout assumes."""
        batch = self.coords[:, 0].long()
        if batch.numel() and bool((batch[1:] < batch[:-1]).any()):
            raise ValueError("coords must be sorted by batch index")
        counts = torch.bincount(batch, minlength=int(batch.max()) + 1 if batch.numel() else 0).tolist()
        starts = [0]
        for count in counts:
            starts.append(starts[-1] + count)
        return [slice(a, b) for a, b in zip(starts[:-1], starts[1:])]


def window_ids(coords: torch.Tensor, window_size: int, shift: int) -> torch.Tensor:
    """Cell id of each voxel: batch-major index of the `window_size`³ cell that holds coords + shift (official math)."""
    shifted = coords.long().clone()
    shifted[:, 1:] += shift
    max_coords = shifted[:, 1:].max(dim=0).values.tolist()
    num_windows = [math.ceil((mc + 1) / window_size) for mc in max_coords]
    offsets = torch.cumprod(torch.tensor([1] + num_windows[::-1]), dim=0).tolist()[::-1]
    shifted[:, 1:] //= window_size
    return (shifted * torch.tensor(offsets, device=coords.device).unsqueeze(0)).sum(dim=1)


def windowed_self_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, coords: torch.Tensor, window_size: int, shift: int
) -> torch.Tensor:
    """Scaled-dot-product self-attention of (N, H, C) q/k/v restricted to each voxel's window; returns (N, H, C)."""
    ids = window_ids(coords, window_size, shift)
    order = torch.argsort(ids, stable=True)
    _, counts = torch.unique_consecutive(ids[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    by_size = torch.argsort(counts, descending=True, stable=True)
    sizes = counts[by_size].tolist()
    out = torch.empty_like(q)
    i = 0
    while i < len(sizes):
        length = sizes[i]
        j = min(len(sizes), i + max(1, _MAX_TOKENS_PER_CALL // length))
        wins = by_size[i:j]
        pos = torch.arange(length, device=q.device)
        valid = pos.unsqueeze(0) < counts[wins].unsqueeze(1)  # (W, L)
        rows = order[torch.where(valid, starts[wins].unsqueeze(1) + pos, starts[wins].unsqueeze(1))]  # pad: 1st row
        mask = None if bool(valid.all()) else valid[:, None, None, :]
        qw, kw, vw = (t[rows].transpose(1, 2) for t in (q, k, v))  # (W, H, L, C)
        attended = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=mask).transpose(1, 2)  # (W, L, H, C)
        out[rows[valid]] = attended[valid]
        i = j
    return out
