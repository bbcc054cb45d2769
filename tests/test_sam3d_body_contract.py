"""sam-3d-body through the Segmind SDK against a real server: tiny SAM 3 + the tiny release-format body model."""

from __future__ import annotations

import io
import json
import struct

import httpx
import numpy as np
import pytest
from PIL import Image
from segmind import SegmindClient
from segmind.exceptions import SegmindError

from pipeline.mesh_io import read_ply
from tests.conftest import noise_image, png_b64
from tests.server_process import ServerProcess

KEY = "body-key"
HEIGHT, WIDTH = 240, 320
PICTURE = noise_image(HEIGHT, WIDTH, seed=3)
IMAGE = png_b64(PICTURE)
MASK = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
MASK[40:200, 110:190] = 255  # one person, box (110, 40, 190, 200)


@pytest.fixture(scope="module")
def server(body_weights_dir, tmp_path_factory):
    proc = ServerProcess(body_weights_dir, tmp_path_factory.mktemp("body") / "data", "--api-key", KEY).start()
    yield proc
    proc.terminate()


@pytest.fixture(scope="module")
def client(server) -> SegmindClient:
    return SegmindClient(api_key=KEY, base_url=f"{server.url}/v1")


def fetch(url: str) -> httpx.Response:
    response = httpx.get(url, headers={"x-api-key": KEY}, timeout=30)
    assert response.status_code == 200, response.text
    return response


def glb_json(data: bytes) -> dict:
    """The glTF JSON chunk of a GLB, after checking the header."""
    magic, version, length = struct.unpack_from("<III", data, 0)
    assert (magic, version, length) == (0x46546C67, 2, len(data))
    chunk_length, chunk_type = struct.unpack_from("<II", data, 12)
    assert chunk_type == 0x4E4F534A
    return json.loads(data[20 : 20 + chunk_length])


def test_mask_prompt_gives_one_person_with_every_output(client, server):
    result = client.run(
        "sam-3d-body",
        image=IMAGE,
        mask=png_b64(MASK),
        include_keypoints=True,
        return_individual_meshes=True,
        return_smplx=True,
        inference_mode="full",
    )
    assert result["status"] == "COMPLETED"
    metadata = result["metadata"]
    assert metadata["num_people"] == 1 and metadata["inference_mode"] == "full"
    person = metadata["people"][0]
    assert person["bbox"] == [110.0, 40.0, 190.0, 200.0]
    assert person["focal_length"] == pytest.approx((WIDTH**2 + HEIGHT**2) ** 0.5, abs=1e-3)

    glb = fetch(result["output"])
    assert glb.headers["content-type"] == "model/gltf-binary"
    gltf = glb_json(glb.content)
    assert [n["name"] for n in gltf["nodes"]] == ["person_0"]
    position = gltf["accessors"][gltf["meshes"][0]["primitives"][0]["attributes"]["POSITION"]]
    assert position["count"] == 18439

    # Keypoints: 70 named, and the 3D ones (camera space) project onto the 2D ones. Full mode projects
    # with the image centre and fx, which is the default camera here.
    names, k2d, k3d = person["keypoint_names"], np.array(person["keypoints_2d"]), np.array(person["keypoints_3d"])
    assert len(names) == 70 and k2d.shape == (70, 2) and k3d.shape == (70, 3)
    visible = k3d[:, 2] > 0.1
    projected = person["focal_length"] * k3d[visible, :2] / k3d[visible, 2:] + [WIDTH / 2, HEIGHT / 2]
    assert np.abs(projected - k2d[visible]).max() < 0.05

    (mesh,) = result["meshes"]
    ply = fetch(mesh["url"]).content
    assert mesh["file_size"] == len(ply) and mesh["file_name"] == "person_0.ply"
    parsed = read_ply(ply)
    assert parsed.vertices.shape == (18439, 3) and parsed.faces.shape == (36874, 3)

    picture = Image.open(io.BytesIO(fetch(result["visualization"]["url"]).content))
    assert picture.size == (4 * WIDTH, HEIGHT)

    smplx = json.loads(fetch(result["smplx"]["url"]).content)
    assert np.array(smplx["people"][0]["vertices"]).shape == (10475, 3)
    assert result["metrics"]["num_people"] == 1 and {"mesh", "encode"} <= set(result["metrics"]["stages"])


def test_detected_people_are_capped_and_best_first(client):
    result = client.run("sam-3d-body", image=IMAGE, detection_threshold=0.2, max_people=2, inference_mode="body")
    people = result["metadata"]["people"]
    assert result["metadata"]["num_people"] == 2 == len(people)
    scores = [p["score"] for p in people]
    assert scores == sorted(scores, reverse=True) and min(scores) >= 0.2
    assert "keypoints_2d" not in people[0] and "meshes" not in result
    gltf = glb_json(fetch(result["output"]).content)
    assert [n["name"] for n in gltf["nodes"]] == ["person_0", "person_1"]
    assert {"embed", "detect", "mesh"} <= set(result["metrics"]["stages"])


def test_nobody_found_is_a_completed_empty_scene(client):
    result = client.run("sam-3d-body", image=IMAGE, detection_threshold=1.0)
    assert result["status"] == "COMPLETED"
    assert result["metadata"] == {"num_people": 0, "inference_mode": "full", "people": []}
    gltf = glb_json(fetch(result["output"]).content)
    assert gltf.get("nodes", []) == [] and len(gltf["scenes"]) == 1


def test_v1_sync_answers_with_the_glb(server):
    response = httpx.post(
        f"{server.url}/v1/sam-3d-body",
        json={"image": IMAGE, "mask": png_b64(MASK), "inference_mode": "body"},
        headers={"x-api-key": KEY},
        timeout=120,
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "model/gltf-binary" and response.headers["x-request-id"]
    assert len(glb_json(response.content)["nodes"]) == 1


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"mask": png_b64(MASK[:100])}, "mask: must be the same size as the image (320x240), got 320x100"),
        ({"mask": png_b64(noise_image(HEIGHT, WIDTH))}, "mask: is not a binary mask"),
        ({"mask": png_b64(np.zeros_like(MASK))}, "mask: has no white"),
        ({"mask": "not an image"}, "mask: "),
        ({"focal_length": -5}, "focal_length"),
        ({"inference_mode": "hands"}, "inference_mode"),
        ({"max_people": 0}, "max_people"),
        ({"return_meshes": True}, "return_meshes"),
    ],
)
def test_bad_parameters_are_400_naming_them(client, params, message):
    with pytest.raises(SegmindError) as refused:
        client.run("sam-3d-body", image=IMAGE, **params)
    assert refused.value.status == 400
    assert message in refused.value.detail
