"""SAM 3D Body backbones: parity with the official DINOv3 on the fixture, key names and shapes, dtype handling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.sam3d_body.backbone import build_backbone
from models.sam3d_body.vit import ViTBackbone

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "sam3d_body"
PARITY_A = FIXTURES / "parity_a"
PREFIX = "backbone."

needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"fixtures not found at {FIXTURES}")


def checkpoint_shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    """`backbone.*` keys and shapes the module saves, without `mask_token` (checkpoints leave it out)."""
    return {
        PREFIX + name: list(tensor.shape)
        for name, tensor in module.state_dict().items()
        if not name.endswith("mask_token")
    }


@needs_fixtures
def test_dinov3_tiny_matches_official_features() -> None:
    state = torch.load(PARITY_A / "model.ckpt", map_location="cpu", weights_only=True)
    backbone_state = {k.removeprefix(PREFIX): v.float() for k, v in state.items() if k.startswith(PREFIX + "encoder.")}
    expected = np.load(PARITY_A / "expected.npz")

    model = build_backbone("dinov3_vits16_tiny").eval()
    report = model.load_state_dict(backbone_state, strict=False)
    assert report.missing_keys == ["encoder.mask_token"]
    assert report.unexpected_keys == []

    with torch.no_grad():
        features = model(torch.from_numpy(expected["interm/backbone_call0/input"]))
    reference = expected["interm/backbone_call0/features"]
    assert features.dtype == torch.float32
    assert features.shape == reference.shape == (2, 96, 16, 16)
    assert np.abs(features.numpy() - reference).max() <= 1e-4


@needs_fixtures
@pytest.mark.parametrize(
    ("type_name", "manifest", "grid"),
    [("dinov3_vith16plus", "manifest_dinov3.json", (32, 32)), ("vit_hmr_512_384", "manifest_vith.json", (32, 24))],
)
def test_release_backbone_keys_match_manifest(type_name: str, manifest: str, grid: tuple[int, int]) -> None:
    keys = json.loads((FIXTURES / manifest).read_text())["keys"]
    expected = {name: entry["shape"] for name, entry in keys.items() if name.startswith(PREFIX)}
    with torch.device("meta"):
        model = build_backbone(type_name)
        assert checkpoint_shapes(model) == expected
        # The release crop is 512x512; the backbone sees it with `input_crop` columns cut from each side.
        features = model(torch.empty(1, 3, 512, 512 - 2 * model.input_crop))
    assert (model.embed_dim, model.patch_size) == (1280, 16)
    assert features.shape == (1, 1280, *grid)
    assert features.dtype == torch.float32


def test_dinov3_swiglu_tiny_keys() -> None:
    """Key names and shapes of `dinov3_vits16plus_tiny`, as listed in TINY_DINOV3.md."""
    c, hidden = 128, 512
    expected = {
        "encoder.cls_token": [1, 1, c],
        "encoder.storage_tokens": [1, 4, c],
        "encoder.patch_embed.proj.weight": [c, 3, 16, 16],
        "encoder.patch_embed.proj.bias": [c],
        "encoder.rope_embed.periods": [8],
        "encoder.norm.weight": [c],
        "encoder.norm.bias": [c],
    }
    for i in range(3):
        block = {
            "norm1.weight": [c],
            "norm1.bias": [c],
            "attn.qkv.weight": [3 * c, c],
            "attn.qkv.bias": [3 * c],
            "attn.qkv.bias_mask": [3 * c],
            "attn.proj.weight": [c, c],
            "attn.proj.bias": [c],
            "ls1.gamma": [c],
            "norm2.weight": [c],
            "norm2.bias": [c],
            "mlp.w1.weight": [hidden, c],
            "mlp.w1.bias": [hidden],
            "mlp.w2.weight": [hidden, c],
            "mlp.w2.bias": [hidden],
            "mlp.w3.weight": [c, hidden],
            "mlp.w3.bias": [c],
            "ls2.gamma": [c],
        }
        expected.update({f"encoder.blocks.{i}.{name}": shape for name, shape in block.items()})
    expected = {PREFIX + name: shape for name, shape in expected.items()}

    model = build_backbone("dinov3_vits16plus_tiny")
    assert checkpoint_shapes(model) == expected
    assert len(expected) == 58
    assert sum(np.prod(shape) for shape in expected.values()) == 894_216


def test_dinov3_bf16_keeps_fp32_rope_periods_and_returns_fp32() -> None:
    torch.manual_seed(0)
    model = build_backbone("dinov3_vits16plus_tiny").eval()
    for name, param in model.named_parameters():
        if name.endswith("gamma"):  # LayerScale init is 1e-5: let the blocks matter
            param.data.fill_(1.0)
    pixels = torch.randn(1, 3, 64, 48)
    periods = model.encoder.rope_embed.periods.clone()
    with torch.no_grad():
        features = model(pixels)
        model = model.to(torch.bfloat16)
        half = model(pixels)
    assert model.encoder.rope_embed.periods.dtype == torch.float32
    assert torch.equal(model.encoder.rope_embed.periods, periods)
    assert half.dtype == torch.float32
    assert half.shape == (1, 128, 4, 3)
    assert (half - features).abs().max() < 0.05 * features.abs().max()


def test_shrunk_vit_forward_and_bf16() -> None:
    torch.manual_seed(0)
    model = ViTBackbone(image_size=(64, 48), embed_dim=64, depth=2, num_heads=4, input_crop=8).eval()
    pixels = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        features = model(pixels)
        half = model.to(torch.bfloat16)(pixels)
    assert (model.embed_dim, model.patch_size, model.input_crop) == (64, 16, 8)
    assert features.shape == half.shape == (2, 64, 4, 3)
    assert features.dtype == half.dtype == torch.float32
    assert torch.isfinite(half).all()
    assert (half - features).abs().max() < 0.05 * features.abs().max()
    with pytest.raises(ValueError, match="patch grid"):
        model(torch.randn(1, 3, 64, 64))


def test_unknown_backbone_lists_known_names() -> None:
    with pytest.raises(ValueError, match="dinov3_vith16plus.*vit_hmr_512_384"):
        build_backbone("dinov3_vit7b")
