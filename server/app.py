"""The server process: LitServe plus what a job server needs and LitServe lacks.

- Jobs live in a store every process shares (`server.jobs`): SQLite on one machine, or Redis
  shared by several replicas (`server.redis_store`), so every front end answers for every job.
- Start-up (SQLite): jobs that were running when the server last stopped are queued again (once;
  see `SqliteJobStore.recover`), and every queued job is handed to the workers, oldest first.
- Replicas (Redis): a puller thread takes jobs from the shared queue while the local workers have
  room; the janitor renews the leases of local running jobs and reclaims those of dead replicas.
- A janitor thread fails jobs past their deadline (the watchdog) and jobs whose worker process
  died, and deletes jobs and files past their retention.
- SIGTERM/SIGINT drain: new submits get 503, running jobs finish (up to `drain_timeout`),
  queued jobs stay queued for the next start; then LitServe shuts down.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import secrets
import signal
import socket
import threading
import time

import litserve as ls
from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.gzip import GZipMiddleware

from pipeline.registry import TASKS
from server import fal, observability, placement, playground, segmind, wavespeed
from server.artifacts import content_type
from server.auth import ApiKeys, warn_if_exposed
from server.config import ServeConfig
from server.gateway import ApiError, Gateway, weight_sets
from server.redis_store import RedisJobStore
from server.stores import open_artifact_store, open_job_store
from server.weights import MANIFEST
from server.worker import ModelWorker

log = logging.getLogger("sam3_serve")

JANITOR_PERIOD = 1.0
PULL_BLOCK_MS = 500
LITSERVE_ROUTES = {"/", "/health", "/info"}


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (a dead worker LitServe has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def cuda_devices(config: ServeConfig) -> int:
    """CUDA devices the server may use: none with --device cpu."""
    if config.device == "cpu":
        return 0
    import torch

    count = torch.cuda.device_count()
    if config.device == "cuda" and count == 0:
        raise placement.PlacementError("device: cuda asked for, but no CUDA device is visible")
    return count


class Sam3Server(ls.LitServer):
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.replica = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.store = open_job_store(config, self.replica)
        self.artifacts = open_artifact_store(config)
        self.draining = mp.get_context("spawn").Event()
        self._stopping = threading.Event()
        self.placement = placement.resolve(config.devices, config.placement, list(TASKS), cuda_devices(config))
        present = {name for name, entry in MANIFEST.items() if not entry.missing(config.weights_dir)}
        needed = weight_sets(config)
        workers = [
            ModelWorker(
                config,
                {ws for model in self.placement.models_on(device) for ws in needed[model]} & present,
                self.draining,
                self.replica,
                self.placement.worker_path(device),
            )
            for device in self.placement.devices
        ]
        super().__init__(
            workers,
            accelerator="cuda" if any(d.startswith("cuda") for d in self.placement.devices) else "cpu",
            devices=1,
            workers_per_device=config.workers_per_device,
            # LitServe's queue timeout answers 504 and leaves the work running: the watchdog owns deadlines.
            timeout=False,
            restart_workers=True,
        )
        keys = ApiKeys(config.api_keys())
        self.gateway = Gateway(config, self.store, self.artifacts, keys, self.draining, self, self.placement)
        self.app.router.routes[:] = [
            r
            for r in self.app.router.routes
            if getattr(r, "path", None) not in LITSERVE_ROUTES
            and not getattr(r, "path", "").startswith(placement.WORKER_PREFIX)
        ]
        # Gzip would re-encode PNG/GLB files for nothing and hide their Content-Length.
        self.app.user_middleware[:] = [m for m in self.app.user_middleware if m.cls is not GZipMiddleware]
        self.app.title = "sam3-serve"
        self.app.add_exception_handler(StarletteHTTPException, http_error)
        self.app.include_router(common_router(self.gateway))
        self.app.include_router(segmind.build_router(self.gateway))
        self.app.include_router(fal.build_router(self.gateway))
        self.app.include_router(wavespeed.build_router(self.gateway))
        self.app.include_router(playground.build_router(self.gateway))
        warn_if_exposed(config.host, config.is_loopback, keys)

    # -- LitServe hooks: run in the main process, in this order -------------------------------

    def _inference_workers_config_for_api(self, api_path: str) -> list[list[str]]:
        """Each device's worker API runs on that device only (LitServe would start it on every device)."""
        device = self.placement.devices[int(api_path.removeprefix(placement.WORKER_PREFIX))]
        return [[device]] * self.config.workers_per_device

    def verify_worker_status(self) -> None:
        """After the workers are up, before the front ends: recover and re-dispatch old jobs."""
        # LitServer.run() gave LitServe's logger its own handler again: back to ours before the front ends fork.
        observability.configure_logging(self.config.log_format, self.config.log_level)
        super().verify_worker_status()
        if isinstance(self.store, RedisJobStore):
            log.info("replica %s: pulling jobs from %s", self.replica, self.config.jobs)
            return  # the puller takes queued jobs; a dead replica's jobs come back through `reclaim`
        requeued, failed = self.store.recover()
        queued = self.store.queued_ids()
        if requeued or failed or queued:
            log.info(
                "recovered jobs: %d re-queued, %d failed, %d queued in all", len(requeued), len(failed), len(queued)
            )
        for job_id in queued:
            self._dispatch(job_id)

    def _dispatch(self, job_id: str) -> None:
        """Hand a job found in the store (recovered, pulled or reclaimed) to a worker holding its model."""
        job = self.store.get(job_id)
        if job is not None and not job.finished:
            self.gateway.dispatch(job_id, job.model, consumer_id=0)

    def _start_worker_monitoring(self, manager, uvicorn_workers) -> None:
        super()._start_worker_monitoring(manager, uvicorn_workers)
        threading.Thread(target=self._janitor, name="sam3-janitor", daemon=True).start()
        if isinstance(self.store, RedisJobStore):
            threading.Thread(target=self._pull, args=(self.store,), name="sam3-puller", daemon=True).start()
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)

    def _perform_graceful_shutdown(self, manager, uvicorn_workers, shutdown_reason: str = "normal") -> None:
        self._stopping.set()
        super()._perform_graceful_shutdown(manager, uvicorn_workers, shutdown_reason)

    # -- lifecycle ------------------------------------------------------------------------------

    def _janitor(self) -> None:
        while not self._stopping.wait(JANITOR_PERIOD):
            try:
                failed = self.store.fail_overdue() + self.store.fail_orphans(pid_alive)
                if isinstance(self.store, RedisJobStore):
                    self.store.renew(pid_alive)
                    if not self.draining.is_set():
                        reclaimed, gave_up = self.store.reclaim()
                        failed += gave_up
                        for job_id in reclaimed:
                            log.info("job %s: reclaimed from a replica that stopped answering", job_id)
                            self._dispatch(job_id)
                for job in failed:
                    log.warning("job %s (%s) failed: %s", job.id, job.state, job.error, extra={"request_id": job.id})
                    observability.JOBS_FINISHED.labels(model=job.model, outcome="failed").inc()
                    self.store.release_input(job)
                for job in self.store.expire():
                    self.artifacts.delete(job.files_token)
                    self.store.release_input(job)
                observability.forget_dead_processes(pid_alive)
            except Exception:
                log.exception("janitor pass failed")

    def _pull(self, store: RedisJobStore) -> None:
        """Take jobs from the replicas' shared queue while the local workers have room for them."""
        capacity = len(self.placement.devices) * self.config.workers_per_device * self.config.max_batch_size
        queues = [self.litapi_request_queues[self.placement.worker_path(d)] for d in self.placement.devices]
        while not self._stopping.is_set():
            try:
                if self.draining.is_set():
                    self._stopping.wait(JANITOR_PERIOD)
                    continue
                room = capacity - store.active() - sum(q.qsize() for q in queues)
                if room <= 0:
                    self._stopping.wait(0.05)
                    continue
                for job_id in store.pull(room, PULL_BLOCK_MS):
                    self._dispatch(job_id)
            except Exception:
                log.exception("pulling jobs failed; retrying")
                self._stopping.wait(JANITOR_PERIOD)

    def _on_stop_signal(self, signum: int, frame) -> None:
        if self.draining.is_set():
            log.warning("second %s: stopping without waiting for running jobs", signal.Signals(signum).name)
            self._shutdown_event.set()
            return
        log.info("%s: draining (running jobs finish, queued jobs wait for the next start)", signal.Signals(signum).name)
        self.draining.set()
        threading.Thread(target=self._drain, name="sam3-drain", daemon=True).start()

    def _drain(self) -> None:
        # A worker that dequeued a job just before the flag was set may still claim it: give it one batch window.
        time.sleep(self.config.batch_timeout + 0.2)
        deadline = time.monotonic() + self.config.drain_timeout
        while time.monotonic() < deadline and self.store.active() > 0:
            time.sleep(0.1)
        left = self.store.active()
        if left:
            log.warning("drain timeout: %d job(s) still running; they are re-queued at the next start", left)
        self._shutdown_event.set()


