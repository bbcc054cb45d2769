"""Faults with a whole batch in flight (tests/test_durability.py covers them one job at a time).

(a) SIGKILL of the inference worker while it runs a batch of 8: each of the 8 jobs ends FAILED with
    an error naming the dead worker; the jobs queued behind the batch are not lost (they COMPLETE on
    the worker LitServe starts again), and a new job completes.
(b) SIGTERM of the server while a batch of 8 runs and 8 more jobs wait: the batch finishes, the 8
    waiting jobs stay QUEUED in the store, and a server restarted on the same data directory runs
    them, each exactly once.

A batch is made deterministic by a short blocker job: the 8 jobs are submitted while it runs, so the
worker finds all of them queued when it is free and takes them as one batch (checked in the store:
one worker pid, one start time).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import schemathesis

from tests.conftest import noise_image, png_b64
from tests.server_process import ServerProcess

BATCH = 8
SIDE = 64
BLOCKER = {"image": png_b64(noise_image(SIDE, SIDE, seed=100)), "points_per_side": 64}  # about 2 s
QUICK = {"image": png_b64(noise_image(SIDE, SIDE, seed=101)), "points_input": "[[10, 10]]"}


def images(seed: int, count: int) -> list[str]:
    return [png_b64(noise_image(SIDE, SIDE, seed=seed + i)) for i in range(count)]


def start(weights_dir: Path, data_dir: Path) -> ServerProcess:
    args = ("--max-batch-size", str(BATCH), "--batch-timeout", "0.3", "--job-timeout", "120")
    return ServerProcess(weights_dir, data_dir, *args).start()


async def submit_all(server: ServerProcess, bodies: list[dict]) -> list[str]:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        responses = await asyncio.gather(*(client.post("/v2/sam3-image", json=body) for body in bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies), [r.text for r in responses]
    return [r.json()["request_id"] for r in responses]


def submit_one_batch(server: ServerProcess, bodies: list[dict]) -> list[str]:
    """Submit `bodies` while a blocker job runs, then wait until the worker runs all of them as one batch."""
    blocker = asyncio.run(submit_all(server, [BLOCKER]))[0]
    server.wait_for_state(blocker, {"PROCESSING"}, timeout=30)
    batch = asyncio.run(submit_all(server, bodies))
    assert server.job_row(blocker)["state"] == "PROCESSING", "the blocker ended before the batch was submitted"
    assert server.wait_for_state(blocker, {"COMPLETED", "FAILED"}, timeout=60)["status"] == "COMPLETED"
    for job_id in batch:
        server.wait_for_state(job_id, {"PROCESSING"}, timeout=30)
    rows = [server.job_row(job_id) for job_id in batch]
    assert len({(r["worker_pid"], r["started_at"]) for r in rows}) == 1, "the jobs must run as one batch"
    return batch


def worker_pids(server: ServerProcess) -> list[int]:
    """Live processes of the server's process group whose command line is a multiprocessing spawn: the workers."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if int(stat[2]) == server.process.pid and stat[0] not in ("Z", "X") and b"spawn_main" in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s")


@pytest.fixture(scope="module")
def killed_batch(weights_dir, tmp_path_factory):
    """A server whose worker was SIGKILLed mid-batch: (server, batch ids, queued ids, dead pid, time of the kill)."""
    server = start(weights_dir, tmp_path_factory.mktemp("faults-kill") / "data")
    try:
        slow = [{"image": image, "points_per_side": 128} for image in images(200, BATCH)]  # ~8 s each, if left
        batch = submit_one_batch(server, slow)
        queued = asyncio.run(submit_all(server, [QUICK] * 4))
        workers = worker_pids(server)
        assert len(workers) == 1, f"one worker process expected, found {workers}"
        (worker,) = workers
        assert server.job_row(batch[0])["worker_pid"] == worker
        killed_at = time.monotonic()
        os.kill(worker, signal.SIGKILL)
        yield server, batch, queued, worker, killed_at
    finally:
        server.terminate()


