"""Condition embedder of SAM 3D Objects: image, mask and pointmap inputs -> one sequence of condition tokens.

The official `EmbedderFuser` runs a list of embedders, each on one or more named inputs ("kwargs"), projects every
output to a common width (LayerNorm -> llama3 SwiGLU feed-forward), adds a learned embedding of the input's
position group ("cropped" / "full") and concatenates all tokens in list order. The embedders are `Dino` (a DINOv2
ViT on resized, ImageNet-normalised images or masks) and `PointPatchEmbed` (a windowed encoder of a pointmap whose
invalid pixels are NaN/inf). Module names follow the official ones, so the state dict of `EmbedderFuser` equals
the `_base_models.condition_embedder.*` entries of `ss_generator.ckpt` / `slat_generator.ckpt` with that prefix
stripped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from models.sam3d_objects.dinov2 import DINOV2_SPECS, DinoV2Model, ViTBlock

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SwiGLUFeedForward(nn.Module):
    """llama3 feed-forward `w2(silu(w1 x) * w3 x)` without biases.

    As in llama3, the requested hidden width is scaled by 2/3 and rounded up to a multiple of `multiple_of`.
    """

    def __init__(self, dim: int, hidden_dim: int, output_dim: int, multiple_of: int = 256) -> None:
        super().__init__()
        hidden_dim = int(2 * hidden_dim / 3)
        hidden_dim = multiple_of * -(-hidden_dim // multiple_of)
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, output_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ProjectionNet(nn.Sequential):
    """Per-token projection of one embedder's output to the fused width: (LayerNorm) -> SwiGLU feed-forward.

    A `Sequential` so the keys are `0.*` (norm) and `1.*` (feed-forward), as in the checkpoints.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_multiplier: float, pre_norm: bool = True) -> None:
        super().__init__(
            nn.LayerNorm(in_dim) if pre_norm else nn.Identity(),
            SwiGLUFeedForward(in_dim, int(hidden_multiplier * out_dim), out_dim),
        )


