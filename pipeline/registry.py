"""The served models: name, parameters and the weight sets each needs. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from pipeline.schemas import Sam3DBodyParams, Sam3DObjectsParams, Sam3ImageParams

# What a mask parameter holds in a stored job once the gateway has decoded the mask and stored it beside the
# image: the parameter stays set, so that validation that depends on it holds in the worker too.
STORED_MASK = "stored with the image"


@dataclass(frozen=True)
class TaskSpec:
    name: str  # the model slug in URLs, e.g. /v2/sam3-image
    summary: str
    params: type[BaseModel]
    # Weight sets of weights/manifest.json; "{option}" fields are filled from the server config.
    weights: tuple[str, ...]
    primary_content_type: str  # what v1 sync answers with
    # Parameters that carry a mask image (white = foreground, the input image's size): the gateway
    # decodes and checks them and stores them beside the image.
    mask_params: tuple[str, ...] = ()

    def weight_sets(self, **options: object) -> tuple[str, ...]:
        return tuple(name.format(**options) for name in self.weights)


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
        TaskSpec(
            name="sam-3d-body",
            summary="SAM 3D Body: a 3D mesh (MHR) of every person in the image, placed in camera space.",
            params=Sam3DBodyParams,
            weights=("sam3", "sam-3d-body-{body_variant}"),
            primary_content_type="model/gltf-binary",
            mask_params=("mask",),
        ),
        TaskSpec(
            name="sam-3d-objects",
            summary="SAM 3D Objects: the prompted object as a textured mesh and 3D Gaussians, placed in camera space.",
            params=Sam3DObjectsParams,
            weights=("sam3", "sam-3d-objects", "moge"),
            primary_content_type="model/gltf-binary",
            mask_params=("mask",),
        ),
    ]
}
