"""Per-model device placement: worker groups per device, each loading and running only its models."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from server.placement import PlacementError, resolve
from tests.conftest import noise_image, png_b64
from tests.server_process import ServerProcess

MODELS = ["sam3-image", "sam-3d-body"]


def test_defaults_put_every_model_on_every_device():
    assert resolve([], [], MODELS, cuda_count=2).models == {m: ("cuda:0", "cuda:1") for m in MODELS}
    assert resolve([], [], MODELS, cuda_count=0).devices == ("cpu",)


def test_a_model_can_be_pinned_to_some_devices():
    placed = resolve(["cuda:0", "cuda:1"], ["sam-3d-body=cuda:1", "sam3-image=all"], MODELS, cuda_count=2)
    assert placed.models == {"sam3-image": ("cuda:0", "cuda:1"), "sam-3d-body": ("cuda:1",)}
    assert placed.models_on("cuda:0") == ["sam3-image"]
    assert placed.paths_for("sam-3d-body") == ["/internal/worker/1"]


@pytest.mark.parametrize(
    ("devices", "placement", "message"),
    [
        (["gpu0"], [], "not understood"),
        (["cuda:3"], [], "not present"),
        ([], ["sam-3d-objects=cuda:0"], "MODEL one of"),
        ([], ["sam3-image"], "MODEL=DEVICES"),
        (["cuda:0"], ["sam3-image=cuda:1"], "names cuda:1"),
    ],
)
def test_bad_placements_are_refused_with_the_reason(devices, placement, message):
    with pytest.raises(PlacementError, match=message):
        resolve(devices, placement, MODELS, cuda_count=2)


def test_jobs_run_on_the_device_group_holding_their_model(body_weights_dir, tmp_path):
    args = ["--devices", "cpu:0", "--devices", "cpu:1", "--placement", "sam3-image=cpu:0"]
    args += ["--placement", "sam-3d-body=cpu:1"]
    server = ServerProcess(body_weights_dir, tmp_path / "data", *args).start()
    try:
        image = png_b64(noise_image(120, 160))
        devices = set()
        for _ in range(3):
            body = httpx.post(f"{server.url}/v2/sam3-image", json={"image": image, "text_prompt": "a cat"}).json()
            server.wait_for_state(body["request_id"], {"COMPLETED"}, timeout=120)
            result = httpx.get(body["response_url"], timeout=10).json()
            devices.add(result["metrics"]["device"])
        assert devices == {"cpu:0"}

        mask = np.zeros((120, 160), np.uint8)
        mask[20:100, 60:100] = 255
        body = httpx.post(
            f"{server.url}/v2/sam-3d-body", json={"image": image, "mask": png_b64(mask), "inference_mode": "body"}
        ).json()
        server.wait_for_state(body["request_id"], {"COMPLETED"}, timeout=120)
        assert httpx.get(body["response_url"], timeout=10).json()["metrics"]["device"] == "cpu:1"
    finally:
        server.terminate()
