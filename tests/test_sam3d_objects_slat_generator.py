"""Parity of the SAM 3D Objects structured-latent flow (velocity net, CFG, Euler sampling) with the official fixture."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from models.sam3d_objects.flow_sampler import FlowSampler
from models.sam3d_objects.latent_flow import build_slat_flow
from models.sam3d_objects.structure_flow import VELOCITY_PREFIX, load_generator_config
from tests.conftest import SAM3D_OBJECTS_FIXTURES as FIXTURES
from tests.parity.sam3d_objects import assert_within_tolerance, readme_cfg, slat_generator_rows

SET_DIR = FIXTURES / "parity_a" / "slat_generator"

pytestmark = pytest.mark.skipif(not SET_DIR.is_dir(), reason="slat_generator fixture not available")


@pytest.fixture(scope="module")
def generator_config() -> dict:
    return load_generator_config(SET_DIR / "config.yaml")


def test_parameter_count(generator_config: dict) -> None:
    net = build_slat_flow(generator_config["reverse_fn"]["backbone"])
    assert sum(p.numel() for p in net.parameters()) == 693_032


def test_forward_and_sampling_match_official() -> None:
    """Velocity net (cond / uncond / CFG), noise draw, CFG sampling, de-normalisation (the runner's rows)."""
    assert_within_tolerance(slat_generator_rows(SET_DIR))


def test_sampler_settings(generator_config: dict) -> None:
    """Steps and rescale_t come from the config; the pipeline's CFG settings from the README's official call."""
    sampler = FlowSampler.from_config(generator_config)
    assert sampler.steps == 3 and sampler.rescale_t == 1.0 and not sampler.shortcut_model
    assert readme_cfg(SET_DIR) == (2.0, (0.0, 500.0))


def test_released_network_matches_manifest() -> None:
    config = load_generator_config(FIXTURES / "configs_used" / "slat_generator.yaml")
    with torch.device("meta"):
        model = build_slat_flow(config["reverse_fn"]["backbone"])
    manifest = json.loads((FIXTURES / "manifests" / "slat_generator.json").read_text())["keys"]
    want = {k[len(VELOCITY_PREFIX) :]: v["shape"] for k, v in manifest.items() if k.startswith(VELOCITY_PREFIX)}
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == want


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("pe_mode", "rope", "pe_mode"),
        ("share_mod", True, "share_mod"),
        ("bogus", 1, "bogus"),
        ("patch_size", 4, "patch_size"),
    ],
)
def test_config_refuses_unsupported(generator_config: dict, key: str, value: object, message: str) -> None:
    node = copy.deepcopy(generator_config["reverse_fn"]["backbone"])
    node[key] = value
    with pytest.raises(ValueError, match=message):
        build_slat_flow(node)
