"""Velocity network of the SAM 3D Objects geometry (sparse-structure) flow model.

The official `SparseStructureFlowTdfyWrapper` (tdfy_dit/models/mot_sparse_structure_flow.py) is a
mixture-of-transformers: each latent modality is projected to tokens (`Latent`), the pose modalities
(6D rotation, translation, scale, translation scale) are concatenated into one shared stream, and every block
runs per-stream weights for norms, attention and MLP while the adaLN modulation from the time (+ shortcut step)
embedding is shared. In self-attention the `shape` stream attends only to itself; the other streams attend to
themselves and to the shape keys/values. Module names follow the official ones, so the state dict equals the
`_base_models.generator.reverse_fn.backbone.*` entries of `ss_generator.ckpt` with that prefix stripped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

# The modality that only attends to itself (official `protect_modality_list` default).
PROTECTED_STREAM = "shape"
VELOCITY_PREFIX = "_base_models.generator.reverse_fn.backbone."


class TimestepEmbedder(nn.Module):
    """Sinusoidal `[cos, sin]` features of a scalar time (already scaled, e.g. t*1000) -> Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        half = frequency_embedding_size // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.reshape(-1, 1).float() * self.freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


def sincos_position_embedding(channels: int, resolution: int) -> torch.Tensor:
    """Fixed `[sin, cos]` embedding of the ij-ordered `resolution`³ grid, zero-padded to `channels`.

    Matches the official `AbsolutePositionEmbedder(channels, 3)` on `ShapePositionEmbedder` coords: token index
    i*res² + j*res + k.
    """
    freq_dim = channels // 3 // 2
    freqs = 1.0 / (10000 ** (torch.arange(freq_dim, dtype=torch.float32) / freq_dim))
    axes = torch.meshgrid(*[torch.arange(resolution)] * 3, indexing="ij")
    coords = torch.stack(axes, dim=-1).reshape(-1, 3).float()
    out = torch.outer(coords.reshape(-1), freqs)
    embed = torch.cat([torch.sin(out), torch.cos(out)], dim=-1).reshape(coords.shape[0], -1)
    return F.pad(embed, (0, channels - embed.shape[1]))


class Latent(nn.Module):
    """One modality's input projection + position embedding and its output head (param-free LayerNorm -> Linear).

    `pos_emb` is a learned parameter for pose tokens and a fixed buffer (the sin-cos grid) for the shape grid.
    """

    def __init__(self, in_channels: int, model_channels: int, pos_emb: torch.Tensor, learned: bool) -> None:
        super().__init__()
        self.input_layer = nn.Linear(in_channels, model_channels)
        self.out_layer = nn.Linear(model_channels, in_channels)
        if learned:
            self.pos_emb = nn.Parameter(pos_emb)
        else:
            self.register_buffer("pos_emb", pos_emb)

    @property
    def token_len(self) -> int:
        return self.pos_emb.shape[0]

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_layer(x) + self.pos_emb[None]

    def to_output(self, h: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.layer_norm(h, h.shape[-1:]))


