"""WaveSpeed's v3 contract (`wavespeed==2.0.5`), as a view of the same jobs as every other contract.

- Submit `POST /api/v3/wavespeed-ai/{sam3-image,sam-3d-body}` -> the task, status `created`;
  `"enable_sync_mode": true` answers with the finished task instead.
- Poll `GET /api/v3/predictions/{id}/result` (and `GET /api/v3/predictions/{id}`).
- Every answer is `{"code", "message", "data"}`; a task is `data` = id, model, status (created |
  processing | completed | failed), outputs (file URLs, primary first), urls.get, has_nsfw_contents,
  created_at, error, timings.inference (ms), and `metadata` (the model's JSON result; the SDK reads
  only status, outputs, error and id). A failed task is HTTP 200 with status `failed`; errors are
  the envelope with the HTTP status as `code` and `data: null`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.fal import BoxPrompt, PointPrompt
from server.gateway import ApiError, Gateway, contract_route, describe_validation_error
from server.jobs import Job, JobState
from server.segmind import require_key

log = logging.getLogger(__name__)

OWNER = "wavespeed-ai"
STATUS = {
    JobState.QUEUED: "created",
    JobState.PROCESSING: "processing",
    JobState.COMPLETED: "completed",
    JobState.FAILED: "failed",
}


def envelope(code: int, message: str, data: dict | None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": code, "message": message, "data": data}, status_code=code, headers=headers)


WaveSpeedRoute = contract_route(lambda error: envelope(error.status, error.message, None, error.headers))


# -- inputs -------------------------------------------------------------------------------------

IMAGE = Field(description="Input image: http(s) URL, raw base64, or a data: URI.")
SYNC = Field(False, description="Answer the POST with the finished task instead of polling.")


class Sam3ImageInput(BaseModel):
    """`wavespeed-ai/sam3-image`: WaveSpeed's names; at least one prompt, as WaveSpeed requires."""

    model_config = ConfigDict(extra="forbid")

    image: str = IMAGE
    prompt: str | None = Field(None, max_length=500, description="Concept to segment: every instance is returned.")
    point_prompts: list[PointPrompt] | None = Field(
        None, description="Clicks on one object: `[{x, y, label, object_id}]`, pixels; label 1 (default) / 0."
    )
    box_prompts: list[BoxPrompt] | None = Field(
        None, description="Boxes `[{x_min, y_min, x_max, y_max, object_id}]` in pixels: one object each."
    )
    apply_mask: bool = Field(
        True, description="true: the masks blended over the image; false: the masks alone, one colour each."
    )
    output_format: Literal["png"] = Field("png", description="Only png is served (jpeg and webp are refused).")
    enable_sync_mode: bool = SYNC

    def params(self) -> dict:
        """The sam3-image parameters; refuses object groupings SAM 3's prompts here cannot express."""
        points, boxes = self.point_prompts or [], self.box_prompts or []
        if not (self.prompt and self.prompt.strip()) and not points and not boxes:
            raise ApiError(400, "prompt: give prompt, point_prompts or box_prompts")
        point_ids = {p.object_id for p in points}
        if len(point_ids) > 1:
            raise ApiError(400, "point_prompts: points of several objects (object_id) are not supported")
        box_ids = [b.object_id for b in boxes if b.object_id is not None]
        if len(box_ids) != len(set(box_ids)):
            raise ApiError(400, "box_prompts: several boxes with one object_id are not supported")
        point_id = next(iter(point_ids), None)
        if points and boxes and point_id is not None:
            lone = boxes[0].object_id if len(boxes) == 1 else None
            if (len(boxes) == 1 and lone not in (None, point_id)) or (len(boxes) > 1 and point_id in box_ids):
                raise ApiError(
                    400, "point_prompts: points refine the box only when there is exactly one box, of their object_id"
                )
        return {
            "text_prompt": self.prompt,
            "points_input": [[p.x, p.y] for p in points] or None,
            "point_labels_input": [p.label for p in points] or None,
            "boxes_input": [[b.x_min, b.y_min, b.x_max, b.y_max] for b in boxes] or None,
            "points_per_side": 0,  # no automatic "everything" mode: WaveSpeed asks for a prompt
            "return_preview": not self.apply_mask,
            "return_overlay": self.apply_mask,
        }


class Sam3DBodyInput(BaseModel):
    """`wavespeed-ai/sam-3d-body`: the image and an optional person mask, as on WaveSpeed."""

    model_config = ConfigDict(extra="forbid")

    image: str = IMAGE
    mask_image: str | None = Field(
        None, description="Person mask (URL, base64 or data: URI), white = person, the image's size: skips detection."
    )
    enable_sync_mode: bool = SYNC

    def params(self) -> dict:
        return {"mask": self.mask_image}


