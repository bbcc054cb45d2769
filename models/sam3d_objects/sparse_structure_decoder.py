"""SAM 3D Objects sparse-structure decoder: the VAE decoder from the 16³ shape latent to 64³ occupancy logits.

A re-implementation of the official `SparseStructureDecoder` (tdfy_dit/models/sparse_structure_vae.py, itself
TRELLIS's): same module tree and parameter names, so the official `ss_decoder.ckpt` (a plain state_dict) loads with
`strict=True`. Data flow: Conv3d(latent→c0) → middle ResBlocks(c0) → per level [ResBlocks(ci), Upsample ×2
(conv to 8·c_{i+1} channels + 3-D pixel shuffle)] → norm + SiLU + Conv3d(c_last→out). The pipeline then keeps the
voxels with logit > 0 (`occupied_coords`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.sam3d_objects.hydra_config import constructor_kwargs

_TARGETS = {
    "sam3d_objects.model.backbone.tdfy_dit.models.sparse_structure_vae.SparseStructureDecoderTdfyWrapper",
    "sam3d_objects.model.backbone.tdfy_dit.models.sparse_structure_vae.SparseStructureDecoder",
}
_ACCEPTED = {
    "out_channels",
    "latent_channels",
    "num_res_blocks",
    "channels",
    "num_res_blocks_middle",
    "norm_type",
    "reshape_input_to_cube",
}
# use_fp16 only picks the official torso dtype (we run fp32); weights are loaded by the caller, not the constructor.
_IGNORED = {"use_fp16", "pretrained_ckpt_path"}


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of a (B, C, *spatial) tensor, computed in fp32 (official ChannelLayerNorm32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Contiguous both ways, as the official: the next conv then sees NCDHW memory and sums in the same order.
        h = x.movedim(1, -1).float().contiguous()
        return super().forward(h).to(x.dtype).movedim(-1, 1).contiguous()


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 (official GroupNorm32, 32 groups)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


def norm_layer(norm_type: str, channels: int) -> nn.Module:
    """The official `norm_layer`: 'layer' (LayerNorm over channels, the default) or 'group' (32 groups)."""
    if norm_type == "layer":
        return ChannelLayerNorm(channels)
    if norm_type == "group":
        return GroupNorm32(32, channels)
    raise ValueError(f"unknown norm_type {norm_type!r}; known: ['group', 'layer']")


def pixel_shuffle_3d(x: torch.Tensor, scale: int) -> torch.Tensor:
    """(B, C·s³, D, H, W) → (B, C, D·s, H·s, W·s); channel c·s³ + a·s² + b·s + d lands at offset (a, b, d)."""
    b, c, d, h, w = x.shape
    x = x.reshape(b, c // scale**3, scale, scale, scale, d, h, w)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c // scale**3, d * scale, h * scale, w * scale)


class ResBlock3d(nn.Module):
    """Pre-norm residual block: norm → SiLU → conv3³ → norm → SiLU → conv3³, plus a 1³ conv skip if channels change."""

    def __init__(self, channels: int, out_channels: int | None = None, norm_type: str = "layer") -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.norm1 = norm_layer(norm_type, channels)
        self.norm2 = norm_layer(norm_type, out_channels)
        self.conv1 = nn.Conv3d(channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.skip_connection = nn.Conv3d(channels, out_channels, 1) if channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip_connection(x)


class UpsampleBlock3d(nn.Module):
    """×2 upsampling: conv3³ to 8·out channels, then a 3-D pixel shuffle (the official 'conv' mode)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels * 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle_3d(self.conv(x), 2)


