"""Seconds per pipeline stage, reported in each job's `metrics.stages`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class StageTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        """Time a block. Stages must end on a host sync (a `.cpu()`, a file written) to be exact on CUDA."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start)

    def rounded(self) -> dict[str, float]:
        return {stage: round(seconds, 4) for stage, seconds in self.seconds.items()}
