"""Structured-latent (SLAT) flow model of SAM 3D Objects and its sampling.

Follows the official `SLatFlowModelTdfyWrapper` (tdfy_dit/models/structured_latent_flow.py, from TRELLIS): the
per-voxel latents go through `SparseLinear` -> input `SparseResBlock3d`s (submanifold 3³ convs, adaLN scale/shift
from the time embedding; the last of each stage average-pools by 2) -> sin-cos APE of the coarse coords -> adaLN
`ModulatedSparseTransformerCrossBlock`s (full self-attention per batch item with q/k RMS norm, cross-attention to
the condition tokens, GELU-tanh MLP) -> output res-blocks on concat(h, skip) (the first of each stage upsamples by
2) -> parameter-free LayerNorm -> `SparseLinear`. Module names follow the official ones, so the state dict equals the
`_base_models.generator.reverse_fn.backbone.*` entries of `slat_generator.ckpt` with that prefix stripped.
Sampling reuses the geometry model's `FlowSampler` (FlowMatching, Euler, CFG with cond*0) on fixed coords.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.sam3d_objects.flow_sampler import FlowSampler
from models.sam3d_objects.sparse_attention import SparseVoxels
from models.sam3d_objects.sparse_conv import SparseConv3d, submanifold_neighbors
from models.sam3d_objects.sparse_resample import downsample, upsample
from models.sam3d_objects.structure_flow import (
    CrossAttention,
    FeedForwardNet,
    MultiHeadRMSNorm,
    TimestepEmbedder,
    attention,
)

_WRAPPER_TARGET = "sam3d_objects.model.backbone.tdfy_dit.models.structured_latent_flow.SLatFlowModelTdfyWrapper"
_REQUIRED = {
    "resolution",
    "in_channels",
    "model_channels",
    "cond_channels",
    "out_channels",
    "num_blocks",
    "io_block_channels",
}
_OPTIONAL = {
    "num_heads",
    "num_head_channels",
    "mlp_ratio",
    "patch_size",
    "num_io_res_blocks",
    "use_skip_connection",
    "qk_rms_norm",
    "qk_rms_norm_cross",
    "is_shortcut_model",
    "force_zeros_cond",
}
# Runtime precision / activation-checkpointing switches: no effect on keys or fp32 results.
_IGNORED = {"use_fp16", "use_checkpoint"}
_FIXED = {"pe_mode": "ape", "share_mod": False, "condition_embedder": None}


def position_embedding(xyz: torch.Tensor, channels: int) -> torch.Tensor:
    """Official `AbsolutePositionEmbedder(channels, 3)`: `[sin, cos]` per axis of (N, 3) coords, zero-padded."""
    freq_dim = channels // 3 // 2
    freqs = 1.0 / (10000 ** (torch.arange(freq_dim, dtype=torch.float32, device=xyz.device) / freq_dim))
    out = torch.outer(xyz.reshape(-1).float(), freqs)
    embed = torch.cat([torch.sin(out), torch.cos(out)], dim=-1).reshape(xyz.shape[0], -1)
    return F.pad(embed, (0, channels - embed.shape[1]))


class SparseResBlock3d(nn.Module):
    """Pre-norm conv res-block with adaLN scale/shift. `downsample` / `upsample` mark the blocks whose input the
    model resamples by 2 first (the official block does it inside; the resampled input also feeds the skip)."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int,
        downsample: bool = False,
        upsample: bool = False,
    ) -> None:
        super().__init__()
        if downsample and upsample:
            raise ValueError("cannot downsample and upsample at the same time")
        self.downsample = downsample
        self.upsample = upsample
        self.norm1 = nn.LayerNorm(channels, eps=1e-6)
        self.norm2 = nn.LayerNorm(out_channels, elementwise_affine=False, eps=1e-6)
        self.conv1 = SparseConv3d(channels, out_channels, 3)
        self.conv2 = SparseConv3d(out_channels, out_channels, 3)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.skip_connection = nn.Linear(channels, out_channels) if channels != out_channels else nn.Identity()

    def forward(self, x: SparseVoxels, emb: torch.Tensor, neighbors: torch.Tensor) -> SparseVoxels:
        """`emb` (B, emb_channels); `neighbors` from `submanifold_neighbors(x.coords)`."""
        scale, shift = self.emb_layers(emb).chunk(2, dim=1)
        batch = x.coords[:, 0].long()
        h = self.conv1(F.silu(self.norm1(x.feats)), neighbors)
        h = F.silu(self.norm2(h) * (1 + scale[batch]) + shift[batch])
        h = self.conv2(h, neighbors)
        return x.replace(h + self.skip_connection(x.feats))


