"""Request parameters of every served model: one pydantic schema each, the single source of
validation (HTTP 400 naming the parameter), the OpenAPI schema and the README tables.

Torch-free on purpose: the HTTP processes import this, the worker imports the models.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator


def _json_list(value: object) -> object:
    """Accept a JSON-encoded list ("[[300, 400]]", as Segmind documents) or a real list."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a JSON list: {exc.msg}") from None
    return value


def _pairs(value: object) -> object:
    value = _json_list(value)
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return [value]  # one bare [x, y]
    return value


def _boxes(value: object) -> object:
    value = _json_list(value)
    if isinstance(value, list) and len(value) == 4 and all(isinstance(v, (int, float)) for v in value):
        return [value]  # one bare [x1, y1, x2, y2]
    return value


def _labels(value: object) -> object:
    value = _json_list(value)
    if not isinstance(value, list):
        return value
    flat: list = []

    def walk(v: object) -> None:
        if isinstance(v, list):
            for item in v:
                walk(item)
        else:
            flat.append(v)

    walk(value)
    return flat


Point = Annotated[list[float], Field(min_length=2, max_length=2)]
Box = Annotated[list[float], Field(min_length=4, max_length=4)]


def _check_clicks(points: list[list[float]] | None, labels: list[int] | None, names: tuple[str, str]) -> None:
    """Labels need points, and one label per point or one for all; `names` = (points, labels) parameters."""
    if labels is None:
        return
    if not points:
        raise ValueError(f"{names[1]}: given without {names[0]}")
    if len(labels) not in (1, len(points)):
        raise ValueError(
            f"{names[1]}: {len(labels)} labels for {len(points)} points (give one per point, or one for all)"
        )


def _click_labels(points: list[list[float]] | None, labels: list[int] | None) -> list[int]:
    """One label per click: the given ones, or the single given label (default 1) repeated."""
    labels = labels or [1]
    return labels * len(points or ()) if len(labels) == 1 else labels


def _check_box(box: list[float], what: str) -> None:
    x1, y1, x2, y2 = box
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"{what} must have x2 > x1 and y2 > y1")


def _check_points_on_image(points: list[list[float]] | None, name: str, width: int, height: int) -> None:
    for i, (x, y) in enumerate(points or []):
        if not (0 <= x <= width and 0 <= y <= height):
            raise ValueError(f"{name}: point {i} ({x}, {y}) is outside the {width}x{height} image")


def _check_box_on_image(box: list[float], what: str, width: int, height: int) -> None:
    x1, y1, x2, y2 = box
    if not (0 <= x1 and 0 <= y1 and x2 <= width and y2 <= height):
        raise ValueError(f"{what} lies outside the {width}x{height} image")


class Sam3ImageParams(BaseModel):
    """sam3-image parameters besides the image (names, defaults and ranges as on Segmind)."""

    model_config = ConfigDict(extra="forbid")

    text_prompt: str | None = Field(
        None, max_length=500, description="Concept to segment, e.g. 'red car': every instance is returned."
    )
    points_input: Annotated[list[Point] | None, BeforeValidator(_pairs)] = Field(
        None, description='Clicks on one object, as "[[x, y], ...]" in image pixels.'
    )
    point_labels_input: Annotated[list[Literal[0, 1]] | None, BeforeValidator(_labels)] = Field(
        None, description='One label per click, 1 foreground / 0 background, e.g. "[[1, 0]]". Default: all 1.'
    )
    boxes_input: Annotated[list[Box] | None, BeforeValidator(_boxes)] = Field(
        None, description='Boxes as "[[x1, y1, x2, y2], ...]" in image pixels; see box_prompt_mode.'
    )
    box_prompt_mode: Literal["object", "exemplar"] = Field(
        "object",
        description="object: each box selects that one object. exemplar: boxes are examples of the concept "
        "and every similar instance is returned (with text_prompt when given).",
    )
    threshold: float = Field(0.5, ge=0.1, le=1.0, description="Minimum score of a concept (text/exemplar) match.")
    points_per_side: int = Field(
        32, ge=0, le=128, description="Automatic mask generation grid when no prompt is given (0: off)."
    )
    pred_iou_thresh: float = Field(0.88, ge=0.5, le=1.0, description="Automatic masks: minimum predicted IoU.")
    stability_score_thresh: float = Field(0.95, ge=0.0, le=1.0, description="Automatic masks: minimum stability.")
    max_masks: int = Field(0, ge=0, le=100, description="Keep the best N masks (0: all).")
    return_preview: bool = Field(True, description="Output one PNG with every mask in its own colour.")
    return_overlay: bool = Field(False, description="Output the masks blended over the input image.")
    return_masks: bool = Field(False, description="Output one binary PNG per mask, at the input size.")

    @model_validator(mode="after")
    def _consistent(self) -> Sam3ImageParams:
        if self.text_prompt is not None:
            self.text_prompt = self.text_prompt.strip() or None
        _check_clicks(self.points_input, self.point_labels_input, ("points_input", "point_labels_input"))
        for i, box in enumerate(self.boxes_input or []):
            _check_box(box, f"boxes_input: box {i}")
        if not (self.text_prompt or self.points_input or self.boxes_input or self.points_per_side):
            raise ValueError(
                "points_per_side: no prompt given and automatic mask generation is off; "
                "give text_prompt, points_input or boxes_input, or points_per_side > 0"
            )
        return self

    def check_bounds(self, width: int, height: int) -> None:
        """Prompts must lie on the image; raises ValueError naming the parameter."""
        _check_points_on_image(self.points_input, "points_input", width, height)
        for i, box in enumerate(self.boxes_input or []):
            _check_box_on_image(box, f"boxes_input: box {i}", width, height)

    @property
    def point_labels(self) -> list[int]:
        return _click_labels(self.points_input, self.point_labels_input)


