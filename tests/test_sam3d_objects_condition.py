"""SAM 3D Objects condition embedder: strict checkpoint keys, parity with the official EmbedderFuser, DINOv2 shapes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from models.sam3d_objects.condition_embedder import EmbedderFuser, build_condition_embedder
from models.sam3d_objects.dinov2 import DINOV2_SPECS, DinoV2Model
from tests.conftest import SAM3D_OBJECTS_FIXTURES as FIXTURES
from tests.parity.sam3d_objects import EMBEDDER_PREFIX, assert_within_tolerance, condition_embedder_rows, embedder_state

PARITY_A = FIXTURES / "parity_a" / "condition_embedder"
CKPT_A = FIXTURES / "parity_a" / "ss_generator" / "ss_generator.ckpt"

needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"fixtures not found at {FIXTURES}")


@pytest.fixture(scope="module")
def fuser_a() -> EmbedderFuser:
    model = build_condition_embedder(PARITY_A / "config.yaml").eval()
    model.load_state_dict(embedder_state(CKPT_A), strict=True)
    return model


@needs_fixtures
def test_state_dict_keys_match_checkpoint() -> None:
    model = build_condition_embedder(PARITY_A / "config.yaml")
    ours = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    theirs = {key: tuple(value.shape) for key, value in embedder_state(CKPT_A).items()}
    assert sorted(set(ours) - set(theirs)) == []
    assert sorted(set(theirs) - set(ours)) == []
    assert ours == theirs


@needs_fixtures
def test_tokens_match_official() -> None:
    """Tokens, raw embedder outputs and projections (the parity runner's rows; atol 1e-4)."""
    assert_within_tolerance(condition_embedder_rows(PARITY_A))


@needs_fixtures
def test_pointmap_invalid_pixels_use_invalid_token(fuser_a: EmbedderFuser) -> None:
    """NaN and inf are both invalid: the tokens do not depend on which non-finite value marks a pixel."""
    pointmap = torch.from_numpy(np.load(PARITY_A / "inputs.npz")["pointmap"])
    assert pointmap.isnan().any()
    embedder = fuser_a.module_list[2]
    with torch.no_grad():
        torch.testing.assert_close(embedder(pointmap), embedder(pointmap.nan_to_num(nan=float("inf"))))


@needs_fixtures
def test_vitl14_reg_keys_and_shapes_match_manifest() -> None:
    manifest = json.loads((FIXTURES / "manifests" / "dinov2_vitl14_reg.json").read_text())["keys"]
    with torch.device("meta"):
        model = DinoV2Model(DINOV2_SPECS["dinov2_vitl14_reg"])
    state = model.state_dict()
    assert list(state) == list(manifest)
    assert {key: list(value.shape) for key, value in state.items()} == {k: v["shape"] for k, v in manifest.items()}
    assert {key for key, v in manifest.items() if v["kind"] == "param"} == {
        name for name, _ in model.named_parameters()
    }
    assert all(value.dtype == torch.float32 for value in state.values())


@needs_fixtures
@pytest.mark.parametrize("name", ["ss_generator", "slat_generator"])
def test_released_configs_match_manifests(name: str) -> None:
    """The full-size ss (2x Dino + pointmap) and slat (2x Dino prenorm) embedders have the released keys and shapes."""
    config = yaml.safe_load((FIXTURES / "configs_used" / f"{name}.yaml").read_text())
    with torch.device("meta"):
        model = build_condition_embedder(config["module"]["condition_embedder"]["backbone"])
    manifest = json.loads((FIXTURES / "manifests" / f"{name}.json").read_text())["keys"]
    expected = {
        key.removeprefix(EMBEDDER_PREFIX): v["shape"] for key, v in manifest.items() if key.startswith(EMBEDDER_PREFIX)
    }
    assert {key: list(value.shape) for key, value in model.state_dict().items()} == expected


def test_unknown_target_is_refused() -> None:
    config = {
        "_target_": "sam3d_objects.model.backbone.dit.embedder.embedder_fuser.EmbedderFuser",
        "embedder_list": [[{"_target_": "sam3d_objects.SomethingElse"}, [["image", "cropped"]]]],
    }
    with pytest.raises(ValueError, match="unknown condition embedder _target_"):
        build_condition_embedder(config)
