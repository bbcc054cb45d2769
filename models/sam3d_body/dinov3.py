"""DINOv3 ViT encoder, as SAM 3D Body runs it on the person crop.

Inference-only re-implementation of `dinov3.models.vision_transformer.DinoVisionTransformer` with the
options every official DINOv3 ViT entrypoint shares: 16x16 patches, one class token and 4 storage
tokens, axial 2D RoPE on the patch tokens (no absolute position embedding), LayerScale, a k-masked qkv
bias and either an MLP or a SwiGLU FFN. State-dict keys are the official ones, so the `backbone.encoder.*`
tensors of a SAM 3D Body checkpoint load as they are (`mask_token` excepted: checkpoints leave it out and
it stays zero).

SAM 3D Body reads one output: the last block, the final LayerNorm, the patch tokens only, as a map
`[N, C, H/16, W/16]`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.vit_layers import LayerScale, Mlp

FfnLayer = Literal["mlp", "swiglu"]

ROPE_BASE = 100.0
LAYERSCALE_INIT = 1e-5
SWIGLU_ALIGN = 8


class RopePositionEmbedding(nn.Module):
    """Axial 2D rotary embedding: sin/cos tables `[H*W, head_dim]` for a `H x W` patch grid.

    Patch centres are normalized per axis ("separate") to `2 * (i + 0.5) / n - 1`, in [-1, 1]. Each axis gets
    `head_dim / 4` angles `2 pi * coord / period_j`, periods `base ** (2 j / (head_dim / 2))`: row angles, then
    column angles, then the same again, so that each angle turns one rotate-half pair `(d, d + head_dim / 2)`.
    The periods are a persistent buffer (checkpoints carry them) and stay float32 when the module is cast.
    """

    def __init__(self, head_dim: int, base: float = ROPE_BASE) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"RoPE needs a head dim divisible by 4, got {head_dim}")
        exponents = 2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2)
        self.register_buffer("periods", base**exponents, persistent=True)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> RopePositionEmbedding:
        # `model.to(torch.bfloat16)` would round the periods; keep the float32 values, follow the device only.
        periods = self.periods
        super()._apply(fn, recurse)
        if self.periods.dtype != torch.float32:
            self.periods = periods.to(device=self.periods.device, dtype=torch.float32)
        return self

    def forward(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.periods.device
        coords_h = torch.arange(0.5, height, device=device, dtype=torch.float32) / height
        coords_w = torch.arange(0.5, width, device=device, dtype=torch.float32) / width
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
        coords = 2.0 * coords - 1.0  # [HW, 2]
        angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]  # [HW, 2, head_dim/4]
        angles = angles.flatten(1, 2).tile(2)  # [HW, head_dim]
        return torch.sin(angles), torch.cos(angles)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """`[x1, x2] -> [-x2, x1]` on the last dimension (the RoPE pairs are `(i, i + D/2)`)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate the last `sin.shape[0]` tokens of `x` `[N, heads, tokens, D]`; leading (prefix) tokens pass as they are.

    The rotation runs in the tables' dtype (float32) and the result is cast back to `x`'s dtype.
    """
    num_prefix = x.shape[-2] - sin.shape[0]
    prefix, patches = x[:, :, :num_prefix], x[:, :, num_prefix:].to(sin.dtype)
    patches = patches * cos + rotate_half(patches) * sin
    return torch.cat([prefix, patches.to(x.dtype)], dim=-2)


class MaskedBiasLinear(nn.Linear):
    """The qkv projection: its bias is multiplied by `bias_mask` (1 for q and v, 0 for k in DINOv3 checkpoints).

    `bias_mask` is a persistent buffer because the checkpoints carry it.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        mask = torch.ones(out_features)
        mask[out_features // 3 : 2 * out_features // 3] = 0
        self.register_buffer("bias_mask", mask, persistent=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias * self.bias_mask.to(self.bias.dtype))


class SwiGLUFFN(nn.Module):
    """`w3(silu(w1(x)) * w2(x))`, with 2/3 of `hidden_dim` (rounded up to a multiple of 8) as its width."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        width = int(hidden_dim * 2 / 3)
        width += -width % SWIGLU_ALIGN
        self.w1 = nn.Linear(dim, width)
        self.w2 = nn.Linear(dim, width)
        self.w3 = nn.Linear(width, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


FFN_LAYERS: dict[str, type[Mlp] | type[SwiGLUFFN]] = {"mlp": Mlp, "swiglu": SwiGLUFFN}


class Dinov3Attention(nn.Module):
    """Multi-head self-attention with RoPE on the patch tokens' queries and keys."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = MaskedBiasLinear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [N, heads, tokens, head_dim]
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class Dinov3Block(nn.Module):
    """Pre-norm transformer block with LayerScale on both residual branches."""

    def __init__(self, dim: int, num_heads: int, ffn_ratio: float, ffn_layer: FfnLayer) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = Dinov3Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, LAYERSCALE_INIT)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = FFN_LAYERS[ffn_layer](dim, int(dim * ffn_ratio))
        self.ls2 = LayerScale(dim, LAYERSCALE_INIT)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class Dinov3PatchEmbed(nn.Module):
    """Non-overlapping `patch_size` convolution; returns tokens `[N, h*w, C]` (row-major) and the grid `(h, w)`."""

    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(pixel_values)
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


