"""The WaveSpeed v3 contract through the official `wavespeed==2.0.5` SDK, against a real server process."""

from __future__ import annotations

import io
import re
from datetime import datetime

import httpx
import numpy as np
import pytest
import wavespeed
from PIL import Image

from tests.conftest import noise_image, png_b64
from tests.server_process import ServerProcess

KEY = "wavespeed-key"
HEIGHT, WIDTH = 240, 320
IMAGE = png_b64(noise_image(HEIGHT, WIDTH, seed=5))
MASK = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
MASK[40:200, 110:190] = 255  # one person, box (110, 40, 190, 200)
SAM3 = "wavespeed-ai/sam3-image"
BODY = "wavespeed-ai/sam-3d-body"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(body_weights_dir, tmp_path_factory):
    proc = ServerProcess(body_weights_dir, tmp_path_factory.mktemp("wavespeed") / "data", "--api-key", KEY).start()
    yield proc
    proc.terminate()


@pytest.fixture(scope="module")
def client(server) -> wavespeed.Client:
    return wavespeed.Client(api_key=KEY, base_url=server.url, max_connection_retries=0)


def fetch(url: str) -> httpx.Response:
    response = httpx.get(url, headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    return response


def run(client: wavespeed.Client, model: str, payload: dict, sync: bool = False) -> dict:
    """Through the SDK (submit, then poll; or one sync request), then the full task by its id."""
    done = client.run_no_throw(model, payload, enable_sync_mode=sync, poll_interval=0.05, timeout=60)
    assert done["status"] == "completed", done
    envelope = client.get_result(done["task_id"])
    assert envelope["code"] == 200 and envelope["message"] == "success"
    assert envelope["data"]["outputs"] == done["outputs"]
    return envelope["data"]


def test_sam3_image_async_overlay_with_prompts_and_metadata(client, server):
    task = run(
        client,
        SAM3,
        {
            "image": IMAGE,
            "prompt": "a red car",
            "point_prompts": [{"x": 60, "y": 60, "label": 1}, {"x": 100, "y": 90, "label": 0}],
            "box_prompts": [{"x_min": 10, "y_min": 10, "x_max": 150, "y_max": 120}],
        },
    )
    assert task["model"] == SAM3 and task["status"] == "completed" and task["error"] == ""
    assert task["urls"]["get"] == f"{server.url}/api/v3/predictions/{task['id']}/result"
    assert datetime.fromisoformat(task["created_at"]).tzinfo is not None
    assert isinstance(task["timings"]["inference"], int) and task["timings"]["inference"] > 0
    [url] = task["outputs"]
    assert url.endswith("/overlay.png") and task["has_nsfw_contents"] == [False]
    assert Image.open(io.BytesIO(fetch(url).content)).size == (WIDTH, HEIGHT)
    metadata = task["metadata"]
    assert "point_prompts+box_prompts[0]" in metadata["sources"]
    assert len(metadata["boxes"]) == len(metadata["scores"]) == metadata["num_masks"]


def test_sam3_image_sync_mode_without_mask_overlay(client):
    box = {"x_min": 5, "y_min": 5, "x_max": 200, "y_max": 100}
    output = client.run(SAM3, {"image": IMAGE, "box_prompts": [box], "apply_mask": False}, enable_sync_mode=True)
    [url] = output["outputs"]
    assert url.endswith("/preview.png")


def test_sam_3d_body_async_and_sync_with_mask(client, server):
    payload = {"image": IMAGE, "mask_image": f"data:image/png;base64,{png_b64(MASK)}"}
    task = run(client, BODY, payload)
    glb, visualization = task["outputs"]
    assert glb.endswith("/scene.glb") and visualization.endswith("/visualization.png")
    assert fetch(glb).content[:4] == b"glTF"
    assert fetch(visualization).headers["content-type"] == "image/png"
    assert task["metadata"]["num_people"] == 1
    assert task["metadata"]["people"][0]["bbox"] == [110.0, 40.0, 190.0, 200.0]

    synced = run(client, BODY, payload, sync=True)
    assert synced["id"] != task["id"] and synced["status"] == "completed" and len(synced["outputs"]) == 2
    # One job model: the same task is a Segmind request too.
    segmind = httpx.get(f"{server.url}/v2/requests/{task['id']}", headers={"x-api-key": KEY}).json()
    assert segmind["status"] == "COMPLETED" and segmind["output"] == glb


def test_submit_answers_created_and_both_poll_paths_agree(server):
    submitted = httpx.post(
        f"{server.url}/api/v3/{SAM3}", json={"image": IMAGE, "prompt": "dog"}, headers=AUTH, timeout=30
    ).json()
    data = submitted["data"]
    assert submitted["code"] == 200 and data["status"] in {"created", "processing", "completed"}
    assert data["model"] == SAM3 and data["error"] == ""
    assert data["has_nsfw_contents"] == [False] * len(data["outputs"])
    short = httpx.get(f"{server.url}/api/v3/predictions/{data['id']}", headers=AUTH).json()
    assert short["data"]["id"] == data["id"] and short["data"]["urls"] == data["urls"]


@pytest.mark.parametrize(
    ("model", "payload", "named"),
    [
        (SAM3, {"image": IMAGE, "prompt": "car", "output_format": "jpeg"}, "output_format"),
        (SAM3, {"image": IMAGE}, "prompt"),
        (SAM3, {"image": IMAGE, "point_prompts": [{"x": 999, "y": 10}]}, "point_prompts: point 0"),
        (SAM3, {"image": IMAGE, "prompt": "car", "threshold": 0.2}, "threshold: unknown parameter"),
        (SAM3, {"image": IMAGE, "point_prompts": [{"x": 1, "y": 1, "object_id": 1}, {"x": 2, "y": 2, "object_id": 2}]},
         "point_prompts"),
        (BODY, {"image": IMAGE, "mask_image": png_b64(np.zeros((10, 10), np.uint8))}, "mask_image"),
        (BODY, {"prompt": "person"}, "image"),
    ],
)  # fmt: skip
def test_bad_input_is_a_400_naming_the_parameter(client, server, model, payload, named):
    with pytest.raises(RuntimeError, match="HTTP 400"):
        client.run(model, payload)
    response = httpx.post(f"{server.url}/api/v3/{model}", json=payload, headers=AUTH, timeout=30)
    body = response.json()
    assert response.status_code == 400 and body["code"] == 400 and body["data"] is None
    assert body["message"].startswith(named), body["message"]


def test_unknown_task_model_and_key(client, server):
    with pytest.raises(RuntimeError, match="HTTP 404"):
        client.get_result("nope")
    missing = httpx.get(f"{server.url}/api/v3/predictions/nope/result", headers=AUTH)
    assert missing.status_code == 404
    assert missing.json() == {"code": 404, "message": "Request nope not found", "data": None}
    unknown = httpx.post(f"{server.url}/api/v3/wavespeed-ai/z-image/turbo", json={}, headers=AUTH)
    assert unknown.status_code == 404 and unknown.json()["code"] == 404
    with pytest.raises(RuntimeError, match="HTTP 401"):
        wavespeed.Client(api_key="wrong", base_url=server.url).run(SAM3, {"image": IMAGE, "prompt": "car"})
    anonymous = httpx.post(f"{server.url}/api/v3/{SAM3}", json={"image": IMAGE})
    assert anonymous.status_code == 401 and anonymous.json()["code"] == 401


def test_failed_task_is_http_200_with_status_failed(weights_dir, tmp_path):
    """A job past its deadline fails (the watchdog): WaveSpeed reports it as a task, not an HTTP error."""
    proc = ServerProcess(weights_dir, tmp_path / "data", "--api-key", KEY, "--job-timeout", "0.001").start()
    try:
        client = wavespeed.Client(api_key=KEY, base_url=proc.url)
        payload = {"image": IMAGE, "prompt": "car"}
        for sync in (False, True):
            done = client.run_no_throw(SAM3, payload, enable_sync_mode=sync, poll_interval=0.05, timeout=30)
            assert done["status"] == "failed" and "timed out" in done["error"], done
            response = httpx.get(f"{proc.url}/api/v3/predictions/{done['task_id']}/result", headers=AUTH)
            data = response.json()["data"]
            assert response.status_code == 200 and data["status"] == "failed" and data["outputs"] == []
            assert re.match(r"Job timed out", data["error"])
    finally:
        proc.terminate()
