"""MoGe v1 (microsoft/MoGe `moge.model.v1.MoGeModel`): monocular point map, depth, mask and intrinsics.

SAM 3D Objects runs it first to get the camera-frame point map of the whole image. A DINOv2 ViT (no registers) gives
the normed patch tokens of its last `intermediate_layers` blocks; the head sums their 1x1 projections, upsamples 8x
with UV-aware transposed convolutions and residual conv blocks, and predicts (x/z, y/z, log z) plus a raw mask logit.
`infer()` recovers the unknown z-shift and focal with MoGe's least-squares solver (`moge_geometry`).

Checkpoints are the official `model.pt` layout, `{'model_config': dict, 'model': state_dict}`, loaded strictly.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.sam3d_objects.dinov2 import DinoV2Config, DinoV2Model
from models.sam3d_objects.moge_geometry import (
    depth_to_points,
    intrinsics_from_focal_center,
    normalized_view_plane_uv,
    recover_focal_shift,
)

# MoGe's vendored torch.hub entry points: no registers, bicubic pos-emb resize by scale factor (offset 0.1, no AA).
_MOGE_DINOV2 = {"num_register_tokens": 0, "interpolate_antialias": False, "interpolate_offset": 0.1}
MOGE_ENCODERS: dict[str, DinoV2Config] = {
    "dinov2_vits14": DinoV2Config(embed_dim=384, depth=12, num_heads=6, **_MOGE_DINOV2),
    "dinov2_vitb14": DinoV2Config(embed_dim=768, depth=12, num_heads=12, **_MOGE_DINOV2),
    "dinov2_vitl14": DinoV2Config(embed_dim=1024, depth=24, num_heads=16, **_MOGE_DINOV2),
}

# `model_config` of the released `Ruicheng/moge-vitl/model.pt` (legacy key layout; MOGE_PIPELINE.md §2).
MOGE_VITL_CONFIG: dict = {
    "encoder": "dinov2_vitl14",
    "remap_output": "exp",
    "output_mask": True,
    "split_head": True,
    "intermediate_layers": 4,
    "dim_upsample": [256, 128, 64],
    "dim_times_res_block_hidden": 2,
    "num_res_blocks": 2,
    "trained_area_range": [250000, 500000],
    "last_conv_channels": 32,
    "last_conv_size": 1,
}


def encoder_config_from_spec(spec: dict) -> DinoV2Config:
    """DinoV2Config from a `fixture_encoder_spec`-style dict (official DinoVisionTransformer argument names)."""
    unsupported = {
        "ffn_layer": "mlp",
        "block_chunks": 0,
        "qkv_bias": True,
        "proj_bias": True,
        "ffn_bias": True,
        "layernorm_eps": 1e-6,
        "act": "GELU(exact)",
    }
    for key, expected in unsupported.items():
        if spec.get(key, expected) != expected:
            raise ValueError(f"encoder spec {spec.get('name')!r}: {key}={spec[key]!r} is not supported")
    return DinoV2Config(
        embed_dim=spec["embed_dim"],
        depth=spec["depth"],
        num_heads=spec["num_heads"],
        img_size=spec["img_size"],
        patch_size=spec["patch_size"],
        num_register_tokens=spec["num_register_tokens"],
        mlp_ratio=float(spec["mlp_ratio"]),
        layer_scale_init=spec["init_values"],
        interpolate_antialias=spec["interpolate_antialias"],
        interpolate_offset=spec["interpolate_offset"],
    )


@dataclass(frozen=True)
class MoGeConfig:
    """`MoGeModel(**model_config)` arguments, official defaults (the released ViT-L: MOGE_VITL_CONFIG)."""

    encoder: str = "dinov2_vitb14"
    intermediate_layers: int = 4
    dim_proj: int = 512
    dim_upsample: tuple[int, ...] = (256, 128, 128)
    dim_times_res_block_hidden: int = 1
    num_res_blocks: int = 1
    remap_output: str = "linear"
    res_block_norm: str = "group_norm"
    num_tokens_range: tuple[int, int] = (1200, 2500)
    last_res_blocks: int = 0
    last_conv_channels: int = 32
    last_conv_size: int = 1
    mask_threshold: float = 0.5
    encoder_config: DinoV2Config | None = None  # None: looked up in MOGE_ENCODERS by `encoder`

    def __post_init__(self) -> None:
        if self.encoder_config is None:
            object.__setattr__(self, "encoder_config", MOGE_ENCODERS[self.encoder])

    @classmethod
    def from_model_config(cls, model_config: dict, encoder_specs: dict[str, DinoV2Config] | None = None) -> MoGeConfig:
        """Parse a checkpoint's `model_config`, legacy keys included (`trained_area_range` -> `num_tokens_range`).

        `output_mask` and `split_head` are ignored, as the official constructor does (with a warning).
        """
        config = dict(model_config)
        if "trained_area_range" in config:
            low, high = config.pop("trained_area_range")
            config["num_tokens_range"] = (low // 14**2, high // 14**2)
        ignored = {key: config.pop(key) for key in ("output_mask", "split_head") if key in config}
        if ignored:
            warnings.warn(f"MoGe: deprecated model_config arguments ignored: {ignored}", stacklevel=2)
        unknown = set(config) - {f for f in cls.__dataclass_fields__ if f != "encoder_config"}
        if unknown:
            raise ValueError(f"MoGe: unknown model_config keys {sorted(unknown)}")
        if isinstance(config.get("intermediate_layers", 4), list):
            raise ValueError("MoGe: an explicit list of intermediate layers is not supported")
        specs = {**MOGE_ENCODERS, **(encoder_specs or {})}
        encoder = config.get("encoder", cls.encoder)
        if encoder not in specs:
            raise KeyError(f"MoGe: unknown encoder {encoder!r}; known: {sorted(specs)}")
        for key in ("dim_upsample", "num_tokens_range"):
            if key in config:
                config[key] = tuple(config[key])
        return cls(**config, encoder_config=specs[encoder])


class ResidualConvBlock(nn.Module):
    """x + [GroupNorm → ReLU → Conv3x3 → GroupNorm → ReLU → Conv3x3](x), replicate padding, same width in and out."""

    def __init__(self, channels: int, hidden_channels: int, norm: str) -> None:
        super().__init__()
        hidden_groups = hidden_channels // 32 if norm == "group_norm" else 1
        self.layers = nn.Sequential(
            nn.GroupNorm(1, channels),
            nn.ReLU(),
            nn.Conv2d(channels, hidden_channels, kernel_size=3, padding=1, padding_mode="replicate"),
            nn.GroupNorm(hidden_groups, hidden_channels),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, channels, kernel_size=3, padding=1, padding_mode="replicate"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x)


def _upsampler(in_channels: int, out_channels: int) -> nn.Sequential:
    """2x transposed convolution followed by a 3x3 replicate-padded convolution."""
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2),
        nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, padding_mode="replicate"),
    )


def _with_uv(x: torch.Tensor, aspect_ratio: float) -> torch.Tensor:
    """Append the normalised view-plane UV of the image's aspect ratio as two channels (aspect awareness)."""
    uv = normalized_view_plane_uv(x.shape[-1], x.shape[-2], aspect_ratio, dtype=x.dtype, device=x.device)
    return torch.cat([x, uv.permute(2, 0, 1)[None].expand(x.shape[0], -1, -1, -1)], dim=1)


