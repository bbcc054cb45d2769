"""Which models run on which devices: one inference worker group per device, each loading only its models.

LitServe gives every API the same device list, so the server makes one worker API per device
(`/internal/worker/<i>`) and launches each only on its device; a job goes to the least busy
device that holds its model. Devices are `cuda:N`, or `cpu` / `cpu:N` (CPU "devices" run on the
same CPU; they make placement testable without a GPU).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEVICE = re.compile(r"^(cuda:\d+|cpu(:\d+)?)$")
WORKER_PREFIX = "/internal/worker/"


class PlacementError(ValueError):
    """A --devices or --placement value that names no known device or model."""


@dataclass(frozen=True)
class Placement:
    devices: tuple[str, ...]  # in worker order
    models: dict[str, tuple[str, ...]]  # model -> the devices that load it

    def worker_path(self, device: str) -> str:
        return f"{WORKER_PREFIX}{self.devices.index(device)}"

    def models_on(self, device: str) -> list[str]:
        return [model for model, devices in self.models.items() if device in devices]

    def paths_for(self, model: str) -> list[str]:
        return [self.worker_path(device) for device in self.models.get(model, ())]


def torch_device(device: str) -> str:
    """The torch device of a worker device name: every `cpu:N` is the CPU."""
    return "cpu" if device.startswith("cpu") else device


def resolve(devices: list[str], placement: list[str], models: list[str], cuda_count: int) -> Placement:
    """Devices (default: every GPU, else the CPU) and, per model, where it loads (default: everywhere).

    `placement` items are `MODEL=DEVICE[+DEVICE...]` or `MODEL=all`.
    """
    if devices:
        chosen = tuple(dict.fromkeys(devices))
        bad = [d for d in chosen if not DEVICE.match(d)]
        if bad:
            raise PlacementError(f"devices: {', '.join(bad)} not understood; use cuda:N, cpu or cpu:N")
        missing = [d for d in chosen if d.startswith("cuda:") and int(d.split(":")[1]) >= cuda_count]
        if missing:
            raise PlacementError(f"devices: {', '.join(missing)} not present ({cuda_count} CUDA device(s) visible)")
    else:
        chosen = tuple(f"cuda:{i}" for i in range(cuda_count)) or ("cpu",)
    where = {model: chosen for model in models}
    for item in placement:
        model, sep, targets = item.partition("=")
        if not sep or model not in where:
            raise PlacementError(f"placement: {item!r} must be MODEL=DEVICES with MODEL one of {', '.join(models)}")
        names = chosen if targets == "all" else tuple(targets.split("+"))
        unknown = [d for d in names if d not in chosen]
        if unknown or not names:
            raise PlacementError(f"placement: {item!r} names {', '.join(unknown) or 'no device'}; devices: {chosen}")
        where[model] = names
    return Placement(chosen, where)
