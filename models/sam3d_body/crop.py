"""Person crops: box -> square crop -> affine warp, the camera rays of each crop pixel, intrinsics.

Arithmetic follows the release bit for bit where it matters: box numbers stay float32 and the
warp matrix is built from three float32 point pairs by `cv2.getAffineTransform`, so the crop
pixels equal the official ones exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

BODY_PADDING = 1.25
HAND_PADDING = 0.9
PRIOR_ASPECT = 0.75  # boxes are first widened to w/h = 3/4, then to the (square) model input


def default_intrinsics(width: int, height: int) -> np.ndarray:
    """The release's camera when none is given: focal = image diagonal, principal point = centre."""
    f = (height**2 + width**2) ** 0.5
    return np.array([[f, 0, width / 2.0], [0, f, height / 2.0], [0, 0, 1]], dtype=np.float32)


def _fix_aspect(scale: np.ndarray, aspect: float) -> np.ndarray:
    w, h = scale
    return np.array([w, w / aspect], dtype=scale.dtype) if w > h * aspect else np.array([h * aspect, h], scale.dtype)


def box_center_scale(box: np.ndarray, padding: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """xyxy box -> (centre, side x side) of the square crop around it, in image pixels."""
    x1, y1, x2, y2 = box
    center = np.array([x1 + x2, y1 + y2], dtype=box.dtype) * 0.5
    scale = np.array([x2 - x1, y2 - y1], dtype=box.dtype) * padding
    scale = _fix_aspect(_fix_aspect(scale, PRIOR_ASPECT), size / size)
    return center, scale


def _third_point(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = a - b
    return b + np.array([-d[1], d[0]], dtype=d.dtype)


def warp_matrix(center: np.ndarray, scale: np.ndarray, size: int) -> np.ndarray:
    """2x3 float64 affine taking the crop square around `center` to a size x size image."""
    src = np.zeros((3, 2), dtype=np.float32)
    src[0] = center
    src[1] = center + np.array([0.0, scale[0] * -0.5])
    src[2] = _third_point(src[0], src[1])
    dst = np.zeros((3, 2), dtype=np.float32)
    dst[0] = [size * 0.5, size * 0.5]
    dst[1] = np.array([size * 0.5, size * 0.5]) + np.array([0.0, size * -0.5])
    dst[2] = _third_point(dst[0], dst[1])
    return cv2.getAffineTransform(src, dst)


@dataclass
class Crops:
    """The model inputs of N person (or hand) crops, all tensors on the CPU, float32."""

    images: torch.Tensor  # [N, 3, S, S] RGB in [0, 1]
    masks: torch.Tensor  # [N, 1, S, S] 0/1
    mask_scores: torch.Tensor  # [N]
    centers: torch.Tensor  # [N, 2] crop centre in image pixels
    scales: torch.Tensor  # [N, 2] crop side in image pixels (twice the same value)
    affines: torch.Tensor  # [N, 2, 3] image -> crop
    boxes: torch.Tensor  # [N, 4] the boxes as given

    def __len__(self) -> int:
        return self.images.shape[0]


def crop_people(
    image: np.ndarray, boxes: np.ndarray, size: int, padding: float, masks: np.ndarray | None = None
) -> Crops:
    """Cut a size x size crop per box (xyxy, float32) out of an RGB uint8 image.

    `masks` ([N, H, W], 0/1) are warped with the same affine; without them every crop gets an
    empty mask and score 0, which tells the model there is no mask.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    images, crop_masks, centers, scales, affines = [], [], [], [], []
    for i, box in enumerate(boxes):
        center, scale = box_center_scale(box, padding, size)
        matrix = warp_matrix(center, scale, size)
        images.append(cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR))
        if masks is not None:
            crop_masks.append(cv2.warpAffine(masks[i].astype(np.uint8), matrix, (size, size), flags=cv2.INTER_LINEAR))
        else:
            crop_masks.append(np.zeros((size, size), dtype=np.uint8))
        centers.append(center)
        scales.append(scale)
        affines.append(matrix)
    n = len(boxes)
    return Crops(
        images=torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255)
        if n
        else torch.zeros(0, 3, size, size),
        masks=torch.from_numpy(np.stack(crop_masks)).float()[:, None] if n else torch.zeros(0, 1, size, size),
        mask_scores=torch.full((n,), 1.0 if masks is not None else 0.0),
        centers=torch.from_numpy(np.stack(centers)).float() if n else torch.zeros(0, 2),
        scales=torch.from_numpy(np.stack(scales)).float() if n else torch.zeros(0, 2),
        affines=torch.from_numpy(np.stack(affines)).float() if n else torch.zeros(0, 2, 3),
        boxes=torch.from_numpy(boxes.copy()),
    )


def crop_rays(affines: torch.Tensor, cam_int: torch.Tensor, size: int) -> torch.Tensor:
    """[N, 2, S, S] normalised camera ray (x, y) of every crop pixel (integer pixel positions)."""
    grid = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="xy"), dim=-1)
    grid = grid.to(affines)[None]  # [1, S, S, 2]
    diag = affines[:, None, None, [0, 1], [0, 1]]
    shift = affines[:, None, None, [0, 1], [2, 2]]
    image_xy = grid / diag - shift / diag
    rays = (image_xy - cam_int[:, None, None, [0, 1], [2, 2]]) / cam_int[:, None, None, [0, 1], [0, 1]]
    return rays.permute(0, 3, 1, 2)
