"""Segmind's serverless contract (v2 submit/status/result, v1 sync), as `segmind==1.3.0` expects it.

- Submit `POST /v2/{model}` -> request_id and absolute status/response URLs.
- Status `GET /v2/requests/{id}/status`: QUEUED | PROCESSING | COMPLETED | FAILED (uppercase);
  FAILED is HTTP 422 with the reason in `error`.
- Result `GET /v2/requests/{id}` (and `GET /v1/requests/{id}`, the poll URL): the output URLs,
  model-specific keys and `metrics`.
- Sync `POST /v1/{model}`: the primary output's bytes, `x-request-id`, `x-generation-time`.
- Every error is `{"error": "..."}`. Status and result are never rate-limited.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import Field, create_model

from pipeline.registry import TASKS, TaskSpec
from server.gateway import ApiError, Gateway, contract_route
from server.jobs import Job, JobState

log = logging.getLogger(__name__)

MISSING_KEY = "Missing Authorization or x-api-key in header"


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse({"error": error.message}, status_code=error.status, headers=error.headers)


SegmindRoute = contract_route(error_response)


def presented_key(request: Request) -> str | None:
    """The key from `x-api-key`, or from `Authorization: Key ...` / `Bearer ...`."""
    key = request.headers.get("x-api-key")
    if key is not None:
        return key
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() in ("key", "bearer") and value.strip() else None


def require_key(gateway: Gateway) -> Callable:
    def check(request: Request) -> None:
        key = presented_key(request)
        if key is None and gateway.keys.enabled:
            raise ApiError(401, MISSING_KEY)
        if not gateway.keys.accepts(key):
            raise ApiError(401, "Invalid API key")

    return check


def request_schema(spec: TaskSpec) -> dict:
    """OpenAPI body of a model: its parameter schema plus the `image` field."""
    image = Field(description="Input image: http(s) URL, raw base64, or a data: URI.")
    model = create_model(
        f"{spec.params.__name__.removesuffix('Params')}Request", __base__=spec.params, image=(str, image)
    )
    return model.model_json_schema()


def build_router(gateway: Gateway) -> APIRouter:
    router = APIRouter(route_class=SegmindRoute, dependencies=[Depends(require_key(gateway))])

    def urls(base: str, job: Job) -> dict:
        return {
            "request_id": job.id,
            "status_url": f"{base}/v2/requests/{job.id}/status",
            "response_url": f"{base}/v2/requests/{job.id}",
        }

    def failed(job: Job, base: str) -> JSONResponse:
        body = {"status": JobState.FAILED.value, **urls(base, job), "error": job.error, "metrics": job.metrics()}
        return JSONResponse(body, status_code=422)

    def result_body(job: Job, base: str) -> dict:
        body = {"status": job.state.value, **urls(base, job), "output": None, "metrics": job.metrics()}
        if job.state is JobState.COMPLETED:
            result = job.result
            if result["primary"]:
                body["output"] = gateway.file_url(base, job, result["primary"])
            for key, names in result["outputs"].items():
                if isinstance(names, list):
                    body[key] = [gateway.file_object(base, job, n) for n in names]
                else:
                    body[key] = gateway.file_object(base, job, names)
            body.update(result["data"])
            body["metrics"].update(result["metrics"])
        return body

    async def submit(model: str, request: Request, wait: bool) -> tuple[Job, object]:
        body = await gateway.read_json(request)
        image = body.pop("image", None)
        return await gateway.submit(model, image, body, request.app.response_queue_id, wait)

    def add_model_routes(spec: TaskSpec) -> None:
        body = {"requestBody": {"required": True, "content": {"application/json": {"schema": request_schema(spec)}}}}

        async def submit_async(request: Request) -> JSONResponse:
            job, _ = await submit(spec.name, request, wait=False)
            base = gateway.base_url(request)
            return JSONResponse(
                {"status": JobState.QUEUED.value, **urls(base, job), "poll_url": f"{base}/v1/requests/{job.id}"}
            )

        async def submit_sync(request: Request) -> Response:
            job, event = await submit(spec.name, request, wait=True)
            job = await gateway.wait_finished(job.id, event)
            base = gateway.base_url(request)
            if job.state is JobState.FAILED:
                return failed(job, base)
            headers = {"x-request-id": job.id, "x-generation-time": str(job.metrics().get("inference_time", 0.0))}
            primary = gateway.primary_file(job)
            if primary is None:  # the request asked for no image output: answer with the data
                return JSONResponse(result_body(job, base), headers=headers)
            found, content_type = primary
            if isinstance(found, bytes):
                return Response(found, media_type=content_type, headers=headers)
            return FileResponse(found, media_type=content_type, headers=headers)

        for path, handler, summary in (
            (f"/v2/{spec.name}", submit_async, f"Submit a {spec.name} job"),
            (f"/v1/{spec.name}", submit_sync, f"Run {spec.name} and wait for its output"),
        ):
            router.add_api_route(
                path, handler, methods=["POST"], summary=summary, description=spec.summary, openapi_extra=body,
                tags=["segmind"],
            )  # fmt: skip

    for spec in TASKS.values():
        add_model_routes(spec)

    @router.post("/v2/{model}", include_in_schema=False)
    @router.post("/v1/{model}", include_in_schema=False)
    async def unknown_model(model: str) -> None:
        gateway.task(model)  # raises 404 for an unknown model

    def status_body(job: Job, base: str) -> dict:
        return {"status": job.state.value, **urls(base, job), "metrics": job.metrics()}

    async def answer(request_id: str, request: Request, body: Callable[[Job, str], dict]) -> JSONResponse:
        job = await gateway.job(request_id)
        base = gateway.base_url(request)
        return failed(job, base) if job.state is JobState.FAILED else JSONResponse(body(job, base))

    @router.get("/v2/requests/{request_id}/status", tags=["segmind"], summary="Job status")
    async def status(request_id: str, request: Request) -> JSONResponse:
        return await answer(request_id, request, status_body)

    @router.get("/v2/requests/{request_id}", tags=["segmind"], summary="Job result")
    @router.get("/v1/requests/{request_id}", tags=["segmind"], summary="Job result (the v1 poll URL)")
    async def result(request_id: str, request: Request) -> JSONResponse:
        return await answer(request_id, request, result_body)

    return router
