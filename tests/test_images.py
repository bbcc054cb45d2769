"""Image inputs: encodings, URL fetching and its guard, orientation, modes, and refusals."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from server.images import ImageInputError, ImageLimits, content_key, decode_image, load_image

LIMITS = ImageLimits(max_pixels=10_000_000, max_bytes=2_000_000, url_timeout=5, allow_private_urls=False)
LOCAL = ImageLimits(max_pixels=10_000_000, max_bytes=2_000_000, url_timeout=5, allow_private_urls=True)


def encode(image: Image.Image, format: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **kwargs)
    return buffer.getvalue()


RGB = Image.fromarray(np.arange(12 * 20 * 3, dtype=np.uint8).reshape(12, 20, 3))


def load(value: str, limits: ImageLimits = LIMITS) -> np.ndarray:
    return asyncio.run(load_image(value, limits))


def test_raw_base64_and_data_uri_give_the_same_pixels():
    data = encode(RGB)
    raw = load(base64.b64encode(data).decode())
    uri = load("data:image/png;base64," + base64.b64encode(data).decode())
    assert raw.shape == (12, 20, 3) and np.array_equal(raw, uri) and np.array_equal(raw, np.asarray(RGB))
    assert content_key(raw) == content_key(uri)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    pixels = decode_image(encode(RGB, "JPEG", exif=exif), LIMITS.max_pixels)
    assert pixels.shape == (20, 12, 3)


def test_modes_become_8bit_rgb():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert decode_image(encode(rgba), 100)[0, 0].tolist() == [255, 255, 255]  # transparent -> white
    gray = decode_image(encode(Image.new("L", (4, 4), 77)), 100)
    assert gray.shape == (4, 4, 3) and gray[0, 0].tolist() == [77, 77, 77]
    deep = Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16))  # 16-bit: scaled, not clipped to white
    assert decode_image(encode(deep), 100)[0, 0].tolist() == [156, 156, 156]
    palette = RGB.convert("P")
    assert decode_image(encode(palette), 1000).shape == (12, 20, 3)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"%PDF-1.4 not an image", "not a supported image format"),
        (encode(RGB)[:60], "truncated"),
        (encode(Image.new("1", (5000, 3000))), "over the limit"),
    ],
)
def test_unusable_images_are_refused(data, message):
    with pytest.raises(ImageInputError, match=message):
        decode_image(data, LIMITS.max_pixels)


def test_bad_base64_and_oversized_payloads():
    with pytest.raises(ImageInputError, match="valid base64"):
        load("not base64 at all!")
    with pytest.raises(ImageInputError, match="base64-encoded"):
        load("data:image/png,rawbytes")
    with pytest.raises(ImageInputError, match="larger than"):
        load("A" * 3_000_000)


class _Files(BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, dict, bytes]] = {}

    def do_GET(self):
        status, headers, body = self.routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    _Files.routes = {
        "/cat.png": (200, {"Content-Type": "image/png"}, encode(RGB)),
        "/big.png": (200, {}, b"x" * 3_000_000),
        "/moved": (302, {"Location": "/cat.png"}, b""),
        "/missing.png": (404, {}, b""),
    }
    yield base
    server.shutdown()


def test_urls_are_fetched_when_private_addresses_are_allowed(http_server):
    assert load(f"{http_server}/cat.png", LOCAL).shape == (12, 20, 3)
    assert load(f"{http_server}/moved", LOCAL).shape == (12, 20, 3)
    with pytest.raises(ImageInputError, match="HTTP 404"):
        load(f"{http_server}/missing.png", LOCAL)
    with pytest.raises(ImageInputError, match="larger than"):
        load(f"{http_server}/big.png", LOCAL)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9/x.png", "http://10.1.2.3/x.png", "http://169.254.169.254/latest", "http://[::1]/x"]
)
def test_loopback_private_and_link_local_urls_are_refused_by_default(url):
    with pytest.raises(ImageInputError, match="loopback, private or link-local"):
        load(url)


def test_only_http_schemes():
    with pytest.raises(ImageInputError):
        asyncio.run(load_image("file:///etc/passwd", LOCAL))
