"""Prometheus /metrics and JSON logs, against one real server process (json logs, two front ends)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from server import observability
from server.app import common_router
from server.auth import ApiKeys
from server.config import ServeConfig
from tests.conftest import noise_image, png_b64
from tests.server_process import ServerProcess

KEY = "obs-key"
HEADERS = {"x-api-key": KEY}
Samples = dict[tuple[str, frozenset], float]


@pytest.fixture(scope="module")
def server(weights_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("observability")
    proc = ServerProcess(
        weights_dir, root / "data", "--api-key", KEY, "--log-format", "json", "--api-servers", "2"
    ).start()
    yield proc
    proc.terminate()


def scrape(server: ServerProcess) -> Samples:
    """Every sample of /metrics (asked without a key: it is open by default), by name and labels."""
    response = httpx.get(f"{server.url}/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    families = text_string_to_metric_families(response.text)
    return {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def submit(server: ServerProcess, seed: int) -> str:
    body = {"image": png_b64(noise_image(96, 128, seed=seed)), "text_prompt": "a cat", "threshold": 0.1}
    response = httpx.post(f"{server.url}/v2/sam3-image", json=body, headers=HEADERS, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def test_metrics_count_jobs_observed_in_the_workers(server):
    before = scrape(server)
    for job_id in [submit(server, seed) for seed in (1, 2)]:
        assert server.wait_for_state(job_id, {"COMPLETED", "FAILED"}, headers=HEADERS)["status"] == "COMPLETED"

    # Two front ends: whichever answers, it sums the files of every process.
    scrapes = [scrape(server) for _ in range(4)]
    assert all(s == scrapes[0] for s in scrapes)
    after = scrapes[0]

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    model = {"model": "sam3-image"}
    assert delta("sam3serve_jobs_finished_total", **model, outcome="completed") == 2
    assert delta("sam3serve_jobs_finished_total", **model, outcome="failed") == 0
    for histogram in ("sam3serve_job_latency_seconds", "sam3serve_job_queue_seconds", "sam3serve_batch_size"):
        assert delta(f"{histogram}_count", **model) == 2
        assert delta(f"{histogram}_bucket", **model, le="+Inf") == 2
    assert delta("sam3serve_job_latency_seconds_sum", **model) > 0
    assert delta("sam3serve_batch_size_sum", **model) >= 2
    stages = {
        dict(labels)["stage"]
        for name, labels in after
        if name == "sam3serve_stage_seconds_count" and dict(labels)["model"] == "sam3-image"
    }
    assert {"decode", "embed", "detect", "encode"} <= stages
    assert delta("sam3serve_stage_seconds_count", **model, stage="decode") == 2
    assert value(after, "sam3serve_queue_depth") == 0
    assert value(after, "sam3serve_jobs", state="QUEUED") == value(after, "sam3serve_jobs", state="PROCESSING") == 0
    assert delta("sam3serve_jobs", state="COMPLETED") == 2
    assert not any(name.startswith("sam3serve_gpu_memory") for name, _ in after)  # CPU: no GPU series at all


def test_bad_requests_are_not_jobs(server):
    before = scrape(server)
    image = png_b64(noise_image(32, 32))
    for path, body, status in (
        ("/v2/sam3-image", {"image": ""}, 400),
        ("/v2/sam3-image", {"image": image, "threshold": 7}, 400),
        ("/v2/no-such-model", {"image": image}, 404),
    ):
        assert httpx.post(f"{server.url}{path}", json=body, headers=HEADERS, timeout=10).status_code == status
    after = scrape(server)
    jobs = {key: v for key, v in after.items() if key[0].startswith(("sam3serve_jobs", "sam3serve_queue"))}
    assert jobs == {key: v for key, v in before.items() if key in jobs}


def test_metrics_key_is_optional_by_flag():
    """Open like /health by default; --metrics-require-key puts it behind the API key like /models."""

    class Store:
        def counts(self) -> dict[str, int]:
            return {"QUEUED": 3, "PROCESSING": 1, "COMPLETED": 0, "FAILED": 0}

    def client(require: bool) -> TestClient:
        gateway = SimpleNamespace(
            config=ServeConfig(metrics_require_key=require), keys=ApiKeys([KEY]), store=Store(), models=list
        )
        app = FastAPI()
        app.include_router(common_router(gateway))
        return TestClient(app)

    assert client(False).get("/models").status_code == 401
    response = client(False).get("/metrics")
    assert response.status_code == 200 and "sam3serve_queue_depth 3.0" in response.text
    assert client(True).get("/metrics").status_code == 401
    assert client(True).get("/metrics", headers={"authorization": f"Bearer {KEY}"}).status_code == 200


def test_gpu_memory_is_reported_on_cuda_only(monkeypatch):
    """The CUDA branch, with torch's counters stubbed (the metrics of this test process are in-memory)."""
    import torch

    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 1024)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 4096)
    job = SimpleNamespace(id="gpu-job", model="gpu-test", created_at=1.0, started_at=2.0)
    metrics = {"batch_size": 1, "stages": {"embed": 0.5}}

    def memory(device: str, kind: str) -> float | None:
        return REGISTRY.get_sample_value("sam3serve_gpu_memory_bytes", {"device": device, "kind": kind})

    observability.job_finished(job, metrics, None, "cpu")
    assert memory("cpu", "allocated") is None
    observability.job_finished(job, metrics, None, "cuda:1")
    assert memory("cuda:1", "allocated") == 1024 and memory("cuda:1", "peak") == 4096
    finished = {"model": "gpu-test", "outcome": "completed"}
    assert REGISTRY.get_sample_value("sam3serve_jobs_finished_total", finished) == 2


def test_json_logs_carry_the_request_id(server):
    body = {"image": png_b64(noise_image(96, 128, seed=3)), "text_prompt": "a cat", "threshold": 0.1}
    response = httpx.post(f"{server.url}/v1/sam3-image", json=body, headers=HEADERS, timeout=60)
    assert response.status_code == 200, response.text
    job_id = response.headers["x-request-id"]

    lines = [json.loads(line) for line in server.log_path.read_text().splitlines() if line.strip()]
    assert lines and all({"ts", "level", "logger", "message", "pid"} <= set(line) for line in lines)
    about_job = [line for line in lines if job_id in line["message"]]
    assert about_job and all(line.get("request_id") == job_id for line in about_job)
    front_ends = {line["pid"] for line in lines if line["logger"] == "uvicorn.access"}
    tagged = [line for line in lines if line.get("request_id") == job_id]
    workers = [line for line in tagged if line["pid"] not in front_ends | {server.process.pid}]
    assert any(f"job {job_id} completed" in line["message"] for line in workers)
    assert any(line["logger"] == "uvicorn.access" and "POST /v1/sam3-image" in line["message"] for line in tagged)
