"""`sam3-serve bench` against a real server: report keys, error counting, bounds, plot, v1 mode."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from server.bench import base_url, parse_param
from tests.conftest import noise_image
from tests.server_process import ServerProcess

KEY = "bench-key"


@pytest.fixture(scope="module")
def server(weights_dir, tmp_path_factory):
    proc = ServerProcess(weights_dir, tmp_path_factory.mktemp("bench") / "data", "--api-key", KEY).start()
    yield proc
    proc.terminate()


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "street.png"
    Image.fromarray(noise_image(240, 320)).save(path)
    return path


def bench(server, image, tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "server", "bench", "--base-url", f"{server.url}/v1", "--api-key", KEY,
         "--model", "sam3-image", "--image", str(image), "--json", str(out), *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return done, json.loads(out.read_text())


def test_report_has_the_documented_keys_and_a_plot(server, image, tmp_path):
    plot = tmp_path / "latency.png"
    done, report = bench(
        server, image, tmp_path, "--param", "points_input=[[10, 20]]", "--requests", "6", "--concurrency", "3",
        "--plot", str(plot),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert set(report) == {
        "target", "requests", "errors", "error_examples", "wall_time_s", "throughput_rps", "latency_s", "server",
        "polling", "samples",
    }  # fmt: skip
    assert report["requests"] == {"sent": 6, "ok": 6, "errors": 0} and report["errors"] == {}
    latency = report["latency_s"]
    assert 0 < latency["min"] <= latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert report["throughput_rps"] > 0 and report["target"]["concurrency"] == 3
    server_side = report["server"]
    assert server_side["inference_time_s"]["p50"] > 0 and "p99" in server_side["queue_time_s"]
    assert {"decode", "mask", "encode"} <= set(server_side["stages_s"]) and server_side["batch_size"]["max"] >= 1
    assert report["polling"]["mean_polls"] >= 1 and 0.02 <= report["polling"]["mean_final_interval_s"] <= 1.0
    assert len(report["samples"]) == 6
    assert "latency (end to end)" in done.stdout and "server inference_time" in done.stdout
    with Image.open(plot) as png:
        png.verify()
        assert png.format == "PNG" and png.size[0] > 600


def test_errors_are_counted_by_http_status(server, image, tmp_path):
    done, report = bench(server, image, tmp_path, "--param", "threshold=5", "--requests", "4", "--warmup", "0")
    assert done.returncode == 1
    assert report["requests"] == {"sent": 4, "ok": 0, "errors": 4} and report["errors"] == {"400": 4}
    assert report["error_examples"]["400"].startswith("threshold:")
    assert "errors 400: 4" in done.stdout
    done, report = bench(server, image, tmp_path, "--api-key", "wrong", "--requests", "2", "--warmup", "0")
    assert report["errors"] == {"401": 2}


def test_stops_at_the_request_bound_and_at_the_duration_bound(server, image, tmp_path):
    _, counted = bench(server, image, tmp_path, "--param", "points_input=[[1, 1]]", "--requests", "5")
    assert counted["requests"]["sent"] == 5
    slow = ("--param", "points_per_side=16", "--param", "pred_iou_thresh=0.5")
    _, timed = bench(server, image, tmp_path, *slow, "--requests", "100000", "--duration", "1.5", "--concurrency", "2")
    assert 0 < timed["requests"]["sent"] < 100000
    assert all(sample["t"] < 1.5 for sample in timed["samples"])  # nothing started after the bound
    assert timed["wall_time_s"] < 1.5 + timed["latency_s"]["max"] + 1.0  # in-flight requests only finish


def test_v1_sync_mode_reads_metrics_from_the_poll_url(server, image, tmp_path):
    done, report = bench(server, image, tmp_path, "--mode", "v1", "--param", "text_prompt=car", "--requests", "3")
    assert done.returncode == 0 and report["requests"]["ok"] == 3 and "polling" not in report
    assert report["server"]["queue_time_s"]["max"] >= 0 and "detect" in report["server"]["stages_s"]


def test_params_and_base_urls():
    assert parse_param("threshold=0.3") == ("threshold", 0.3)
    assert parse_param("return_masks=true") == ("return_masks", True)
    assert parse_param("points_input=[[300, 400]]") == ("points_input", "[[300, 400]]")  # Segmind's string lists
    assert parse_param("text_prompt=red car") == ("text_prompt", "red car")
    for url in ("http://h:8000", "http://h:8000/", "http://h:8000/v1", "http://h:8000/v2/"):
        assert base_url(url) == "http://h:8000"
