"""SAM 3D Objects structured-latent Gaussian decoder: sparse SLAT voxels → 3D Gaussians (+ 3DGS binary PLY).

A re-implementation of the official `SLatGaussianDecoder` (tdfy_dit/models/structured_latent_vae/decoder_gs.py and
base.py, itself TRELLIS's) with the same parameter names, so `slat_decoder_gs.ckpt` (a plain state_dict with the
`offset_perturbation` buffer) loads with `strict=True`. Data flow: Linear(latent→C) + sin-cos APE of the voxel coords
→ `num_blocks` pre-norm transformer blocks (swin window attention over active voxels, shift window_size//2 on odd
blocks; GELU-tanh MLP; affine-free LayerNorm eps 1e-6 in fp32) → affine-free layer_norm → Linear(C→G·14) → per voxel G
Gaussians (xyz offset = tanh(raw·lr + perturbation)/res·0.5·voxel_size around the voxel centre).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.sam3d_objects.hydra_config import constructor_kwargs
from models.sam3d_objects.sparse_attention import SparseVoxels, windowed_self_attention
from models.sam3d_objects.structure_flow import FeedForwardNet

_TARGETS = {
    "sam3d_objects.model.backbone.tdfy_dit.models.structured_latent_vae.decoder_gs.SLatGaussianDecoderTdfyWrapper",
    "sam3d_objects.model.backbone.tdfy_dit.models.structured_latent_vae.decoder_gs.SLatGaussianDecoder",
}
# Constructor arguments of the swin trunk both structured-latent decoders share.
TRUNK_KEYS = {
    "resolution",
    "model_channels",
    "latent_channels",
    "num_blocks",
    "num_heads",
    "num_head_channels",
    "mlp_ratio",
    "attn_mode",
    "window_size",
    "pe_mode",
    "qk_rms_norm",
}
_ACCEPTED = TRUNK_KEYS | {"representation_config"}
# use_fp16 only picks the official torso dtype (we run fp32); weights are loaded by the caller, not the constructor.
_IGNORED = {"use_fp16", "use_checkpoint", "pretrained_ckpt_path"}
_REPRESENTATION_KEYS = {
    "lr",
    "perturb_offset",
    "voxel_size",
    "num_gaussians",
    "2d_filter_kernel_size",
    "3d_filter_kernel_size",
    "scaling_bias",
    "opacity_bias",
    "scaling_activation",
}
_FIELDS = ("_xyz", "_features_dc", "_scaling", "_rotation", "_opacity")
_AABB = (-0.5, -0.5, -0.5, 1.0, 1.0, 1.0)
_PLY_PROPERTIES = (
    *("x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity"),
    *("scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"),
)


@dataclass(frozen=True)
class RepresentationConfig:
    """The official `representation_config`; `2d_filter_kernel_size` is render-time only and kept for completeness."""

    lr: Mapping[str, float]
    perturb_offset: bool
    voxel_size: float
    num_gaussians: int
    filter_2d_kernel_size: float
    filter_3d_kernel_size: float
    scaling_bias: float
    opacity_bias: float
    scaling_activation: str

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> RepresentationConfig:
        """Explicit mapping from the yaml names; refuses unknown keys and unsupported activations by name."""
        unknown = set(config) - _REPRESENTATION_KEYS
        if unknown:
            raise ValueError(f"gs decoder representation_config: unsupported keys {sorted(unknown)}")
        missing = _REPRESENTATION_KEYS - set(config)
        if missing:
            raise ValueError(f"gs decoder representation_config: missing keys {sorted(missing)}")
        if set(config["lr"]) != set(_FIELDS):
            raise ValueError(f"gs decoder lr must name exactly {list(_FIELDS)}, got {sorted(config['lr'])}")
        if config["scaling_activation"] not in ("exp", "softplus"):
            raise ValueError(f"unsupported scaling_activation {config['scaling_activation']!r}; known: exp, softplus")
        return cls(
            lr={key: float(value) for key, value in config["lr"].items()},
            perturb_offset=bool(config["perturb_offset"]),
            voxel_size=float(config["voxel_size"]),
            num_gaussians=int(config["num_gaussians"]),
            filter_2d_kernel_size=float(config["2d_filter_kernel_size"]),
            filter_3d_kernel_size=float(config["3d_filter_kernel_size"]),
            scaling_bias=float(config["scaling_bias"]),
            opacity_bias=float(config["opacity_bias"]),
            scaling_activation=config["scaling_activation"],
        )


def _inverse_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x / (1 - x))


@dataclass
class GaussianSet:
    """One object's Gaussians: raw fields as the official `Gaussian` stores them, activated values as properties.

    Rows are voxel-major: voxel i of the input owns rows i·G .. i·G+G-1.
    """

    _xyz: torch.Tensor  # (M, 3) in [0, 1]³ grid units
    _features_dc: torch.Tensor  # (M, 1, 3) SH degree-0 colour coefficients
    _scaling: torch.Tensor  # (M, 3)
    _rotation: torch.Tensor  # (M, 4) quaternion (w, x, y, z) minus the identity
    _opacity: torch.Tensor  # (M, 1)
    scaling_bias: float
    opacity_bias: float
    min_kernel_size: float
    scaling_activation: str

    def _scale_act(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(x) if self.scaling_activation == "softplus" else torch.exp(x)

    def _scale_bias(self) -> torch.Tensor:
        bias = torch.tensor(self.scaling_bias)
        return bias + torch.log(-torch.expm1(-bias)) if self.scaling_activation == "softplus" else torch.log(bias)

    @property
    def get_xyz(self) -> torch.Tensor:
        """World positions: _xyz · aabb size + aabb min (aabb = [-0.5]*3 + [1]*3, i.e. the unit cube at the origin)."""
        aabb = torch.tensor(_AABB, dtype=self._xyz.dtype, device=self._xyz.device)
        return self._xyz * aabb[3:] + aabb[:3]

    @property
    def get_scaling(self) -> torch.Tensor:
        """sqrt(act(_scaling + inv_act(scaling_bias))² + 3d_filter²): scales never fall below the 3D filter size."""
        scales = self._scale_act(self._scaling + self._scale_bias().to(self._scaling))
        return torch.sqrt(torch.square(scales) + self.min_kernel_size**2)

    @property
    def get_rotation(self) -> torch.Tensor:
        """Unit quaternion normalize(_rotation + [1, 0, 0, 0])."""
        return F.normalize(self._rotation + self._rotation_bias(), dim=-1)

    @property
    def get_opacity(self) -> torch.Tensor:
        """sigmoid(_opacity + logit(opacity_bias))."""
        return torch.sigmoid(self._opacity + _inverse_sigmoid(torch.tensor(self.opacity_bias)).to(self._opacity))

    @property
    def get_features(self) -> torch.Tensor:
        """SH coefficients (M, 1, 3); degree 0 only, so just the DC term."""
        return self._features_dc

    def _rotation_bias(self) -> torch.Tensor:
        return torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=self._rotation.dtype, device=self._rotation.device)


def splat_table(gaussians: GaussianSet) -> np.ndarray:
    """(M, 17) float32 rows of the standard 3DGS PLY as official `Gaussian.save_ply` writes them: position,
    zero normal, SH degree-0 colour, logit opacity, log scale, raw (unnormalised) (w, x, y, z) rotation."""
    columns = [
        gaussians.get_xyz,
        torch.zeros_like(gaussians._xyz),
        gaussians._features_dc.transpose(1, 2).flatten(1),
        _inverse_sigmoid(gaussians.get_opacity),
        torch.log(gaussians.get_scaling),
        gaussians._rotation + gaussians._rotation_bias(),
    ]
    return torch.cat([c.detach().float().cpu() for c in columns], dim=1).numpy()


def splat_ply(table: np.ndarray) -> bytes:
    """Binary little-endian PLY of `splat_table` rows."""
    header = "".join(
        ["ply\n", "format binary_little_endian 1.0\n", f"element vertex {table.shape[0]}\n"]
        + [f"property float {name}\n" for name in _PLY_PROPERTIES]
        + ["end_header\n"]
    )
    return header.encode("ascii") + np.ascontiguousarray(table, dtype="<f4").tobytes()


def gaussians_ply(gaussians: GaussianSet) -> bytes:
    """One object's Gaussians as the official `Gaussian.save_ply` file."""
    return splat_ply(splat_table(gaussians))


