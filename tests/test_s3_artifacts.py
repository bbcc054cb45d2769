"""Output files in S3-compatible storage (a local moto S3 server): presigned URLs, v1 bytes, expiry."""

from __future__ import annotations

import io
import time

import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer
from PIL import Image
from segmind import SegmindClient

from server.artifacts import S3ArtifactStore
from tests.conftest import noise_image, png_b64
from tests.server_process import ServerProcess, free_port

BUCKET = "sam3-outputs"
IMAGE = png_b64(noise_image(96, 128))


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A local S3 endpoint with one bucket; the environment carries its (dummy) credentials."""
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    moto.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
    moto.stop()


@pytest.fixture(scope="module")
def server(s3, weights_dir, tmp_path_factory):
    args = ["--artifacts", f"s3://{BUCKET}/jobs", "--s3-endpoint-url", s3, "--retention", "4"]
    proc = ServerProcess(weights_dir, tmp_path_factory.mktemp("s3") / "data", *args).start()
    yield proc
    proc.terminate()


def objects(endpoint: str) -> list[str]:
    listed = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=BUCKET, Prefix="jobs/")
    return [item["Key"] for item in listed.get("Contents", [])]


def test_files_are_presigned_urls_into_the_bucket_and_expire_with_the_job(s3, server):
    client = SegmindClient(base_url=f"{server.url}/v1")
    result = client.run("sam3-image", image=IMAGE, text_prompt="a cat", threshold=0.1, return_masks=True)
    assert result["output"].startswith(f"{s3}/{BUCKET}/jobs/") and "Signature=" in result["output"]
    preview = httpx.get(result["output"], timeout=10)  # straight from the storage, no API key
    assert preview.status_code == 200 and Image.open(io.BytesIO(preview.content)).size == (128, 96)
    for mask in result["masks"]:
        assert len(httpx.get(mask["url"], timeout=10).content) == mask["file_size"]
    token = result["output"].split(f"{BUCKET}/jobs/", 1)[1].split("/", 1)[0]
    assert any(key.startswith(f"jobs/{token}/") for key in objects(s3))
    assert httpx.get(f"{server.url}/files/{token}/preview.png", timeout=10).status_code == 404  # not on disk

    deadline = time.monotonic() + 30
    while any(key.startswith(f"jobs/{token}/") for key in objects(s3)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(key.startswith(f"jobs/{token}/") for key in objects(s3))


def test_v1_sync_answers_with_the_bytes_from_the_bucket(server):
    response = httpx.post(f"{server.url}/v1/sam3-image", json={"image": IMAGE, "text_prompt": "a cat"}, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (128, 96)


def test_store_refuses_names_that_could_escape_its_prefix(s3):
    store = S3ArtifactStore(f"s3://{BUCKET}/unit", endpoint_url=s3)
    token = "A" * 32
    assert store.save(token, "a.png", b"png") == 3
    assert store.read(token, "a.png") == b"png" and store.read(token, "missing.png") is None
    for name in ("../x.png", ".hidden", "a/b.png"):
        with pytest.raises(ValueError):
            store.save(token, name, b"")
        assert store.read(token, name) is None
    store.delete(token)
    assert store.read(token, "a.png") is None
