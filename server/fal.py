"""fal.ai's queue contract for the SAM 3 apps, as `fal-client==1.0.3` expects it: a view of the same jobs.

- Submit `POST /fal-ai/sam-3/{image|3d-body|3d-objects}` with fal's input schema -> `request_id` and absolute
  `status_url`, `response_url`, `cancel_url` (under `/fal-ai/sam-3/requests/{id}`: fal drops the sub-path).
- Status `GET .../requests/{id}/status[?logs=1]`: IN_QUEUE (with `queue_position`) | IN_PROGRESS |
  COMPLETED; a failed job is COMPLETED with `error` and `error_type`, its result is HTTP 422.
- Result `GET .../requests/{id}`: fal's output schema of the app.
- Cancel `PUT .../requests/{id}/cancel`: a queued job FAILS as cancelled; a running one still finishes.
- Every error is `{"detail": "..."}`. `?fal_webhook=` is refused (400): this server calls no webhooks.

3d-objects (model sam-3d-objects) reconstructs one object per request: from one mask in `mask_urls`, from
point/box prompts on one object, or from a text `prompt` (its best match). Several masks, several boxes or
several object_ids are refused (400), as is `pointmap_url` (the pointmap always comes from MoGe). Its
metadata gives each rotation as fal documents it, an (x, y, z, w) quaternion; SAM 3D Objects and this
server's Segmind routes give the same rotation as (w, x, y, z). `artifacts_zip` needs `include_artifacts`,
an input of this server's (fal documents none for it).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from server.gateway import ApiError, Gateway, contract_route, describe_validation_error
from server.jobs import CANCELLED, Job, JobState
from server.segmind import require_key

log = logging.getLogger(__name__)

PREFIX = "/fal-ai/sam-3"


# -- schemas ----------------------------------------------------------------------------------


class File(BaseModel):
    url: str
    content_type: str
    file_name: str
    file_size: int


class PointPrompt(BaseModel):
    model_config = ConfigDict(extra="forbid")

    x: float = Field(description="Pixels from the left edge.")
    y: float = Field(description="Pixels from the top edge.")
    label: Literal[0, 1] = Field(1, description="1 foreground, 0 background.")
    object_id: int | None = Field(None, description="Every point must belong to one object (one id or none).")


class BoxPrompt(BaseModel):
    model_config = ConfigDict(extra="forbid")

    x_min: float
    y_min: float
    x_max: float
    y_max: float
    object_id: int | None = Field(None, description="Each box is its own object: ids may not repeat.")


class ImageInput(BaseModel):
    """fal-ai/sam-3/image input."""

    model_config = ConfigDict(extra="forbid")

    image_url: str = Field(description="Image to segment: http(s) URL or data: URI (`fal_client.encode_file`).")
    prompt: str | None = Field(
        None,
        max_length=500,
        description="Concept to segment, every instance. No default (fal's is 'wheel'): without any prompt "
        "every object is segmented automatically.",
    )
    text_prompt: str | None = Field(None, max_length=500, description="Deprecated name of `prompt`.")
    point_prompts: list[PointPrompt] = Field([], description="Clicks on one object, in image pixels.")
    box_prompts: list[BoxPrompt] = Field([], description="Boxes in image pixels, one object each.")
    apply_mask: bool = Field(True, description="`image` shows the masks over the input (else the masks alone).")
    sync_mode: bool = Field(False, description="Only false: outputs are always URLs, never data URIs.")
    output_format: Literal["png", "jpeg", "webp"] = Field("png", description="Only png is produced.")
    return_multiple_masks: bool = Field(False, description="`masks` holds up to max_masks masks (else the best one).")
    max_masks: int = Field(3, ge=1, le=32, description="Most masks returned with return_multiple_masks.")
    include_scores: bool = Field(False, description="Add `scores`, one per returned mask.")
    include_boxes: bool = Field(False, description="Add `boxes`, normalized [cx, cy, w, h] per returned mask.")

    @model_validator(mode="after")
    def _supported(self) -> ImageInput:
        if self.sync_mode:
            raise ValueError("sync_mode: not supported; outputs are URLs (fetch them, or poll the result)")
        if self.output_format != "png":
            raise ValueError(f"output_format: only png is supported, not {self.output_format}")
        if self.prompt and self.text_prompt and self.prompt != self.text_prompt:
            raise ValueError("text_prompt: differs from prompt (it is its deprecated name; give one)")
        if len({p.object_id for p in self.point_prompts}) > 1:
            raise ValueError("point_prompts: all points must share one object_id (several objects are not supported)")
        ids = [b.object_id for b in self.box_prompts if b.object_id is not None]
        if len(ids) != len(set(ids)):
            raise ValueError("box_prompts: grouping several boxes into one object by object_id is not supported")
        return self

    def params(self) -> dict:
        """Sam3ImageParams (pipeline/schemas.py) of this input."""
        return {
            "text_prompt": self.prompt or self.text_prompt,
            "points_input": [[p.x, p.y] for p in self.point_prompts] or None,
            "point_labels_input": [p.label for p in self.point_prompts] or None,
            "boxes_input": [[b.x_min, b.y_min, b.x_max, b.y_max] for b in self.box_prompts] or None,
            "return_preview": not self.apply_mask,
            "return_overlay": self.apply_mask,
            "return_masks": True,
            "max_masks": self.max_masks if self.return_multiple_masks else 0,
        }

    def view(self) -> dict:
        """What the result needs besides the job's outputs."""
        return self.model_dump(include={"return_multiple_masks", "include_scores", "include_boxes"})


