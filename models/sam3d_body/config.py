"""`model_config.yaml` of a SAM 3D Body release, read into the few numbers the architecture needs.

The official loader parses the file with OmegaConf into a yacs tree and reads dozens of training
keys. Inference depends on the sizes below and on a handful of switches; the switches every
release sets the same way are checked, so a config that asks for another architecture fails at
load time with the key named instead of producing wrong meshes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml


class ConfigError(ValueError):
    """The config describes an architecture this implementation does not build."""


# Switches the releases fix; any other value is a different architecture.
_REQUIRED = {
    ("MODEL", "DECODER", "TYPE"): "sam",
    ("MODEL", "DECODER", "FFN_TYPE"): "origin",
    ("MODEL", "DECODER", "LAYER_SCALE_INIT"): 0.0,
    ("MODEL", "DECODER", "ENABLE_TWOWAY"): False,
    ("MODEL", "DECODER", "REPEAT_PE"): True,
    ("MODEL", "DECODER", "CONDITION_TYPE"): "cliff",
    ("MODEL", "DECODER", "USE_INTRIN_CENTER"): True,
    ("MODEL", "DECODER", "DO_INTERM_PREDS"): True,
    ("MODEL", "DECODER", "DO_KEYPOINT_TOKENS"): True,
    ("MODEL", "DECODER", "DO_KEYPOINT3D_TOKENS"): True,
    ("MODEL", "DECODER", "DO_HAND_DETECT_TOKENS"): True,
    ("MODEL", "DECODER", "KEYPOINT_TOKEN_UPDATE"): "v2",
    ("MODEL", "PROMPT_ENCODER", "ENABLE"): True,
    ("MODEL", "PROMPT_ENCODER", "PROMPT_KEYPOINTS"): "mhr70",
    ("MODEL", "PROMPT_ENCODER", "MASK_EMBED_TYPE"): "v2",
    ("MODEL", "PROMPT_ENCODER", "MASK_PROMPT"): "v1",
    ("MODEL", "PERSON_HEAD", "POSE_TYPE"): "mhr",
    ("MODEL", "PERSON_HEAD", "CAMERA_TYPE"): "perspective",
}


@dataclass(frozen=True)
class Sam3DBodyConfig:
    """Sizes and constants of one SAM 3D Body model."""

    backbone_type: str
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    decoder_dim: int
    decoder_depth: int
    decoder_heads: int
    decoder_head_dim: int
    decoder_mlp_dim: int
    head_mlp_depth: int
    head_mlp_div: int
    camera_mlp_depth: int
    camera_mlp_div: int
    hand_scale_factor: float
    # Dtype the release runs its backbone in on GPU (TRAIN.USE_FP16 / FP16_TYPE); None = fp32.
    backbone_half_dtype: torch.dtype | None

    @classmethod
    def from_yaml(cls, path: Path) -> Sam3DBodyConfig:
        with open(path) as f:
            raw = yaml.safe_load(f)
        if not isinstance(raw, dict) or "MODEL" not in raw:
            raise ConfigError(f"{path}: not a SAM 3D Body model config (no MODEL section)")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> Sam3DBodyConfig:
        for keys, expected in _REQUIRED.items():
            value = _get(raw, keys, source)
            if value != expected:
                raise ConfigError(f"{source}: {'.'.join(keys)} is {value!r}; only {expected!r} is supported")
        model = raw["MODEL"]
        size = model["IMAGE_SIZE"]
        if len(size) != 2 or size[0] != size[1]:
            raise ConfigError(f"{source}: MODEL.IMAGE_SIZE must be square (every release is), got {size}")
        train = raw.get("TRAIN", {}) or {}
        half = None
        if train.get("USE_FP16", False):
            half = torch.float16 if train.get("FP16_TYPE", "float16") == "float16" else torch.bfloat16
        decoder = model["DECODER"]
        return cls(
            backbone_type=model["BACKBONE"]["TYPE"],
            image_size=int(size[0]),
            image_mean=tuple(float(v) for v in model["IMAGE_MEAN"]),
            image_std=tuple(float(v) for v in model["IMAGE_STD"]),
            decoder_dim=int(decoder["DIM"]),
            decoder_depth=int(decoder["DEPTH"]),
            decoder_heads=int(decoder["HEADS"]),
            decoder_head_dim=int(decoder["DIM_HEAD"]),
            decoder_mlp_dim=int(decoder["MLP_DIM"]),
            head_mlp_depth=int(model["MHR_HEAD"].get("MLP_DEPTH", 1)),
            head_mlp_div=int(model["MHR_HEAD"].get("MLP_CHANNEL_DIV_FACTOR", 1)),
            camera_mlp_depth=int(model["CAMERA_HEAD"].get("MLP_DEPTH", 1)),
            camera_mlp_div=int(model["CAMERA_HEAD"].get("MLP_CHANNEL_DIV_FACTOR", 1)),
            hand_scale_factor=float(model["CAMERA_HEAD"].get("DEFAULT_SCALE_FACTOR_HAND", 1.0)),
            backbone_half_dtype=half,
        )


def _get(raw: dict[str, Any], keys: tuple[str, ...], source: str) -> Any:
    node: Any = raw
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            raise ConfigError(f"{source}: missing {'.'.join(keys)}")
        node = node[key]
    return node
