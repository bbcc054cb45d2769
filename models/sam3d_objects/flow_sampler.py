"""Euler sampler of the SAM 3D Objects geometry flow model, with classifier-free guidance and shortcut mode.

Mirrors the official ShortCut / FlowMatching `generate_iter` + `ClassifierFreeGuidance` at inference
(sam3d_objects/model/backbone/generator/): rectified flow with t=0 noise and t=1 data, `t_seq = linspace(0, 1,
steps+1)` optionally rescaled `t/(1+(r-1)(1-t))`, Euler steps `x += v*dt`, the network fed t*time_scale (and, for
ShortCut, the step size d*time_scale: 0 in plain flow mode, 1/steps in shortcut mode). CFG blends
`(1+s)*v_cond - s*v_uncond` for every modality when t*time_scale lies in the interval.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.sam3d_objects.structure_flow import SparseStructureFlow

_GENERATOR = "sam3d_objects.model.backbone.generator."
_SHORTCUT_TARGET = _GENERATOR + "shortcut.model.ShortCut"
_FLOW_MATCHING_TARGET = _GENERATOR + "flow_matching.model.FlowMatching"
_CFG_TARGETS = {
    _GENERATOR + "classifier_free_guidance.ClassifierFreeGuidance",
    _GENERATOR + "classifier_free_guidance.ClassifierFreeGuidanceWithExternalUnconditionalProbability",
}
_SAMPLER_KEYS = {"reverse_fn", "inference_steps", "rescale_t", "time_scale", "reversed_timestamp", "no_shortcut"}
# Training-only keys (losses, time samplers, self-consistency targets, batching of conditionals during training).
_FLOW_MATCHING_IGNORED = {"sigma_min", "training_time_sampler_fn", "loss_fn", "loss_weights"}
_SHORTCUT_IGNORED = _FLOW_MATCHING_IGNORED | {
    "self_consistency_prob",
    "shortcut_loss_weight",
    "self_consistency_cfg_strength",
    "ratio_cfg_samples_in_self_consistency_target",
    "fm_in_shortcut_target_prob",
    "fm_eps_max",
    "batch_mode",
    "cfg_modalities",
}
_SAMPLER_FIXED = {"solver_method": "euler", "solver_kwargs": {}}
_CFG_KEYS = {"backbone", "strength", "interval"}
_CFG_IGNORED = {"p_unconditional", "use_unconditional_from_flow_matching"}
_CFG_FIXED = {"unconditional_handling": "add_flag"}

Latents = dict[str, torch.Tensor]


def _check(target: str, config: Mapping[str, Any], accepted: set[str], fixed: Mapping[str, Any]) -> None:
    """Refuses unknown keys and unsupported fixed values of one hydra node, naming them."""
    unknown = set(config) - {"_target_"} - accepted - set(fixed)
    if unknown:
        raise ValueError(f"{target}: unsupported config keys {sorted(unknown)}")
    for key, value in fixed.items():
        if key in config and config[key] != value:
            raise ValueError(f"{target}: {key}={config[key]!r} is not supported (only {value!r})")


def draw_noise(shapes: Mapping[str, tuple[int, ...]], generator: torch.Generator | None = None) -> Latents:
    """Initial noise, one `torch.randn` per modality in sorted-name order (the official optree order), so a
    `torch.manual_seed(seed)` before this reproduces the official draw."""
    return {name: torch.randn(shapes[name], generator=generator) for name in sorted(shapes)}


@dataclass(frozen=True)
class FlowSampler:
    """Sampling schedule and guidance settings; `sample_iter` runs them on a `SparseStructureFlow`.

    `shortcut_model` is True for ShortCut generators (the net always gets a step size d); with `no_shortcut`
    d is 0, otherwise 1/steps.
    """

    steps: int
    rescale_t: float = 1.0
    time_scale: float = 1000.0
    reversed_timestamp: bool = False
    shortcut_model: bool = True
    no_shortcut: bool = True
    cfg_strength: float = 0.0
    cfg_interval: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> FlowSampler:
        """From the ShortCut / FlowMatching hydra node (with its CFG `reverse_fn`). Pipeline-level settings
        (steps, no_shortcut, cfg_strength, cfg_interval, ...) are passed as `overrides`."""
        target = config.get("_target_")
        if target not in (_SHORTCUT_TARGET, _FLOW_MATCHING_TARGET):
            raise ValueError(f"unknown generator _target_ {target!r}")
        if target == _SHORTCUT_TARGET:
            accepted = _SAMPLER_KEYS | _SHORTCUT_IGNORED
        else:
            accepted = (_SAMPLER_KEYS - {"no_shortcut"}) | _FLOW_MATCHING_IGNORED
        _check(target, config, accepted, _SAMPLER_FIXED)
        cfg = config["reverse_fn"]
        if cfg.get("_target_") not in _CFG_TARGETS:
            raise ValueError(f"unsupported reverse_fn _target_ {cfg.get('_target_')!r}")
        _check(cfg["_target_"], cfg, _CFG_KEYS | _CFG_IGNORED, _CFG_FIXED)
        interval = cfg.get("interval")
        settings: dict[str, Any] = {
            "steps": int(config.get("inference_steps", 100)),
            "rescale_t": float(config.get("rescale_t", 1.0)),
            "time_scale": float(config.get("time_scale", 1000.0)),
            "reversed_timestamp": bool(config.get("reversed_timestamp", False)),
            "shortcut_model": target == _SHORTCUT_TARGET,
            "no_shortcut": bool(config.get("no_shortcut", False)),
            "cfg_strength": float(cfg.get("strength", 3.0)),
            "cfg_interval": None if interval is None else (float(interval[0]), float(interval[1])),
        }
        unknown = set(overrides) - set(settings)
        if unknown:
            raise ValueError(f"unknown sampler overrides {sorted(unknown)}")
        return cls(**(settings | overrides))

    def time_sequence(self) -> list[float]:
        """The `steps + 1` times in [0, 1], float64 as in the official numpy schedule."""
        t_seq = np.linspace(0, 1, self.steps + 1)
        if self.rescale_t:
            t_seq = t_seq / (1 + (self.rescale_t - 1) * (1 - t_seq))
        return (1 - t_seq if self.reversed_timestamp else t_seq).tolist()

    def velocity(self, net: SparseStructureFlow, x: Latents, t: float, cond: torch.Tensor) -> Latents:
        """Guided velocity at time t in [0, 1]: the official `reverse_fn` call of one solver step."""
        t_in = torch.tensor([t * self.time_scale], dtype=torch.float32, device=cond.device)
        d = None
        if self.shortcut_model:
            step = (0.0 if self.no_shortcut else 1 / self.steps) * self.time_scale
            d = torch.tensor([step], dtype=torch.float32, device=cond.device)
        return guided_velocity(net, x, t_in, cond, d, self.cfg_strength, self.cfg_interval)

    def sample_iter(self, net: SparseStructureFlow, x0: Latents, cond: torch.Tensor) -> Iterator[Latents]:
        """Yields x after each Euler step, starting from the noise `x0`; the last one is the sample."""
        x = dict(x0)
        t_seq = self.time_sequence()
        for t0, t1 in zip(t_seq[:-1], t_seq[1:], strict=True):
            v = self.velocity(net, x, t0, cond)
            x = {name: x[name] + v[name] * (t1 - t0) for name in x}
            yield x

    def sample(self, net: SparseStructureFlow, x0: Latents, cond: torch.Tensor) -> Latents:
        """Final sample of `sample_iter`."""
        return deque(self.sample_iter(net, x0, cond), maxlen=1)[0]


def guided_velocity(
    net: SparseStructureFlow,
    x: Latents,
    t: torch.Tensor,
    cond: torch.Tensor,
    d: torch.Tensor | None,
    strength: float,
    interval: tuple[float, float] | None,
) -> Latents:
    """Classifier-free guidance at inference: `(1+s)*v_cond - s*v_uncond` when `interval[0] <= t <= interval[1]`
    (t already scaled) and s > 0, else `v_cond` alone (no unconditional pass)."""
    v_cond = net(x, t, cond, d)
    if interval is None or strength <= 0 or not interval[0] <= float(t) <= interval[1]:
        return v_cond
    v_uncond = net(x, t, cond, d, unconditional=True)
    return {name: (1 + strength) * v_cond[name] - strength * v_uncond[name] for name in v_cond}
