"""DINOv2 vision transformer with register tokens, as used by SAM 3D Objects' image and mask conditioners.

Architecture of `dinov2.models.vision_transformer.DinoVisionTransformer` built the way the torch.hub entry points
build it (`block_chunks=0`, MLP FFN, LayerScale): a 14x14 patch convolution, a class token and register tokens, a
learned position embedding for one grid that is resized (bicubic) to the input grid, pre-norm blocks and a final
LayerNorm. State-dict keys equal the official ones (`cls_token`, `pos_embed`, `register_tokens`, `mask_token`,
`patch_embed.proj.*`, `blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}.*`, `norm.*`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from models.vit_layers import Attention, LayerScale, Mlp


@dataclass(frozen=True)
class DinoV2Config:
    """Shape of a DINOv2 ViT; the defaults are ViT-L/14 with 4 registers (`dinov2_vitl14_reg`)."""

    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    img_size: int = 518  # the position embedding covers (img_size // patch_size)**2 patches
    patch_size: int = 14
    num_register_tokens: int = 4
    mlp_ratio: float = 4.0
    layer_scale_init: float = 1.0
    interpolate_antialias: bool = True
    interpolate_offset: float = 0.0


# Names used by `torch.hub.load(..., dino_model)` in the official configs. The `dinov2_tiny14_reg_*` entries are the
# shrunk networks of the SAM 3D Objects parity fixtures (fixtures/sam3d_objects/TINY_DINO.md), not hub models.
DINOV2_SPECS: dict[str, DinoV2Config] = {
    "dinov2_vitl14_reg": DinoV2Config(),
    "dinov2_tiny14_reg_a": DinoV2Config(embed_dim=128, depth=2, num_heads=4, img_size=518),
    "dinov2_tiny14_reg_b": DinoV2Config(embed_dim=96, depth=3, num_heads=4, img_size=224),
}


class DinoV2Features(NamedTuple):
    """Outputs of `DinoV2Model.forward_features`; the normed tokens are split by kind."""

    cls_token: torch.Tensor  # [B, D], normed
    register_tokens: torch.Tensor  # [B, R, D], normed
    patch_tokens: torch.Tensor  # [B, N, D], normed
    prenorm: torch.Tensor  # [B, 1 + R + N, D], output of the last block before the final norm


class PatchEmbed(nn.Module):
    """Non-overlapping patch convolution, flattened to a token sequence."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"input {height}x{width} is not a multiple of the patch size {self.patch_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


class ViTBlock(nn.Module):
    """Pre-norm transformer block, with LayerScale on both branches when `layer_scale_init` is given.

    Without LayerScale it is also timm's `vision_transformer.Block` (same key names), which PointPatchEmbed uses.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, layer_scale_init: float | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV2Model(nn.Module):
    """DINOv2 ViT backbone; `forward_features` gives the normed class/register/patch tokens and the pre-norm ones."""

    def __init__(self, config: DinoV2Config | None = None) -> None:
        super().__init__()
        config = config or DinoV2Config()
        self.config = config
        self.embed_dim = config.embed_dim
        self.patch_size = config.patch_size
        self.num_register_tokens = config.num_register_tokens
        grid = config.img_size // config.patch_size
        dim = config.embed_dim

        self.patch_embed = PatchEmbed(config.patch_size, 3, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        if config.num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, config.num_register_tokens, dim))
        self.blocks = nn.ModuleList(
            ViTBlock(dim, config.num_heads, config.mlp_ratio, config.layer_scale_init) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        # Used only by masked-image training; kept so the official checkpoints load strictly.
        self.mask_token = nn.Parameter(torch.zeros(1, dim))

    def interpolate_pos_encoding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embedding for a `grid_h x grid_w` patch grid: class entry kept, patch entries resized bicubic."""
        pos_embed = self.pos_embed
        grid = int((pos_embed.shape[1] - 1) ** 0.5)
        if (grid_h, grid_w) == (grid, grid):
            return pos_embed
        class_pos, patch_pos = pos_embed.float().split([1, grid * grid], dim=1)
        patch_pos = patch_pos.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        if self.config.interpolate_offset:
            # The official "offset" variant passes scale factors; torch then derives the output size from them.
            offset = self.config.interpolate_offset
            resize = {"scale_factor": ((grid_h + offset) / grid, (grid_w + offset) / grid)}
        else:
            resize = {"size": (grid_h, grid_w)}
        patch_pos = F.interpolate(patch_pos, mode="bicubic", antialias=self.config.interpolate_antialias, **resize)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([class_pos, patch_pos], dim=1).to(pos_embed.dtype)

    def prepare_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch tokens with the class token and position embedding, then the register tokens after the class token."""
        batch, _, height, width = pixels.shape
        x = self.patch_embed(pixels)
        x = torch.cat([self.cls_token.expand(batch, -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(height // self.patch_size, width // self.patch_size)
        if self.num_register_tokens:
            x = torch.cat([x[:, :1], self.register_tokens.expand(batch, -1, -1), x[:, 1:]], dim=1)
        return x

    def forward_features(self, pixels: torch.Tensor) -> DinoV2Features:
        """Run the ViT on normalised `[B, 3, H, W]` pixels (H, W multiples of the patch size)."""
        x = self.prepare_tokens(pixels)
        for block in self.blocks:
            x = block(x)
        normed = self.norm(x)
        cls_token, register_tokens, patch_tokens = normed.split(
            [1, self.num_register_tokens, normed.shape[1] - 1 - self.num_register_tokens], dim=1
        )
        return DinoV2Features(cls_token[:, 0], register_tokens, patch_tokens, x)
