"""Load the `facebook/sam3` Hub snapshot into a detector and a tracker that share one ViT.

The snapshot is a `sam3_video` checkpoint: `detector_model.*` (ViT, text encoder, DETR heads),
`tracker_model.*` (SAM 2 style prompt encoder and mask decoder, plus video-only memory modules)
and `tracker_neck.*` (the tracker's own FPN over the detector's ViT). `from_pretrained` on both
`Sam3Model` and `Sam3TrackerModel` would hold the 454M-parameter ViT twice, so the tracker is
built on the meta device, given the detector's ViT, and loaded from its own keys only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import Sam3Model, Sam3Processor, Sam3TrackerModel, Sam3VideoConfig
from transformers.utils import logging as hf_logging

WEIGHTS_FILE = "model.safetensors"
DETECTOR_PREFIX = "detector_model."
TRACKER_PREFIX = "tracker_model."
TRACKER_NECK_PREFIX = "tracker_neck."
SHARED_BACKBONE = "vision_encoder.backbone."
# Video-only tracker modules (memory attention/encoder, object pointers): not used on single images.
VIDEO_ONLY = [re.compile(p) for p in Sam3TrackerModel._keys_to_ignore_on_load_unexpected]


class CheckpointError(RuntimeError):
    """The checkpoint does not match the architecture its config describes."""


@dataclass
class KeyReport:
    """Checkpoint keys the models needed but did not find, and keys nothing consumed."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        parts = []
        for name in ("missing", "unexpected", "mismatched"):
            keys = getattr(self, name)
            if keys:
                shown = ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
                parts.append(f"{len(keys)} {name} key(s): {shown}")
        return "; ".join(parts) or "all keys match"


@dataclass
class Sam3Models:
    """The loaded SAM 3 pieces. `tracker.vision_encoder.backbone is detector.vision_encoder.backbone`."""

    detector: Sam3Model
    tracker: Sam3TrackerModel
    processor: Sam3Processor
    report: KeyReport


def _tracker_checkpoint_key(name: str) -> str | None:
    """Map a `Sam3TrackerModel` state-dict name to its key in the sam3_video checkpoint."""
    if name.startswith(SHARED_BACKBONE):
        return None
    if name.startswith("vision_encoder.neck."):
        return TRACKER_NECK_PREFIX + name[len("vision_encoder.neck.") :]
    return TRACKER_PREFIX + name


def _load_tracker(config: Sam3VideoConfig, detector: Sam3Model, weights: Path, report: KeyReport) -> Sam3TrackerModel:
    with torch.device("meta"):
        tracker = Sam3TrackerModel(config.tracker_config)
    tracker.vision_encoder.backbone = detector.vision_encoder.backbone

    wanted = {
        ckpt_key: name for name in tracker.state_dict() if (ckpt_key := _tracker_checkpoint_key(name)) is not None
    }
    expected_shapes = {name: t.shape for name, t in tracker.state_dict().items()}
    state = {}
    with safe_open(weights, framework="pt") as f:
        for key in f.keys():
            if key in wanted:
                tensor = f.get_tensor(key)
                name = wanted[key]
                if tensor.shape != expected_shapes[name]:
                    report.mismatched.append(f"{key} {tuple(tensor.shape)} != {tuple(expected_shapes[name])}")
                    continue
                state[name] = tensor
            elif key.startswith(TRACKER_PREFIX):
                if not any(p.search(key[len(TRACKER_PREFIX) :]) for p in VIDEO_ONLY):
                    report.unexpected.append(key)
            elif key.startswith(TRACKER_NECK_PREFIX):
                report.unexpected.append(key)
    report.missing.extend(k for k, name in wanted.items() if name not in state)
    tracker.load_state_dict(state, strict=False, assign=True)
    return tracker


def load_sam3(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Sam3Models:
    """Load detector, tracker and processor from a `facebook/sam3` snapshot directory.

    Raises `CheckpointError` when any key is missing, unexpected or of the wrong shape.
    """
    path = Path(path)
    weights = path / WEIGHTS_FILE
    config = Sam3VideoConfig.from_pretrained(path)
    report = KeyReport()

    hf_logging.disable_progress_bar()
    detector, info = Sam3Model.from_pretrained(path, dtype=dtype, output_loading_info=True)
    report.missing.extend(DETECTOR_PREFIX + k for k in sorted(info["missing_keys"]))
    report.mismatched.extend(DETECTOR_PREFIX + str(k) for k in sorted(info["mismatched_keys"]))
    # transformers silently drops tracker keys for the detector; anything else it did not use is ours to report.
    report.unexpected.extend(
        k for k in sorted(info["unexpected_keys"]) if not k.startswith((TRACKER_PREFIX, TRACKER_NECK_PREFIX))
    )
    tracker = _load_tracker(config, detector, weights, report)
    if not report.ok:
        raise CheckpointError(f"{weights}: {report.describe()}")

    leftover = [n for n, t in [*tracker.named_parameters(), *tracker.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f"{weights}: tracker tensors not loaded: {', '.join(leftover)}")

    detector.to(device=device, dtype=dtype).eval()
    tracker.to(device=device, dtype=dtype).eval()
    processor = Sam3Processor.from_pretrained(path)
    return Sam3Models(detector=detector, tracker=tracker, processor=processor, report=report)