class Sam3DBodyParams(BaseModel):
    """sam-3d-body parameters besides the image (Segmind's names first, then this server's)."""

    model_config = ConfigDict(extra="forbid")

    include_keypoints: bool = Field(
        False, description="Add each person's 70 keypoints (2D pixels, 3D camera metres) to the metadata."
    )
    return_individual_meshes: bool = Field(False, description="Also output one PLY mesh per person.")
    mask: str | None = Field(
        None,
        description="Person mask image (URL, base64 or data: URI), white = person, same size as the image: "
        "skips detection, the person's box is the mask's bounding box.",
    )
    inference_mode: Literal["full", "body"] | None = Field(
        None,
        description="full: body, then both hands refined; body: one body pass (faster). "
        "Default: the server's --body-inference-mode.",
    )
    detection_threshold: float = Field(0.5, ge=0.05, le=1.0, description="Minimum SAM 3 score of a person.")
    max_people: int = Field(20, ge=1, le=100, description="Reconstruct at most this many people, best scores first.")
    focal_length: float | None = Field(
        None, ge=1, le=1e6, description="Camera focal length in pixels. Default: the image diagonal, as the release."
    )
    return_smplx: bool = Field(
        False,
        description="Also output each person's vertices in SMPL-X order (JSON; with faces and fitted "
        "SMPL-X parameters when SMPL-X model files are in weights/smplx/).",
    )

    def check_bounds(self, width: int, height: int) -> None:
        """Nothing here refers to image coordinates; masks are checked by the gateway."""


class Sam3DObjectsParams(BaseModel):
    """sam-3d-objects parameters besides the image (Segmind's names first, then this server's)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(
        None, max_length=500, description="Text naming the object, e.g. 'chair': SAM 3 finds it (see max_objects)."
    )
    bounding_box: Annotated[Box | None, BeforeValidator(_json_list)] = Field(
        None, description='Box around the one object, "[x1, y1, x2, y2]" in image pixels (SAM 3 segments it).'
    )
    point_coords: Annotated[list[Point] | None, BeforeValidator(_pairs)] = Field(
        None, description='Clicks on the one object, "[[x, y], ...]" in image pixels (with or without bounding_box).'
    )
    point_labels: Annotated[list[Literal[0, 1]] | None, BeforeValidator(_labels)] = Field(
        None, description='One label per click, 1 foreground / 0 background, e.g. "[1, 0]". Default: all 1.'
    )
    mask: str | None = Field(
        None,
        description="Object mask image (URL, base64 or data: URI), white = object, same size as the image: "
        "no segmentation step.",
    )
    seed: int = Field(123, ge=0, le=1_000_000, description="Seed of the sampling noise: same request, same result.")
    include_artifacts: bool = Field(
        False, description="Also output a ZIP of the mask, pointmap, voxels, splat, mesh and a JSON of parameters."
    )
    max_objects: int = Field(
        1,
        ge=1,
        le=8,
        description="With prompt: reconstruct up to this many instances, best scores first, in one scene.",
    )
    detection_threshold: float = Field(0.5, ge=0.05, le=1.0, description="Minimum SAM 3 score of a prompt match.")
    preset: Literal["quality", "fast"] = Field(
        "quality",
        description="quality: as released (geometry 25 guided steps, latent 25). fast: geometry 4 shortcut steps "
        "without guidance (the release's distilled path), latent 12 steps.",
    )
    geometry_steps: int | None = Field(None, ge=1, le=50, description="Override the preset's geometry sampling steps.")
    latent_steps: int | None = Field(None, ge=1, le=50, description="Override the preset's latent sampling steps.")

    @model_validator(mode="after")
    def _consistent(self) -> Sam3DObjectsParams:
        if self.prompt is not None:
            self.prompt = self.prompt.strip() or None
        _check_clicks(self.point_coords, self.point_labels, ("point_coords", "point_labels"))
        if self.bounding_box is not None:
            _check_box(self.bounding_box, "bounding_box:")
        selects = self.bounding_box is not None or bool(self.point_coords)
        if self.mask is not None and (self.prompt or selects):
            raise ValueError("mask: give either mask or prompt / bounding_box / point_coords, not both")
        if self.prompt and selects:
            raise ValueError("prompt: give either a text prompt or bounding_box / point_coords, not both")
        if not (self.mask or self.prompt or selects):
            raise ValueError("prompt: give the object as prompt, bounding_box, point_coords or mask")
        return self

    def check_bounds(self, width: int, height: int) -> None:
        """Prompts must lie on the image; raises ValueError naming the parameter."""
        _check_points_on_image(self.point_coords, "point_coords", width, height)
        if self.bounding_box is not None:
            _check_box_on_image(self.bounding_box, "bounding_box:", width, height)

    @property
    def labels(self) -> list[int]:
        return _click_labels(self.point_coords, self.point_labels)