class MultiHeadRMSNorm(nn.Module):
    """Per-head L2 normalisation scaled by a learned gamma and sqrt(head_dim), on (..., heads, head_dim)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(heads, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) * self.gamma * self.scale


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA on (B, L, H, D) tensors, returning (B, L, H*D)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)


class CrossAttention(nn.Module):
    """Multi-head cross-attention from stream tokens to condition tokens (optional q/k RMS norm)."""

    def __init__(self, channels: int, ctx_channels: int, num_heads: int, qk_rms_norm: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(channels, channels)
        self.to_kv = nn.Linear(ctx_channels, channels * 2)
        self.to_out = nn.Linear(channels, channels)
        self.qk_rms_norm = qk_rms_norm
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(channels // num_heads, num_heads)
            self.k_rms_norm = MultiHeadRMSNorm(channels // num_heads, num_heads)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = self.to_q(x).unflatten(-1, (self.num_heads, -1))
        k, v = self.to_kv(context).unflatten(-1, (2, self.num_heads, -1)).unbind(dim=2)
        if self.qk_rms_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        return self.to_out(attention(q, k, v))


class MOTSelfAttention(nn.Module):
    """Per-stream qkv / q-k RMS norm / output projections with the shape-protected attention pattern.

    The protected `shape` stream attends to its own tokens; all other streams are concatenated (stream order) and
    attend to [their own keys; shape keys]. The official code detaches the shape keys there, which only matters
    for training.
    """

    def __init__(self, channels: int, num_heads: int, streams: list[str]) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = channels // num_heads
        self.to_qkv = nn.ModuleDict({n: nn.Linear(channels, channels * 3) for n in streams})
        self.q_rms_norm = nn.ModuleDict({n: MultiHeadRMSNorm(head_dim, num_heads) for n in streams})
        self.k_rms_norm = nn.ModuleDict({n: MultiHeadRMSNorm(head_dim, num_heads) for n in streams})
        self.to_out = nn.ModuleDict({n: nn.Linear(channels, channels) for n in streams})

    def forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        q, k, v = {}, {}, {}
        for name, h in x.items():
            q[name], k[name], v[name] = self.to_qkv[name](h).unflatten(-1, (3, self.num_heads, -1)).unbind(dim=2)
            q[name] = self.q_rms_norm[name](q[name])
            k[name] = self.k_rms_norm[name](k[name])
        out = {PROTECTED_STREAM: attention(q[PROTECTED_STREAM], k[PROTECTED_STREAM], v[PROTECTED_STREAM])}
        others = [n for n in x if n != PROTECTED_STREAM]
        if others:
            h = attention(
                torch.cat([q[n] for n in others], dim=1),
                torch.cat([k[n] for n in others] + [k[PROTECTED_STREAM]], dim=1),
                torch.cat([v[n] for n in others] + [v[PROTECTED_STREAM]], dim=1),
            )
            for part, name in zip(h.split([x[n].shape[1] for n in others], dim=1), others, strict=True):
                out[name] = part
        return {name: self.to_out[name](out[name]) for name in x}


class FeedForwardNet(nn.Module):
    """Linear -> GELU(tanh) -> Linear, wrapped so keys read `mlp.{0,2}.*` as in the checkpoints."""

    def __init__(self, channels: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class MOTModulatedTransformerCrossBlock(nn.Module):
    """adaLN-modulated self-attention -> cross-attention -> MLP, with per-stream weights and shared modulation."""

    def __init__(
        self,
        channels: int,
        ctx_channels: int,
        num_heads: int,
        mlp_ratio: float,
        streams: list[str],
        qk_rms_norm_cross: bool,
    ) -> None:
        super().__init__()
        self.norm2 = nn.ModuleDict({n: nn.LayerNorm(channels, eps=1e-6) for n in streams})
        self.self_attn = MOTSelfAttention(channels, num_heads, streams)
        self.cross_attn = nn.ModuleDict(
            {n: CrossAttention(channels, ctx_channels, num_heads, qk_rms_norm_cross) for n in streams}
        )
        self.mlp = nn.ModuleDict({n: FeedForwardNet(channels, mlp_ratio) for n in streams})
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels))

    def forward(self, x: dict[str, torch.Tensor], t_emb: torch.Tensor, cond: torch.Tensor) -> dict[str, torch.Tensor]:
        mods = [m.unsqueeze(1) for m in self.adaLN_modulation(t_emb).chunk(6, dim=1)]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods

        def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return F.layer_norm(h, h.shape[-1:], eps=1e-6) * (1 + scale) + shift

        h = self.self_attn({n: modulate(v, shift_msa, scale_msa) for n, v in x.items()})
        x = {n: v + h[n] * gate_msa for n, v in x.items()}
        x = {n: v + self.cross_attn[n](self.norm2[n](v), cond) for n, v in x.items()}
        return {n: v + self.mlp[n](modulate(v, shift_mlp, scale_mlp)) * gate_mlp for n, v in x.items()}


class SparseStructureFlow(nn.Module):
    """Geometry flow velocity network: latents dict + time (x1000) + cond tokens -> velocity dict.

    `latent_share_transformer` maps a stream name to the modalities concatenated (in that order) into it; every
    other modality is its own stream. `d` is the shortcut step size (x1000); when given (the samplers always give
    it, 0 in plain flow mode) its embedding is added to the time embedding.
    """

    def __init__(
        self,
        latents: Mapping[str, Latent],
        latent_share_transformer: Mapping[str, list[str]],
        model_channels: int,
        cond_channels: int,
        num_blocks: int,
        num_heads: int,
        mlp_ratio: float,
        is_shortcut_model: bool,
        qk_rms_norm_cross: bool,
        force_zeros_cond: bool,
    ) -> None:
        super().__init__()
        merged = {m for members in latent_share_transformer.values() for m in members}
        unknown = merged - set(latents)
        if unknown:
            raise ValueError(f"latent_share_transformer names unknown modalities {sorted(unknown)}")
        self.streams = [n for n in latents if n not in merged] + list(latent_share_transformer)
        if PROTECTED_STREAM not in self.streams:
            raise ValueError(f"the {PROTECTED_STREAM!r} modality must be its own stream; streams: {self.streams}")
        self.share = {n: list(m) for n, m in latent_share_transformer.items()}
        self.force_zeros_cond = force_zeros_cond
        if is_shortcut_model:
            self.d_embedder = TimestepEmbedder(model_channels)
        self.t_embedder = TimestepEmbedder(model_channels)
        self.blocks = nn.ModuleList(
            MOTModulatedTransformerCrossBlock(
                model_channels, cond_channels, num_heads, mlp_ratio, self.streams, qk_rms_norm_cross
            )
            for _ in range(num_blocks)
        )
        self.latent_mapping = nn.ModuleDict(latents)

    def forward(
        self,
        latents: Mapping[str, torch.Tensor],
        t: torch.Tensor,
        cond: torch.Tensor,
        d: torch.Tensor | None = None,
        unconditional: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Velocity per modality. `unconditional` is the CFG branch: cond*0 when `force_zeros_cond` (official
        `cfg=True` flag; without force_zeros_cond the flag leaves cond unchanged)."""
        if unconditional and self.force_zeros_cond:
            cond = cond * 0
        t_emb = self.t_embedder(t)
        if d is not None:
            t_emb = t_emb + self.d_embedder(d)
        tokens = {n: self.latent_mapping[n].to_input(latents[n]) for n in self.latent_mapping}
        h = {
            n: torch.cat([tokens[m] for m in self.share[n]], dim=1) if n in self.share else tokens[n]
            for n in self.streams
        }
        for block in self.blocks:
            h = block(h, t_emb, cond)
        out: dict[str, torch.Tensor] = {}
        for name in self.streams:
            members = self.share.get(name, [name])
            sizes = [self.latent_mapping[m].token_len for m in members]
            for member, part in zip(members, h[name].split(sizes, dim=1), strict=True):
                out[member] = self.latent_mapping[member].to_output(part)
        return {n: out[n] for n in self.latent_mapping}


