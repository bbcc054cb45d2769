"""Mask images: a colour preview, an overlay on the input, and one binary PNG per mask."""

from __future__ import annotations

import colorsys
import io

import numpy as np
from PIL import Image

OVERLAY_ALPHA = 0.5


def palette(count: int) -> np.ndarray:
    """`count` distinct, saturated RGB colours (golden-ratio hue steps), the same for every call."""
    hues = (np.arange(count) * 0.618033988749895) % 1.0
    return np.array([colorsys.hsv_to_rgb(h, 0.75, 1.0) for h in hues]).reshape(-1, 3) * 255


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class MaskCanvas:
    """Paints masks chunk by chunk, so that only a few full-size masks are in memory at once."""

    def __init__(self, image: np.ndarray, count: int) -> None:
        self.image = image
        self.colours = palette(count)
        self.labels = np.full(image.shape[:2], -1, dtype=np.int32)  # index of the mask drawn on top

    def paint(self, first_index: int, masks: np.ndarray) -> None:
        """Masks arrive best first; a better mask stays on top of a worse one."""
        for offset, mask in enumerate(masks):
            self.labels[mask & (self.labels < 0)] = first_index + offset

    def preview(self) -> bytes:
        out = np.zeros_like(self.image)
        covered = self.labels >= 0
        out[covered] = self.colours[self.labels[covered]].astype(np.uint8)
        return png_bytes(Image.fromarray(out))

    def overlay(self) -> bytes:
        out = self.image.astype(np.float32)
        covered = self.labels >= 0
        out[covered] = (1 - OVERLAY_ALPHA) * out[covered] + OVERLAY_ALPHA * self.colours[self.labels[covered]]
        return png_bytes(Image.fromarray(out.round().astype(np.uint8)))


def mask_png(mask: np.ndarray) -> bytes:
    """A 1-bit PNG: white inside the mask."""
    return png_bytes(Image.fromarray(mask))