class DinoEmbedder(nn.Module):
    """DINOv2 tokens of an image or a mask (official `Dino`).

    The input is resized (bilinear) to `input_size`, 1-channel masks are repeated to 3 channels, and ImageNet
    mean/std normalisation is applied to images and masks alike. Tokens are the normed class + patch tokens, or with
    `prenorm_features` a parameter-free LayerNorm of all pre-norm tokens (class, registers and patches).
    """

    def __init__(
        self, dino_model: str, input_size: int, normalize_images: bool = True, prenorm_features: bool = False
    ) -> None:
        super().__init__()
        if dino_model not in DINOV2_SPECS:
            raise ValueError(f"unknown DINOv2 model {dino_model!r}; known: {sorted(DINOV2_SPECS)}")
        self.backbone = DinoV2Model(DINOV2_SPECS[dino_model])
        self.embed_dim = self.backbone.embed_dim
        self.input_size = input_size
        self.normalize_images = normalize_images
        self.prenorm_features = prenorm_features
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(3, 1, 1), persistent=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, 1|3, H, W]` in [0, 1] -> normalised `[B, 3, input_size, input_size]`."""
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if self.normalize_images:
            x = (x - self.mean) / self.std
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone.forward_features(self.preprocess(x))
        if self.prenorm_features:
            tokens = F.layer_norm(features.prenorm, features.prenorm.shape[-1:])
        else:
            tokens = torch.cat([features.cls_token[:, None], features.patch_tokens], dim=1)
        return tokens.to(x.dtype)


class PointPatchEmbed(nn.Module):
    """Pointmap encoder: one token per `patch_size` window (official `PointPatchEmbed`, MCC-style).

    The `[B, 3, H, W]` pointmap is resized (nearest) to `input_size`. Each point is projected linearly; points with
    any non-finite coordinate get the learned `invalid_xyz_token` instead. Every window's points, a window class
    token and a per-point position embedding go through one transformer block; the window class outputs plus a
    learned window-grid position embedding are the tokens. Only the identity ("linear") point remapping of the
    released configs is supported.
    """

    def __init__(self, input_size: int, patch_size: int, embed_dim: int, num_heads: int = 16) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        grid = input_size // patch_size
        self.point_proj = nn.Linear(3, embed_dim)
        self.invalid_xyz_token = nn.Parameter(torch.zeros(embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, grid, grid))
        self.pos_embed_window = nn.Parameter(torch.zeros(1, 1 + patch_size * patch_size, embed_dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.ModuleList([ViTBlock(embed_dim, num_heads, mlp_ratio=2.0)])

    def forward(self, xyz: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` pointmap (NaN/inf = invalid) -> `[B, (input_size // patch_size)**2, embed_dim]`."""
        xyz = F.interpolate(xyz, size=self.input_size, mode="nearest").permute(0, 2, 3, 1)
        valid = xyz.isfinite().all(dim=-1, keepdim=True)
        x = self.point_proj(torch.where(valid, xyz, 0.0))
        x = torch.where(valid, x, self.invalid_xyz_token)

        batch, p, grid, dim = xyz.shape[0], self.patch_size, self.input_size // self.patch_size, self.embed_dim
        windows = x.reshape(batch, grid, p, grid, p, dim).permute(0, 1, 3, 2, 4, 5).reshape(-1, p * p, dim)
        tokens = torch.cat([self.cls_token.expand(windows.shape[0], -1, -1), windows], dim=1) + self.pos_embed_window
        for block in self.blocks:
            tokens = block(tokens)

        pos_embed = F.interpolate(self.pos_embed, size=(grid, grid), mode="bilinear", align_corners=False)
        return tokens[:, 0].reshape(batch, grid * grid, dim) + pos_embed.flatten(2).transpose(1, 2)


@dataclass(frozen=True)
class ConditionInput:
    """One named input of the fuser: which embedder reads it and which position-group embedding it gets."""

    name: str
    embedder: int
    pos_group: int | None


class EmbedderFuser(nn.Module):
    """Runs every embedder on its inputs, projects to a common width, adds group embeddings, concatenates tokens.

    `embedder_list` pairs each embedder with its `(input name, position group or None)` list. Position groups are
    numbered in order of first appearance ("cropped" -> 0, "full" -> 1 in the released configs); `idx_emb` has one
    spare row, as in the official code. Inference only: the training-time modality dropout is not implemented.
    """

    def __init__(
        self,
        embedder_list: list[tuple[nn.Module, list[tuple[str, str | None]]]],
        projection_net_hidden_dim_multiplier: float = 4.0,
        projection_pre_norm: bool = True,
        force_drop_modalities: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.module_list = nn.ModuleList(embedder for embedder, _ in embedder_list)
        self.embed_dim = max(embedder.embed_dim for embedder in self.module_list)
        groups: dict[str, int] = {}
        inputs = []
        for index, (_, names) in enumerate(embedder_list):
            for name, group in names:
                if group is not None:
                    groups.setdefault(group, len(groups))
                inputs.append(ConditionInput(name, index, None if group is None else groups[group]))
        self.inputs = tuple(inputs)
        self.pos_groups = groups
        self.force_drop_modalities = frozenset(force_drop_modalities or ())
        self.idx_emb = nn.Parameter(torch.zeros(len(groups) + 1, self.embed_dim))
        self.projection_nets = nn.ModuleList(
            ProjectionNet(embedder.embed_dim, self.embed_dim, projection_net_hidden_dim_multiplier, projection_pre_norm)
            for embedder in self.module_list
        )

    def embed(self, spec: ConditionInput, value: torch.Tensor) -> torch.Tensor:
        """Tokens of one input: embedder -> projection -> + position-group embedding (zeroed if force-dropped)."""
        tokens = self.projection_nets[spec.embedder](self.module_list[spec.embedder](value))
        if spec.pos_group is not None:
            tokens = tokens + self.idx_emb[spec.pos_group]
        if spec.name in self.force_drop_modalities:
            tokens = tokens * 0.0
        return tokens

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Named inputs (e.g. image, rgb_image, mask, rgb_image_mask, pointmap, rgb_pointmap) -> `[B, T, D]`."""
        missing = [spec.name for spec in self.inputs if spec.name not in inputs]
        if missing:
            raise KeyError(f"condition embedder inputs missing: {missing}")
        return torch.cat([self.embed(spec, inputs[spec.name]) for spec in self.inputs], dim=1)


