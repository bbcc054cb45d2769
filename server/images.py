"""Image inputs as clients send them: an http(s) URL, raw base64, or a `data:` URI.

Everything is decoded here, in the front end, so that a bad image is a 400 at submit time and
the worker receives plain RGB pixels. Decoding honours EXIF orientation, converts RGBA,
palette, grayscale and 16-bit images to 8-bit RGB, and refuses images over a pixel budget
before decompressing them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

Image.MAX_IMAGE_PIXELS = None  # our own limit applies, before decoding (see decode_image)

DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I)
MAX_REDIRECTS = 3


class ImageInputError(ValueError):
    """The image parameter is unusable; the message is for the client."""


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int
    max_bytes: int
    url_timeout: float
    allow_private_urls: bool


def _blocked(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


async def _check_host(url: str, allow_private: bool) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ImageInputError(f"unsupported URL {url!r}: only http and https")
    if allow_private:
        return
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(parts.hostname, parts.port or 443, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise ImageInputError(f"cannot resolve the host of {url!r}") from None
    if any(_blocked(info[4][0]) for info in infos):
        raise ImageInputError(
            f"refusing {url!r}: it resolves to a loopback, private or link-local address "
            "(allowed only with --allow-private-urls)"
        )


async def fetch(url: str, limits: ImageLimits) -> bytes:
    """Download an image URL with a size cap and timeout; every redirect hop is checked again."""
    async with httpx.AsyncClient(timeout=limits.url_timeout, follow_redirects=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            await _check_host(url, limits.allow_private_urls)
            try:
                async with client.stream("GET", url) as response:
                    if response.is_redirect and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise ImageInputError(f"downloading {url!r} answered HTTP {response.status_code}")
                    chunks, size = [], 0
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > limits.max_bytes:
                            raise ImageInputError(f"{url!r} is larger than {limits.max_bytes} bytes")
                        chunks.append(chunk)
                    return b"".join(chunks)
            except httpx.TimeoutException:
                raise ImageInputError(f"downloading {url!r} timed out after {limits.url_timeout:g} s") from None
            except httpx.HTTPError as exc:
                raise ImageInputError(f"cannot download {url!r}: {type(exc).__name__}") from None
    raise ImageInputError(f"{url!r} redirects more than {MAX_REDIRECTS} times")


def decode_base64(value: str) -> bytes:
    """Raw base64 or a `data:<mime>;base64,` URI."""
    match = DATA_URI.match(value)
    if match:
        mime = match.group("mime")
        if mime and not mime.lower().startswith("image/"):
            raise ImageInputError(f"data URI declares {mime!r}, not an image type")
        if not match.group("b64"):
            raise ImageInputError("data URI must be base64-encoded (data:<mime>;base64,...)")
        value = value[match.end() :]
    try:
        return base64.b64decode(re.sub(r"\s+", "", value), validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError("not an http(s) URL, a data URI, or valid base64") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        if image.mode == "F":
            top = max(float(pixels.max()), 1.0)
        image = Image.fromarray(np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # transparent pixels become white
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Bytes -> HxWx3 uint8 RGB, upright as EXIF says; ImageInputError for anything unusable."""
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageInputError("not a supported image format") from None
    except (OSError, ValueError, SyntaxError) as exc:  # a corrupt header, or metadata over Pillow's limits
        raise ImageInputError(f"cannot decode the image (truncated or corrupt): {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageInputError(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        rgb = _to_rgb(image)
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageInputError(f"cannot decode the image (truncated or corrupt): {exc}") from None
    return np.asarray(rgb, dtype=np.uint8).copy()


def content_key(pixels: np.ndarray) -> str:
    """Hash of the decoded pixels: the same picture sent as URL or base64 gets the same key."""
    digest = hashlib.sha256(np.ascontiguousarray(pixels).data)
    digest.update(str(pixels.shape).encode())
    return digest.hexdigest()


async def load_image(value: str, limits: ImageLimits) -> np.ndarray:
    """Fetch or decode an image parameter; decoding runs off the event loop."""
    value = value.strip()
    if value.lower().startswith(("http://", "https://")):
        data = await fetch(value, limits)
    else:
        if len(value) > limits.max_bytes * 4 // 3 + 4:
            raise ImageInputError(f"image is larger than {limits.max_bytes} bytes")
        data = decode_base64(value)
    return await asyncio.to_thread(decode_image, data, limits.max_pixels)


def binary_mask(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """A black-and-white mask image (white = foreground) of the input's size -> [H, W] uint8 0/1.

    Up to 1% of grey pixels are tolerated (anti-aliased or JPEG edges); they count as white from 128 up.
    """
    if pixels.shape[:2] != (height, width):
        raise ImageInputError(
            f"must be the same size as the image ({width}x{height}), got {pixels.shape[1]}x{pixels.shape[0]}"
        )
    gray = pixels.mean(axis=2)
    grey = float(((gray > 32) & (gray < 223)).mean())
    if grey > 0.01:
        raise ImageInputError(f"is not a binary mask: {grey:.1%} of its pixels are neither black nor white")
    mask = (gray >= 128).astype(np.uint8)
    if not mask.any():
        raise ImageInputError("has no white (foreground) pixel")
    return mask
