"""The fal.ai queue contract through the real, unchanged `fal_client`, over HTTPS with a self-signed certificate.

fal_client reads FAL_RUN_HOST / FAL_QUEUE_RUN_HOST when imported and always speaks https, so each client call
runs in a subprocess with those variables, FAL_KEY and SSL_CERT_FILE set before the import.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import noise_image, png_b64
from tests.server_process import ServerProcess

KEY = "fal-key"
HEIGHT, WIDTH = 240, 320
IMAGE = "data:image/png;base64," + png_b64(noise_image(HEIGHT, WIDTH, seed=3))
MASK = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
MASK[40:200, 110:190] = 255  # one person, box (110, 40, 190, 200)
SMALL = "data:image/png;base64," + png_b64(noise_image(64, 64, seed=100))
OBJECT_HEIGHT, OBJECT_WIDTH = 96, 128
OBJECT_IMAGE = "data:image/png;base64," + png_b64(noise_image(OBJECT_HEIGHT, OBJECT_WIDTH, seed=5))
OBJECT_MASK = np.zeros((OBJECT_HEIGHT, OBJECT_WIDTH), dtype=np.uint8)
OBJECT_MASK[20:70, 30:90] = 255
OBJECT_MASK_URI = "data:image/png;base64," + png_b64(OBJECT_MASK)
BLOCKER = {"image": png_b64(noise_image(64, 64, seed=100)), "points_per_side": 64}  # a couple of seconds


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (IP SAN, as TLS clients check) and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def server(all_weights_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fal")
    cert, key = self_signed(root)
    args = ("--api-key", KEY, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--max-batch-size", "1")
    proc = ServerProcess(all_weights_dir, root / "data", *args).start()
    proc.cert = cert
    yield proc
    proc.terminate()


def fal(server: ServerProcess, code: str, key: str = KEY) -> dict:
    """Run `code` (which sets `out`) with fal_client pointed at the server; returns `out`."""
    host = f"127.0.0.1:{server.port}"
    env = {**os.environ, "FAL_RUN_HOST": host, "FAL_QUEUE_RUN_HOST": host, "FAL_KEY": key}
    env["SSL_CERT_FILE"] = str(server.cert)
    script = "import json, fal_client\nout = {}\n" + textwrap.dedent(code) + "\nprint(json.dumps(out))\n"
    done = subprocess.run([sys.executable, "-"], input=script, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def fetch(server: ServerProcess, url: str) -> httpx.Response:
    assert url.startswith(f"https://127.0.0.1:{server.port}/"), url  # absolute URLs follow the request's scheme
    response = httpx.get(url, headers={"Authorization": f"Key {KEY}"}, timeout=30, verify=server.verify)
    assert response.status_code == 200, response.text
    return response


def test_image_through_subscribe(server):
    out = fal(
        server,
        f"""
        updates = []
        out["result"] = fal_client.subscribe(
            "fal-ai/sam-3/image",
            {{"image_url": {SMALL!r}, "point_prompts": [{{"x": 10, "y": 10}}], "return_multiple_masks": True,
              "include_scores": True, "include_boxes": True}},
            with_logs=True,
            on_queue_update=lambda s: updates.append(type(s).__name__),
        )
        out["updates"] = updates
        """,
    )
    result = out["result"]
    assert out["updates"][-1] == "Completed"
    assert set(result) == {"image", "masks", "metadata", "scores", "boxes"}
    assert result["image"]["content_type"] == "image/png" and result["image"]["file_size"] > 0
    assert len(result["masks"]) == len(result["metadata"]) == len(result["scores"]) == len(result["boxes"]) >= 1
    assert all(0 <= v <= 1 for box in result["boxes"] for v in box)
    assert fetch(server, result["masks"][0]["url"]).content.startswith(b"\x89PNG")


def test_body_through_submit_status_result_and_the_same_job_on_segmind(server):
    mask = "data:image/png;base64," + png_b64(MASK)
    out = fal(
        server,
        f"""
        handle = fal_client.submit("fal-ai/sam-3/3d-body", {{"image_url": {IMAGE!r}, "mask_url": {mask!r}}})
        out["id"] = handle.request_id
        for status in handle.iter_events(with_logs=True, interval=0.1):
            pass
        out["status"] = {{"logs": status.logs, "metrics": status.metrics, "error": status.error}}
        out["result"] = fal_client.result("fal-ai/sam-3/3d-body", handle.request_id)
        out["again"] = type(fal_client.status("fal-ai/sam-3/3d-body", handle.request_id, with_logs=False)).__name__
        """,
    )
    assert out["status"]["error"] is None and out["again"] == "Completed"
    assert [entry["message"] for entry in out["status"]["logs"]][-1] == "Completed"
    result = out["result"]
    assert set(result) == {"model_glb", "visualization", "meshes", "metadata"}
    assert result["model_glb"]["content_type"] == "model/gltf-binary"
    assert len(result["meshes"]) == 1 and result["meshes"][0]["file_name"] == "person_0.ply"
    person = result["metadata"]["people"][0]
    assert result["metadata"]["num_people"] == 1 and person["bbox"] == [110.0, 40.0, 190.0, 200.0]
    assert len(person["keypoints_2d"]) == len(person["keypoints_3d"]) == 70
    assert fetch(server, result["model_glb"]["url"]).content[:4] == b"glTF"

    # One job underneath: the Segmind routes answer for the same id.
    segmind = httpx.get(f"{server.url}/v2/requests/{out['id']}", headers={"x-api-key": KEY}, verify=server.verify)
    assert segmind.status_code == 200 and segmind.json()["status"] == "COMPLETED"
    assert segmind.json()["metadata"]["num_people"] == 1


def test_cancelled_queued_job_fails_and_reads_as_a_failed_fal_request(server):
    blocker = httpx.post(f"{server.url}/v2/sam3-image", json=BLOCKER, headers={"x-api-key": KEY}, verify=server.verify)
    server.wait_for_state(blocker.json()["request_id"], {"PROCESSING"}, headers={"x-api-key": KEY})
    out = fal(
        server,
        f"""
        handle = fal_client.submit("fal-ai/sam-3/image", {{"image_url": {SMALL!r}}})
        out["queued"] = fal_client.status("fal-ai/sam-3/image", handle.request_id).position
        handle.cancel()
        status = handle.status(with_logs=True)
        out["status"] = {{"kind": type(status).__name__, "error": status.error, "error_type": status.error_type}}
        out["logs"] = status.logs
        try:
            handle.get()
        except fal_client.client.FalClientHTTPError as error:
            out["result"] = [error.status_code, error.message]
        try:
            handle.cancel()
        except fal_client.client.FalClientHTTPError as error:
            out["again"] = [error.status_code, error.response.json()]
        """,
    )
    assert out["queued"] == 0
    assert out["status"] == {"kind": "Completed", "error": out["result"][1], "error_type": "cancelled"}
    assert out["result"][0] == 422 and "cancelled" in out["result"][1]
    assert out["logs"][-1]["level"] == "ERROR"
    assert out["again"] == [400, {"status": "ALREADY_COMPLETED"}]
    server.wait_for_state(blocker.json()["request_id"], {"COMPLETED"}, headers={"x-api-key": KEY})


@pytest.mark.parametrize(
    "body, message",
    [
        ({"image_url": SMALL, "output_format": "jpeg"}, "output_format: only png"),
        ({"image_url": SMALL, "point_prompts": [{"x": 500, "y": 1}]}, "point_prompts: point 0"),
        ({"image_url": "not an image"}, "image_url: "),
        ({"image_url": SMALL, "threshold": 0.3}, "threshold: unknown parameter"),
        ({}, "image_url: Field required"),
    ],
)
def test_bad_input_is_400_naming_the_parameter(server, body, message):
    response = httpx.post(
        f"{server.url}/fal-ai/sam-3/image", json=body, headers={"Authorization": f"Key {KEY}"}, verify=server.verify
    )
    assert response.status_code == 400 and response.json()["detail"].startswith(message), response.text


def test_errors_are_fal_details(server):
    out = fal(
        server,
        f"""
        for name, call in [
            ("key", lambda: fal_client.submit("fal-ai/sam-3/image", {{"image_url": {SMALL!r}}})),
            ("app", lambda: fal_client.submit("fal-ai/sam-3/video", {{"image_url": {SMALL!r}}})),
        ]:
            try:
                call()
            except fal_client.client.FalClientHTTPError as error:
                out[name] = [error.status_code, error.message]
        """,
        key="wrong",
    )
    assert out["key"] == [401, "Invalid API key"]
    headers = {"Authorization": f"Key {KEY}"}
    unknown = httpx.post(f"{server.url}/fal-ai/sam-3/video", json={}, headers=headers, verify=server.verify)
    assert unknown.status_code == 404 and "fal-ai/sam-3/video" in unknown.json()["detail"]
    assert "fal-ai/sam-3/3d-objects" in unknown.json()["detail"]  # the served apps are listed
    base = f"{server.url}/fal-ai/sam-3/requests/nope"
    assert httpx.get(f"{base}/status", headers=headers, verify=server.verify).json() == {
        "detail": "Request nope not found"
    }
    cancel = httpx.put(f"{base}/cancel", headers=headers, verify=server.verify)
    assert cancel.status_code == 404 and cancel.json() == {"status": "NOT_FOUND"}
    hook = httpx.post(
        f"{server.url}/fal-ai/sam-3/image?fal_webhook=https://example.com",
        json={"image_url": SMALL},
        headers=headers,
        verify=server.verify,
    )
    assert hook.status_code == 400 and hook.json()["detail"].startswith("fal_webhook:")


def test_objects_through_subscribe_with_a_mask_and_the_same_job_on_segmind(server):
    """One mask in `mask_urls` (a data URI from fal_client.encode): the scene GLB, the splat and the artifacts;
    the metadata's rotation is the Segmind result's (w, x, y, z) quaternion reordered to fal's (x, y, z, w)."""
    mask_png = OBJECT_MASK_URI.split(",", 1)[1]
    out = fal(
        server,
        f"""
        import base64
        mask = fal_client.encode(base64.b64decode({mask_png!r}), "image/png")
        ids = []
        out["result"] = fal_client.subscribe(
            "fal-ai/sam-3/3d-objects",
            {{"image_url": {OBJECT_IMAGE!r}, "mask_urls": [mask], "seed": 7, "include_artifacts": True}},
            on_enqueue=ids.append,
        )
        out["id"] = ids[0]
        """,
    )
    result = out["result"]
    files = {"model_glb", "gaussian_splat", "individual_glbs", "individual_splats", "artifacts_zip"}
    assert set(result) == files | {"metadata"}
    assert result["individual_glbs"] is None and result["individual_splats"] is None  # one object
    assert result["model_glb"]["content_type"] == "model/gltf-binary"
    assert [result[k]["file_name"] for k in ("model_glb", "gaussian_splat", "artifacts_zip")] == [
        "scene.glb",
        "scene.ply",
        "artifacts.zip",
    ]
    assert fetch(server, result["model_glb"]["url"]).content[:4] == b"glTF"
    assert fetch(server, result["gaussian_splat"]["url"]).content.startswith(b"ply\n")
    assert fetch(server, result["artifacts_zip"]["url"]).content[:2] == b"PK"
    (meta,) = result["metadata"]
    assert meta["object_index"] == 0 and meta["rotation_order"] == "xyzw"

    segmind = httpx.get(f"{server.url}/v2/requests/{out['id']}", headers={"x-api-key": KEY}, verify=server.verify)
    assert segmind.status_code == 200 and segmind.json()["status"] == "COMPLETED"
    (ours,) = segmind.json()["metadata"]
    w, x, y, z = ours["rotation"]
    assert meta["rotation"] == [x, y, z, w]
    assert all(meta[k] == ours[k] for k in ("scale", "translation", "camera_pose"))
    assert segmind.json()["gaussian_splat"]["file_name"] == result["gaussian_splat"]["file_name"]


