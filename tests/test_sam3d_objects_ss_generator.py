"""Parity of the SAM 3D Objects geometry flow (velocity net, CFG, Euler sampling) with the official-code fixture."""

from __future__ import annotations

import copy

import pytest

from models.sam3d_objects.flow_sampler import FlowSampler
from models.sam3d_objects.structure_flow import build_structure_flow, load_generator_config
from tests.conftest import SAM3D_OBJECTS_FIXTURES as FIXTURES
from tests.parity.sam3d_objects import assert_within_tolerance, ss_generator_rows, ss_noise_rows

SET_DIR = FIXTURES / "parity_a" / "ss_generator"

pytestmark = pytest.mark.skipif(not SET_DIR.is_dir(), reason="ss_generator fixture not available")


@pytest.fixture(scope="module")
def generator_config() -> dict:
    return load_generator_config(SET_DIR / "config.yaml")


def test_forward_and_sampling_match_official() -> None:
    """Velocity net (cond / uncond / CFG), CFG and shortcut sampling from the official noise (the runner's rows)."""
    assert_within_tolerance(ss_generator_rows(SET_DIR))


def test_noise_matches_official_draw() -> None:
    rows = ss_noise_rows(SET_DIR)
    assert len(rows) == 5  # one draw per modality
    assert_within_tolerance(rows)


def test_refuses_unknown_options(generator_config: dict) -> None:
    backbone = copy.deepcopy(generator_config["reverse_fn"]["backbone"])
    backbone["mystery_option"] = 1
    with pytest.raises(ValueError, match="mystery_option"):
        build_structure_flow(backbone)
    backbone = copy.deepcopy(generator_config["reverse_fn"]["backbone"])
    backbone["pe_mode"] = "rope"
    with pytest.raises(ValueError, match="pe_mode"):
        build_structure_flow(backbone)
    sampler_config = copy.deepcopy(generator_config)
    sampler_config["solver_method"] = "midpoint"
    with pytest.raises(ValueError, match="solver_method"):
        FlowSampler.from_config(sampler_config)