class SparseSelfAttention(nn.Module):
    """Full multi-head self-attention within each batch item (official `SparseMultiHeadAttention`, type self)."""

    def __init__(self, channels: int, num_heads: int, qk_rms_norm: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_qkv = nn.Linear(channels, channels * 3)
        self.qk_rms_norm = qk_rms_norm
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(channels // num_heads, num_heads)
            self.k_rms_norm = MultiHeadRMSNorm(channels // num_heads, num_heads)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, feats: torch.Tensor, slices: list[slice]) -> torch.Tensor:
        q, k, v = self.to_qkv(feats).unflatten(-1, (3, self.num_heads, -1)).unbind(dim=1)
        if self.qk_rms_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        return self.to_out(torch.cat([attention(q[s][None], k[s][None], v[s][None])[0] for s in slices]))


class ModulatedSparseTransformerCrossBlock(nn.Module):
    """adaLN-modulated self-attention -> cross-attention to the condition tokens -> MLP, on sparse tokens."""

    def __init__(
        self,
        channels: int,
        ctx_channels: int,
        num_heads: int,
        mlp_ratio: float,
        qk_rms_norm: bool,
        qk_rms_norm_cross: bool,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(channels, eps=1e-6)
        self.norm3 = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.self_attn = SparseSelfAttention(channels, num_heads, qk_rms_norm)
        self.cross_attn = CrossAttention(channels, ctx_channels, num_heads, qk_rms_norm_cross)
        self.mlp = FeedForwardNet(channels, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels))

    def forward(self, x: SparseVoxels, mod: torch.Tensor, context: torch.Tensor) -> SparseVoxels:
        """`mod` (B, channels) time embedding; `context` (B, L, ctx_channels)."""
        batch = x.coords[:, 0].long()
        slices = x.batch_slices()
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            m[batch] for m in self.adaLN_modulation(mod).chunk(6, dim=1)
        )
        h = x.feats
        h = h + self.self_attn(self.norm1(h) * (1 + scale_msa) + shift_msa, slices) * gate_msa
        normed = self.norm2(h)
        h = h + torch.cat([self.cross_attn(normed[s][None], context[b : b + 1])[0] for b, s in enumerate(slices)])
        h = h + self.mlp(self.norm3(h) * (1 + scale_mlp) + shift_mlp) * gate_mlp
        return x.replace(h)


class SLatFlowModel(nn.Module):
    """Velocity network of the structured latents: `forward(x (1, N, in), t, cond, coords) -> (1, N, out)`."""

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        cond_channels: int,
        out_channels: int,
        num_blocks: int,
        num_heads: int,
        io_block_channels: list[int],
        mlp_ratio: float = 4.0,
        num_io_res_blocks: int = 2,
        use_skip_connection: bool = True,
        qk_rms_norm: bool = False,
        qk_rms_norm_cross: bool = False,
        is_shortcut_model: bool = False,
        force_zeros_cond: bool = False,
    ) -> None:
        super().__init__()
        self.model_channels = model_channels
        self.use_skip_connection = use_skip_connection
        self.force_zeros_cond = force_zeros_cond
        self.t_embedder = TimestepEmbedder(model_channels)
        if is_shortcut_model:
            self.d_embedder = TimestepEmbedder(model_channels)
        self.input_layer = nn.Linear(in_channels, io_block_channels[0])
        self.input_blocks = nn.ModuleList()
        for chs, next_chs in zip(io_block_channels, io_block_channels[1:] + [model_channels], strict=True):
            self.input_blocks.extend(SparseResBlock3d(chs, model_channels, chs) for _ in range(num_io_res_blocks - 1))
            self.input_blocks.append(SparseResBlock3d(chs, model_channels, next_chs, downsample=True))
        self.blocks = nn.ModuleList(
            ModulatedSparseTransformerCrossBlock(
                model_channels, cond_channels, num_heads, mlp_ratio, qk_rms_norm, qk_rms_norm_cross
            )
            for _ in range(num_blocks)
        )
        skip = 2 if use_skip_connection else 1
        self.out_blocks = nn.ModuleList()
        prev = [model_channels] + list(reversed(io_block_channels[1:]))
        for chs, prev_chs in zip(reversed(io_block_channels), prev, strict=True):
            self.out_blocks.append(SparseResBlock3d(prev_chs * skip, model_channels, chs, upsample=True))
            self.out_blocks.extend(
                SparseResBlock3d(chs * skip, model_channels, chs) for _ in range(num_io_res_blocks - 1)
            )
        self.out_layer = nn.Linear(io_block_channels[0], out_channels)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        coords: torch.Tensor | np.ndarray,
        d: torch.Tensor | None = None,
        unconditional: bool = False,
    ) -> torch.Tensor:
        """`x` (1, N, in) feats of the voxels `coords` (N, 4) [b, x, y, z] (sorted by batch), `t` (B,) already
        scaled (t*1000), `cond` (B, L, cond_channels). `unconditional` is the official `cfg=True` branch: cond*0
        when `force_zeros_cond`. `d` is the shortcut step size (shortcut models only)."""
        if unconditional and self.force_zeros_cond:
            cond = cond * 0
        coords = torch.as_tensor(coords, device=x.device)
        emb = self.t_embedder(t)
        if d is not None:
            emb = emb + self.d_embedder(d)
        h = SparseVoxels(coords, self.input_layer(x[0]))
        neighbors = [submanifold_neighbors(coords)]
        resampled: list[tuple[torch.Tensor, torch.Tensor]] = []
        skips = []
        for block in self.input_blocks:
            if block.downsample:
                fine_coords = h.coords
                h, idx = downsample(h)
                resampled.append((fine_coords, idx))
                neighbors.append(submanifold_neighbors(h.coords))
            h = block(h, emb, neighbors[-1])
            skips.append(h.feats)
        h = h.replace(h.feats + position_embedding(h.coords[:, 1:], self.model_channels))
        for block in self.blocks:
            h = block(h, emb, cond)
        for block, skip in zip(self.out_blocks, reversed(skips), strict=True):
            if self.use_skip_connection:
                h = h.replace(torch.cat([h.feats, skip], dim=1))
            if block.upsample:
                h = upsample(h, *resampled.pop())
                neighbors.pop()
            h = block(h, emb, neighbors[-1])
        return self.out_layer(F.layer_norm(h.feats, h.feats.shape[-1:]))[None]