class MaskMetadata(BaseModel):
    index: int
    score: float
    box: list[float] = Field(description="Normalized [cx, cy, w, h].")


class ImageOutput(BaseModel):
    """fal-ai/sam-3/image output."""

    image: File | None = Field(description="The masks over the input (apply_mask) or alone, one colour each.")
    masks: list[File] = Field(description="Binary PNG per returned mask, best score first.")
    metadata: list[MaskMetadata]
    scores: list[float] | None = None
    boxes: list[list[float]] | None = None


class BodyInput(BaseModel):
    """fal-ai/sam-3/3d-body input."""

    model_config = ConfigDict(extra="forbid")

    image_url: str = Field(description="Image: http(s) URL or data: URI (`fal_client.encode_file`).")
    mask_url: str | None = Field(
        None, description="Person mask, white = person, the image's size: skips detection, bbox from the mask."
    )
    export_meshes: bool = Field(True, description="`meshes`: one .ply per person.")
    include_3d_keypoints: bool = Field(
        True,
        description="Each person's 70 keypoints (2D pixels, 3D camera metres) in `metadata`; this server "
        "draws no keypoint markers in the GLB.",
    )

    def params(self) -> dict:
        """Sam3DBodyParams (pipeline/schemas.py) of this input."""
        return {
            "mask": self.mask_url,
            "return_individual_meshes": self.export_meshes,
            "include_keypoints": self.include_3d_keypoints,
        }

    def view(self) -> dict:
        return {}


class BodyPerson(BaseModel):
    person_id: int
    bbox: list[float] = Field(description="[x1, y1, x2, y2] pixels.")
    focal_length: float
    pred_cam_t: list[float] = Field(description="[tx, ty, tz] metres.")
    keypoints_2d: list[list[float]] | None = Field(None, description="70 x [x, y] pixels.")
    keypoints_3d: list[list[float]] | None = Field(None, description="70 x [x, y, z], camera metres, OpenCV axes.")


class BodyMetadata(BaseModel):
    num_people: int
    people: list[BodyPerson]


class BodyOutput(BaseModel):
    """fal-ai/sam-3/3d-body output."""

    model_glb: File = Field(description="Every person's mesh in one glTF scene.")
    visualization: File = Field(description="Input, 2D keypoints, mesh overlay and side view, side by side.")
    meshes: list[File] = Field(description="One .ply per person (export_meshes).")
    metadata: BodyMetadata


