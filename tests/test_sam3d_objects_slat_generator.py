"""Parity of the SAM 3D Objects structured-latent flow (velocity net, CFG, Euler sampling) with the official fixture."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from models.sam3d_objects.flow_sampler import FlowSampler, guided_velocity
from models.sam3d_objects.latent_flow import (
    FixedCoordsVelocity,
    SLatFlowModel,
    build_slat_flow,
    denormalize_slat,
    sample_slat_iter,
)
from models.sam3d_objects.structure_flow import VELOCITY_PREFIX, load_generator_config, velocity_state_dict

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "sam3d_objects"
SET_DIR = FIXTURES / "parity_a" / "slat_generator"
CFG_STRENGTH = 2.0
CFG_INTERVAL = (0.0, 500.0)

pytestmark = pytest.mark.skipif(not SET_DIR.is_dir(), reason="slat_generator fixture not available")


@pytest.fixture(scope="module")
def generator_config() -> dict:
    return load_generator_config(SET_DIR / "config.yaml")


@pytest.fixture(scope="module")
def net(generator_config: dict) -> SLatFlowModel:
    model = build_slat_flow(generator_config["reverse_fn"]["backbone"]).eval()
    state = torch.load(SET_DIR / "slat_generator.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict(velocity_state_dict(state), strict=True)
    return model


@pytest.fixture(scope="module")
def inputs() -> np.lib.npyio.NpzFile:
    return np.load(SET_DIR / "inputs.npz")


@pytest.fixture(scope="module")
def expected() -> np.lib.npyio.NpzFile:
    return np.load(SET_DIR / "expected.npz")


def _max_err(got: torch.Tensor, want: np.ndarray) -> float:
    return float(np.abs(got.numpy().reshape(want.shape) - want).max())


def test_parameter_count(net: SLatFlowModel) -> None:
    assert sum(p.numel() for p in net.parameters()) == 693_032


@torch.no_grad()
def test_forward_cond_uncond_cfg(
    net: SLatFlowModel, inputs: np.lib.npyio.NpzFile, expected: np.lib.npyio.NpzFile
) -> None:
    x, t, cond = (torch.from_numpy(inputs[k]) for k in ("x", "t", "cond"))
    coords = inputs["coords"]
    v_cfg = guided_velocity(FixedCoordsVelocity(net, coords), {"feats": x}, t, cond, None, CFG_STRENGTH, CFG_INTERVAL)
    errors = {
        "v_cond": _max_err(net(x, t, cond, coords), expected["v_cond"]),
        "v_uncond": _max_err(net(x, t, cond, coords, unconditional=True), expected["v_uncond"]),
        "v_cfg": _max_err(v_cfg["feats"], expected["v_cfg"]),
    }
    assert max(errors.values()) < 1e-4, errors


@torch.no_grad()
def test_sampling_and_denormalisation(
    net: SLatFlowModel, generator_config: dict, inputs: np.lib.npyio.NpzFile, expected: np.lib.npyio.NpzFile
) -> None:
    torch.manual_seed(3333)
    x0 = torch.randn(1, inputs["coords"].shape[0], 8)
    assert _max_err(x0, expected["x0"]) == 0.0
    sampler = FlowSampler.from_config(generator_config, cfg_strength=CFG_STRENGTH, cfg_interval=CFG_INTERVAL)
    assert sampler.steps == 3 and sampler.rescale_t == 1.0 and not sampler.shortcut_model
    np.testing.assert_allclose(sampler.time_sequence(), expected["t_seq"], atol=1e-6)
    steps = list(sample_slat_iter(net, sampler, x0, torch.from_numpy(inputs["cond"]), inputs["coords"]))
    errors = {f"step{i}": _max_err(x, expected[f"step{i}"]) for i, x in enumerate(steps)}
    pipeline = yaml.safe_load((FIXTURES / "configs_used" / "pipeline.yaml").read_text())
    mean, std = (torch.tensor(pipeline[k], dtype=torch.float32) for k in ("slat_mean", "slat_std"))
    errors["final"] = _max_err(steps[-1][0], expected["final"])
    errors["slat_feats_denorm"] = _max_err(denormalize_slat(steps[-1][0], mean, std), expected["slat_feats_denorm"])
    assert max(errors.values()) < 1e-3, errors


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