# Hydra targets of the official configs.
_MM_LATENT = "sam3d_objects.model.backbone.tdfy_dit.models.mm_latent."
_LATENT_TARGET = _MM_LATENT + "Latent"
_LEARNT_POS = _MM_LATENT + "LearntPositionEmbedder"
_SHAPE_POS = _MM_LATENT + "ShapePositionEmbedder"
_WRAPPER_TARGET = (
    "sam3d_objects.model.backbone.tdfy_dit.models.mot_sparse_structure_flow.SparseStructureFlowTdfyWrapper"
)
_WRAPPER_REQUIRED = {
    "in_channels",
    "out_channels",
    "model_channels",
    "cond_channels",
    "num_blocks",
    "latent_mapping",
}
_WRAPPER_OPTIONAL = {
    "num_heads",
    "num_head_channels",
    "mlp_ratio",
    "latent_share_transformer",
    "is_shortcut_model",
    "qk_rms_norm_cross",
    "force_zeros_cond",
}
# Keys with no effect at inference here: fp16/checkpointing/freezing are training or precision choices of the
# runner; resolution/patch_size are only read by the shape position embedder's own config; the official code
# pops shape_attend_pose unused.
_WRAPPER_IGNORED = {
    "use_fp16",
    "use_checkpoint",
    "freeze_shared_parameters",
    "freeze_d_time_embedder",
    "resolution",
    "patch_size",
    "shape_attend_pose",
}
# Keys whose only supported value is fixed by this implementation.
_WRAPPER_FIXED = {"pe_mode": "ape", "share_mod": False, "qk_rms_norm": True, "condition_embedder": None}


