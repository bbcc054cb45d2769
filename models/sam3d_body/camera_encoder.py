"""Camera-ray conditioning: every feature cell learns where in the camera frustum it looks.

For each crop pixel the normalised camera ray (x, y, 1) is computed from the crop's affine and
the intrinsics, downsampled to the feature grid, Fourier-encoded and fused into the image
features by a 1x1 conv and a LayerNorm.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.sam3d_body.transformer import LayerNorm2d

NUM_BANDS = 16
MAX_FREQUENCY = 32.0  # linspace(1, max_resolution / 2) with max_resolution 64
RAY_CHANNELS = 3 + 2 * 3 * NUM_BANDS  # xyz, then sin and cos of 16 bands per axis = 99


def fourier_features(points: torch.Tensor) -> torch.Tensor:
    """[..., 3] -> [..., 99]: (p, sin(pi p f), cos(pi p f)) for 16 frequencies f per axis, axis-major."""
    freqs = torch.linspace(1.0, MAX_FREQUENCY, NUM_BANDS, device=points.device, dtype=points.dtype)
    scaled = (points[..., :, None] * freqs).flatten(-2)
    return torch.cat([points, torch.sin(math.pi * scaled), torch.cos(math.pi * scaled)], dim=-1)


class CameraEncoder(nn.Module):
    """Fuse Fourier-encoded camera rays [B, 2, S, S] into image features [B, C, h, w]."""

    def __init__(self, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.conv = nn.Conv2d(embed_dim + RAY_CHANNELS, embed_dim, kernel_size=1, bias=False)
        self.norm = LayerNorm2d(embed_dim)

    def forward(self, features: torch.Tensor, rays: torch.Tensor) -> torch.Tensor:
        scale = 1 / self.patch_size
        rays = F.interpolate(rays, scale_factor=(scale, scale), mode="bilinear", align_corners=False, antialias=True)
        rays = rays.permute(0, 2, 3, 1)
        rays = torch.cat([rays, torch.ones_like(rays[..., :1])], dim=-1)
        encoded = fourier_features(rays).permute(0, 3, 1, 2)
        return self.norm(self.conv(torch.cat([features, encoded.to(features)], dim=1)))
