"""Image, mask and pointmap preprocessing of SAM 3D Objects (the official `PreProcessor` with the released configs).

Geometry stage (`structure_inputs`), in the official order:
1. `normalize_pointmap` (official `ObjectCentricSSI`, scene scale): the full pointmap is shifted by the per-axis
   median of the object's points and divided by the median over all pixels of the largest absolute centred
   coordinate.
2. `crop_to_mask` / `crop_pointmap_to_mask`: a box 1.2x the mask's bounding box, cut out with zero fill beyond
   the image, then padded to a square (image and mask 0, pointmap NaN).
3. `pad_to_square` (value 0 for all three) and `resize_square` to S: bilinear with antialias for RGB, nearest for the
   mask and the pointmap. The full image, mask and normalised pointmap go through step 3 only.
Structured-latent stage (`latent_inputs`): steps 2 and 3 without a pointmap.

All functions take one image (no batch axis) and work on any device. Pointmaps are in the PyTorch3D camera frame
(x left, y up, z forward); NaN/inf mark pixels without a point.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BOX_SIZE_FACTOR = 1.2
_OPENCV_TO_PYTORCH3D = (-1.0, -1.0, 1.0)


def opencv_to_pytorch3d(points: torch.Tensor) -> torch.Tensor:
    """(..., 3) points in the OpenCV camera frame (x right, y down, z forward) -> PyTorch3D frame (x, y negated).

    The official code applies R = diag(-1, -1, 1) as a homogeneous 4x4 product, in which 0 * inf = NaN: a point with
    any non-finite coordinate (MoGe marks masked-out pixels +inf) comes out NaN in all three.
    """
    flipped = points * points.new_tensor(_OPENCV_TO_PYTORCH3D)
    return flipped.masked_fill(~points.isfinite().all(dim=-1, keepdim=True), float("nan"))


def normalize_pointmap(pointmap: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(H, W, 3) pointmap and (H, W) mask -> (normalised pointmap, scale (3,), shift (3,)), pointmap = p·scale + shift.

    shift = per-axis `nanmedian` of the points under the mask (> 0.5); scale = `nanmedian` over all pixels of
    max_c |p_c - shift_c| (NaN if any coordinate is NaN), the same for all axes. `torch.nanmedian` returns the lower
    of the two middle values, as in the official code. With no finite point under the mask scale is 1 and shift 0.
    As in the official homogeneous transform, a pixel with any non-finite coordinate becomes NaN in all three.
    """
    if pointmap.shape[:2] != mask.shape or pointmap.shape[-1] != 3:
        shapes = f"{tuple(pointmap.shape)}, {tuple(mask.shape)}"
        raise ValueError(f"expected an (H, W, 3) pointmap and an (H, W) mask, got {shapes}")
    flat = pointmap.reshape(-1, 3)
    inside = flat[mask.reshape(-1) > 0.5]
    if not inside.isfinite().any():
        scale, shift = flat.new_ones(3), flat.new_zeros(3)
    else:
        shift = inside.nanmedian(dim=0).values
        scale = (flat - shift).abs().max(dim=1).values.nanmedian().expand(3)
    normalized = (pointmap - shift) / scale
    normalized = normalized.masked_fill(~pointmap.isfinite().all(dim=-1, keepdim=True), float("nan"))
    return normalized, scale, shift


