"""Plain ViT backbone of the SAM 3D Body "vith" release (`vit_hmr_512_384`).

The ViTPose/HMR 2.0 style ViT-H: a padded 16x16 patch convolution, a learned absolute position embedding
sized for one input resolution (no class token, no interpolation), pre-norm blocks with a GELU MLP, and a
final `last_norm`. LayerNorms run in float32 whatever the model's dtype. State-dict keys are the official
ones at the top level (`backbone.pos_embed`, `backbone.blocks.i.*`, ...).
"""

from __future__ import annotations

import torch
from torch import nn

from models.sam3d_body.transformer import LayerNorm32
from models.vit_layers import Attention, Mlp


class ViTBlock(nn.Module):
    """Pre-norm transformer block (no LayerScale)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = LayerNorm32(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = LayerNorm32(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTPatchEmbed(nn.Module):
    """Patch convolution with `padding` pixels of zero padding on each side (2 in the release).

    The padding does not change the grid for sizes that are multiples of the patch size: 512x384 gives 32x24.
    """

    def __init__(self, patch_size: int, embed_dim: int, padding: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size, padding=padding)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(pixel_values)
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


class ViTBackbone(nn.Module):
    """ViT backbone: normalized crop `[N, 3, H, W]` (already cut to `image_size`) -> features `[N, C, H/16, W/16]`.

    `pos_embed` has one slot per patch plus a leading slot from pretraining (a class token this model does
    not have); that slot is added to every patch, as the official forward does. `input_crop` is the number of
    columns the caller cuts from each side of the square crop to reach `image_size` (64 for 512 -> 384).
    Inputs are cast to the parameters' dtype and features come back in float32.
    """

    def __init__(
        self,
        *,
        image_size: tuple[int, int],
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        patch_size: int = 16,
        patch_padding: int = 2,
        input_crop: int = 0,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.input_crop = input_crop
        self.grid_size = (image_size[0] // patch_size, image_size[1] // patch_size)
        self.patch_embed = ViTPatchEmbed(patch_size, embed_dim, patch_padding)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1] + 1, embed_dim))
        self.blocks = nn.ModuleList(ViTBlock(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.last_norm = LayerNorm32(embed_dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x, grid = self.patch_embed(pixel_values.to(self.patch_embed.proj.weight.dtype))
        if grid != self.grid_size:
            raise ValueError(
                f"input {tuple(pixel_values.shape[-2:])} gives a {grid} patch grid; the position embedding "
                f"is for {self.grid_size} (no interpolation)"
            )
        x = x + self.pos_embed[:, 1:] + self.pos_embed[:, :1]
        for block in self.blocks:
            x = block(x)
        x = self.last_norm(x)
        return x.transpose(1, 2).reshape(x.shape[0], -1, *grid).float()
