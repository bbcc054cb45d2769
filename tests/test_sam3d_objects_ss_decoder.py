"""SAM 3D Objects sparse-structure decoder: strict checkpoint keys, parity with the official decoder, real-size keys."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from models.sam3d_objects.sparse_structure_decoder import SparseStructureDecoder, occupied_coords

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "sam3d_objects"
PARITY_A = FIXTURES / "parity_a" / "ss_decoder"
REAL_CONFIG = FIXTURES / "configs_used" / "ss_decoder.yaml"
MANIFEST = FIXTURES / "manifests" / "ss_decoder.json"
ATOL = 1e-4

needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"fixtures not found at {FIXTURES}")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The fixture was made with 1 thread; conv3d summation order changes with the thread count (~4e-6)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_decoder() -> SparseStructureDecoder:
    model = SparseStructureDecoder.from_config(PARITY_A / "config.yaml").eval()
    state = torch.load(PARITY_A / "ss_decoder.ckpt", map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model


@needs_fixtures
@pytest.mark.usefixtures("one_thread")
def test_logits_and_coords_match_official() -> None:
    model = load_decoder()
    inputs = np.load(PARITY_A / "inputs.npz")
    expected = np.load(PARITY_A / "expected.npz")
    with torch.no_grad():
        logits = model(torch.from_numpy(inputs["x"]))
        from_tokens = model(SparseStructureDecoder.flat_to_cube(torch.from_numpy(inputs["shape_latent_tokens"])))

    assert logits.shape == expected["logits"].shape
    np.testing.assert_allclose(logits.numpy(), expected["logits"], rtol=0, atol=ATOL)
    assert torch.equal(from_tokens, logits)

    coords = occupied_coords(logits)
    assert coords.dtype == torch.int32
    ours = {tuple(row) for row in coords.tolist()}
    theirs = {tuple(row) for row in expected["coords"].tolist()}
    b, i, j, k = np.array(sorted(ours ^ theirs), dtype=np.int64).reshape(-1, 4).T
    assert np.all(np.abs(expected["logits"][b, 0, i, j, k]) < ATOL)


@needs_fixtures
def test_real_size_keys_match_manifest() -> None:
    # Without the yaml, the sizes the manifest implies (input_layer 8→512, out_layer 32→1, widths 512/128/32).
    implied = {"out_channels": 1, "latent_channels": 8, "num_res_blocks": 2, "channels": [512, 128, 32]}
    with torch.device("meta"):
        model = SparseStructureDecoder.from_config(REAL_CONFIG if REAL_CONFIG.is_file() else implied)
    ours = {key: list(value.shape) for key, value in model.state_dict().items()}
    theirs = {key: entry["shape"] for key, entry in json.loads(MANIFEST.read_text())["keys"].items()}
    assert sorted(set(ours) ^ set(theirs)) == []
    assert ours == theirs


def test_config_refuses_unknown_keys() -> None:
    config = {"out_channels": 1, "latent_channels": 8, "num_res_blocks": 1, "channels": [32, 32], "bogus": 1}
    with pytest.raises(ValueError, match="bogus"):
        SparseStructureDecoder.from_config(config)
