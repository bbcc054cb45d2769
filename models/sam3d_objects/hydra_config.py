"""Reading the release's hydra yaml nodes into constructor arguments, refusing what we do not build."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml


def constructor_kwargs(
    config: Mapping[str, Any] | str | Path, name: str, targets: set[str], accepted: set[str], ignored: set[str]
) -> dict[str, Any]:
    """The `accepted` keys of a config node (a mapping or a yaml file).

    `_target_` must be one of `targets` when present; `ignored` keys (training or precision
    switches) are dropped; any other key is refused by name, so a config asking for an
    architecture we do not build fails at load time instead of building the wrong network.
    """
    if not isinstance(config, Mapping):
        config = yaml.safe_load(Path(config).read_text())
    target = config.get("_target_")
    if target is not None and target not in targets:
        raise ValueError(f"{name}: unexpected _target_ {target!r}; known: {sorted(targets)}")
    unknown = set(config) - accepted - ignored - {"_target_"}
    if unknown:
        raise ValueError(f"{name}: unsupported config keys {sorted(unknown)}")
    return {key: value for key, value in config.items() if key in accepted}