class ObjectsInput(BaseModel):
    """fal-ai/sam-3/3d-objects input: one object per request."""

    model_config = ConfigDict(extra="forbid")

    image_url: str = Field(description="Image: http(s) URL or data: URI (`fal_client.encode_file`).")
    prompt: str | None = Field(
        None, max_length=500, description="Text naming the object, e.g. 'chair': its best SAM 3 match is reconstructed."
    )
    point_prompts: list[PointPrompt] = Field(
        [], description="Clicks on the one object, in image pixels (with or without one box)."
    )
    box_prompts: list[BoxPrompt] = Field(
        [], description="At most one box, around the one object, in image pixels (several objects are not served)."
    )
    mask_urls: list[str] = Field(
        [],
        description="One object mask (white = object, the image's size): no segmentation step. A list, as fal "
        "has it, of one: several masks (one object each) are not served.",
    )
    seed: int | None = Field(None, ge=0, le=1_000_000, description="Seed of the sampling noise. Default: 123.")
    pointmap_url: str | None = Field(
        None, description="Not supported: this server computes the pointmap with MoGe; a supplied one is not read."
    )
    detection_threshold: float | None = Field(
        None, ge=0.05, le=1.0, description="Minimum SAM 3 score of a `prompt` match. Default: 0.5."
    )
    include_artifacts: bool = Field(
        False,
        description="This server's own input (fal documents none): add `artifacts_zip`, the mask, pointmap, "
        "voxels, splat, mesh and a JSON of parameters.",
    )

    @model_validator(mode="after")
    def _supported(self) -> ObjectsInput:
        if self.prompt is not None:
            self.prompt = self.prompt.strip() or None
        if self.pointmap_url is not None:
            raise ValueError("pointmap_url: not supported; this server computes the pointmap with MoGe (leave it out)")
        if len(self.mask_urls) > 1:
            raise ValueError(
                f"mask_urls: {len(self.mask_urls)} masks given; one is served (one object per mask is not supported)"
            )
        if len(self.box_prompts) > 1:
            raise ValueError("box_prompts: one box is served (several objects per request are not supported)")
        ids = {p.object_id for p in [*self.point_prompts, *self.box_prompts] if p.object_id is not None}
        if len(ids) > 1:
            name = "box_prompts" if self.box_prompts else "point_prompts"
            raise ValueError(f"{name}: all prompts must share one object_id (several objects are not supported)")
        selects = bool(self.point_prompts or self.box_prompts)
        if self.mask_urls and (self.prompt or selects):
            raise ValueError("mask_urls: give either a mask or prompt / point_prompts / box_prompts, not both")
        if self.prompt and selects:
            raise ValueError("prompt: give either a text prompt or point_prompts / box_prompts, not both")
        if not (self.mask_urls or self.prompt or selects):
            raise ValueError("prompt: give the object as prompt, point_prompts, box_prompts or mask_urls")
        return self

    def params(self) -> dict:
        """Sam3DObjectsParams (pipeline/schemas.py) of this input."""
        box = self.box_prompts[0] if self.box_prompts else None
        optional = {"seed": self.seed, "detection_threshold": self.detection_threshold}
        return {
            "prompt": self.prompt,
            "bounding_box": [box.x_min, box.y_min, box.x_max, box.y_max] if box else None,
            "point_coords": [[p.x, p.y] for p in self.point_prompts] or None,
            "point_labels": [p.label for p in self.point_prompts] or None,
            "mask": self.mask_urls[0] if self.mask_urls else None,
            "include_artifacts": self.include_artifacts,
            **{name: value for name, value in optional.items() if value is not None},
        }

    def view(self) -> dict:
        return {}


