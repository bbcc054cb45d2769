"""Prometheus metrics and log lines (text or JSON) that carry the request id, for every process.

Metrics. Jobs are observed where they finish, in the spawned inference workers (and in the
main process, whose watchdog fails overdue jobs), and served at `/metrics` by the forked front
ends. prometheus_client's multiprocess mode joins them: each process writes its samples to
memory-mapped files in `PROMETHEUS_MULTIPROC_DIR` (`set_multiprocess_dir`, called before any
worker or front end starts), and a scrape sums the files of every process, the dead included,
so counts survive a worker restart. Job counts by state are read from the job store at scrape.

Logs. `configure_logging` gives each process one root handler; in JSON mode every line is an
object with ts, level, logger, message, pid, and `request_id` when it is about a job: the
gateway sets the id for the HTTP request that handles a job, the worker while it runs one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import uvicorn.config
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as prometheus_values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from server.jobs import Job

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# From a cached prompt on a GPU (tens of ms) to sam-3d-body's full mode on a CPU (minutes).
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

JOB_LATENCY = Histogram(
    "sam3serve_job_latency_seconds",
    "Inference time of completed jobs (started to finished).",
    ["model"],
    buckets=SECONDS,
)
JOB_QUEUE = Histogram(
    "sam3serve_job_queue_seconds", "Time completed jobs waited (submitted to started).", ["model"], buckets=SECONDS
)
STAGE = Histogram(
    "sam3serve_stage_seconds",
    "Seconds per pipeline stage of completed jobs (their metrics.stages).",
    ["model", "stage"],
    buckets=SECONDS,
)
BATCH_SIZE = Histogram(
    "sam3serve_batch_size", "Jobs in the batch each completed job ran in.", ["model"], buckets=(1, 2, 4, 8, 16, 32, 64)
)
JOBS_FINISHED = Counter(
    "sam3serve_jobs_finished", "Jobs finished, by outcome (completed or failed).", ["model", "outcome"]
)
GPU_MEMORY = Gauge(
    "sam3serve_gpu_memory_bytes",
    "CUDA memory of the live workers' tensors on a device, summed over its workers (kind: allocated now, "
    "or the peak since each worker started).",
    ["device", "kind"],
    multiprocess_mode="livesum",
)


class CountingStore(Protocol):
    def counts(self) -> dict[str, int]: ...


# -- metrics ----------------------------------------------------------------------------------


def set_multiprocess_dir(root: Path, alive: Callable[[int], bool]) -> Path:
    """Point this process and every process it starts afterwards at a fresh `root/<pid>` for metric files.

    Directories of earlier runs whose main process is gone are deleted (counters restart with the server)."""
    root.mkdir(parents=True, exist_ok=True)
    for old in root.iterdir():
        if old.name.isdigit() and not alive(int(old.name)):
            shutil.rmtree(old, ignore_errors=True)
    path = root / str(os.getpid())
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    os.environ[MULTIPROC_ENV] = str(path)
    # prometheus_client picks its value store at import, which in this process came first: pick again.
    prometheus_values.ValueClass = prometheus_values.get_value_class()
    return path


def forget_dead_processes(alive: Callable[[int], bool]) -> None:
    """Drop the live-only gauges (GPU memory) of worker processes that died."""
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        return
    for file in Path(path).glob("gauge_live*_*.db"):
        pid = int(file.stem.rsplit("_", 1)[1])
        if not alive(pid):
            mark_process_dead(pid, path)


def job_finished(job: Job, metrics: dict | None, error: str | None, device: str) -> None:
    """Record a job the worker finished (`metrics`: its result's, None when it failed): one log line, the metrics."""
    now = time.time()
    if metrics is None:
        log.info("job %s failed: %s", job.id, error, extra={"request_id": job.id})
        JOBS_FINISHED.labels(model=job.model, outcome="failed").inc()
        return
    latency = now - job.started_at
    queued = job.started_at - job.created_at
    batch = metrics.get("batch_size", 1)
    message = "job %s completed in %.3f s (queued %.3f s, batch of %d)"
    log.info(message, job.id, latency, queued, batch, extra={"request_id": job.id})
    JOBS_FINISHED.labels(model=job.model, outcome="completed").inc()
    JOB_LATENCY.labels(model=job.model).observe(latency)
    JOB_QUEUE.labels(model=job.model).observe(queued)
    BATCH_SIZE.labels(model=job.model).observe(batch)
    for stage, seconds in metrics.get("stages", {}).items():
        STAGE.labels(model=job.model, stage=stage).observe(seconds)
    if device.startswith("cuda"):
        import torch

        GPU_MEMORY.labels(device=device, kind="allocated").set(torch.cuda.memory_allocated(device))
        GPU_MEMORY.labels(device=device, kind="peak").set(torch.cuda.max_memory_allocated(device))


class JobStoreCollector(Collector):
    """Job counts by state, read from the store at each scrape (any store with `counts()`)."""

    def __init__(self, store: CountingStore) -> None:
        self.store = store

    def collect(self) -> Iterable[GaugeMetricFamily]:
        counts = self.store.counts()
        yield GaugeMetricFamily(
            "sam3serve_queue_depth", "Jobs waiting for a worker (QUEUED).", value=counts.get("QUEUED", 0)
        )
        jobs = GaugeMetricFamily(
            "sam3serve_jobs", "Jobs in the store by state (finished ones until their retention ends).", labels=["state"]
        )
        for state, n in counts.items():
            jobs.add_metric([state], n)
        yield jobs


def exposition(store: CountingStore) -> bytes:
    """The text exposition of every process's metrics plus the store's job counts (blocking: file and store reads)."""
    registry = CollectorRegistry()
    if os.environ.get(MULTIPROC_ENV):
        MultiProcessCollector(registry)
    registry.register(JobStoreCollector(store))
    return generate_latest(registry)


# -- logs ---------------------------------------------------------------------------------------

_request_ids: ContextVar[tuple[str, ...]] = ContextVar("request_ids", default=())


def set_request_id(job_id: str) -> None:
    """Tag the rest of the current asyncio task (one HTTP request) with a job's id."""
    _request_ids.set((job_id,))


@contextmanager
def request_context(job_ids: Iterable[str]) -> Iterator[None]:
    """Tag the log lines of a block with the ids of the jobs it runs."""
    token = _request_ids.set(tuple(job_ids))
    try:
        yield
    finally:
        _request_ids.reset(token)


class RequestIdFilter(logging.Filter):
    """Adds `request_id` (one job) or `request_ids` (a batch) from the context, unless the call gave one."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = _request_ids.get()
        if ids and not hasattr(record, "request_id"):
            if len(ids) == 1:
                record.request_id = ids[0]
            else:
                record.request_ids = list(ids)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, message, pid, request id(s), exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for key in ("request_id", "request_ids"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def configure_logging(log_format: str, level: str) -> None:
    """One stderr handler on the root logger that every logger reaches; call it in each process at start.

    LitServe gives its logger a handler of its own (at import and in `LitServer.run`): it is
    removed, so LitServe's lines take this format too. Python warnings become log lines."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    library = logging.getLogger("litserve")
    library.handlers.clear()
    library.propagate = True
    logging.captureWarnings(True)


def uvicorn_log_config(log_format: str) -> dict | None:
    """uvicorn's logging setup: its own in text mode; none in JSON mode, so its lines (access log
    included) reach the root handler."""
    return None if log_format == "json" else uvicorn.config.LOGGING_CONFIG