# Hydra `_target_` of the official configs -> our class and the config keys it accepts. Keys listed under
# `ignored` only matter for training or for where the official code fetched its weights from.
_EMBEDDERS: dict[str, tuple[type[nn.Module], set[str], set[str]]] = {
    "sam3d_objects.model.backbone.dit.embedder.dino.Dino": (
        DinoEmbedder,
        {"dino_model", "input_size", "normalize_images", "prenorm_features"},
        {"repo_or_dir", "source", "freeze_backbone"},
    ),
    "sam3d_objects.model.backbone.dit.embedder.pointmap.PointPatchEmbed": (
        PointPatchEmbed,
        {"input_size", "patch_size", "embed_dim"},
        set(),
    ),
}
_FUSER_TARGET = "sam3d_objects.model.backbone.dit.embedder.embedder_fuser.EmbedderFuser"
_FUSER_KEYS = {"embedder_list", "projection_net_hidden_dim_multiplier", "projection_pre_norm", "force_drop_modalities"}
_FUSER_IGNORED = {"freeze", "dropout_prob", "drop_modalities_weight"}

# Official options whose non-default values would change the weights or the maths; we support only the defaults.
_REQUIRED_VALUES: dict[str, dict[str, Any]] = {
    _FUSER_TARGET: {"use_pos_embedding": "learned", "compression_projection_multiplier": 0},
    "sam3d_objects.model.backbone.dit.embedder.dino.Dino": {"backbone_kwargs": None, "prune_network": False},
    "sam3d_objects.model.backbone.dit.embedder.pointmap.PointPatchEmbed": {
        "remap_output": "linear",
        "dropout_prob": 0.0,
        "force_dropout_always": False,
    },
}


def _check_keys(target: str, config: Mapping[str, Any], accepted: set[str], ignored: set[str]) -> dict[str, Any]:
    """The constructor kwargs of `config`; refuses unknown keys and unsupported values."""
    required = _REQUIRED_VALUES.get(target, {})
    unknown = set(config) - accepted - ignored - set(required) - {"_target_"}
    if unknown:
        raise ValueError(f"{target}: unsupported config keys {sorted(unknown)}")
    for key, value in required.items():
        if key in config and config[key] != value and not (value is None and config[key] == {}):
            raise ValueError(f"{target}: {key}={config[key]!r} is not supported (only {value!r})")
    return {key: value for key, value in config.items() if key in accepted}


def _build_embedder(config: Mapping[str, Any]) -> nn.Module:
    target = config.get("_target_")
    if target not in _EMBEDDERS:
        raise ValueError(f"unknown condition embedder _target_ {target!r}; known: {sorted(_EMBEDDERS)}")
    cls, accepted, ignored = _EMBEDDERS[target]
    return cls(**_check_keys(target, config, accepted, ignored))


def build_condition_embedder(config: Mapping[str, Any] | str | Path) -> EmbedderFuser:
    """Build an `EmbedderFuser` from the official hydra config (`module.condition_embedder.backbone`).

    `config` is the mapping or a yaml file holding it. Weights are left at their initial values; load them with
    `load_state_dict` from the checkpoint entries under `_base_models.condition_embedder.`.
    """
    if not isinstance(config, Mapping):
        config = yaml.safe_load(Path(config).read_text())
    if config.get("_target_") != _FUSER_TARGET:
        raise ValueError(f"expected _target_ {_FUSER_TARGET!r}, got {config.get('_target_')!r}")
    kwargs = _check_keys(_FUSER_TARGET, config, _FUSER_KEYS, _FUSER_IGNORED)
    kwargs["embedder_list"] = [
        (_build_embedder(embedder), [(name, group) for name, group in names])
        for embedder, names in kwargs["embedder_list"]
    ]
    return EmbedderFuser(**kwargs)
