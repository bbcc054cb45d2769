"""What every contract's routes share: validating a request, turning it into a job, handing it to
the workers, waiting for it, and naming its files by absolute URL. Contracts only map names and
shapes onto this (Segmind now; fal and WaveSpeed are further views of the same jobs).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import multiprocessing.synchronize
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import litserve as ls
import numpy as np
from fastapi import Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from litserve.utils import ResponseBufferItem
from pydantic import BaseModel, ValidationError

from pipeline.registry import STORED_MASK, TASKS, TaskSpec
from server import observability
from server.artifacts import ArtifactStore, S3ArtifactStore, new_token
from server.auth import ApiKeys
from server.config import ServeConfig
from server.images import ImageInputError, ImageLimits, binary_mask, content_key, load_image
from server.jobs import Job, JobStore, NewJob, QueueFull, new_job_id
from server.placement import Placement
from server.weights import MANIFEST

log = logging.getLogger(__name__)


@dataclass
class ApiError(Exception):
    """An HTTP error with a client-facing message; each contract renders it in its own shape."""

    status: int
    message: str
    headers: dict[str, str] = field(default_factory=dict)


def contract_route(render: Callable[[ApiError], Response]) -> type[APIRoute]:
    """A route class whose errors a contract renders in its own shape; an unexpected one is logged, never leaked."""

    class ContractRoute(APIRoute):
        def get_route_handler(self) -> Callable:
            handler = super().get_route_handler()

            async def route(request: Request) -> Response:
                try:
                    return await handler(request)
                except ApiError as error:
                    return render(error)
                except Exception:
                    log.exception("%s %s failed", request.method, request.url.path)
                    return render(ApiError(500, "Internal server error"))

            return route

    return ContractRoute


def describe_validation_error(error: ValidationError) -> str:
    """pydantic errors -> "name: what is wrong", the parameter first, as clients need it."""
    parts = []
    for e in error.errors():
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            message = "unknown parameter"
        name = str(e["loc"][0]) if e["loc"] else ""
        parts.append(message if not name or message.startswith(f"{name}:") else f"{name}: {message}")
    return "; ".join(parts)


def weight_sets(config: ServeConfig) -> dict[str, tuple[str, ...]]:
    """Per model: the weight sets it needs under this configuration."""
    options = config.model_dump()
    return {name: spec.weight_sets(**options) for name, spec in TASKS.items()}


def missing_weights(config: ServeConfig) -> dict[str, list[str]]:
    """Per model: the weight files it still needs (empty when it can be served)."""
    return {
        name: [f for ws in sets for f in MANIFEST[ws].missing(config.weights_dir)]
        for name, sets in weight_sets(config).items()
    }


class Gateway:
    def __init__(
        self,
        config: ServeConfig,
        store: JobStore,
        artifacts: ArtifactStore | S3ArtifactStore,
        keys: ApiKeys,
        draining: multiprocessing.synchronize.Event,
        server: ls.LitServer,
        placement: Placement,
    ) -> None:
        self.config = config
        self.store = store
        self.artifacts = artifacts
        self.keys = keys
        self.draining = draining
        self.server = server  # the LitServer, for its request queues and response buffer
        self.placement = placement
        # With a shared (Redis) store, work reaches the workers through the replicas' pullers instead.
        self.distributed = config.jobs != "sqlite"
        self.weight_sets = weight_sets(config)
        self.missing = missing_weights(config)
        self.limits = ImageLimits(
            config.max_image_pixels, config.max_request_bytes, config.url_timeout, config.allow_private_urls
        )

    # -- models -------------------------------------------------------------------------------

    def task(self, model: str) -> TaskSpec:
        spec = TASKS.get(model)
        if spec is None:
            raise ApiError(404, f"Unknown model '{model}'. Served models: {', '.join(TASKS)}")
        missing = self.missing[model]
        if missing:
            commands = sorted({MANIFEST[ws].download_command for ws in self.weight_sets[model]})
            raise ApiError(
                503,
                f"Model '{model}' is unavailable: missing weight files {', '.join(missing)} in "
                f"{self.config.weights_dir}. Fetch them with: {'; '.join(commands)}",
            )
        return spec

    def models(self) -> list[dict]:
        return [
            {
                "name": name,
                "summary": spec.summary,
                "available": not self.missing[name],
                "missing_files": self.missing[name],
                "download": [MANIFEST[ws].download_command for ws in self.weight_sets[name]],
            }
            for name, spec in TASKS.items()
        ]

    # -- requests -----------------------------------------------------------------------------

    async def read_json(self, request: Request) -> dict:
        limit = self.config.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"Request body is larger than {limit} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"Request body is larger than {limit} bytes")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "Request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "Request body must be a JSON object of parameters")
        return data

    def validate(self, spec: TaskSpec, params: dict) -> BaseModel:
        try:
            return spec.params.model_validate(params)
        except ValidationError as exc:
            raise ApiError(400, describe_validation_error(exc)) from None

    async def submit(
        self, model: str, image: object, params: dict, consumer_id: int, wait: bool, view: dict | None = None
    ) -> tuple[Job, asyncio.Event | None]:
        """Validate, decode, persist as QUEUED, and enqueue; `wait` also registers for the worker's answer.
        `view`: a contract's own options for rendering the result, kept with the job (payload["view"])."""
        spec = self.task(model)
        if self.draining.is_set():
            raise ApiError(503, "Server is shutting down; submit again shortly", {"Retry-After": "10"})
        if not isinstance(image, str) or not image.strip():
            raise ApiError(400, "image: required, as an http(s) URL, base64, or a data: URI")
        validated = self.validate(spec, params)
        depth = await asyncio.to_thread(self.store.unfinished)
        if depth >= self.config.max_queue:  # refuse before downloading and decoding; submit() re-checks atomically
            raise self._queue_full(depth)
        started = time.perf_counter()
        try:
            pixels = await load_image(image, self.limits)
        except ImageInputError as exc:
            raise ApiError(400, f"image: {exc}") from None
        try:
            validated.check_bounds(pixels.shape[1], pixels.shape[0])
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        masks = {}
        for name in spec.mask_params:
            if getattr(validated, name) is not None:
                masks[name] = await self._load_mask(name, getattr(validated, name), pixels.shape[:2])
                validated = validated.model_copy(update={name: STORED_MASK})

        job_id = new_job_id()
        observability.set_request_id(job_id)  # the rest of this HTTP request logs with it
        data, key = await asyncio.to_thread(self._pack_input, pixels, masks)
        payload = {
            "params": validated.model_dump(mode="json"),
            "image_key": key,
            "decode_seconds": round(time.perf_counter() - started, 4),  # fetch, decode and store the image
        }
        if view:
            payload["view"] = view
        try:
            new = NewJob(model, payload, data, new_token(), self.config.job_timeout, self.config.retention, job_id)
            job = await asyncio.to_thread(self.store.submit, new, self.config.max_queue)
        except QueueFull as full:
            raise self._queue_full(full.depth) from None
        if self.distributed:  # replicas pull their work from the shared queue; a v1 caller polls the store
            return job, None
        return job, self.dispatch(job.id, model, consumer_id, wait)

    async def _load_mask(self, name: str, source: str, size: tuple[int, int]) -> np.ndarray:
        try:
            return binary_mask(await load_image(source, self.limits), *size)
        except ImageInputError as exc:
            raise ApiError(400, f"{name}: {exc}") from None

    @staticmethod
    def _pack_input(pixels: np.ndarray, masks: dict[str, np.ndarray]) -> tuple[bytes, str]:
        """The job's input as one .npz (the decoded image, the decoded masks under their parameter names),
        and the image's content key."""
        buffer = io.BytesIO()
        np.savez(buffer, image=pixels, **masks)
        return buffer.getvalue(), content_key(pixels)

    def _queue_full(self, depth: int) -> ApiError:
        per_job = self.store.recent_inference_time() or 1.0
        retry_after = max(1, min(300, math.ceil(per_job * depth / self.config.max_batch_size)))
        return ApiError(
            429, f"Too many jobs ({depth} waiting or running); retry later", {"Retry-After": str(retry_after)}
        )

    def dispatch(self, job_id: str, model: str, consumer_id: int, wait: bool = False) -> asyncio.Event | None:
        """Hand a job to the least busy device group holding its model, through LitServe's queue.

        LitServe drops answers for ids nobody registered; `wait` registers one for this front end.
        """
        event = None
        if wait:
            event = asyncio.Event()
            self.server.response_buffer[job_id] = ResponseBufferItem(event=event)
        queues = self.server.litapi_request_queues
        path = min(self.placement.paths_for(model), key=lambda p: queues[p].qsize())
        queues[path].put((consumer_id, job_id, time.monotonic(), {"job_id": job_id}))
        return event

    async def wait_finished(self, job_id: str, event: asyncio.Event | None) -> Job:
        """Until the job is COMPLETED or FAILED. The worker's answer wakes us at once; the store is
        checked every second too, for jobs the watchdog or a worker crash ended instead. Without an
        event (the job may run on another replica) the store is polled, 20 ms apart at first."""
        interval = 0.02
        try:
            while True:
                if event is None:
                    await asyncio.sleep(interval)
                    interval = min(interval * 1.5, 0.5)
                else:
                    try:
                        await asyncio.wait_for(event.wait(), timeout=1.0)
                    except TimeoutError:
                        pass
                job = await asyncio.to_thread(self.store.get, job_id)
                if job is None:
                    raise ApiError(404, f"Request {job_id} not found")
                if job.finished:
                    return job
                if event is not None and event.is_set():  # answered without starting it
                    if self.draining.is_set():
                        raise ApiError(
                            503,
                            f"Server is shutting down; request {job_id} stays queued and runs after the restart",
                            {"Retry-After": "10"},
                        )
                    event = None  # its deadline passed before a worker took it: poll until the watchdog fails it
        finally:
            self.server.response_buffer.pop(job_id, None)

    async def job(self, job_id: str) -> Job:
        observability.set_request_id(job_id)
        job = await asyncio.to_thread(self.store.get, job_id)
        if job is None:
            raise ApiError(404, f"Request {job_id} not found")
        return job

    # -- URLs -----------------------------------------------------------------------------------

    def base_url(self, request: Request) -> str:
        if self.config.public_url:
            return self.config.public_url.rstrip("/")
        return str(request.base_url).rstrip("/")

    def file_url(self, base: str, job: Job, name: str) -> str:
        return self.artifacts.url(base, job.files_token, name, job.expires_at)

    def file_object(self, base: str, job: Job, name: str) -> dict:
        info = job.result["files"][name]
        return {
            "url": self.file_url(base, job, name),
            "content_type": info["content_type"],
            "file_name": name,
            "file_size": info["size"],
        }

    def primary_file(self, job: Job) -> tuple[Path | bytes, str] | None:
        """The primary output, as a local path when the files are on disk, else its bytes; and its type."""
        name = job.result.get("primary") if job.result else None
        if not name:
            return None
        found = self.artifacts.path(job.files_token, name) or self.artifacts.read(job.files_token, name)
        return (found, job.result["files"][name]["content_type"]) if found else None
