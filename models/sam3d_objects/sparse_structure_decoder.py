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
