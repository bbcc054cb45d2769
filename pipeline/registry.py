"""The served models: name, parameters and the weight sets each needs. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from pipeline.schemas import Sam3ImageParams


@dataclass(frozen=True)
class TaskSpec:
    name: str  # the model slug in URLs, e.g. /v2/sam3-image
    summary: str
    params: type[BaseModel]
    weights: tuple[str, ...]  # weight sets of weights/manifest.json
    primary_content_type: str  # what v1 sync answers with


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in [
        TaskSpec(
            name="sam3-image",
            summary="SAM 3 promptable segmentation: text, boxes, points, or everything.",
            params=Sam3ImageParams,
            weights=("sam3",),
            primary_content_type="image/png",
        ),
    ]
}