def sincos_position_embedding(positions: torch.Tensor, channels: int) -> torch.Tensor:
    """Official `AbsolutePositionEmbedder`: per axis [sin, cos](p·10000^(-k/F)), F = C//3//2, zero-padded to C."""
    n, dims = positions.shape
    freq_dim = channels // dims // 2
    freqs = 1.0 / (10000 ** (torch.arange(freq_dim, dtype=torch.float32, device=positions.device) / freq_dim))
    angles = torch.outer(positions.reshape(-1).float(), freqs)
    embed = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1).reshape(n, -1)
    return F.pad(embed, (0, channels - embed.shape[1]))


def _radical_inverse(base: int, n: int) -> float:
    """Van der Corput radical inverse of n in `base` (official `radical_inverse`)."""
    inv_base = 1.0 / base
    value, scale = 0.0, inv_base
    while n > 0:
        value += (n % base) * scale
        n //= base
        scale *= inv_base
    return value


def hammersley_perturbation(num_gaussians: int, voxel_size: float) -> torch.Tensor:
    """The official `offset_perturbation`: atanh((2·Hammersley_3D(i) − 1)/voxel_size); NaN where voxel_size < 1."""
    points = [[i / num_gaussians, _radical_inverse(2, i), _radical_inverse(3, i)] for i in range(num_gaussians)]
    perturbation = torch.tensor(points, dtype=torch.float32) * 2 - 1
    return torch.atanh(perturbation / voxel_size)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back (official LayerNorm32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class SparseWindowAttention(nn.Module):
    """Multi-head self-attention inside `window_size`³ cells of the grid shifted by `shift` (keys to_qkv, to_out)."""

    def __init__(self, channels: int, num_heads: int, window_size: int, shift: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels {channels} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift = shift
        self.to_qkv = nn.Linear(channels, channels * 3)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        q, k, v = self.to_qkv(x).reshape(x.shape[0], 3, self.num_heads, -1).unbind(dim=1)
        h = windowed_self_attention(q, k, v, coords, self.window_size, self.shift)
        return self.to_out(h.reshape(x.shape[0], -1))


class SparseTransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm1 x), then x + mlp(norm2 x); norms are affine-free (no state_dict keys)."""

    def __init__(self, channels: int, num_heads: int, mlp_ratio: float, window_size: int, shift: int) -> None:
        super().__init__()
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.attn = SparseWindowAttention(channels, num_heads, window_size, shift)
        self.mlp = FeedForwardNet(channels, mlp_ratio)

    def forward(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), coords)
        return x + self.mlp(self.norm2(x))


class SwinLatentDecoder(nn.Module):
    """The trunk the structured-latent decoders share: a linear input layer plus absolute sin-cos
    position embedding of the voxel coordinates, then swin-style sparse transformer blocks
    (windows shifted by half a window on odd blocks)."""

    def __init__(
        self,
        resolution: int,
        model_channels: int,
        latent_channels: int,
        num_blocks: int,
        num_heads: int | None = None,
        num_head_channels: int = 64,
        mlp_ratio: float = 4.0,
        attn_mode: str = "swin",
        window_size: int = 8,
        pe_mode: str = "ape",
        qk_rms_norm: bool = False,
    ) -> None:
        super().__init__()
        if attn_mode != "swin":
            raise ValueError(f"unsupported attn_mode {attn_mode!r}; only 'swin' (the released config) is implemented")
        if pe_mode != "ape":
            raise ValueError(f"unsupported pe_mode {pe_mode!r}; only 'ape' is implemented")
        if qk_rms_norm:
            raise ValueError("qk_rms_norm=True is not implemented (the released config has it off)")
        self.resolution = resolution
        self.model_channels = model_channels
        heads = num_heads or model_channels // num_head_channels
        self.input_layer = nn.Linear(latent_channels, model_channels)
        self.blocks = nn.ModuleList(
            SparseTransformerBlock(model_channels, heads, mlp_ratio, window_size, window_size // 2 * (i % 2))
            for i in range(num_blocks)
        )

    def trunk(self, x: SparseVoxels) -> torch.Tensor:
        """(N, model_channels) features of the voxels after the transformer blocks."""
        h = self.input_layer(x.feats.float()) + sincos_position_embedding(x.coords[:, 1:], self.model_channels)
        for block in self.blocks:
            h = block(h, x.coords)
        return h


class SLatGaussianDecoder(SwinLatentDecoder):
    """Structured latent (N voxels × latent_channels) → `num_gaussians` Gaussians per voxel; swin attention, APE."""

    def __init__(
        self,
        resolution: int,
        model_channels: int,
        latent_channels: int,
        num_blocks: int,
        representation_config: Mapping[str, Any],
        **trunk: Any,
    ) -> None:
        super().__init__(resolution, model_channels, latent_channels, num_blocks, **trunk)
        self.rep = RepresentationConfig.from_mapping(representation_config)
        g = self.rep.num_gaussians
        # Official output layout order and per-Gaussian sizes: xyz 3, features_dc 3, scaling 3, rotation 4, opacity 1.
        self.layout = {"_xyz": (3,), "_features_dc": (1, 3), "_scaling": (3,), "_rotation": (4,), "_opacity": (1,)}
        out_channels = g * sum(int(np.prod(shape)) for shape in self.layout.values())
        self.out_layer = nn.Linear(model_channels, out_channels)
        self.register_buffer("offset_perturbation", hammersley_perturbation(g, self.rep.voxel_size))

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | str | Path) -> SLatGaussianDecoder:
        """Build from the official hydra config (mapping or yaml file); refuses unknown keys. Weights stay random."""
        return cls(**constructor_kwargs(config, "gs decoder", _TARGETS, _ACCEPTED, _IGNORED))

    def forward(self, x: SparseVoxels) -> list[GaussianSet]:
        """Decode de-normalised structured latents (coords sorted by batch) into one GaussianSet per batch item."""
        h = self.out_layer(F.layer_norm(self.trunk(x), (self.model_channels,))).float()  # fields in fp32
        return [self.to_gaussians(x.coords[rows], h[rows]) for rows in x.batch_slices()]

    def to_gaussians(self, coords: torch.Tensor, out: torch.Tensor) -> GaussianSet:
        """Split one item's (N, G·14) output into Gaussian fields (official `to_representation`)."""
        g, rep = self.rep.num_gaussians, self.rep
        fields: dict[str, torch.Tensor] = {}
        start = 0
        for name, shape in self.layout.items():
            size = g * int(np.prod(shape))
            raw = out[:, start : start + size].reshape(-1, g, *shape) * rep.lr[name]
            start += size
            if name == "_xyz":
                if rep.perturb_offset:
                    raw = raw + self.offset_perturbation
                centres = (coords[:, 1:].float() + 0.5) / self.resolution
                raw = centres.unsqueeze(1) + torch.tanh(raw) / self.resolution * 0.5 * rep.voxel_size
            fields[name] = raw.flatten(0, 1)
        return GaussianSet(
            **fields,
            scaling_bias=rep.scaling_bias,
            opacity_bias=rep.opacity_bias,
            min_kernel_size=rep.filter_3d_kernel_size,
            scaling_activation=rep.scaling_activation,
        )
