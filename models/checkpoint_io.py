"""Reading `.ckpt`/`.pt` checkpoints as data.

The safe unpickler (`weights_only=True`) reads every released file we know of. Should a release carry
training metadata that it refuses, the file is re-read with the full unpickler only when it lies inside
the trusted weights folder, with a warning.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch

from models.sam3.checkpoint import CheckpointError

log = logging.getLogger(__name__)


def torch_load(path: Path, weights_only: bool) -> object:
    """torch.load, memory-mapped when the archive allows it (stored, not deflated, members).

    Mapped, the file's pages are not copied into the process first, so loading does not need
    room for the checkpoint and the model at once.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError:  # a compressed archive cannot be mapped
        return torch.load(path, map_location="cpu", weights_only=weights_only)


def read_checkpoint(path: Path, trusted_root: Path) -> dict[str, torch.Tensor]:
    """The state dict in `path`: a flat {key: tensor} dict, or one under "state_dict"."""
    try:
        data = torch_load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        if not path.resolve().is_relative_to(trusted_root.resolve()):
            raise CheckpointError(f"{path}: holds objects other than tensors and is outside {trusted_root}") from err
        log.warning("%s holds objects other than tensors (%s); loading it with the full unpickler", path, err)
        data = torch_load(path, weights_only=False)
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return data
