"""SAM 3D Objects structured-latent Gaussian decoder: strict keys, parity with the official decoder, PLY, real size."""

from __future__ import annotations

import json

import pytest
import torch

from models.sam3d_objects.gaussian_decoder import SLatGaussianDecoder
from models.sam3d_objects.sparse_attention import windowed_self_attention
from tests.conftest import SAM3D_OBJECTS_FIXTURES as FIXTURES
from tests.parity.sam3d_objects import GAUSSIAN_FIELDS, assert_within_tolerance, slat_decoder_gs_rows

PARITY_A = FIXTURES / "parity_a" / "slat_decoder_gs"
REAL_CONFIG = FIXTURES / "configs_used" / "slat_decoder_gs.yaml"
MANIFESTS = FIXTURES / "manifests"

needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"fixtures not found at {FIXTURES}")


@needs_fixtures
def test_gaussians_and_ply_match_official() -> None:
    """Raw and activated fields, the Hammersley offsets and the PLY file (the parity runner's rows)."""
    assert_within_tolerance(slat_decoder_gs_rows(PARITY_A))


@needs_fixtures
@pytest.mark.parametrize("name", ["slat_decoder_gs", "slat_decoder_gs_4"])
def test_real_size_keys_match_manifest(name: str) -> None:
    manifest = json.loads((MANIFESTS / f"{name}.json").read_text())
    config = FIXTURES / "configs_used" / manifest["config_files"][0]
    with torch.device("meta"):
        model = SLatGaussianDecoder.from_config(config)
    ours = {key: list(value.shape) for key, value in model.state_dict().items()}
    theirs = {key: entry["shape"] for key, entry in manifest["keys"].items()}
    assert list(ours) == list(theirs)
    assert ours == theirs
    buffers = {key for key, _ in model.named_buffers()}
    assert buffers == {key for key, entry in manifest["keys"].items() if entry["kind"] == "buffer"}


def test_window_attention_matches_dense_masked_reference() -> None:
    # Two batch items on a 20³ grid; every voxel may only see voxels of its own shifted 8³ cell and batch item.
    gen = torch.Generator().manual_seed(0)
    coords = torch.randint(0, 20, (300, 4), generator=gen)
    coords[:, 0] = torch.arange(300) >= 150
    q, k, v = torch.randn(3, 300, 2, 16, generator=gen).unbind(0)
    for shift in (0, 4):
        cell = torch.cat([coords[:, :1], (coords[:, 1:] + shift) // 8], dim=1)
        allowed = (cell[:, None, :] == cell[None, :, :]).all(-1)
        reference = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=allowed
        ).transpose(0, 1)
        ours = windowed_self_attention(q, k, v, coords, window_size=8, shift=shift)
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_config_refuses_unknown_keys() -> None:
    config = {
        "resolution": 64,
        "model_channels": 64,
        "latent_channels": 8,
        "num_blocks": 2,
        "num_heads": 4,
        "representation_config": {
            "lr": dict.fromkeys(GAUSSIAN_FIELDS, 1.0),
            "perturb_offset": True,
            "voxel_size": 1.5,
            "num_gaussians": 4,
            "2d_filter_kernel_size": 0.1,
            "3d_filter_kernel_size": 0.0009,
            "scaling_bias": 0.004,
            "opacity_bias": 0.1,
            "scaling_activation": "softplus",
        },
    }
    SLatGaussianDecoder.from_config(config)
    with pytest.raises(ValueError, match="bogus"):
        SLatGaussianDecoder.from_config({**config, "bogus": 1})
    with pytest.raises(ValueError, match="bogus_rep"):
        rep = {**config["representation_config"], "bogus_rep": 1}
        SLatGaussianDecoder.from_config({**config, "representation_config": rep})
    with pytest.raises(ValueError, match="shift_window"):
        SLatGaussianDecoder.from_config({**config, "attn_mode": "shift_window"})
