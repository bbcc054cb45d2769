"""SAM 3D Objects preprocessing (models/sam3d_objects/preprocess.py) against the official code.

tests/fixtures/sam3d_objects_preprocess.npz was made by a script kept outside this repo (it imports the official
code): it ran facebookresearch/sam-3d-objects @ cf06676 with pytorch3d's pure-Python transforms @ 75ebeea (the commit
the official requirements.p3d.txt pins; loguru, optree, open3d, trimesh and the layout-optimisation module stubbed),
torch 2.14.1 / torchvision 0.29.1 on CPU. For four seeded random cases (37x53, 41x30, 29x37, 23x31 uint8 RGB; an
elliptic mask plus stray pixels, touching the top-left / bottom-right border in cases 1 and 2 so the crop leaves the
image; OpenCV points with z in [1, 5], ~8% pixels with y NaN and ~5% with z (and some x) +inf; case 3 with no finite
point under the mask) it saved:
- c{i}_in_*: the inputs; the pointmap after the official OpenCV -> PyTorch3D transform (`Transform3d().rotate(R)` with
  R from `look_at_view_transform(eye=[0,0,-1], up=[0,-1,0])`, as `compute_pointmap`);
- c{i}_{image,mask,rgb_image,rgb_image_mask,pointmap,rgb_pointmap,pointmap_scale,pointmap_shift}: the official
  `PreProcessor._process_image_mask_pointmap_mess` built as the released ss_preprocessor (resize_all_to_same_size,
  crop_around_mask_with_padding(1.2, 0.0), pad_to_square_centered + Resize(28) / Resize(28, NEAREST),
  ObjectCentricSSI(use_scene_scale=True, allow_scale_and_shift_override=True)), with the batch axis
  `preprocess_image` adds. The slat_preprocessor's outputs were checked equal to the first four there.
The same file holds the pose and sparse-structure fixtures of tests/test_sam3d_objects_layout.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.sam3d_objects.preprocess import (
    crop_pointmap_to_mask,
    crop_zero_fill,
    latent_inputs,
    mask_box,
    normalize_pointmap,
    opencv_to_pytorch3d,
    pad_to_square,
    structure_inputs,
)

FIXTURE = Path(__file__).parent / "fixtures" / "sam3d_objects_preprocess.npz"
SIZE = 28
MASK_KEYS = ("mask", "rgb_image_mask")
LATENT_KEYS = ("image", "mask", "rgb_image", "rgb_image_mask")


@pytest.fixture(scope="module")
def official() -> dict[str, torch.Tensor]:
    with np.load(FIXTURE) as data:
        return {key: torch.from_numpy(data[key]) for key in data.files}


def case_inputs(official: dict[str, torch.Tensor], case: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    prefix = f"c{case}_in_"
    rgb = official[prefix + "rgb"].float() / 255
    return rgb, official[prefix + "mask"].float(), official[prefix + "points"]


def assert_same_nan_close(ours: torch.Tensor, ref: torch.Tensor, atol: float = 1e-6) -> None:
    assert ours.shape == ref.shape
    assert torch.equal(ours.isnan(), ref.isnan())
    torch.testing.assert_close(ours.nan_to_num(), ref.nan_to_num(), rtol=1e-6, atol=atol)


def test_opencv_to_pytorch3d_matches_official(official):
    points = official["c0_in_points_opencv"]
    ours = opencv_to_pytorch3d(points)
    ref = official["c0_in_points"]
    assert points.isinf().any() and not ref.isinf().any()
    assert torch.equal(ours.isnan(), ref.isnan())
    assert torch.equal(ours.nan_to_num(), ref.nan_to_num())
    finite = points.isfinite().all(dim=-1)
    assert torch.equal(ours[finite], points[finite] * torch.tensor([-1.0, -1.0, 1.0]))


@pytest.mark.parametrize("case", range(4))
def test_structure_inputs_match_official(official, case):
    rgb, mask, points = case_inputs(official, case)
    ours = structure_inputs(rgb, mask, points, SIZE)
    assert set(ours) == {*LATENT_KEYS, "pointmap", "rgb_pointmap", "pointmap_scale", "pointmap_shift"}
    for key, value in ours.items():
        ref = official[f"c{case}_{key}"]
        if key in MASK_KEYS:
            assert torch.equal(value, ref.float()), key
        elif key in ("pointmap", "rgb_pointmap"):
            assert_same_nan_close(value, ref)
        else:
            torch.testing.assert_close(value, ref, rtol=1e-6, atol=1e-6, msg=key)
    assert ours["pointmap"].shape == (1, 3, SIZE, SIZE) and ours["mask"].shape == (1, 1, SIZE, SIZE)


@pytest.mark.parametrize("case", range(4))
def test_latent_inputs_match_official(official, case):
    rgb, mask, _ = case_inputs(official, case)
    ours = latent_inputs(rgb, mask, SIZE)
    assert set(ours) == set(LATENT_KEYS)
    for key, value in ours.items():
        torch.testing.assert_close(value, official[f"c{case}_{key}"].to(value.dtype), rtol=1e-6, atol=1e-6, msg=key)


def test_normalization_statistics(official):
    rgb, mask, points = case_inputs(official, 0)
    normalized, scale, shift = normalize_pointmap(points, mask)
    inside = points[mask > 0.5]
    assert torch.equal(shift, inside.nanmedian(dim=0).values)
    assert scale.shape == (3,) and torch.all(scale == scale[0])
    valid = points.isfinite().all(dim=-1)
    assert torch.equal(normalized.isnan().any(dim=-1), ~valid)
    torch.testing.assert_close(normalized[valid] * scale + shift, points[valid])
    # Case 3 has no finite point under the mask: identity normalisation.
    _, mask3, points3 = case_inputs(official, 3)
    _, scale3, shift3 = normalize_pointmap(points3, mask3)
    assert torch.equal(scale3, torch.ones(3)) and torch.equal(shift3, torch.zeros(3))


def test_padding_values(official):
    rgb, mask, points = case_inputs(official, 0)
    out = structure_inputs(rgb, mask, points, SIZE)
    # 37x53 full image: 8 zero rows on top and bottom (the official pad value 0, also for the pointmap); nearest
    # resizing to 28 reads source rows floor(i * 53 / 28), so rows 0-4 and 24-27 are padding.
    zero_rows = (out["rgb_pointmap"][0] == 0).all(dim=0).all(dim=-1)
    assert zero_rows.tolist() == [True] * 5 + [False] * 19 + [True] * 4
    # Case 1: the crop box (-2, -1, 15, 17) is 18 x 17; the square pad column is NaN in the pointmap, the crop's
    # part beyond the image is 0.
    _, mask1, points1 = case_inputs(official, 1)
    assert mask_box(mask1) == (-2, -1, 15, 17)
    cropped = crop_pointmap_to_mask(points1.permute(2, 0, 1), mask1)
    assert cropped.shape == (3, 18, 18)
    assert torch.all(cropped[:, :, -1].isnan()) and torch.all(cropped[:, 0, :-1] == 0)


def test_mask_box_rounding():
    mask = torch.zeros(20, 30)
    mask[5:12, 10:20] = 1  # x 10..19, y 5..11: w 9, h 6, size int(9 * 1.2) = 10
    assert mask_box(mask) == (int(14.5 - 5), int(8.0 - 5), int(14.5 + 5), int(8.0 + 5))
    thin = torch.zeros(10, 10)
    thin[3, 2:8] = 1
    with pytest.raises(ValueError):
        mask_box(thin)


def test_crop_and_pad_helpers():
    x = torch.arange(12.0).reshape(1, 3, 4)
    out = crop_zero_fill(x, (-1, 1, 2, 4))
    assert torch.equal(out, torch.tensor([[[0.0, 4.0, 5.0], [0.0, 8.0, 9.0], [0.0, 0.0, 0.0]]]))
    padded = pad_to_square(torch.ones(1, 2, 5), value=-1.0)
    assert padded.shape == (1, 5, 5)
    assert torch.equal(padded[0, :, 0], torch.tensor([-1.0, 1.0, 1.0, -1.0, -1.0]))