def build_slat_flow(config: Mapping[str, Any]) -> SLatFlowModel:
    """Velocity network from the `SLatFlowModelTdfyWrapper` hydra node (the FlowMatching's `reverse_fn.backbone`).
    Raises on missing / unknown keys and unsupported values, by name."""
    if config.get("_target_") != _WRAPPER_TARGET:
        raise ValueError(f"expected _target_ {_WRAPPER_TARGET!r}, got {config.get('_target_')!r}")
    keys = set(config) - {"_target_"}
    missing = _REQUIRED - keys
    unknown = keys - _REQUIRED - _OPTIONAL - _IGNORED - set(_FIXED)
    if missing or unknown:
        raise ValueError(f"{_WRAPPER_TARGET}: missing keys {sorted(missing)}, unsupported keys {sorted(unknown)}")
    for key, value in _FIXED.items():
        if key in config and config[key] != value:
            raise ValueError(f"{_WRAPPER_TARGET}: {key}={config[key]!r} is not supported (only {value!r})")
    channels = int(config["model_channels"])
    io_channels = [int(c) for c in config["io_block_channels"]]
    patch_size = int(config.get("patch_size", 2))
    if 2 ** len(io_channels) != patch_size:
        raise ValueError(
            f"patch_size {patch_size} needs log2(patch_size) == len(io_block_channels) = {len(io_channels)}"
        )
    num_heads = config.get("num_heads") or channels // int(config.get("num_head_channels", 64))
    return SLatFlowModel(
        in_channels=int(config["in_channels"]),
        model_channels=channels,
        cond_channels=int(config["cond_channels"]),
        out_channels=int(config["out_channels"]),
        num_blocks=int(config["num_blocks"]),
        num_heads=int(num_heads),
        io_block_channels=io_channels,
        mlp_ratio=float(config.get("mlp_ratio", 4.0)),
        num_io_res_blocks=int(config.get("num_io_res_blocks", 2)),
        use_skip_connection=bool(config.get("use_skip_connection", True)),
        qk_rms_norm=bool(config.get("qk_rms_norm", False)),
        qk_rms_norm_cross=bool(config.get("qk_rms_norm_cross", False)),
        is_shortcut_model=bool(config.get("is_shortcut_model", False)),
        force_zeros_cond=bool(config.get("force_zeros_cond", False)),
    )


class FixedCoordsVelocity:
    """Adapts `SLatFlowModel` to `FlowSampler`'s dict-of-latents call, with the voxel coords held fixed."""

    def __init__(self, net: SLatFlowModel, coords: torch.Tensor | np.ndarray) -> None:
        self.net = net
        self.coords = coords

    def __call__(
        self,
        x: dict[str, torch.Tensor],
        t: torch.Tensor,
        cond: torch.Tensor,
        d: torch.Tensor | None,
        unconditional: bool = False,
    ) -> dict[str, torch.Tensor]:
        return {"feats": self.net(x["feats"], t, cond, self.coords, d=d, unconditional=unconditional)}


def sample_slat_iter(
    net: SLatFlowModel,
    sampler: FlowSampler,
    x0: torch.Tensor,
    cond: torch.Tensor,
    coords: torch.Tensor | np.ndarray,
) -> Iterator[torch.Tensor]:
    """Yields the (1, N, C) latents after each Euler step from the noise `x0`; the last one is the sample
    (official `FlowMatching.generate_iter` with the CFG `reverse_fn`)."""
    velocity = FixedCoordsVelocity(net, coords)
    for x in sampler.sample_iter(velocity, {"feats": x0}, cond):  # type: ignore[arg-type]
        yield x["feats"]


def denormalize_slat(feats: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Pipeline `slat * slat_std + slat_mean`: the latents the SLAT decoders take."""
    return feats * std + mean
