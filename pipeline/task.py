"""What flows between the job layer and a model pipeline: decoded inputs in, named files and data out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel

# save(file_name, content, content_type): stores one output file of the job.
SaveFile = Callable[[str, bytes, str], None]


@dataclass
class TaskInput:
    image: np.ndarray  # HxWx3 uint8 RGB
    image_key: str  # content hash of `image`: the embedding cache key
    params: BaseModel
    save: SaveFile
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # mask parameters, decoded: [H, W] 0/1


@dataclass
class TaskOutput:
    primary: str | None  # file name of the primary output (what v1 returns as bytes)
    files: dict[str, str | list[str]]  # response key -> file name(s)
    data: dict  # JSON-serialisable outputs
    metrics: dict = field(default_factory=dict)


class TaskError(Exception):
    """A job that cannot be done as asked (say, no object matched its prompt). A pipeline returns it in place
    of that job's output; its message is the job's error, shown to the client as is."""