def test_sigkill_of_the_worker_mid_batch_fails_the_batch_and_keeps_serving(killed_batch):
    server, batch, queued, dead, killed_at = killed_batch
    failed = [server.wait_for_state(job_id, {"COMPLETED", "FAILED"}, timeout=30) for job_id in batch]
    all_failed = time.monotonic() - killed_at
    replacement = wait_until(lambda: [p for p in worker_pids(server) if p != dead], 60, "a new worker process")
    for job_id in queued:
        assert server.wait_for_state(job_id, {"COMPLETED", "FAILED"}, timeout=90)["status"] == "COMPLETED"
    queued_done = time.monotonic() - killed_at
    fresh = asyncio.run(submit_all(server, [QUICK]))[0]
    assert server.wait_for_state(fresh, {"COMPLETED", "FAILED"}, timeout=60)["status"] == "COMPLETED"
    print(
        f"\nworker {dead} SIGKILLed with a batch of {len(batch)} running and {len(queued)} jobs queued behind it:"
        f"\n  the batch FAILED {all_failed:.2f} s after the kill; new worker {replacement};"
        f" the queued jobs COMPLETED {queued_done:.2f} s after the kill; then a new job completed"
        f"\n  error: {failed[0].get('error')}"
    )
    for body in failed:
        assert body["status"] == "FAILED"
        assert f"worker process running this job died (pid {dead})" in body["error"], body
    for job_id in batch:
        row = server.job_row(job_id)
        assert row["state"] == "FAILED" and row["attempts"] == 1 and row["result"] is None
    for job_id in queued:
        assert server.job_row(job_id)["worker_pid"] is None  # finished by the new worker, which then released it


def test_a_failed_job_answers_on_the_contract_and_as_the_schema_declares(killed_batch):
    """FAILED is HTTP 422 `{status, error, ...}` on every poll route, and conforms to the served schema's 422."""
    server, batch, _, dead, _ = killed_batch
    server.wait_for_state(batch[0], {"FAILED"}, timeout=30)
    api = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    for path in ("/v2/requests/{request_id}/status", "/v2/requests/{request_id}", "/v1/requests/{request_id}"):
        response = httpx.get(server.url + path.format(request_id=batch[0]), timeout=10)
        print(f"\n{path}: HTTP {response.status_code} {response.text[:100]}...")
        body = response.json()
        assert response.status_code == 422 and body["status"] == "FAILED" and body["request_id"] == batch[0]
        assert f"pid {dead}" in body["error"]
        api[path]["GET"].validate_response(response)


def test_sigterm_with_a_batch_running_and_jobs_queued_then_restart(weights_dir, tmp_path):
    data = tmp_path / "data"
    server = start(weights_dir, data)
    try:
        medium = [{"image": image, "points_per_side": 32} for image in images(300, BATCH)]  # ~0.6 s each
        batch = submit_one_batch(server, medium)
        queued = asyncio.run(
            submit_all(server, [{"image": image, "points_input": "[[5, 5]]"} for image in images(400, BATCH)])
        )
        assert {server.job_row(j)["state"] for j in batch} == {"PROCESSING"}, "the batch must be running at SIGTERM"
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        # Draining: probes and submits answer 503, polls keep answering.
        wait_until(lambda: httpx.get(f"{server.url}/health", timeout=5).status_code == 503, 10, "/health turning 503")
        refused = httpx.post(f"{server.url}/v2/sam3-image", json=QUICK, timeout=30)
        assert refused.status_code == 503 and refused.headers.get("retry-after"), refused.text
        assert server.wait_for_state(queued[0], {"QUEUED"}, timeout=5)["status"] == "QUEUED"
        assert server.process.wait(timeout=90) == 0
        drained = time.monotonic() - signalled
    finally:
        server.terminate()
    rows = {job_id: server.job_row(job_id) for job_id in batch + queued}
    assert [rows[j]["state"] for j in batch] == ["COMPLETED"] * BATCH, [rows[j]["state"] for j in batch]
    assert [rows[j]["state"] for j in queued] == ["QUEUED"] * BATCH, [rows[j]["state"] for j in queued]
    assert {rows[j]["attempts"] for j in batch} == {1} and {rows[j]["attempts"] for j in queued} == {0}

    restarted_at = time.monotonic()
    restarted = start(weights_dir, data)
    try:
        ready = time.monotonic() - restarted_at
        for job_id in queued:
            assert restarted.wait_for_state(job_id, {"COMPLETED", "FAILED"}, timeout=60)["status"] == "COMPLETED"
        done = time.monotonic() - restarted_at
        for job_id in batch:  # finished before the stop: not run again, result still served
            result = httpx.get(f"{restarted.url}/v2/requests/{job_id}", timeout=10).json()
            assert result["status"] == "COMPLETED" and result["output"], result
    finally:
        restarted.terminate()
    rows = {job_id: restarted.job_row(job_id) for job_id in batch + queued}
    print(
        f"\nSIGTERM with a batch of {BATCH} running and {BATCH} queued: drained and exited in {drained:.2f} s;"
        f"\n  restarted server ready in {ready:.2f} s, the {BATCH} queued jobs COMPLETED {done:.2f} s after the restart"
    )
    assert {row["state"] for row in rows.values()} == {"COMPLETED"}
    assert {row["attempts"] for row in rows.values()} == {1}, "every job ran exactly once"