class ObjectMetadata(BaseModel):
    object_index: int
    score: float | None = Field(description="SAM 3 score of the object's mask (null for a given mask).")
    scale: list[float] = Field(description="[sx, sy, sz], object frame to camera frame.")
    rotation: list[float] = Field(
        description="Unit quaternion in (x, y, z, w) order, as fal documents it (SAM 3D Objects and this "
        "server's Segmind routes give (w, x, y, z)); object frame to the PyTorch3D camera frame."
    )
    rotation_order: Literal["xyzw"] = Field("xyzw", description="The order of `rotation`: always xyzw here.")
    translation: list[float] = Field(description="[tx, ty, tz], PyTorch3D camera frame (x left, y up, z forward).")
    camera_pose: list[list[float]] = Field(description="4x4 object-to-camera matrix (scale, rotation, translation).")


class ObjectsOutput(BaseModel):
    """fal-ai/sam-3/3d-objects output."""

    model_glb: File = Field(description="The posed object meshes with vertex colours, glTF camera axes.")
    gaussian_splat: File = Field(description="The posed objects as 3D Gaussians, a standard 3DGS .ply.")
    metadata: list[ObjectMetadata]
    individual_glbs: list[File] | None = Field(None, description="One .glb per object, when there are several.")
    individual_splats: list[File] | None = Field(None, description="One .ply per object, when there are several.")
    artifacts_zip: File | None = Field(None, description="With include_artifacts: the processing artifacts.")


FalInput = ImageInput | BodyInput | ObjectsInput

# app (the path after fal-ai/sam-3/) -> (our model, its input schema, our parameter names -> fal's)
APPS: dict[str, tuple[str, type[FalInput], dict[str, str]]] = {
    "image": (
        "sam3-image",
        ImageInput,
        {
            "image": "image_url",
            "text_prompt": "prompt",
            "points_input": "point_prompts",
            "point_labels_input": "point_prompts",
            "boxes_input": "box_prompts",
        },
    ),
    "3d-body": ("sam-3d-body", BodyInput, {"image": "image_url", "mask": "mask_url"}),
    "3d-objects": (
        "sam-3d-objects",
        ObjectsInput,
        {
            "image": "image_url",
            "bounding_box": "box_prompts",
            "point_coords": "point_prompts",
            "point_labels": "point_prompts",
            "mask": "mask_urls",
        },
    ),
}
MODEL_APP = {model: app for app, (model, _, _) in APPS.items()}


def fal_message(error: ApiError, names: dict[str, str]) -> ApiError:
    """The gateway's "param: ..." messages under fal's parameter names."""
    parts = []
    for part in error.message.split("; "):
        name, sep, rest = part.partition(":")
        parts.append(f"{names[name]}:{rest}" if sep and name in names else part)
    return ApiError(error.status, "; ".join(parts), error.headers)


def inline_refs(schema: dict) -> dict:
    """A pydantic JSON schema with its `$defs` inlined, to embed in OpenAPI as is."""
    defs = schema.pop("$defs", {})

    def walk(node: object) -> object:
        if isinstance(node, dict):
            if "$ref" in node:
                return walk(defs[node["$ref"].rsplit("/", 1)[1]])
            return {k: walk(v) for k, v in node.items()}
        return [walk(v) for v in node] if isinstance(node, list) else node

    return walk(schema)


# -- routes -----------------------------------------------------------------------------------


FalRoute = contract_route(
    lambda error: JSONResponse({"detail": error.message}, status_code=error.status, headers=error.headers)
)