def mask_box(mask: torch.Tensor, box_size_factor: float = BOX_SIZE_FACTOR) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), x1/y1 exclusive: the official `compute_mask_bbox` around the nonzero pixels of (H, W) `mask`.

    With the inclusive pixel bounds, centre c and size = int(max(w, h, 2) * factor) where w = max_x - min_x, the box is
    int(c ∓ size // 2) per axis; int() truncates towards zero, so a box starting left of/above the image can be one
    pixel narrower on that axis. Refuses masks whose bounds span fewer than 2 pixels on an axis, as the official.
    """
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if len(xs) == 0:
        raise ValueError("the mask is empty")
    min_x, max_x, min_y, max_y = xs.min().item(), xs.max().item(), ys.min().item(), ys.max().item()
    if max_x - min_x < 2 or max_y - min_y < 2:
        raise ValueError("the mask's bounding box must span at least 2 pixels on each axis")
    cx, cy = (min_x + max_x) / 2, (min_y + max_y) / 2
    half = int(max(max_x - min_x, max_y - min_y, 2) * box_size_factor) // 2
    return int(cx - half), int(cy - half), int(cx + half), int(cy + half)


def crop_zero_fill(x: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """(C, H, W) -> (C, y1 - y0, x1 - x0) window `box` = (x0, y0, x1, y1); 0 beyond the image (torchvision `crop`)."""
    x0, y0, x1, y1 = box
    height, width = x.shape[-2:]
    out = x.new_zeros(x.shape[0], y1 - y0, x1 - x0)
    sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, height), max(x0, 0), min(x1, width)
    if sy0 < sy1 and sx0 < sx1:
        out[:, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = x[:, sy0:sy1, sx0:sx1]
    return out


def pad_to_square(x: torch.Tensor, value: float = 0.0) -> torch.Tensor:
    """(C, H, W) -> (C, M, M), M = max(H, W), padded with `value`; an odd remainder goes to the right/bottom."""
    height, width = x.shape[-2:]
    diff = abs(height - width)
    before, after = diff // 2, diff - diff // 2
    padding = (before, after, 0, 0) if height > width else (0, 0, before, after)
    return F.pad(x, padding, mode="constant", value=value)


def resize_square(x: torch.Tensor, size: int, nearest: bool = False) -> torch.Tensor:
    """(C, M, M) -> (C, size, size): torchvision `Resize(size)` on a square tensor, bilinear+antialias or nearest."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"expected a square image, got {tuple(x.shape)}")
    if nearest:
        return F.interpolate(x[None], size=(size, size), mode="nearest")[0]
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def crop_to_mask(rgb: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Official `crop_around_mask_with_padding(box_size_factor=1.2, padding_factor=0)` on (3, H, W) RGB and an
    (H, W) mask: the `mask_box` window with zero fill, then a zero square pad -> (3, M, M), (1, M, M)."""
    box = mask_box(mask)
    return pad_to_square(crop_zero_fill(rgb, box)), pad_to_square(crop_zero_fill(mask[None], box))


def crop_pointmap_to_mask(pointmap: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The same crop on a (3, H, W) pointmap: 0 beyond the image, NaN in the square padding -> (3, M, M)."""
    return pad_to_square(crop_zero_fill(pointmap, mask_box(mask)), float("nan"))


def _square_resized(x: torch.Tensor, size: int, nearest: bool) -> torch.Tensor:
    """The official per-input transform: `pad_to_square_centered` (value 0) then `Resize(size)`, plus a batch axis."""
    return resize_square(pad_to_square(x), size, nearest)[None]


def latent_inputs(rgb: torch.Tensor, mask: torch.Tensor, size: int) -> dict[str, torch.Tensor]:
    """Structured-latent stage condition inputs from (3, H, W) RGB in [0, 1] and an (H, W) 0/1 mask.

    Returns the official batch-1 tensors: image (1, 3, S, S) and mask (1, 1, S, S) cropped around the object,
    rgb_image and rgb_image_mask of the full image.
    """
    crop_rgb, crop_mask = crop_to_mask(rgb, mask)
    return {
        "image": _square_resized(crop_rgb, size, nearest=False),
        "mask": _square_resized(crop_mask, size, nearest=True),
        "rgb_image": _square_resized(rgb, size, nearest=False),
        "rgb_image_mask": _square_resized(mask[None], size, nearest=True),
    }


def structure_inputs(
    rgb: torch.Tensor, mask: torch.Tensor, pointmap: torch.Tensor, size: int
) -> dict[str, torch.Tensor]:
    """Geometry stage condition inputs from (3, H, W) RGB in [0, 1], an (H, W) 0/1 mask and an (H, W, 3) pointmap
    in the PyTorch3D camera frame.

    Returns `latent_inputs` plus pointmap and rgb_pointmap (1, 3, S, S): the normalised pointmap cropped (NaN in the
    square padding, 0 beyond the image) and full (0 in the square padding: the official pad value); and
    pointmap_scale, pointmap_shift (1, 3) mapping normalised points back to the camera frame: p·scale + shift.
    """
    normalized, scale, shift = normalize_pointmap(pointmap, mask)
    normalized = normalized.permute(2, 0, 1)
    return {
        **latent_inputs(rgb, mask, size),
        "pointmap": _square_resized(crop_pointmap_to_mask(normalized, mask), size, nearest=True),
        "rgb_pointmap": _square_resized(normalized, size, nearest=True),
        "pointmap_scale": scale[None],
        "pointmap_shift": shift[None],
    }