def test_objects_prompt_without_a_match_is_a_completed_request_with_an_error(server):
    out = fal(
        server,
        f"""
        handle = fal_client.submit(
            "fal-ai/sam-3/3d-objects", {{"image_url": {OBJECT_IMAGE!r}, "prompt": "car", "detection_threshold": 1.0}}
        )
        for status in handle.iter_events(with_logs=True, interval=0.1):
            pass
        out["status"] = {{"kind": type(status).__name__, "error": status.error, "error_type": status.error_type}}
        try:
            handle.get()
        except fal_client.client.FalClientHTTPError as error:
            out["result"] = [error.status_code, error.response.json()]
        """,
    )
    assert out["status"]["kind"] == "Completed" and out["status"]["error_type"] == "runner_error"
    assert "no object matched prompt 'car'" in out["status"]["error"]
    assert out["result"] == [422, {"detail": out["status"]["error"]}]


@pytest.mark.parametrize(
    "body, message",
    [
        ({"mask_urls": [OBJECT_MASK_URI, OBJECT_MASK_URI]}, "mask_urls: 2 masks given; one is served"),
        ({"mask_urls": [SMALL]}, "mask_urls: must be the same size as the image (128x96), got 64x64"),
        ({"mask_urls": [OBJECT_MASK_URI], "pointmap_url": "https://example.com/p.npy"}, "pointmap_url: not supported"),
        ({"mask_urls": [OBJECT_MASK_URI], "seed": 1_000_001}, "seed: Input should be less than or equal to 1000000"),
        ({"box_prompts": [{"x_min": 0, "y_min": 0, "x_max": 9, "y_max": 9}] * 2}, "box_prompts: one box is served"),
        ({"box_prompts": [{"x_min": 0, "y_min": 0, "x_max": 500, "y_max": 9}]}, "box_prompts: lies outside"),
        (
            {"point_prompts": [{"x": 1, "y": 1, "object_id": 1}, {"x": 2, "y": 2, "object_id": 2}]},
            "point_prompts: all prompts must share one object_id",
        ),
        ({"prompt": "cup", "mask_urls": [OBJECT_MASK_URI]}, "mask_urls: give either a mask or prompt"),
        ({}, "prompt: give the object as prompt, point_prompts, box_prompts or mask_urls"),
        ({"prompt": "cup", "preset": "fast"}, "preset: unknown parameter"),
    ],
)
def test_bad_objects_input_is_400_naming_fals_parameter(server, body, message):
    response = httpx.post(
        f"{server.url}/fal-ai/sam-3/3d-objects",
        json={"image_url": OBJECT_IMAGE, **body},
        headers={"Authorization": f"Key {KEY}"},
        verify=server.verify,
    )
    assert response.status_code == 400 and response.json()["detail"].startswith(message), response.text