class SparseStructureDecoder(nn.Module):
    """Latent cube (B, latent_channels, R, R, R) → logits (B, out_channels, R·2^(L-1), …) for L = len(channels).

    With `reshape_input_to_cube` the input is the generator's flat tokens (B, R³, latent_channels) instead, token
    n = i·R² + j·R + k going to cell (i, j, k).
    """

    def __init__(
        self,
        out_channels: int,
        latent_channels: int,
        num_res_blocks: int,
        channels: list[int],
        num_res_blocks_middle: int = 2,
        norm_type: str = "layer",
        reshape_input_to_cube: bool = False,
    ) -> None:
        super().__init__()
        self.reshape_input_to_cube = reshape_input_to_cube
        self.input_layer = nn.Conv3d(latent_channels, channels[0], 3, padding=1)
        self.middle_block = nn.Sequential(
            *[ResBlock3d(channels[0], norm_type=norm_type) for _ in range(num_res_blocks_middle)]
        )
        self.blocks = nn.ModuleList()
        for i, ch in enumerate(channels):
            self.blocks.extend(ResBlock3d(ch, norm_type=norm_type) for _ in range(num_res_blocks))
            if i < len(channels) - 1:
                self.blocks.append(UpsampleBlock3d(ch, channels[i + 1]))
        self.out_layer = nn.Sequential(
            norm_layer(norm_type, channels[-1]), nn.SiLU(), nn.Conv3d(channels[-1], out_channels, 3, padding=1)
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | str | Path) -> SparseStructureDecoder:
        """Build from the official hydra config (mapping or yaml file); refuses unknown keys. Weights stay random."""
        return cls(**constructor_kwargs(config, "ss decoder", _TARGETS, _ACCEPTED, _IGNORED))

    @staticmethod
    def flat_to_cube(tokens: torch.Tensor) -> torch.Tensor:
        """(B, R³, C) tokens → (B, C, R, R, R), token n = i·R² + j·R + k at cell (i, j, k)."""
        b, n, c = tokens.shape
        r = round(n ** (1 / 3))
        if r**3 != n:
            raise ValueError(f"{n} tokens do not form a cube")
        return tokens.reshape(b, r, r, r, c).permute(0, 4, 1, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reshape_input_to_cube:
            x = self.flat_to_cube(x)
        h = self.middle_block(self.input_layer(x))
        for block in self.blocks:
            h = block(h)
        return self.out_layer(h)


def occupied_coords(logits: torch.Tensor) -> torch.Tensor:
    """(B, 1, D, H, W) logits → (N, 4) int32 rows (batch, i, j, k) of the voxels with logit > 0, in C order."""
    if logits.dim() != 5 or logits.shape[1] != 1:
        raise ValueError(f"expected (B, 1, D, H, W) logits, got {tuple(logits.shape)}")
    return torch.argwhere(logits > 0)[:, [0, 2, 3, 4]].to(torch.int32)


def prune_interior(coords: torch.Tensor, distance: int = 1) -> torch.Tensor:
    """Official `prune_sparse_structure`: drop the voxels whose whole (2·distance+1)³ neighbourhood (themselves
    included; 27 voxels at distance 1) is occupied, keeping the surface. Rows keep their order and dtype.

    As the official, the occupancy grid ignores the batch column (all rows share one grid) and cells outside the
    occupied bounding box count as empty.
    """
    if len(coords) == 0:
        return coords
    xyz = coords[:, 1:].long()
    xyz = xyz - xyz.min(dim=0).values
    size = (xyz.max(dim=0).values + 1).tolist()
    occupancy = torch.zeros((1, 1, *size), dtype=torch.float32, device=coords.device)
    occupancy[0, 0, xyz[:, 0], xyz[:, 1], xyz[:, 2]] = 1
    width = 2 * distance + 1
    kernel = torch.ones((1, 1, width, width, width), dtype=torch.float32, device=coords.device)
    counts = F.conv3d(occupancy, kernel, padding=distance)[0, 0, xyz[:, 0], xyz[:, 1], xyz[:, 2]]
    return coords[counts < width**3]


def downsample_coords(
    coords: torch.Tensor, max_coords: int = 42000, factor: int = 2, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, int]:
    """Official `downsample_sparse_structure`: (N, 4) int rows (batch, i, j, k) -> (rows, downsample factor).

    Up to `max_coords` rows come back unchanged with factor 1 (the mesh decoder's int32 indexing needs
    64·768·N < 2³¹). Otherwise each axis of the occupied box is mapped linearly onto a box `factor` times smaller
    centred in it (round half to even, clamp), duplicates are merged (rows sorted as `torch.unique`) and, if still
    too many, a random subset of `max_coords` rows (`torch.randperm` from `generator`) is kept; factor is returned.
    """
    if len(coords) <= max_coords:
        return coords, 1
    xyz = coords[:, 1:].float()
    low, high = xyz.min(dim=0).values, xyz.max(dim=0).values
    size = high - low + 1
    target = size / factor
    target_low = low + (size - target) / 2
    target_high = low + (size - target) / 2 + target - 1
    scaled = (xyz - low) / (high - low) * (target - 1) + target_low
    scaled = torch.clamp(torch.round(scaled).int(), target_low.int(), target_high.int())
    rows = torch.unique(torch.cat([coords[:, :1], scaled], dim=1), dim=0)
    if len(rows) > max_coords:
        device = rows.device if generator is None else generator.device
        rows = rows[torch.randperm(len(rows), generator=generator, device=device)[:max_coords].to(rows.device)]
    return rows.int(), factor
