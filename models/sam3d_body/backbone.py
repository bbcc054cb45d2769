"""Image backbones of SAM 3D Body, by their config name (`MODEL.BACKBONE.TYPE`).

Every backbone module exposes:
- `embed_dim`: the feature width C;
- `patch_size`: the stride of the feature map (16);
- `input_crop`: columns the caller cuts from each side of the normalized square crop before the call
  (`crop[..., input_crop:-input_crop]`, as the official `data_preprocess` does); 0 for DINOv3;
and maps that (cropped) input `[N, 3, H, W]` to float32 features `[N, C, H/16, W/16]`.

The DINOv3 names are the official `dinov3` hub entrypoints SAM 3D Body accepts (their LVD-1689M variants),
plus the two shrunk test encoders of the parity fixtures. `dinov3_vit7b16` is left out: it has no qkv bias,
a 64-aligned SwiGLU and an extra untied `local_cls_norm`, and SAM 3D Body's `dinov3_vit7b` name does not
resolve to it anyway.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from models.sam3d_body.dinov3 import Dinov3Backbone
from models.sam3d_body.vit import ViTBackbone

BACKBONES: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    # Release backbones.
    "dinov3_vith16plus": (
        Dinov3Backbone,
        dict(embed_dim=1280, depth=32, num_heads=20, ffn_ratio=6.0, ffn_layer="swiglu"),
    ),
    "vit_hmr_512_384": (
        ViTBackbone,
        dict(image_size=(512, 384), embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4.0, input_crop=64),
    ),
    # Other official DINOv3 ViTs SAM 3D Body accepts.
    "dinov3_vits16": (Dinov3Backbone, dict(embed_dim=384, depth=12, num_heads=6, ffn_ratio=4.0, ffn_layer="mlp")),
    "dinov3_vits16plus": (
        Dinov3Backbone,
        dict(embed_dim=384, depth=12, num_heads=6, ffn_ratio=6.0, ffn_layer="swiglu"),
    ),
    "dinov3_vitb16": (Dinov3Backbone, dict(embed_dim=768, depth=12, num_heads=12, ffn_ratio=4.0, ffn_layer="mlp")),
    "dinov3_vitl16": (Dinov3Backbone, dict(embed_dim=1024, depth=24, num_heads=16, ffn_ratio=4.0, ffn_layer="mlp")),
    # Shrunk copies of vits16 / vits16plus used by the parity fixtures (see TINY_DINOV3.md).
    "dinov3_vits16_tiny": (Dinov3Backbone, dict(embed_dim=96, depth=2, num_heads=3, ffn_ratio=4.0, ffn_layer="mlp")),
    "dinov3_vits16plus_tiny": (
        Dinov3Backbone,
        dict(embed_dim=128, depth=3, num_heads=4, ffn_ratio=6.0, ffn_layer="swiglu"),
    ),
}


def build_backbone(type_name: str) -> nn.Module:
    """The backbone named `type_name`, with default-initialized weights (load a checkpoint over them)."""
    if type_name not in BACKBONES:
        raise ValueError(f"unknown backbone type {type_name!r}; known: {', '.join(sorted(BACKBONES))}")
    cls, kwargs = BACKBONES[type_name]
    return cls(**kwargs)
