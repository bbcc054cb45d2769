"""Submanifold sparse conv vs a brute-force dense F.conv3d reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.sam3d_objects.sparse_conv import SubMConv3d, submanifold_conv3d, submanifold_neighbors


def random_voxels(n: int, batch: int, grid: int, seed: int) -> torch.Tensor:
    """(n, 4) int32 unique [b, x, y, z] with the grid's corners always present (border voxels)."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(batch * grid**3, generator=g)[:n]
    corners = torch.tensor([0, grid**3 - 1, (batch - 1) * grid**3, batch * grid**3 - 1])
    flat = torch.unique(torch.cat([flat, corners]))
    b, rest = flat // grid**3, flat % grid**3
    return torch.stack([b, rest // grid**2, rest // grid % grid, rest % grid], dim=1).int()


def dense_reference(
    coords: torch.Tensor, feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, grid: int
) -> torch.Tensor:
    """Scatter to a dense grid, F.conv3d with the permuted weight, gather the active voxels back."""
    c = coords.long()
    batch = int(c[:, 0].max()) + 1
    dense = feats.new_zeros(batch, feats.shape[1], grid, grid, grid)
    dense[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]] = feats
    out = F.conv3d(dense, weight.permute(0, 4, 1, 2, 3), bias, padding=weight.shape[1] // 2)
    return out[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]]


@pytest.mark.parametrize(
    ("n", "batch", "grid", "c_in", "c_out", "k"),
    [
        (300, 1, 8, 4, 6, 3),
        (2000, 3, 16, 16, 8, 3),
        (500, 2, 12, 8, 8, 1),
        (800, 2, 10, 5, 7, 5),
    ],
)
def test_matches_dense_reference(n: int, batch: int, grid: int, c_in: int, c_out: int, k: int) -> None:
    coords = random_voxels(n, batch, grid, seed=n)
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(coords.shape[0], c_in, generator=g)
    weight = torch.randn(c_out, k, k, k, c_in, generator=g) * 0.1
    bias = torch.randn(c_out, generator=g)
    perm = torch.randperm(coords.shape[0], generator=g)  # voxel order must not matter
    coords, feats = coords[perm], feats[perm]
    ours = submanifold_conv3d(feats, submanifold_neighbors(coords, k), weight, bias)
    torch.testing.assert_close(ours, dense_reference(coords, feats, weight, bias, grid), atol=1e-5, rtol=1e-5)


def test_module_without_bias_and_empty_input() -> None:
    conv = SubMConv3d(4, 3, bias=False)
    coords = random_voxels(100, 2, 6, seed=0)
    feats = torch.randn(coords.shape[0], 4)
    expected = dense_reference(coords, feats, conv.weight.detach(), None, 6)
    torch.testing.assert_close(conv(feats, submanifold_neighbors(coords)).detach(), expected, atol=1e-5, rtol=1e-5)
    empty = submanifold_neighbors(torch.empty(0, 4, dtype=torch.int32))
    assert conv(torch.empty(0, 4), empty).shape == (0, 3)


def test_thread_count_independent() -> None:
    coords = random_voxels(3000, 2, 24, seed=7)
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(coords.shape[0], 32, generator=g)
    weight = torch.randn(32, 3, 3, 3, 32, generator=g)
    bias = torch.randn(32, generator=g)
    nbr = submanifold_neighbors(coords)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = submanifold_conv3d(feats, nbr, weight, bias)
        torch.set_num_threads(2)
        two = submanifold_conv3d(feats, nbr, weight, bias)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