async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Unknown paths and wrong methods answer in the contract's JSON shape too."""
    return JSONResponse({"error": error.detail}, status_code=error.status_code, headers=error.headers)


def common_router(gateway: Gateway) -> APIRouter:
    router = APIRouter(route_class=segmind.SegmindRoute)

    @router.get("/health", tags=["server"], summary="Liveness and readiness (no API key needed)")
    async def health() -> JSONResponse:
        draining = gateway.draining.is_set()
        body = {"status": "draining" if draining else "ok", "models": gateway.models()}
        return JSONResponse(body, status_code=503 if draining else 200)

    key = [Depends(segmind.require_key(gateway))]

    @router.get(
        "/models", tags=["server"], summary="Served models and whether their weights are present", dependencies=key
    )
    async def models() -> JSONResponse:
        return JSONResponse({"models": gateway.models()})

    @router.get("/files/{token}/{name}", tags=["server"], summary="An output file of a job", dependencies=key)
    async def files(token: str, name: str) -> FileResponse:
        path = gateway.artifacts.path(token, name)
        if path is None:
            raise ApiError(404, "File not found (it expires with its job)")
        return FileResponse(path, media_type=content_type(name))

    @router.get(
        "/metrics",
        tags=["server"],
        summary="Prometheus metrics of every process (no API key needed unless --metrics-require-key)",
        dependencies=key if gateway.config.metrics_require_key else [],
    )
    async def metrics() -> Response:
        body = await asyncio.to_thread(observability.exposition, gateway.store)
        return Response(body, media_type=observability.CONTENT_TYPE)

    return router


def serve(config: ServeConfig) -> None:
    observability.configure_logging(config.log_format, config.log_level)
    observability.set_multiprocess_dir(config.data_dir / "metrics", pid_alive)  # before any worker or front end
    server = Sam3Server(config)
    tls = {}
    if config.ssl_certfile:  # LitServe hands these to uvicorn.Config
        tls = {"ssl_certfile": str(config.ssl_certfile), "ssl_keyfile": str(config.ssl_keyfile)}
    server.run(
        host=config.host,
        port=config.port,
        num_api_servers=config.api_servers,
        generate_client_file=False,
        log_level=config.log_level,
        log_config=observability.uvicorn_log_config(config.log_format),
        **tls,
    )
