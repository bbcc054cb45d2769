"""Backpressure, retention and a model without weights, through the HTTP API."""

from __future__ import annotations

import time

import httpx
import pytest
from segmind import SegmindClient
from segmind.exceptions import SegmindError

from tests.conftest import noise_image, png_b64
from tests.server_process import ServerProcess, free_port

IMAGE = png_b64(noise_image(240, 320))
SLOW = {"image": IMAGE, "points_per_side": 64}  # about two seconds on the tiny model


@pytest.fixture(scope="module")
def server(weights_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("limits") / "data"
    port = free_port()
    public = ("--public-url", f"http://localhost:{port}")  # as behind a proxy: URLs use the configured base
    proc = ServerProcess(
        weights_dir, data, "--max-queue", "2", "--max-batch-size", "1", "--retention", "8", *public, port=port
    ).start()
    yield proc
    proc.terminate()


def test_full_queue_refuses_submits_with_429_but_never_polls(server):
    accepted = [httpx.post(f"{server.url}/v2/sam3-image", json=SLOW, timeout=30) for _ in range(2)]
    assert [r.status_code for r in accepted] == [200, 200]
    refused = httpx.post(f"{server.url}/v2/sam3-image", json=SLOW, timeout=30)
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1 and "retry later" in refused.json()["error"]
    sync_refused = httpx.post(f"{server.url}/v1/sam3-image", json=SLOW, timeout=30)
    assert sync_refused.status_code == 429
    ids = [r.json()["request_id"] for r in accepted]
    for _ in range(50):  # a burst of polls while the queue is full: none is limited
        for job_id in ids:
            assert httpx.get(f"{server.url}/v2/requests/{job_id}/status").status_code == 200
    for job_id in ids:
        server.wait_for_state(job_id, {"COMPLETED"}, timeout=60)
    assert httpx.post(f"{server.url}/v2/sam3-image", json=SLOW, timeout=30).status_code == 200


def test_jobs_and_files_expire_after_retention(server):
    client = SegmindClient(base_url=f"{server.url}/v1")
    job = client.submit_async("sam3-image", image=IMAGE, points_input="[[5, 5]]")
    result = job.wait(interval=0.05)
    assert job.status_url.startswith(f"http://localhost:{server.port}/v2/requests/")
    assert result["output"].startswith(f"http://localhost:{server.port}/files/")
    files = server.data_dir / "files" / result["output"].split("/")[-2]
    assert (files / "preview.png").is_file() and httpx.get(result["output"]).status_code == 200
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and files.exists():  # the janitor runs every second
        time.sleep(0.1)
    assert not files.exists()
    with pytest.raises(SegmindError) as gone:
        job.status()
    assert gone.value.status == 404
    assert httpx.get(result["response_url"]).status_code == 404
    assert httpx.get(result["output"]).status_code == 404
    assert not list((server.data_dir / "inputs").iterdir())


def test_a_model_without_weights_is_listed_unavailable_and_answers_503(empty_weights_dir, tmp_path):
    server = ServerProcess(empty_weights_dir, tmp_path / "data").start()
    try:
        health = httpx.get(f"{server.url}/health").json()
        listed = httpx.get(f"{server.url}/models").json()["models"]
        for models in (health["models"], listed):
            entry = next(m for m in models if m["name"] == "sam3-image")
            assert entry["available"] is False and "sam3/model.safetensors" in entry["missing_files"]
        response = httpx.post(f"{server.url}/v2/sam3-image", json={"image": IMAGE})
        assert response.status_code == 503
        error = response.json()["error"]
        assert "sam3/model.safetensors" in error and "sam3-serve weights download sam3" in error
        assert httpx.post(f"{server.url}/v1/sam3-image", json={"image": IMAGE}).status_code == 503
        body = httpx.post(f"{server.url}/v2/sam-3d-body", json={"image": IMAGE})
        assert body.status_code == 503
        error = body.json()["error"]
        assert "sam-3d-body-dinov3/model.ckpt" in error and "sam-3d-body-dinov3/assets/mhr_model.pt" in error
        assert "sam3-serve weights download sam-3d-body-dinov3" in error
    finally:
        server.terminate()
