"""MoGe v1 parity with the official code (fixtures/sam3d_objects/parity_a/moge, fp32 CPU) and the ViT-L manifest."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.sam3d_objects.moge import MOGE_VITL_CONFIG, MoGeConfig, MoGeModel, load_moge
from models.sam3d_objects.moge_geometry import recover_focal_shift, solve_optimal_focal_shift

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "sam3d_objects"
MOGE_DIR = FIXTURES / "parity_a" / "moge"
# Tolerances of the fixture README ("Suggested comparison for an independent fp32 PyTorch port").
ATOL = RTOL = 1e-4
FOCAL_SHIFT_TOL = 1e-5
INTRINSICS_TOL = 1e-6

pytestmark = pytest.mark.skipif(not MOGE_DIR.is_dir(), reason="SAM 3D Objects MoGe fixtures not present")


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    return dict(np.load(MOGE_DIR / "expected.npz"))


@pytest.fixture(scope="module")
def model() -> MoGeModel:
    torch.set_num_threads(2)  # the fixture's thread count
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # legacy output_mask/split_head keys, as in the official loader
        return load_moge(MOGE_DIR / "model.pt")


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    """input.png as SAM 3D Objects' `image_to_float` makes it: (3, H, W) float32 in [0, 1]."""
    pixels = np.array(Image.open(MOGE_DIR / "input.png").convert("RGB"))
    return torch.from_numpy((pixels / 255).astype(np.float32)).permute(2, 0, 1).contiguous()


def assert_close(name: str, actual: torch.Tensor | np.ndarray, reference: np.ndarray, atol: float, rtol: float) -> None:
    """Same +inf pattern, then |a - b| <= atol + rtol·|b| on the finite entries; prints the max error."""
    actual = np.asarray(actual)
    assert actual.shape == reference.shape, f"{name}: shape {actual.shape} != {reference.shape}"
    finite = np.isfinite(reference)
    assert np.array_equal(np.isfinite(actual), finite), f"{name}: +inf pattern differs"
    assert np.array_equal(actual[~finite], reference[~finite]), f"{name}: non-finite values differ"
    error = np.abs(actual[finite].astype(np.float64) - reference[finite])
    print(f"{name}: max |diff| {error.max():.3e} (max |ref| {np.abs(reference[finite]).max():.3g})")
    assert np.all(error <= atol + rtol * np.abs(reference[finite])), f"{name}: max |diff| {error.max():.3e}"


def test_checkpoint_keys_strict(model: MoGeModel) -> None:
    checkpoint = torch.load(MOGE_DIR / "model.pt", map_location="cpu", weights_only=True)
    ours = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    official = {key: tuple(value.shape) for key, value in checkpoint["model"].items()}
    assert list(ours) == list(official)
    assert ours == official
    config = json.loads((MOGE_DIR / "config.json").read_text())
    assert model.config.num_tokens_range == (1275, 2551)
    assert model.config.encoder_config.embed_dim == config["fixture_encoder_spec"]["embed_dim"]


def test_solver_replays_official_iterations(expected: dict[str, np.ndarray]) -> None:
    for prefix in ("sam3d", "debug"):
        shift, focal = solve_optimal_focal_shift(expected[f"{prefix}_solver_uv"], expected[f"{prefix}_solver_xyz"])
        print(f"{prefix} solver: shift {shift!r} vs {expected[f'{prefix}_solver_out_shift']!r}")
        assert abs(shift.item() - float(expected[f"{prefix}_solver_out_shift"])) <= 1e-7
        assert abs(focal.item() - float(expected[f"{prefix}_solver_out_focal"])) <= 1e-6


def test_forward_parity(model: MoGeModel, image: torch.Tensor, expected: dict[str, np.ndarray]) -> None:
    num_tokens = int(expected["sam3d_num_tokens"])
    assert num_tokens == 2551
    with torch.inference_mode():
        output = model(image[None], num_tokens)
    assert_close("forward points", output["points"], expected["sam3d_forward_points"], ATOL, RTOL)
    assert_close("forward mask", output["mask"], expected["sam3d_forward_mask"], ATOL, RTOL)
    focal, shift = recover_focal_shift(output["points"], output["mask"] > model.config.mask_threshold)
    errors = (
        abs(focal.item() - expected["sam3d_rfs_focal"].item()),
        abs(shift.item() - expected["sam3d_rfs_shift"].item()),
    )
    print(f"recover_focal_shift: |dfocal| {errors[0]:.3e}, |dshift| {errors[1]:.3e}")
    assert max(errors) <= FOCAL_SHIFT_TOL


@pytest.mark.parametrize(
    ("prefix", "kwargs"),
    [
        ("sam3d", {"force_projection": False}),
        ("default", {}),
        ("fovx60", {"fov_x": 60.0, "force_projection": False}),
        ("debug", {"num_tokens": 40, "force_projection": False}),
    ],
)
def test_infer_parity(
    model: MoGeModel, image: torch.Tensor, expected: dict[str, np.ndarray], prefix: str, kwargs: dict
) -> None:
    output = model.infer(image, use_fp16=False, **kwargs)
    # mask / mask_prob of `default` and `fovx60` equal the sam3d ones (dropped from the fixture as duplicates).
    reference_mask = prefix if f"{prefix}_mask" in expected else "sam3d"
    assert np.array_equal(output["mask"].numpy(), expected[f"{reference_mask}_mask"])
    assert_close(f"{prefix} mask_prob", output["mask_prob"], expected[f"{reference_mask}_mask_prob"], ATOL, RTOL)
    assert_close(f"{prefix} points", output["points"], expected[f"{prefix}_points"], ATOL, RTOL)
    assert_close(f"{prefix} depth", output["depth"], expected[f"{prefix}_depth"], ATOL, RTOL)
    assert_close(f"{prefix} intrinsics", output["intrinsics"], expected[f"{prefix}_intrinsics"], INTRINSICS_TOL, 0)
    # focal relative to the half diagonal, read back from fy = focal / 2 · sqrt(1 + a²)
    aspect_ratio = image.shape[-1] / image.shape[-2]
    focal = float(output["intrinsics"][1, 1]) * 2 / (1 + aspect_ratio**2) ** 0.5
    print(f"{prefix} focal: |diff| {abs(focal - expected[f'{prefix}_rfs_focal'].item()):.3e}")
    assert abs(focal - expected[f"{prefix}_rfs_focal"].item()) <= FOCAL_SHIFT_TOL


def test_vitl_manifest_on_meta_device() -> None:
    manifest = json.loads((FIXTURES / "manifests" / "moge_vitl.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        config = MoGeConfig.from_model_config(MOGE_VITL_CONFIG)
    assert config.num_tokens_range == (1275, 2551)
    with torch.device("meta"):
        model = MoGeModel(config)
    ours = {
        key: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        for key, t in model.state_dict().items()
    }
    official = {key: {"shape": entry["shape"], "dtype": entry["dtype"]} for key, entry in manifest["keys"].items()}
    assert list(ours) == list(official)
    assert ours == official
    assert sum(p.numel() for p in model.parameters()) == 314_174_020
