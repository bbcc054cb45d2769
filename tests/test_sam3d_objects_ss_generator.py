"""Parity of the SAM 3D Objects geometry flow (velocity net, CFG, Euler sampling) with the official-code fixture."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from models.sam3d_objects.flow_sampler import FlowSampler, draw_noise, guided_velocity
from models.sam3d_objects.structure_flow import (
    SparseStructureFlow,
    build_structure_flow,
    load_generator_config,
    velocity_state_dict,
)

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "sam3d_objects"
SET_DIR = FIXTURES / "parity_a" / "ss_generator"

pytestmark = pytest.mark.skipif(not SET_DIR.is_dir(), reason="ss_generator fixture not available")


def _latents(npz: np.lib.npyio.NpzFile, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: torch.from_numpy(npz[k]) for k in npz.files if k.startswith(prefix)}


def _max_err(got: dict[str, torch.Tensor], npz: np.lib.npyio.NpzFile, prefix: str) -> dict[str, float]:
    return {name: float(np.abs(value.numpy() - npz[prefix + name]).max()) for name, value in got.items()}


@pytest.fixture(scope="module")
def generator_config() -> dict:
    return load_generator_config(SET_DIR / "config.yaml")


@pytest.fixture(scope="module")
def net(generator_config: dict) -> SparseStructureFlow:
    model = build_structure_flow(generator_config["reverse_fn"]["backbone"]).eval()
    state = torch.load(SET_DIR / "ss_generator.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict(velocity_state_dict(state), strict=True)
    return model


@pytest.fixture(scope="module")
def inputs() -> np.lib.npyio.NpzFile:
    return np.load(SET_DIR / "inputs.npz")


@torch.no_grad()
def test_forward_cond_uncond_cfg(net: SparseStructureFlow, inputs: np.lib.npyio.NpzFile) -> None:
    expected = np.load(SET_DIR / "expected_forward.npz")
    x = _latents(inputs, "x.")
    cond, t, d = (torch.from_numpy(inputs[k]) for k in ("cond", "t", "d"))
    outputs = {
        "v_cond.": net(x, t, cond, d),
        "v_uncond.": net(x, t, cond, d, unconditional=True),
        "v_cfg.": guided_velocity(net, x, t, cond, d, strength=7.0, interval=(0.0, 500.0)),
    }
    for prefix, got in outputs.items():
        assert set(got) == set(x)
        for name, err in _max_err(got, expected, prefix).items():
            assert err < 1e-4, f"{prefix}{name}: max|diff| {err:.3e}"


@torch.no_grad()
def test_cfg_sampling(net: SparseStructureFlow, inputs: np.lib.npyio.NpzFile, generator_config: dict) -> None:
    expected = np.load(SET_DIR / "expected_sampling.npz")
    sampler = FlowSampler.from_config(generator_config, steps=3, no_shortcut=True, cfg_strength=7.0)
    np.testing.assert_allclose(sampler.time_sequence(), expected["t_seq"], rtol=0, atol=1e-12)
    x0 = _latents(expected, "x0.")
    steps = list(sampler.sample_iter(net, x0, torch.from_numpy(inputs["cond"])))
    assert len(steps) == 3
    for i, x in enumerate(steps):
        for name, err in _max_err(x, expected, f"step{i}.").items():
            assert err < 1e-3, f"step{i}.{name}: max|diff| {err:.3e}"


@torch.no_grad()
def test_shortcut_sampling(net: SparseStructureFlow, inputs: np.lib.npyio.NpzFile, generator_config: dict) -> None:
    expected = np.load(SET_DIR / "expected_sampling.npz")
    sampler = FlowSampler.from_config(generator_config, steps=3, no_shortcut=False, cfg_strength=0.0)
    final = sampler.sample(net, _latents(expected, "shortcut.x0."), torch.from_numpy(inputs["cond"]))
    for name, err in _max_err(final, expected, "shortcut.final.").items():
        assert err < 1e-3, f"shortcut.final.{name}: max|diff| {err:.3e}"


def test_noise_matches_official_draw() -> None:
    expected = np.load(SET_DIR / "expected_sampling.npz")
    x0 = _latents(expected, "x0.")
    torch.manual_seed(1333)
    noise = draw_noise({name: tuple(v.shape) for name, v in x0.items()})
    for name, value in noise.items():
        assert torch.equal(value, x0[name]), name


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
