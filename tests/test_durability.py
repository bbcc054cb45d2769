"""No job is lost: a hard kill, a draining SIGTERM, a worker crash and the watchdog, in one story.

The servers share one data directory, as a restarted server does. `points_per_side=128` on the
tiny model keeps a job running for several seconds: long enough to act while it runs.
"""

from __future__ import annotations

import os
import signal

import httpx
import pytest
from segmind import SegmindClient
from segmind.v2 import InferenceFailed

from tests.conftest import noise_image, png_b64
from tests.server_process import ServerProcess

IMAGE = png_b64(noise_image(240, 320))
SLOW = {"image": IMAGE, "points_per_side": 128}  # several seconds on the tiny model
QUICK = {"image": IMAGE, "points_input": "[[10, 10]]"}


def submit(server: ServerProcess, body: dict) -> str:
    response = httpx.post(f"{server.url}/v2/sam3-image", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("durable") / "data"


def start(weights_dir, data_dir, *args: str) -> ServerProcess:
    return ServerProcess(weights_dir, data_dir, "--max-batch-size", "1", *args).start()


def start_with_a_running_job(weights_dir, data_dir) -> tuple[ServerProcess, str]:
    server = start(weights_dir, data_dir)
    running = submit(server, SLOW)
    server.wait_for_state(running, {"PROCESSING"})
    return server, running


def test_hard_kill_then_restart_reruns_the_running_job_and_runs_the_queued(weights_dir, data_dir):
    first, running = start_with_a_running_job(weights_dir, data_dir)
    queued = [submit(first, QUICK) for _ in range(2)]
    first.kill()  # every process at once, mid-job
    assert first.job_row(running)["state"] == "PROCESSING"
    assert [first.job_row(j)["state"] for j in queued] == ["QUEUED", "QUEUED"]

    second = start(weights_dir, data_dir)
    try:
        for job_id in [running, *queued]:
            assert second.wait_for_state(job_id, {"COMPLETED", "FAILED"}, timeout=90)["status"] == "COMPLETED"
        assert second.job_row(running)["attempts"] == 2  # interrupted once, run again
    finally:
        second.terminate()


def test_sigterm_drains_running_jobs_and_keeps_queued_ones_for_the_next_start(weights_dir, data_dir):
    server, running = start_with_a_running_job(weights_dir, data_dir)
    waiting = submit(server, QUICK)
    server.process.send_signal(signal.SIGTERM)
    # While draining: polls still answer, submits are refused with 503.
    assert server.wait_for_state(running, {"PROCESSING", "COMPLETED"})["status"] in {"PROCESSING", "COMPLETED"}
    refused = httpx.post(f"{server.url}/v2/sam3-image", json=QUICK, timeout=30)
    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]
    assert server.process.wait(timeout=90) == 0
    server.terminate()
    assert server.job_row(running)["state"] == "COMPLETED"
    assert server.job_row(waiting)["state"] == "QUEUED"

    restarted = start(weights_dir, data_dir)
    try:
        assert restarted.wait_for_state(waiting, {"COMPLETED", "FAILED"}, timeout=60)["status"] == "COMPLETED"
    finally:
        restarted.terminate()


def test_ctrl_c_to_the_whole_process_group_drains_too(weights_dir, data_dir):
    server, running = start_with_a_running_job(weights_dir, data_dir)
    os.killpg(server.process.pid, signal.SIGINT)  # what a terminal sends on Ctrl+C
    assert server.process.wait(timeout=90) == 0
    server.terminate()
    assert server.job_row(running)["state"] == "COMPLETED"


def test_worker_crash_fails_its_job_and_the_server_keeps_serving(weights_dir, data_dir):
    server = start(weights_dir, data_dir, "--job-timeout", "30")
    try:
        client = SegmindClient(base_url=f"{server.url}/v1")
        job = client.submit_async("sam3-image", **SLOW)
        server.wait_for_state(job.request_id, {"PROCESSING"})
        os.kill(server.job_row(job.request_id)["worker_pid"], signal.SIGKILL)
        with pytest.raises(InferenceFailed) as failure:
            job.wait(timeout=30, interval=0.05)
        assert "worker process running this job died" in failure.value.detail
        # LitServe restarts the worker; the next job runs on it.
        assert client.submit_async("sam3-image", **QUICK).wait(timeout=90, interval=0.05)["status"] == "COMPLETED"
    finally:
        server.terminate()


def test_watchdog_fails_a_job_past_its_deadline(weights_dir, data_dir):
    server = start(weights_dir, data_dir, "--job-timeout", "2")
    try:
        client = SegmindClient(base_url=f"{server.url}/v1")
        with pytest.raises(InferenceFailed) as failure:
            client.submit_async("sam3-image", **SLOW).wait(timeout=30, interval=0.05)
        assert "timed out" in failure.value.detail
        # v1 sync on a job that times out answers too, instead of hanging.
        late = httpx.post(f"{server.url}/v1/sam3-image", json=SLOW, timeout=60)
        assert late.status_code == 422 and "timed out" in late.json()["error"]
    finally:
        server.terminate()