def _check(target: str, config: Mapping[str, Any], required: set[str], optional: set[str]) -> None:
    """Refuses missing and unknown keys of one hydra node, naming them."""
    keys = set(config) - {"_target_"}
    missing = required - keys
    unknown = keys - required - optional
    if missing or unknown:
        raise ValueError(f"{target}: missing keys {sorted(missing)}, unsupported keys {sorted(unknown)}")


def _build_latent(name: str, config: Mapping[str, Any]) -> Latent:
    """`mm_latent.Latent` node with a learned or shape-grid position embedder."""
    if config.get("_target_") != _LATENT_TARGET:
        raise ValueError(f"latent_mapping.{name}: expected _target_ {_LATENT_TARGET!r}, got {config.get('_target_')!r}")
    _check(_LATENT_TARGET, config, {"in_channels", "model_channels", "pos_embedder"}, set())
    channels = int(config["model_channels"])
    pos = config["pos_embedder"]
    target = pos.get("_target_")
    if target == _LEARNT_POS:
        _check(target, pos, {"model_channels", "token_len"}, set())
        pos_emb, learned = torch.zeros(int(pos["token_len"]), int(pos["model_channels"])), True
    elif target == _SHAPE_POS:
        _check(target, pos, {"model_channels", "resolution", "patch_size"}, set())
        pos_emb = sincos_position_embedding(
            int(pos["model_channels"]), int(pos["resolution"]) // int(pos["patch_size"])
        )
        learned = False
    else:
        raise ValueError(f"latent_mapping.{name}.pos_embedder: unknown _target_ {target!r}")
    if pos_emb.shape[1] != channels:
        raise ValueError(f"latent_mapping.{name}: pos_embedder width {pos_emb.shape[1]} != model_channels {channels}")
    return Latent(int(config["in_channels"]), channels, pos_emb, learned)


def build_structure_flow(config: Mapping[str, Any]) -> SparseStructureFlow:
    """Velocity network from the `SparseStructureFlowTdfyWrapper` hydra node (the ShortCut's
    `reverse_fn.backbone`). Raises on unknown keys/targets and unsupported values, by name."""
    if config.get("_target_") != _WRAPPER_TARGET:
        raise ValueError(f"expected _target_ {_WRAPPER_TARGET!r}, got {config.get('_target_')!r}")
    _check(_WRAPPER_TARGET, config, _WRAPPER_REQUIRED, _WRAPPER_OPTIONAL | _WRAPPER_IGNORED | set(_WRAPPER_FIXED))
    for key, value in _WRAPPER_FIXED.items():
        if key in config and config[key] != value:
            raise ValueError(f"{_WRAPPER_TARGET}: {key}={config[key]!r} is not supported (only {value!r})")
    channels = int(config["model_channels"])
    num_heads = config.get("num_heads") or channels // int(config.get("num_head_channels", 64))
    latents = {name: _build_latent(name, node) for name, node in config["latent_mapping"].items()}
    return SparseStructureFlow(
        latents=latents,
        latent_share_transformer=config.get("latent_share_transformer") or {},
        model_channels=channels,
        cond_channels=int(config["cond_channels"]),
        num_blocks=int(config["num_blocks"]),
        num_heads=int(num_heads),
        mlp_ratio=float(config.get("mlp_ratio", 4.0)),
        is_shortcut_model=bool(config.get("is_shortcut_model", False)),
        qk_rms_norm_cross=bool(config.get("qk_rms_norm_cross", False)),
        force_zeros_cond=bool(config.get("force_zeros_cond", False)),
    )


def load_generator_config(path: str | Path) -> dict[str, Any]:
    """The generator (ShortCut / FlowMatching) hydra node of an ss_generator yaml: `module.generator.backbone`
    in the fixture layout, or the top level when the file is that node itself."""
    config = yaml.safe_load(Path(path).read_text())
    return config["module"]["generator"]["backbone"] if "module" in config else config


def velocity_state_dict(checkpoint_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The velocity network's entries of an ss_generator ckpt `state_dict`, prefix stripped."""
    return {k[len(VELOCITY_PREFIX) :]: v for k, v in checkpoint_state.items() if k.startswith(VELOCITY_PREFIX)}
