"""sam-3d-objects through the Segmind SDK against a real server: tiny SAM 3 + a tiny random SAM 3D Objects
snapshot and MoGe, both written in the official release layout."""

from __future__ import annotations

import io
import json
import zipfile

import httpx
import numpy as np
import pytest
import yaml
from segmind import SegmindClient
from segmind.exceptions import SegmindError

from tests.conftest import noise_image, png_b64
from tests.server_process import ServerProcess
from tests.test_sam3d_body_contract import glb_json

KEY = "objects-key"
HEIGHT, WIDTH = 96, 128
IMAGE = png_b64(noise_image(HEIGHT, WIDTH, seed=5))
MASK = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
MASK[20:70, 30:90] = 255
SPLAT_PROPERTIES = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity"]
SPLAT_PROPERTIES += ["scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]


@pytest.fixture(scope="module")
def server(objects_weights_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("objects") / "data"
    proc = ServerProcess(objects_weights_dir, data, "--api-key", KEY, "--max-batch-size", "4").start()
    yield proc
    proc.terminate()


@pytest.fixture(scope="module")
def client(server) -> SegmindClient:
    return SegmindClient(api_key=KEY, base_url=f"{server.url}/v1")


def fetch(url: str) -> bytes:
    response = httpx.get(url, headers={"x-api-key": KEY}, timeout=30)
    assert response.status_code == 200, response.text
    return response.content


def splat_header(data: bytes) -> tuple[int, list[str], np.ndarray]:
    """Vertex count, property names and the (N, 17) rows of a binary 3DGS PLY."""
    header, body = data.split(b"end_header\n", 1)
    lines = header.decode().splitlines()
    assert lines[:2] == ["ply", "format binary_little_endian 1.0"]
    count = int(next(line for line in lines if line.startswith("element vertex")).split()[-1])
    names = [line.split()[-1] for line in lines if line.startswith("property float")]
    return count, names, np.frombuffer(body, dtype="<f4").reshape(count, len(names))


def submit(server, **params) -> str:
    response = httpx.post(
        f"{server.url}/v2/sam-3d-objects", json={"image": IMAGE, **params}, headers={"x-api-key": KEY}, timeout=30
    )
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def result(server, request_id: str) -> dict:
    server.wait_for_state(request_id, {"COMPLETED", "FAILED"}, timeout=300, headers={"x-api-key": KEY})
    return httpx.get(f"{server.url}/v2/requests/{request_id}", headers={"x-api-key": KEY}, timeout=30).json()


def test_mask_gives_a_posed_mesh_splat_and_artifacts(client, objects_weights_dir):
    out = client.run("sam-3d-objects", image=IMAGE, mask=png_b64(MASK), include_artifacts=True)
    assert out["status"] == "COMPLETED"
    (meta,) = out["metadata"]
    assert meta["object_index"] == 0 and meta["score"] is None
    assert np.linalg.norm(meta["rotation"]) == pytest.approx(1.0, abs=1e-5)
    pose = np.array(meta["camera_pose"])
    assert pose.shape == (4, 4) and np.allclose(pose[3], [0, 0, 0, 1])
    assert np.allclose(pose[:3, 3], meta["translation"], atol=1e-5)
    assert meta["num_voxels"] > 0 and meta["num_faces"] > 0

    gltf = glb_json(fetch(out["output"]))
    (node,) = gltf["nodes"]
    attributes = gltf["meshes"][0]["primitives"][0]["attributes"]
    assert node["name"] == "object_0" and {"POSITION", "COLOR_0"} <= set(attributes)
    assert gltf["accessors"][attributes["POSITION"]]["count"] == meta["num_vertices"]

    count, names, rows = splat_header(fetch(out["gaussian_splat"]["url"]))
    assert names == SPLAT_PROPERTIES and count == meta["num_gaussians"]
    assert np.linalg.norm(rows[:, 13:17], axis=1) == pytest.approx(np.ones(count), abs=1e-4)

    archive = zipfile.ZipFile(io.BytesIO(fetch(out["artifacts"]["url"])))
    names = set(archive.namelist())
    expected = {"pointmap.npy", "intrinsics.npy", "parameters.json"}
    expected |= {f"object_0/{n}" for n in ("mask.png", "voxels.npy", "gaussians.ply", "mesh.ply")}
    assert names == expected
    assert np.load(io.BytesIO(archive.read("pointmap.npy"))).shape == (HEIGHT, WIDTH, 3)
    voxels = np.load(io.BytesIO(archive.read("object_0/voxels.npy")))
    assert voxels.shape == (meta["num_voxels"], 3) and voxels.min() >= 0 and voxels.max() < 64
    parameters = json.loads(archive.read("parameters.json"))
    release = yaml.safe_load((objects_weights_dir / "sam-3d-objects/checkpoints/pipeline.yaml").read_text())
    assert parameters["params"]["seed"] == 123 and parameters["params"]["mask"] == "stored with the image"
    assert parameters["sampling"]["geometry_steps"] == release.get("ss_inference_steps", 25)
    stages = out["metrics"]["stages"]
    assert {"pointmap", "geometry", "structure", "latent", "gaussians", "mesh", "encode"} <= set(stages)


def test_same_seed_same_result_whatever_the_batch(server):
    """Four jobs submitted together share batches; the seed-7 job equals the seed-7 job run alone."""
    alone = result(server, submit(server, mask=png_b64(MASK), seed=7, preset="fast"))
    ids = [submit(server, mask=png_b64(MASK), seed=seed, preset="fast") for seed in (1, 7, 2, 3)]
    together = [result(server, i) for i in ids]
    assert max(r["metrics"]["batch_size"] for r in together) > 1
    assert together[1]["metadata"] == alone["metadata"]
    assert fetch(together[1]["gaussian_splat"]["url"]) == fetch(alone["gaussian_splat"]["url"])
    assert together[0]["metadata"][0]["rotation"] != alone["metadata"][0]["rotation"]


def test_text_prompt_without_a_match_fails_with_the_reason(server):
    out = result(server, submit(server, prompt="car", detection_threshold=1.0))
    assert out["status"] == "FAILED"
    assert "no object matched prompt 'car'" in out["error"]


def test_text_prompt_reconstructs_the_best_instances_into_one_scene(server):
    out = result(server, submit(server, prompt="thing", detection_threshold=0.05, max_objects=2, preset="fast"))
    assert out["status"] == "COMPLETED", out
    scores = [m["score"] for m in out["metadata"]]
    assert len(scores) == 2 and scores == sorted(scores, reverse=True)
    assert [n["name"] for n in glb_json(fetch(out["output"]))["nodes"]] == ["object_0", "object_1"]
    assert len(out["individual_glbs"]) == 2 and len(out["individual_splats"]) == 2


def test_box_prompt_selects_one_object(client):
    out = client.run("sam-3d-objects", image=IMAGE, bounding_box="[20, 10, 100, 80]", preset="fast")
    (meta,) = out["metadata"]
    assert 0 <= meta["score"] <= 1 and "individual_glbs" not in out


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"mask": png_b64(MASK[:50])}, "mask: must be the same size as the image (128x96), got 128x50"),
        ({"seed": 1_000_001}, "seed"),
        ({"seed": -1}, "seed"),
        ({}, "prompt: give the object as prompt, bounding_box, point_coords or mask"),
        ({"prompt": "cup", "mask": png_b64(MASK)}, "mask: give either mask or prompt"),
        ({"bounding_box": "[0, 0, 500, 50]"}, "bounding_box: lies outside the 128x96 image"),
        ({"bounding_box": "[1, 2, 3]"}, "bounding_box"),
        ({"point_coords": "[[10, 10]]", "point_labels": "[1, 0]"}, "point_labels"),
        ({"prompt": "cup", "preset": "turbo"}, "preset"),
        ({"prompt": "cup", "geometry_steps": 0}, "geometry_steps"),
    ],
)
def test_bad_parameters_are_400_naming_them(client, params, message):
    with pytest.raises(SegmindError) as refused:
        client.run("sam-3d-objects", image=IMAGE, **params)
    assert refused.value.status == 400
    assert message in refused.value.detail