@dataclass(frozen=True)
class WaveSpeedModel:
    task: str  # the served model it runs
    schema: type[Sam3ImageInput] | type[Sam3DBodyInput]
    # Our parameter names in error messages (a regex each) -> WaveSpeed's.
    renames: tuple[tuple[str, str], ...] = ()


MODELS: dict[str, WaveSpeedModel] = {
    f"{OWNER}/sam3-image": WaveSpeedModel(
        "sam3-image",
        Sam3ImageInput,
        (
            (r"\bpoint_labels_input\b", "point_prompts"),
            (r"\bpoints_input\b", "point_prompts"),
            (r"\bboxes_input\b", "box_prompts"),
            (r"\btext_prompt\b", "prompt"),
        ),
    ),
    f"{OWNER}/sam-3d-body": WaveSpeedModel("sam-3d-body", Sam3DBodyInput, ((r"^mask\b", "mask_image"),)),
}
WAVESPEED_NAME = {model.task: name for name, model in MODELS.items()}


def renamed(text: str, renames: tuple[tuple[str, str], ...]) -> str:
    """`text` with our parameter names in WaveSpeed's words."""
    for ours, theirs in renames:
        text = re.sub(ours, theirs, text)
    return text


def task_metadata(served: str, data: dict) -> dict:
    """The model's JSON result, its prompt names (sam3-image's `sources`) in WaveSpeed's words."""
    metadata = data.get("metadata", data)  # sam-3d-body nests it already
    model = MODELS.get(WAVESPEED_NAME.get(served, ""))
    if model is None or "sources" not in metadata:
        return metadata
    return {**metadata, "sources": [renamed(source, model.renames) for source in metadata["sources"]]}


# -- routes -------------------------------------------------------------------------------------


def build_router(gateway: Gateway) -> APIRouter:
    router = APIRouter(route_class=WaveSpeedRoute, dependencies=[Depends(require_key(gateway))])

    def task(job: Job, base: str) -> dict:
        """A job as WaveSpeed's task object."""
        outputs: list[str] = []
        metadata = None
        if job.state is JobState.COMPLETED:
            result = job.result
            names = [result["primary"]] if result["primary"] else []
            for value in result["outputs"].values():
                names += [n for n in (value if isinstance(value, list) else [value]) if n not in names]
            outputs = [gateway.file_url(base, job, name) for name in names]
            metadata = task_metadata(job.model, result["data"])
        inference = job.metrics().get("inference_time")
        return {
            "id": job.id,
            "model": WAVESPEED_NAME.get(job.model, job.model),
            "status": STATUS[job.state],
            "outputs": outputs,
            "urls": {"get": f"{base}/api/v3/predictions/{job.id}/result"},
            "has_nsfw_contents": [False] * len(outputs),
            "created_at": datetime.fromtimestamp(job.created_at, UTC).isoformat(timespec="milliseconds")[:-6] + "Z",
            "error": (job.error or "") if job.state is JobState.FAILED else "",
            "timings": {} if inference is None else {"inference": round(inference * 1000)},
            "metadata": metadata,
        }

    def success(job: Job, request: Request) -> JSONResponse:
        return envelope(200, "success", task(job, gateway.base_url(request)))

    def add_model_route(name: str, model: WaveSpeedModel) -> None:
        body = {
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": model.schema.model_json_schema()}},
            }
        }

        async def submit(request: Request) -> JSONResponse:
            raw = await gateway.read_json(request)
            try:
                given = model.schema.model_validate(raw)
            except ValidationError as exc:
                raise ApiError(400, describe_validation_error(exc)) from None
            try:
                job, event = await gateway.submit(
                    model.task, given.image, given.params(), request.app.response_queue_id, given.enable_sync_mode
                )
            except ApiError as error:
                raise ApiError(error.status, renamed(error.message, model.renames), error.headers) from None
            if given.enable_sync_mode:
                job = await gateway.wait_finished(job.id, event)
            return success(job, request)

        router.add_api_route(
            f"/api/v3/{name}", submit, methods=["POST"], summary=f"Submit a {name} task",
            description=model.schema.__doc__, openapi_extra=body, tags=["wavespeed"],
        )  # fmt: skip

    for name, model in MODELS.items():
        add_model_route(name, model)

    @router.post("/api/v3/{model:path}", include_in_schema=False)
    async def unknown_model(model: str) -> None:
        raise ApiError(404, f"Unknown model '{model}'. Served models: {', '.join(MODELS)}")

    @router.get("/api/v3/predictions/{task_id}/result", tags=["wavespeed"], summary="Task status and outputs")
    @router.get("/api/v3/predictions/{task_id}", tags=["wavespeed"], summary="Task status and outputs")
    async def result(task_id: str, request: Request) -> JSONResponse:
        return success(await gateway.job(task_id), request)

    return router