class Dinov3VisionTransformer(nn.Module):
    """The DINOv3 ViT trunk: `[N, 3, H, W]` -> normalized patch features `[N, C, H/p, W/p]`.

    Tokens are `[cls, storage_0..storage_{S-1}, patches]`. `mask_token` (masked-image training) only enters
    as `cls + 0 * mask_token`, as in the official forward; it is not in SAM 3D Body checkpoints and is zero.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        depth: int,
        num_heads: int,
        ffn_ratio: float,
        ffn_layer: FfnLayer,
        patch_size: int = 16,
        num_storage_tokens: int = 4,
    ) -> None:
        super().__init__()
        if ffn_layer not in FFN_LAYERS:
            raise ValueError(f"unknown ffn_layer {ffn_layer!r}; known: {', '.join(FFN_LAYERS)}")
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.num_prefix_tokens = 1 + num_storage_tokens
        self.patch_embed = Dinov3PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.storage_tokens = nn.Parameter(torch.zeros(1, num_storage_tokens, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.rope_embed = RopePositionEmbedding(embed_dim // num_heads)
        self.blocks = nn.ModuleList(Dinov3Block(embed_dim, num_heads, ffn_ratio, ffn_layer) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches, (height, width) = self.patch_embed(pixel_values)
        batch = patches.shape[0]
        cls_token = self.cls_token + 0 * self.mask_token
        x = torch.cat([cls_token.expand(batch, -1, -1), self.storage_tokens.expand(batch, -1, -1), patches], dim=1)
        rope = self.rope_embed(height, width)
        for block in self.blocks:
            x = block(x, rope)
        x = self.norm(x)[:, self.num_prefix_tokens :]
        return x.reshape(batch, height, width, -1).permute(0, 3, 1, 2).contiguous()


class Dinov3Backbone(nn.Module):
    """SAM 3D Body's DINOv3 backbone: the trunk under `encoder.` (checkpoint keys `backbone.encoder.*`).

    Takes the normalized square crop uncropped (`input_crop = 0`), in any float dtype: it is cast to the
    parameters' dtype (the model may be cast to bf16/fp16 as a whole) and features come back in float32.
    """

    input_crop = 0

    def __init__(self, **trunk: Any) -> None:
        """`trunk`: the arguments of `Dinov3VisionTransformer` (width, depth, heads, FFN type...)."""
        super().__init__()
        self.encoder = Dinov3VisionTransformer(**trunk)
        self.embed_dim = self.encoder.embed_dim
        self.patch_size = self.encoder.patch_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.encoder.patch_embed.proj.weight.dtype
        return self.encoder(pixel_values.to(dtype)).float()
