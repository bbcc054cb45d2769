"""The inference worker: one LitServe API whose process holds every model.

LitServe gives each API its own worker processes (and CUDA context), so SAM 3 and the 3D models
live behind this single API: a batch may mix models, and the 3D pipelines reuse the SAM 3
already loaded for their detection step.

The worker owns its jobs' outcomes: it moves them QUEUED -> PROCESSING in the job store, runs a
whole batch through the pipeline, and writes COMPLETED or FAILED itself before answering LitServe.
So a result is never lost with a front end, and `predict` never raises (in LitServe an exception
fails the whole batch, and one that cannot be pickled kills the worker).
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing.synchronize
import os
import signal
from collections import defaultdict

import litserve as ls
import numpy as np

from pipeline.registry import TASKS
from pipeline.task import TaskError, TaskInput, TaskOutput
from server import observability
from server.config import ServeConfig
from server.jobs import Job, JobState
from server.placement import torch_device
from server.stores import open_artifact_store, open_job_store

log = logging.getLogger(__name__)


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if str(device).startswith("cuda") else "float32"


class ModelWorker(ls.LitAPI):
    """The workers of one device: they load the weight sets of the models placed there."""

    def __init__(
        self,
        config: ServeConfig,
        weight_sets: set[str],
        draining: multiprocessing.synchronize.Event,
        replica: str,
        api_path: str,
    ) -> None:
        super().__init__(max_batch_size=config.max_batch_size, batch_timeout=config.batch_timeout, api_path=api_path)
        self.config = config
        self.replica = replica
        self.weight_sets = weight_sets
        self.draining = draining

    def setup(self, device: str) -> None:
        """`device` is the placement's name for it (`cuda:1`, `cpu:0`); jobs report it in their metrics."""
        import torch

        from pipeline.runtime import Runtime

        # Ctrl+C reaches the whole process group: the main process drains, workers finish their batch.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        observability.configure_logging(self.config.log_format, self.config.log_level)
        self.store = open_job_store(self.config, self.replica)
        self.artifacts = open_artifact_store(self.config)
        self.device = device
        dtype = getattr(torch, resolve_dtype(self.config.dtype, device))
        self.runtime = Runtime(
            self.config.weights_dir,
            self.weight_sets,
            device=torch_device(device),
            dtype=dtype,
            embedding_cache_size=self.config.embedding_cache_size,
            max_batch_size=self.config.max_batch_size,
            body_variant=self.config.body_variant,
            body_mode=self.config.body_inference_mode,
        )

    def decode_request(self, request: dict) -> str:
        return request["job_id"]

    def predict(self, job_ids: list[str] | str) -> list[dict] | dict:
        batched = isinstance(job_ids, list)
        ids = job_ids if batched else [job_ids]
        if self.draining.is_set():
            # Shutting down: leave them QUEUED in the store; they run after the restart.
            answers = [{"job_id": i, "started": False} for i in ids]
            return answers if batched else answers[0]
        jobs = self.store.start(ids, os.getpid())
        by_model: dict[str, list[Job]] = defaultdict(list)
        for job in jobs:
            by_model[job.model].append(job)
        for model, group in by_model.items():
            with observability.request_context(job.id for job in group):
                self._run_batch(model, group)
        answers = [{"job_id": i, "started": True} for i in ids]
        return answers if batched else answers[0]

    def encode_response(self, output: dict) -> dict:
        return output

    def _prepare(self, job: Job, saved: dict[str, dict]) -> TaskInput:
        def save(name: str, content: bytes, content_type: str) -> None:
            size = self.artifacts.save(job.files_token, name, content)
            saved[name] = {"content_type": content_type, "size": size}

        spec = TASKS[job.model]
        with np.load(io.BytesIO(self.store.read_input(job))) as stored:
            image = stored["image"]
            masks = {name: stored[name] for name in spec.mask_params if name in stored.files}
        params = spec.params.model_validate(job.payload["params"])
        return TaskInput(image=image, image_key=job.payload["image_key"], params=params, save=save, masks=masks)

    def _run_batch(self, model: str, jobs: list[Job]) -> None:
        """Run jobs of one model together; if the batch fails, run each alone so one bad job fails alone."""
        saved: dict[str, dict[str, dict]] = {job.id: {} for job in jobs}
        ready: list[tuple[Job, TaskInput]] = []
        for job in jobs:
            try:
                ready.append((job, self._prepare(job, saved[job.id])))
            except Exception as exc:
                log.exception("job %s: unreadable input", job.id, extra={"request_id": job.id})
                self._finish(job, error=f"Could not read the job's input: {type(exc).__name__}: {exc}")
        if not ready:
            return
        try:
            outputs = self.runtime.run(model, [item for _, item in ready])
        except Exception as exc:
            if len(ready) > 1:
                log.warning("batch of %d %s jobs failed (%s); running them one by one", len(ready), model, exc)
                for job, _ in ready:
                    with observability.request_context([job.id]):
                        self._run_batch(model, [job])
                return
            job = ready[0][0]
            log.exception("job %s failed", job.id)
            self._finish(job, error=f"Error while running {model}: {type(exc).__name__}: {exc}")
            return
        for (job, _), output in zip(ready, outputs):
            if isinstance(output, TaskError):
                self.artifacts.delete(job.files_token)
                self._finish(job, error=str(output))
            else:
                self._finish(job, output=output, files=saved[job.id], batch_size=len(ready))

    def _finish(
        self,
        job: Job,
        output: TaskOutput | None = None,
        files: dict | None = None,
        batch_size: int = 1,
        error: str | None = None,
    ) -> None:
        if output is not None:
            result = {
                "primary": output.primary,
                "outputs": output.files,
                "files": files,
                "data": output.data,
                "metrics": {
                    **output.metrics,
                    "batch_size": batch_size,
                    "device": self.device,
                    "stages": {"decode": job.payload["decode_seconds"], **output.metrics.get("stages", {})},
                },
            }
            if not _json_finite(result):  # NaN/inf cannot be sent as JSON: fail now, not at every result poll
                self.artifacts.delete(job.files_token)
                output, error = None, "The model produced non-finite numbers (NaN or infinity) for this input"
        if output is not None:
            recorded = self.store.complete(job.id, result)
            if not recorded:
                now = self.store.get(job.id)
                if now is None or now.state is JobState.FAILED:
                    self.artifacts.delete(job.files_token)  # the watchdog failed it meanwhile
                # else another replica completed it first (it was re-run after a lapsed lease): same files
        else:
            result, recorded = None, self.store.fail(job.id, error)
        if recorded:  # else the watchdog (or another replica) finished it first, and counted it
            observability.job_finished(job, result and result["metrics"], error, self.device)
        self.store.release_input(job)


def _json_finite(value: object) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        return False
    return True
