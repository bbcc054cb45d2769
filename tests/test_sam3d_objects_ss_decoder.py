"""SAM 3D Objects sparse-structure decoder: strict checkpoint keys, parity with the official decoder, real-size keys."""

from __future__ import annotations

import json

import pytest
import torch

from models.sam3d_objects.sparse_structure_decoder import SparseStructureDecoder
from tests.conftest import SAM3D_OBJECTS_FIXTURES as FIXTURES
from tests.parity.sam3d_objects import assert_within_tolerance, ss_decoder_rows

PARITY_A = FIXTURES / "parity_a" / "ss_decoder"
REAL_CONFIG = FIXTURES / "configs_used" / "ss_decoder.yaml"
MANIFEST = FIXTURES / "manifests" / "ss_decoder.json"

needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"fixtures not found at {FIXTURES}")


@needs_fixtures
def test_logits_and_coords_match_official() -> None:
    """Logits of the shape tokens (reshaped as the pipeline does) and the occupied coords (the runner's rows)."""
    assert_within_tolerance(ss_decoder_rows(PARITY_A))


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
