"""The server process: LitServe plus what a job server needs and LitServe lacks.

- Jobs live in SQLite (`server.jobs`), so every front-end process answers for every job.
- Start-up: jobs that were running when the server last stopped are queued again (once; see
  `JobStore.recover`), and every queued job is handed to the workers, oldest first.
- A janitor thread fails jobs past their deadline (the watchdog) and jobs whose worker process
  died, and deletes jobs and files past their retention.
- SIGTERM/SIGINT drain: new submits get 503, running jobs finish (up to `drain_timeout`),
  queued jobs stay queued for the next start; then LitServe shuts down.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from pathlib import Path

import litserve as ls
from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.gzip import GZipMiddleware

from server import segmind
from server.artifacts import ArtifactStore, content_type
from server.auth import ApiKeys, warn_if_exposed
from server.config import ServeConfig
from server.gateway import ApiError, Gateway
from server.jobs import Job, JobStore
from server.weights import MANIFEST
from server.worker import WORKER_PATH, ModelWorker

log = logging.getLogger("sam3_serve")

JANITOR_PERIOD = 1.0
LITSERVE_ROUTES = {"/", "/health", "/info", WORKER_PATH}


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


class Sam3Server(ls.LitServer):
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.store = JobStore(config.jobs_db)
        self.artifacts = ArtifactStore(config.data_dir / "files")
        self.draining = mp.get_context("spawn").Event()
        self._stopping = threading.Event()
        weight_sets = {name for name, entry in MANIFEST.items() if not entry.missing(config.weights_dir)}
        accelerator = {"auto": "auto", "cuda": "cuda", "cpu": "cpu"}[config.device]
        super().__init__(
            ModelWorker(config, weight_sets, self.draining),
            accelerator=accelerator,
            workers_per_device=config.workers_per_device,
            # LitServe's queue timeout answers 504 and leaves the work running: the watchdog owns deadlines.
            timeout=False,
            restart_workers=True,
        )
        keys = ApiKeys(config.api_keys())
        self.gateway = Gateway(config, self.store, self.artifacts, keys, self.draining, server=self)
        self.app.router.routes[:] = [
            r for r in self.app.router.routes if getattr(r, "path", None) not in LITSERVE_ROUTES
        ]
        # Gzip would re-encode PNG/GLB files for nothing and hide their Content-Length.
        self.app.user_middleware[:] = [m for m in self.app.user_middleware if m.cls is not GZipMiddleware]
        self.app.title = "sam3-serve"
        self.app.add_exception_handler(StarletteHTTPException, http_error)
        self.app.include_router(common_router(self.gateway))
        self.app.include_router(segmind.build_router(self.gateway))
        warn_if_exposed(config.host, config.is_loopback, keys)

    # -- LitServe hooks: run in the main process, in this order -------------------------------

    def verify_worker_status(self) -> None:
        """After the workers are up, before the front ends: recover and re-dispatch old jobs."""
        super().verify_worker_status()
        requeued, failed = self.store.recover()
        queued = self.store.queued_ids()
        if requeued or failed or queued:
            log.info(
                "recovered jobs: %d re-queued, %d failed, %d queued in all", len(requeued), len(failed), len(queued)
            )
        for job_id in queued:
            self.gateway.dispatch(job_id, consumer_id=0)

    def _start_worker_monitoring(self, manager, uvicorn_workers) -> None:
        super()._start_worker_monitoring(manager, uvicorn_workers)
        threading.Thread(target=self._janitor, name="sam3-janitor", daemon=True).start()
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)

    def _perform_graceful_shutdown(self, manager, uvicorn_workers, shutdown_reason: str = "normal") -> None:
        self._stopping.set()
        super()._perform_graceful_shutdown(manager, uvicorn_workers, shutdown_reason)

    # -- lifecycle ------------------------------------------------------------------------------

    def _release(self, job: Job) -> None:
        if job.input_path:
            Path(job.input_path).unlink(missing_ok=True)

    def _janitor(self) -> None:
        while not self._stopping.wait(JANITOR_PERIOD):
            try:
                for job in self.store.fail_overdue() + self.store.fail_orphans(pid_alive):
                    log.warning("job %s (%s) failed: %s", job.id, job.state, job.error)
                    self._release(job)
                for job in self.store.expire():
                    self.artifacts.delete(job.files_token)
                    self._release(job)
            except Exception:
                log.exception("janitor pass failed")

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
        while time.monotonic() < deadline and self.store.counts()["PROCESSING"] > 0:
            time.sleep(0.1)
        left = self.store.counts()["PROCESSING"]
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

    return router


def serve(config: ServeConfig) -> None:
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = Sam3Server(config)
    server.run(
        host=config.host,
        port=config.port,
        num_api_servers=config.api_servers,
        generate_client_file=False,
        log_level=config.log_level,
    )
