"""The Segmind contract through the official `segmind==1.3.0` SDK, against a real server process."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import segmind
from PIL import Image
from segmind import SegmindClient
from segmind.exceptions import SegmindError
from segmind.v2 import AsyncJob

from tests.conftest import noise_image, png_b64
from tests.server_process import ServerProcess

KEY, FILE_KEY = "test-key-1", "test-key-2"
IMAGE = png_b64(noise_image(480, 640))


@pytest.fixture(scope="module")
def server(weights_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    keys_file = root / "keys.txt"
    keys_file.write_text(f"# team keys\n{FILE_KEY}\n")
    proc = ServerProcess(weights_dir, root / "data", "--api-key", KEY, "--api-keys-file", str(keys_file)).start()
    yield proc
    proc.terminate()


@pytest.fixture(scope="module")
def client(server) -> SegmindClient:
    return SegmindClient(api_key=KEY, base_url=f"{server.url}/v1")


def fetch(url: str, key: str | None = KEY) -> httpx.Response:
    return httpx.get(url, headers={"x-api-key": key} if key else {}, timeout=10)


def test_run_returns_absolute_urls_masks_and_metrics(client, server):
    result = client.run("sam3-image", image=IMAGE, text_prompt="a red car", threshold=0.1, return_masks=True)

    assert result["status"] == "COMPLETED"
    assert result["output"].startswith(f"{server.url}/files/")
    preview = Image.open(io.BytesIO(fetch(result["output"]).content))
    assert preview.size == (640, 480)
    n = result["num_masks"]
    assert n > 0 and len(result["boxes"]) == len(result["scores"]) == len(result["areas"]) == len(result["masks"]) == n
    assert result["scores"] == sorted(result["scores"], reverse=True)
    assert all(s > 0.1 for s in result["scores"])
    first = result["masks"][0]
    assert set(first) == {"url", "content_type", "file_name", "file_size"}
    body = fetch(first["url"]).content
    assert len(body) == first["file_size"] and first["content_type"] == "image/png"
    mask = np.asarray(Image.open(io.BytesIO(body)))
    assert mask.shape == (480, 640) and int(mask.sum()) == result["areas"][0]
    metrics = result["metrics"]
    assert isinstance(metrics["inference_time"], float)
    assert metrics["total_time"] >= metrics["inference_time"] and "queue_time" in metrics
    assert set(metrics["stages"]) == {"decode", "embed", "detect", "encode"} and metrics["batch_size"] >= 1
    assert all(seconds >= 0 for seconds in metrics["stages"].values())


def test_submit_async_wait_and_status(client):
    job = client.submit_async("sam3-image", image=IMAGE, points_input="[[320, 240]]")
    assert job.submit_response["status"] == "QUEUED"
    assert job.submit_response["poll_url"].endswith(f"/v1/requests/{job.request_id}")
    assert job.status()["status"] in {"QUEUED", "PROCESSING", "COMPLETED"}
    result = job.wait(interval=0.05)
    assert result["request_id"] == job.request_id
    assert result["num_masks"] == 1 and result["sources"] == ["points_input"]
    assert job.status()["status"] == "COMPLETED"


def test_v1_sync_returns_bytes_and_poll_url_serves_the_result(client, server):
    response = client.run_sync("sam3-image", image=IMAGE, boxes_input="[[10, 10, 300, 200]]", return_overlay=True)
    assert response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (640, 480)
    request_id = response.headers["x-request-id"]
    assert float(response.headers["x-generation-time"]) > 0
    v1 = fetch(f"{server.url}/v1/requests/{request_id}").json()
    v2 = fetch(f"{server.url}/v2/requests/{request_id}").json()
    assert v1 == v2 and v1["overlay"]["file_name"] == "overlay.png"


def test_unknown_request_is_a_404_segmind_error(client, server):
    job = AsyncJob(
        request_id="nope",
        status_url=f"{server.url}/v2/requests/nope/status",
        response_url=f"{server.url}/v2/requests/nope",
        submit_response={},
        _client=client,
    )
    with pytest.raises(SegmindError) as error:
        job.status()
    assert error.value.status == 404 and error.value.detail == "Request nope not found"


def test_api_keys_guard_every_route_but_health(client, server):
    result = client.run("sam3-image", image=IMAGE, points_input="[[10, 10]]")
    with pytest.raises(SegmindError) as error:
        SegmindClient(api_key="wrong", base_url=f"{server.url}/v1").run("sam3-image", image=IMAGE)
    assert error.value.status == 401
    anonymous = httpx.post(f"{server.url}/v2/sam3-image", json={"image": IMAGE})
    assert anonymous.status_code == 401
    assert anonymous.json() == {"error": "Missing Authorization or x-api-key in header"}
    for url in (result["status_url"], result["response_url"], result["output"], f"{server.url}/models"):
        assert fetch(url, key=None).status_code == 401
        assert fetch(url, key="wrong").status_code == 401
        assert fetch(url, key=FILE_KEY).status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_module_level_run_with_default_client(server):
    segmind._default_client = SegmindClient(api_key=FILE_KEY, base_url=f"{server.url}/v1")
    try:
        assert segmind.run("sam3-image", image=IMAGE, points_input="[[5, 5]]")["status"] == "COMPLETED"
    finally:
        segmind._default_client = None


def test_nothing_found_is_completed_with_empty_lists_and_blank_preview(client):
    result = client.run("sam3-image", image=IMAGE, text_prompt="unicorn", threshold=1.0)
    assert result["status"] == "COMPLETED"
    assert result["num_masks"] == 0 and result["boxes"] == result["scores"] == result["areas"] == []
    preview = np.asarray(Image.open(io.BytesIO(fetch(result["output"]).content)))
    assert preview.shape == (480, 640, 3) and preview.max() == 0


def test_prompt_kinds_and_box_modes(client):
    boxes = "[[10, 10, 300, 200], [320, 240, 600, 460]]"
    objects = client.run("sam3-image", image=IMAGE, boxes_input=boxes)
    assert sorted(objects["sources"]) == ["boxes_input[0]", "boxes_input[1]"]
    exemplar = client.run("sam3-image", image=IMAGE, boxes_input=boxes, box_prompt_mode="exemplar", threshold=0.1)
    assert exemplar["num_masks"] > 0 and set(exemplar["sources"]) == {"boxes_input"}
    refined = client.run(
        "sam3-image",
        image=IMAGE,
        boxes_input="[[10, 10, 300, 200]]",
        points_input="[[50, 50], [250, 150]]",
        point_labels_input="[[1, 0]]",
    )
    assert refined["sources"] == ["points_input+boxes_input[0]"]
    both = client.run("sam3-image", image=IMAGE, text_prompt="car", threshold=0.1, points_input="[[5, 5]]", max_masks=3)
    assert both["num_masks"] == 3


def test_automatic_masks_respect_max_masks(client):
    result = client.run(
        "sam3-image", image=IMAGE, points_per_side=8, pred_iou_thresh=0.5, stability_score_thresh=0.0, max_masks=2
    )
    assert 0 < result["num_masks"] <= 2 and set(result["sources"]) == {"auto"}


def test_second_prompt_on_an_image_hits_the_embedding_cache(client):
    image = png_b64(noise_image(300, 200, seed=7))
    first = client.run("sam3-image", image=image, points_input="[[10, 10]]")
    second = client.run("sam3-image", image=image, text_prompt="dog")
    assert first["metrics"]["embedding_cache_hit"] is False
    assert second["metrics"]["embedding_cache_hit"] is True
    assert set(first["metrics"]["stages"]) == {"decode", "embed", "mask", "encode"}
    assert set(second["metrics"]["stages"]) == {"decode", "detect", "encode"}  # the ViT did not run


def _tiny_png(**kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", kwargs.pop("size", (8, 8))).save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


BOMB = base64.b64encode(_tiny_png(size=(12000, 12000))).decode()
TRUNCATED = base64.b64encode(base64.b64decode(IMAGE)[: len(base64.b64decode(IMAGE)) // 2]).decode()


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": 0.05}, "threshold"),
        ({"points_per_side": 129}, "points_per_side"),
        ({"points_per_side": "many"}, "points_per_side"),
        ({"pred_iou_thresh": 0.2}, "pred_iou_thresh"),
        ({"max_masks": 101}, "max_masks"),
        ({"return_masks": "perhaps"}, "return_masks"),
        ({"points_input": "[[1, 2"}, "points_input"),
        ({"points_input": "[[1, 2, 3]]"}, "points_input"),
        ({"points_input": "[[1, 2], [3, 4]]", "point_labels_input": "[[1, 0, 1]]"}, "point_labels_input"),
        ({"point_labels_input": "[[1]]", "text_prompt": "cat"}, "point_labels_input"),
        ({"point_labels_input": "[[2]]", "points_input": "[[1, 2]]"}, "point_labels_input"),
        ({"boxes_input": "[[300, 10, 10, 200]]"}, "boxes_input"),
        ({"boxes_input": "[[0, 0, 700, 100]]"}, "boxes_input"),
        ({"points_input": "[[650, 10]]"}, "points_input"),
        ({"box_prompt_mode": "lasso", "boxes_input": "[[1, 1, 5, 5]]"}, "box_prompt_mode"),
        ({"points_per_side": 0}, "points_per_side"),
        ({"colour": "red"}, "colour"),
        ({"image": "%%% not base64 %%%"}, "image"),
        ({"image": base64.b64encode(b"just some text").decode()}, "image"),
        ({"image": "data:text/plain,hello"}, "image"),
        ({"image": TRUNCATED}, "image"),
        ({"image": BOMB}, "image"),
        ({"image": "http://127.0.0.1:1/cat.png"}, "image"),
        ({"image": ""}, "image"),
        ({"image": None}, "image"),
    ],
)
def test_bad_input_is_400_naming_the_parameter(server, params, named):
    body = {"image": IMAGE, **params}
    response = httpx.post(f"{server.url}/v2/sam3-image", json=body, headers={"x-api-key": KEY}, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(f"{named}:"), response.json()


def test_malformed_bodies(server):
    headers = {"x-api-key": KEY, "content-type": "application/json"}
    assert httpx.post(f"{server.url}/v2/sam3-image", content=b"{nope", headers=headers).status_code == 400
    assert httpx.post(f"{server.url}/v2/sam3-image", content=b"[1, 2]", headers=headers).status_code == 400
    huge = httpx.post(f"{server.url}/v2/sam3-image", content=b"x" * (65 * 2**20), headers=headers)
    assert huge.status_code == 413 and "error" in huge.json()
    unknown = httpx.post(f"{server.url}/v2/sam4-image", json={"image": IMAGE}, headers=headers)
    assert unknown.status_code == 404 and "sam4-image" in unknown.json()["error"]
    assert httpx.get(f"{server.url}/v3/nothing/here", headers=headers).json() == {"error": "Not Found"}
    assert httpx.delete(f"{server.url}/v2/sam3-image", headers=headers).status_code == 405


def test_openapi_documents_each_parameter(server):
    schema = httpx.get(f"{server.url}/openapi.json").json()
    body = schema["paths"]["/v2/sam3-image"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "image" in body["required"]
    assert body["properties"]["points_per_side"]["maximum"] == 128
    assert "every instance" in body["properties"]["text_prompt"]["description"]
    assert "/v1/sam3-image" in schema["paths"] and "/v2/requests/{request_id}/status" in schema["paths"]


def test_jobs_arriving_together_run_as_one_batch(client):
    busy = client.submit_async("sam3-image", image=IMAGE, points_per_side=48, pred_iou_thresh=0.5)
    waiting = [
        client.submit_async("sam3-image", image=png_b64(noise_image(64, 64, seed=s)), points_input="[[5, 5]]")
        for s in range(4)
    ]
    busy.wait(interval=0.05)
    sizes = [job.wait(interval=0.05)["metrics"]["batch_size"] for job in waiting]
    assert max(sizes) > 1, sizes  # queued while the worker was busy, then taken together