class MoGeHead(nn.Module):
    """Feature pyramid head: summed 1x1 projections, three UV-aware 2x upsample stages, per-output conv blocks."""

    def __init__(self, config: MoGeConfig, dim_in: int, dim_out: tuple[int, ...] = (3, 1)) -> None:
        super().__init__()
        self.projects = nn.ModuleList(
            nn.Conv2d(dim_in, config.dim_proj, kernel_size=1) for _ in range(config.intermediate_layers)
        )
        widths_in = (config.dim_proj, *config.dim_upsample[:-1])
        self.upsample_blocks = nn.ModuleList(
            nn.Sequential(
                _upsampler(in_ch + 2, out_ch),
                *(
                    ResidualConvBlock(out_ch, config.dim_times_res_block_hidden * out_ch, config.res_block_norm)
                    for _ in range(config.num_res_blocks)
                ),
            )
            for in_ch, out_ch in zip(widths_in, config.dim_upsample, strict=True)
        )
        last = config.last_conv_channels
        self.output_block = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(config.dim_upsample[-1] + 2, last, kernel_size=3, padding=1, padding_mode="replicate"),
                *(
                    ResidualConvBlock(last, config.dim_times_res_block_hidden * last, config.res_block_norm)
                    for _ in range(config.last_res_blocks)
                ),
                nn.ReLU(),
                nn.Conv2d(
                    last,
                    channels,
                    kernel_size=config.last_conv_size,
                    padding=config.last_conv_size // 2,
                    padding_mode="replicate",
                ),
            )
            for channels in dim_out
        )

    def forward(self, features: list[torch.Tensor], image_hw: tuple[int, int]) -> list[torch.Tensor]:
        """Patch tokens [B, h·w, C] per layer -> one map per output at `image_hw` (the resized image size)."""
        height, width = image_hw
        grid = (height // 14, width // 14)
        x = torch.stack(
            [
                proj(feat.permute(0, 2, 1).unflatten(2, grid).contiguous())
                for proj, feat in zip(self.projects, features)
            ],
            dim=1,
        ).sum(dim=1)
        for block in self.upsample_blocks:
            x = block(_with_uv(x, width / height))
        x = F.interpolate(x, image_hw, mode="bilinear", align_corners=False)
        x = _with_uv(x, width / height)
        return [block(x) for block in self.output_block]


class MoGeModel(nn.Module):
    """MoGe v1: DINOv2 backbone + head; `forward` gives the affine-invariant point map and raw mask, `infer` metrics."""

    image_mean: torch.Tensor
    image_std: torch.Tensor

    def __init__(self, config: MoGeConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = DinoV2Model(config.encoder_config)
        self.head = MoGeHead(config, config.encoder_config.embed_dim)
        self.register_buffer("image_mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("image_std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def intermediate_features(self, image_14: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(patch tokens [B, N, C], class token [B, C]) of the last `intermediate_layers` blocks, final-normed."""
        x = self.backbone.prepare_tokens(image_14)
        first_taken = len(self.backbone.blocks) - self.config.intermediate_layers
        outputs = []
        for index, block in enumerate(self.backbone.blocks):
            x = block(x)
            if index >= first_taken:
                normed = self.backbone.norm(x)
                outputs.append((normed[:, 1:], normed[:, 0]))
        return outputs

    def remap_points(self, points: torch.Tensor) -> torch.Tensor:
        """Map the raw (B, H, W, 3) head output to points; 'exp' reads it as (x/z, y/z, log z)."""
        remap = self.config.remap_output
        if remap in ("linear", False):
            return points
        if remap == "sinh":
            return torch.sinh(points)
        xy, z = points.split([2, 1], dim=-1)
        if remap in ("exp", True):
            z = torch.exp(z)
            return torch.cat([xy * z, z], dim=-1)
        if remap == "sinh_exp":
            return torch.cat([torch.sinh(xy), torch.exp(z)], dim=-1)
        raise ValueError(f"MoGe: unknown remap_output {remap!r}")

    def forward(self, image: torch.Tensor, num_tokens: int) -> dict[str, torch.Tensor]:
        """Image (B, 3, H, W) in [0, 1] -> points (B, H, W, 3) up to a z-shift, raw mask logits (B, H, W).

        The image is resized (bicubic, antialiased) to about `num_tokens` patches of 14x14 at its own aspect ratio.
        """
        height, width = image.shape[-2:]
        resize_factor = ((num_tokens * 14**2) / (height * width)) ** 0.5
        resized_hw = (int(height * resize_factor), int(width * resize_factor))
        image = F.interpolate(image, resized_hw, mode="bicubic", align_corners=False, antialias=True)
        image = (image - self.image_mean) / self.image_std
        image_14 = F.interpolate(
            image,
            (resized_hw[0] // 14 * 14, resized_hw[1] // 14 * 14),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
        features = [patch for patch, _ in self.intermediate_features(image_14)]
        points, mask = self.head(features, resized_hw)
        points = F.interpolate(points, (height, width), mode="bilinear", align_corners=False)
        mask = F.interpolate(mask, (height, width), mode="bilinear", align_corners=False)
        return {"points": self.remap_points(points.permute(0, 2, 3, 1)), "mask": mask.squeeze(1)}

    @torch.inference_mode()
    def infer(
        self,
        image: torch.Tensor,
        fov_x: float | torch.Tensor | None = None,
        resolution_level: int = 9,
        num_tokens: int | None = None,
        apply_mask: bool = True,
        force_projection: bool = True,
        use_fp16: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Metric-free camera-space outputs of an image (3, H, W) or (B, 3, H, W) in [0, 1].

        Returns points (…, H, W, 3) in the OpenCV camera frame, depth (…, H, W), normalised intrinsics (…, 3, 3),
        mask (…, H, W) bool and mask_prob. Points and depth are +inf outside the mask when `apply_mask`.
        `force_projection=False` (SAM 3D Objects) keeps the predicted xy and only shifts z; `use_fp16` runs the network
        under fp16 autocast on the image's device, as the official default.
        """
        unbatched = image.dim() == 3
        if unbatched:
            image = image[None]
        height, width = image.shape[-2:]
        aspect_ratio = width / height
        if num_tokens is None:
            low, high = self.config.num_tokens_range
            num_tokens = int(low + (resolution_level / 9) * (high - low))

        # Without use_fp16 the caller's precision (an enclosing autocast, if any) applies.
        precision = torch.autocast(image.device.type, torch.float16) if use_fp16 else contextlib.nullcontext()
        with precision:
            output = self.forward(image, num_tokens)
        points, mask = output["points"].float(), output["mask"].float()
        mask_binary = mask > self.config.mask_threshold

        if fov_x is None:
            focal, shift = recover_focal_shift(points, mask_binary)
        else:
            fov = torch.as_tensor(fov_x, device=points.device, dtype=points.dtype)
            focal = aspect_ratio / (1 + aspect_ratio**2) ** 0.5 / torch.tan(torch.deg2rad(fov / 2))
            if focal.ndim == 0:
                focal = focal[None].expand(points.shape[0])
            _, shift = recover_focal_shift(points, mask_binary, focal=focal)
        fx = focal / 2 * (1 + aspect_ratio**2) ** 0.5 / aspect_ratio
        fy = focal / 2 * (1 + aspect_ratio**2) ** 0.5
        intrinsics = intrinsics_from_focal_center(fx, fy, 0.5, 0.5)
        depth = points[..., 2] + shift[..., None, None]
        if force_projection:
            points = depth_to_points(depth, intrinsics)
        else:
            zeros = torch.zeros_like(shift)
            points = points + torch.stack([zeros, zeros, shift], dim=-1)[..., None, None, :]
        if apply_mask:
            points = torch.where(mask_binary[..., None], points, torch.inf)
            depth = torch.where(mask_binary, depth, torch.inf)

        result = {
            "points": points,
            "intrinsics": intrinsics,
            "depth": depth,
            "mask": mask_binary,
            "mask_prob": torch.sigmoid(mask),
        }
        return {key: value[0] for key, value in result.items()} if unbatched else result


def load_moge(
    path: str | Path, encoder_specs: dict[str, DinoV2Config] | None = None, device: str | torch.device = "cpu"
) -> MoGeModel:
    """Build a MoGeModel from an official `model.pt` and load its weights strictly; returns it in eval mode.

    Encoder names resolve through `MOGE_ENCODERS`, then `encoder_specs`, then a `fixture_encoder_spec` stored in
    the checkpoint (the parity fixtures' shrunk encoders).
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    specs = dict(encoder_specs or {})
    stored_spec = checkpoint.get("fixture_encoder_spec")
    if stored_spec is not None and stored_spec["name"] not in MOGE_ENCODERS:
        specs.setdefault(stored_spec["name"], encoder_config_from_spec(stored_spec))
    config = MoGeConfig.from_model_config(checkpoint["model_config"], specs)
    with torch.device("meta"):
        model = MoGeModel(config)
    model.load_state_dict(checkpoint["model"], strict=True, assign=True)
    return model.to(device).eval()
