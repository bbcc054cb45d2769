"""Load: 1,000 submits of tiny sam3-image jobs at concurrency 64 against a small queue, over loopback.

Every submit is either accepted (200, and the job then ends COMPLETED with a result) or refused
(429 with Retry-After): nothing lost, nothing stuck, no 5xx, and the queue bound holds throughout.
The figures (accepted, refused, wall time, jobs/s, submit latency, batch sizes) are printed.
"""

from __future__ import annotations

import asyncio
import sqlite3
import statistics
import time
from collections import Counter
from contextlib import closing

import httpx
import pytest

from tests.conftest import noise_image, png_b64
from tests.server_process import ServerProcess

SUBMITS = 1000
CONCURRENCY = 64
MAX_QUEUE = 32
MAX_BATCH = 8
SIDE = 64  # pixels: tiny images, so the run measures the server rather than the model
FINISH_BOUND = 90.0  # seconds after the last submit by which every accepted job must have finished
POLL_INTERVAL = 0.05


@pytest.fixture(scope="module")
def server(weights_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("load") / "data"
    proc = ServerProcess(
        weights_dir, data, "--max-queue", str(MAX_QUEUE), "--max-batch-size", str(MAX_BATCH), "--job-timeout", "120"
    ).start()
    yield proc
    proc.terminate()


def unfinished(server: ServerProcess) -> int:
    """The store's own count of QUEUED and PROCESSING jobs (read from its SQLite file)."""
    with closing(sqlite3.connect(server.data_dir / "jobs.sqlite3", timeout=10)) as db:
        return db.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('QUEUED', 'PROCESSING')").fetchone()[0]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run_load(server: ServerProcess) -> dict:
    images = [png_b64(noise_image(SIDE, SIDE, seed=i)) for i in range(SUBMITS)]
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    gate = asyncio.Semaphore(CONCURRENCY)
    submits: list[tuple[int, float, httpx.Response]] = []
    depths: list[int] = []
    submitting = True

    async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:

        async def submit(i: int) -> None:
            async with gate:
                started = time.perf_counter()
                response = await client.post("/v2/sam3-image", json={"image": images[i], "text_prompt": "cat"})
                submits.append((i, time.perf_counter() - started, response))

        async def sample_depth() -> None:  # the store's own count of unfinished jobs, while submits run
            while submitting:
                depths.append(await asyncio.to_thread(unfinished, server))
                await asyncio.sleep(0.02)

        sampler = asyncio.create_task(sample_depth())
        t0 = time.perf_counter()
        await asyncio.gather(*(submit(i) for i in range(SUBMITS)))
        submitted_at = time.perf_counter()
        submitting = False
        await sampler

        accepted = [r.json()["request_id"] for _, _, r in submits if r.status_code == 200]
        status: dict[str, dict] = {}
        pending = set(accepted)
        deadline = submitted_at + FINISH_BOUND
        while pending and time.perf_counter() < deadline:  # bounded poll of every unfinished job

            async def poll(job_id: str) -> None:
                async with gate:
                    body = (await client.get(f"/v2/requests/{job_id}/status")).json()
                if body["status"] in ("COMPLETED", "FAILED"):
                    status[job_id] = body
                    pending.discard(job_id)

            await asyncio.gather(*(poll(j) for j in list(pending)))
            if pending:
                await asyncio.sleep(POLL_INTERVAL)
        finished_at = time.perf_counter()

        results: dict[str, httpx.Response] = {}

        async def fetch(job_id: str) -> None:
            async with gate:
                results[job_id] = await client.get(f"/v2/requests/{job_id}")

        await asyncio.gather(*(fetch(j) for j in accepted if j not in pending))
        one = next((r.json() for r in results.values() if r.status_code == 200), None)
        preview = await client.get(one["output"]) if one else None

    return {
        "submits": submits,
        "accepted": accepted,
        "pending": pending,
        "status": status,
        "results": results,
        "preview": preview,
        "depths": depths,
        "submit_wall": submitted_at - t0,
        "wall": finished_at - t0,
        "drain": finished_at - submitted_at,
    }


def test_1000_submits_at_concurrency_64_are_accepted_and_complete_or_refused_with_429(server):
    run = asyncio.run(run_load(server))
    submits, accepted, results = run["submits"], run["accepted"], run["results"]
    codes = Counter(r.status_code for _, _, r in submits)
    refused = [r for _, _, r in submits if r.status_code == 429]
    latency = [seconds for _, seconds, _ in submits]
    batch_sizes = Counter(r.json()["metrics"]["batch_size"] for r in results.values() if r.status_code == 200)
    final = Counter(body["status"] for body in run["status"].values())
    print(
        f"\nload: {SUBMITS} submits at concurrency {CONCURRENCY}, --max-queue {MAX_QUEUE}, "
        f"--max-batch-size {MAX_BATCH}, {SIDE}x{SIDE} images, text prompt"
        f"\n  accepted {len(accepted)}, refused (429) {len(refused)}, status codes {dict(codes)}"
        f"\n  final states {dict(final)}, still unfinished {len(run['pending'])}"
        f"\n  wall {run['wall']:.2f} s (submits {run['submit_wall']:.2f} s, then drained in {run['drain']:.2f} s), "
        f"{len(accepted) / run['wall']:.1f} jobs/s completed, {SUBMITS / run['submit_wall']:.1f} submits/s"
        f"\n  submit latency p50 {percentile(latency, 0.5) * 1000:.1f} ms, "
        f"p95 {percentile(latency, 0.95) * 1000:.1f} ms, max {max(latency) * 1000:.1f} ms, "
        f"mean {statistics.fmean(latency) * 1000:.1f} ms"
        f"\n  unfinished jobs in the store while submitting: max {max(run['depths'], default=0)} "
        f"over {len(run['depths'])} samples (bound {MAX_QUEUE})"
        f"\n  batch sizes {dict(sorted(batch_sizes.items()))}"
    )

    assert set(codes) <= {200, 429}, f"only 200 or 429 may answer a submit: {dict(codes)}"
    assert len(accepted) + len(refused) == SUBMITS
    assert accepted and refused, "the run must exercise both the accepted and the refused path"
    for response in refused:
        assert int(response.headers["retry-after"]) >= 1
        assert "retry later" in response.json()["error"]
    assert len(set(accepted)) == len(accepted), "request ids must be unique"
    assert max(run["depths"], default=0) <= MAX_QUEUE, "the queue bound was exceeded"

    # None stuck: every accepted job finished within the bound. None lost: each one COMPLETED with a result.
    assert not run["pending"], f"{len(run['pending'])} jobs not finished {FINISH_BOUND:.0f} s after the last submit"
    assert final == {"COMPLETED": len(accepted)}, f"final states {dict(final)}"
    assert len(results) == len(accepted)
    for job_id, response in results.items():
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["request_id"] == job_id and body["status"] == "COMPLETED"
        assert body["output"].startswith(f"{server.url}/files/") and body["image_size"] == [SIDE, SIDE]
        assert body["num_masks"] == len(body["scores"]) and body["metrics"]["total_time"] < FINISH_BOUND + 60
    assert run["preview"].status_code == 200 and run["preview"].headers["content-type"] == "image/png"
    assert max(batch_sizes) > 1, "under load the worker must batch jobs"
    assert unfinished(server) == 0
    assert "Traceback" not in server.log_path.read_text(errors="replace"), server.log()