def timestamp(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat()


def job_logs(job: Job) -> list[dict]:
    """The job's timeline as fal log entries (this server keeps no model logs)."""

    def entry(message: str, at: float, level: str = "INFO") -> dict:
        return {"message": message, "level": level, "source": "sam3-serve", "timestamp": timestamp(at)}

    logs = [entry(f"Queued for {job.model}", job.created_at)]
    if job.started_at is not None:
        logs.append(entry(f"Running (attempt {job.attempts})", job.started_at))
    if job.state is JobState.COMPLETED:
        logs.append(entry("Completed", job.finished_at))
    elif job.state is JobState.FAILED:
        logs.append(entry(job.error or "Failed", job.finished_at or job.created_at, "ERROR"))
    return logs


def error_type(job: Job) -> str:
    """This server's names for why a job failed (fal's own values are not documented)."""
    if job.error == CANCELLED:
        return "cancelled"
    if (job.error or "").startswith("Job timed out"):
        return "request_timeout"
    return "runner_error"


def normalized_box(box: list[float], width: int, height: int) -> list[float]:
    """Inclusive pixel xyxy -> [cx, cy, w, h] as fractions of the image."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0 + 1, y1 - y0 + 1
    return [round((x0 + w / 2) / width, 6), round((y0 + h / 2) / height, 6), round(w / width, 6), round(h / height, 6)]


def build_router(gateway: Gateway) -> APIRouter:
    router = APIRouter(route_class=FalRoute, dependencies=[Depends(require_key(gateway))], tags=["fal"])

    def urls(base: str, job: Job) -> dict:
        url = f"{base}{PREFIX}/requests/{job.id}"
        return {"request_id": job.id, "response_url": url, "status_url": f"{url}/status", "cancel_url": f"{url}/cancel"}

    async def queue_position(job: Job) -> int:
        """Jobs queued before this one (0: next)."""
        ids = await asyncio.to_thread(gateway.store.queued_ids)
        return ids.index(job.id) if job.id in ids else 0

    def image_output(job: Job, base: str) -> dict:
        result, view = job.result, job.payload.get("view", {})
        data, outputs = result["data"], result["outputs"]
        width, height = data["image_size"]
        keep = data["num_masks"] if view.get("return_multiple_masks") else min(1, data["num_masks"])
        image = outputs.get("overlay") or outputs.get("preview")
        boxes = [normalized_box(b, width, height) for b in data["boxes"][:keep]]
        output = ImageOutput(
            image=gateway.file_object(base, job, image) if image else None,
            masks=[gateway.file_object(base, job, n) for n in outputs.get("masks", [])[:keep]],
            metadata=[MaskMetadata(index=i, score=s, box=b) for i, (s, b) in enumerate(zip(data["scores"], boxes))],
            scores=data["scores"][:keep] if view.get("include_scores") else None,
            boxes=boxes if view.get("include_boxes") else None,
        )
        return output.model_dump()

    def body_output(job: Job, base: str) -> dict:
        result = job.result
        metadata = result["data"]["metadata"]
        output = BodyOutput(
            model_glb=gateway.file_object(base, job, result["primary"]),
            visualization=gateway.file_object(base, job, result["outputs"]["visualization"]),
            meshes=[gateway.file_object(base, job, n) for n in result["outputs"].get("meshes", [])],
            metadata=BodyMetadata(
                num_people=metadata["num_people"],
                people=[BodyPerson.model_validate(p) for p in metadata["people"]],
            ),
        )
        return output.model_dump()

    def objects_output(job: Job, base: str) -> dict:
        result = job.result
        outputs = result["outputs"]

        def files(key: str) -> list[dict] | None:
            return [gateway.file_object(base, job, n) for n in outputs[key]] if key in outputs else None

        metadata = []
        for entry in result["data"]["metadata"]:
            w, x, y, z = entry["rotation"]  # SAM 3D Objects' (w, x, y, z)
            metadata.append(ObjectMetadata.model_validate({**entry, "rotation": [x, y, z, w]}))
        output = ObjectsOutput(
            model_glb=gateway.file_object(base, job, result["primary"]),
            gaussian_splat=gateway.file_object(base, job, outputs["gaussian_splat"]),
            metadata=metadata,
            individual_glbs=files("individual_glbs"),
            individual_splats=files("individual_splats"),
            artifacts_zip=gateway.file_object(base, job, outputs["artifacts"]) if "artifacts" in outputs else None,
        )
        return output.model_dump()

    render = {"image": image_output, "3d-body": body_output, "3d-objects": objects_output}

    def add_app_route(app: str, model: str, schema: type[FalInput], names: dict[str, str]) -> None:
        async def submit(request: Request) -> JSONResponse:
            if "fal_webhook" in request.query_params:
                raise ApiError(400, "fal_webhook: webhooks are not supported; poll status_url instead")
            body = await gateway.read_json(request)
            try:
                given = schema.model_validate(body)
            except ValidationError as exc:
                raise ApiError(400, describe_validation_error(exc)) from None
            try:
                job, _ = await gateway.submit(
                    model, given.image_url, given.params(), request.app.response_queue_id, False, given.view()
                )
            except ApiError as error:
                raise fal_message(error, names) from None
            body = {**urls(gateway.base_url(request), job), "queue_position": await queue_position(job)}
            return JSONResponse(body)

        request_body = {
            "required": True,
            "content": {"application/json": {"schema": inline_refs(schema.model_json_schema())}},
        }
        router.add_api_route(
            f"{PREFIX}/{app}", submit, methods=["POST"], summary=f"Submit a fal-ai/sam-3/{app} request",
            description=f"Runs {model}; the result has fal's {schema.__name__.removesuffix('Input')} output schema.",
            openapi_extra={"requestBody": request_body},
        )  # fmt: skip

    for app, (model, schema, names) in APPS.items():
        add_app_route(app, model, schema, names)

    @router.post(PREFIX + "/{app}", include_in_schema=False)
    async def unknown_app(app: str) -> None:
        raise ApiError(404, f"Unknown app 'fal-ai/sam-3/{app}'. Served: {', '.join(f'fal-ai/sam-3/{a}' for a in APPS)}")

    @router.get(PREFIX + "/requests/{request_id}/status", summary="Request status (fal queue)")
    async def status(request_id: str, request: Request, logs: str | None = None) -> JSONResponse:
        job = await gateway.job(request_id)
        body = urls(gateway.base_url(request), job)
        shown = job_logs(job) if (logs or "").lower() in ("1", "true") else None
        if job.state is JobState.QUEUED:
            body.update(status="IN_QUEUE", queue_position=await queue_position(job), logs=shown)
        elif job.state is JobState.PROCESSING:
            body.update(status="IN_PROGRESS", logs=shown)
        else:
            body.update(status="COMPLETED", logs=shown, metrics=job.metrics())
            if job.state is JobState.FAILED:
                body.update(error=job.error, error_type=error_type(job))
        return JSONResponse(body)

    @router.get(
        PREFIX + "/requests/{request_id}",
        summary="Request result (fal queue)",
        responses={200: {"description": "The app's output", "model": ImageOutput | BodyOutput | ObjectsOutput}},
    )
    async def result(request_id: str, request: Request) -> JSONResponse:
        job = await gateway.job(request_id)
        if job.state is JobState.FAILED:
            raise ApiError(422, job.error or "Failed")
        if not job.finished:
            raise ApiError(400, f"Request {request_id} is still in progress")
        return JSONResponse(render[MODEL_APP[job.model]](job, gateway.base_url(request)))

    @router.put(PREFIX + "/requests/{request_id}/cancel", summary="Cancel a queued request (fal queue)")
    async def cancel(request_id: str) -> JSONResponse:
        try:
            job = await gateway.job(request_id)
        except ApiError:
            return JSONResponse({"status": "NOT_FOUND"}, status_code=404)
        if job.finished:
            return JSONResponse({"status": "ALREADY_COMPLETED"}, status_code=400)
        if await asyncio.to_thread(gateway.store.cancel, request_id):  # a running job cannot be stopped: it finishes
            await asyncio.to_thread(gateway.store.release_input, job)
        return JSONResponse({"status": "CANCELLATION_REQUESTED"}, status_code=202)

    return router
