"""SAM 3D Objects release loading: pipeline.yaml, key accounting against the official manifests, the tiny random
snapshot round trip, refusals by name, and the trusted-folder rule for checkpoints holding metadata."""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from models.sam3.checkpoint import CheckpointError
from models.sam3d_objects.checkpoint import (
    EMBEDDER_PREFIX,
    GENERATOR_PREFIX,
    PipelineConfigError,
    Sam3DObjects,
    build_modules,
    load_sam3d_objects,
    match_keys,
    read_pipeline_config,
    split_generator_state,
    verify_sam3d_objects,
)
from models.sam3d_objects.flow_sampler import draw_noise
from models.sam3d_objects.random_checkpoint import write_random_snapshot
from models.sam3d_objects.sparse_structure_decoder import occupied_coords
from tests.conftest import SAM3D_OBJECTS_FIXTURES as FIXTURES

CONFIGS_USED = FIXTURES / "configs_used"
LOADED = ("ss_generator", "slat_generator", "ss_decoder", "slat_decoder_gs", "slat_decoder_mesh")
needs_fixtures = pytest.mark.skipif(not CONFIGS_USED.is_dir(), reason="sam3d_objects fixtures not available")


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_random_snapshot(tmp_path_factory.mktemp("sam3d_objects"), seed=0)


@pytest.fixture
def copy_of(snapshot: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the snapshot a test may edit."""
    root = snapshot[0].parents[1]
    shutil.copytree(root, tmp_path / "weights")
    return tmp_path / "weights" / "sam-3d-objects" / "checkpoints", tmp_path / "weights" / "moge" / "model.pt"


@pytest.fixture(scope="module")
def loaded(snapshot: tuple[Path, Path]) -> Sam3DObjects:
    return load_sam3d_objects(*snapshot)


def _edit_ckpt(path: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> None:
    data = torch.load(path, map_location="cpu", weights_only=True)
    edit(data["state_dict"] if "state_dict" in data else data)
    torch.save(data, path)


# ------------------------------------------------------------------------------------------ official key layout


@needs_fixtures
def test_released_pipeline_settings() -> None:
    settings = read_pipeline_config(CONFIGS_USED)[0]
    assert (settings.ss_image_size, settings.slat_image_size) == (770, 770)
    assert (settings.ss_steps, settings.ss_rescale_t, settings.ss_cfg_strength) == (25, 3.0, 7.0)
    assert settings.ss_cfg_interval == settings.slat_cfg_interval == (0.0, 500.0)
    assert (settings.slat_steps, settings.slat_rescale_t, settings.slat_cfg_strength) == (25, 1.0, 2.0)
    assert settings.downsample_ss_dist == 1 and settings.box_size_factor == 1.2
    assert len(settings.slat_mean) == len(settings.slat_std) == 8


@needs_fixtures
def test_released_checkpoints_match_manifests_through_the_loader_key_accounting() -> None:
    """Every tensor of every checkpoint the pipeline loads lands in our modules (real yamls, meta parameters),
    split by the loader's own prefix handling; the ss generator's velocity net has no manifest test elsewhere."""
    modules = build_modules({name: CONFIGS_USED / f"{name}.yaml" for name in LOADED})
    for name in LOADED:
        manifest = json.loads((FIXTURES / "manifests" / f"{name}.json").read_text())["keys"]
        state = {key: torch.empty(entry["shape"], device="meta") for key, entry in manifest.items()}
        if name.endswith("generator"):
            state["_base_models.unexplained.extra"] = torch.empty(3, device="meta")  # ignored, as officially
            flow, embedder, unexpected = split_generator_state(state, name)
            assert unexpected == [] and list(state) == ["_base_models.unexplained.extra"]
            reports = [match_keys(modules[f"{name}:flow"], flow), match_keys(modules[f"{name}:embedder"], embedder)]
        else:
            reports = [match_keys(modules[name], state)]
        assert all(report.ok for report in reports), (name, [r.describe() for r in reports])


# ------------------------------------------------------------------------------------------ tiny snapshot


def test_snapshot_layout_and_size(snapshot: tuple[Path, Path]) -> None:
    checkpoints, moge = snapshot
    names = {f"{n}.{ext}" for n in (*LOADED, "slat_decoder_gs_4") for ext in ("yaml", "ckpt")} | {"pipeline.yaml"}
    assert {p.name for p in checkpoints.iterdir()} == names
    assert moge.name == "model.pt" and moge.parent.name == "moge"
    assert sum(p.stat().st_size for p in checkpoints.parents[1].rglob("*") if p.is_file()) < 24e6
    decoder = torch.load(checkpoints / "ss_decoder.ckpt", weights_only=True)
    assert {v.dtype for v in decoder.values()} == {torch.float16, torch.float32}  # the release's mixed storage
    assert set(torch.load(checkpoints / "ss_generator.ckpt", weights_only=True)) == {"state_dict"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_equals_the_stored_tensors(snapshot: tuple[Path, Path], dtype: torch.dtype) -> None:
    checkpoints, moge = snapshot
    model = load_sam3d_objects(checkpoints, moge, dtype=dtype)
    stored: dict[str, dict[str, torch.Tensor]] = {}
    for name in ("ss_generator", "slat_generator"):
        state = torch.load(checkpoints / f"{name}.ckpt", weights_only=True)["state_dict"]
        flow, embedder, _ = split_generator_state(state, name)
        stored[f"{name}:flow"], stored[f"{name}:embedder"] = flow, embedder
    for name in ("ss_decoder", "slat_decoder_gs", "slat_decoder_mesh"):
        stored[name] = torch.load(checkpoints / f"{name}.ckpt", weights_only=True)
    stored["moge"] = torch.load(moge, weights_only=True)["model"]
    modules = {
        "ss_generator:flow": model.ss_flow,
        "ss_generator:embedder": model.ss_embedder,
        "slat_generator:flow": model.slat_flow,
        "slat_generator:embedder": model.slat_embedder,
        "ss_decoder": model.ss_decoder,
        "slat_decoder_gs": model.gs_decoder,
        "slat_decoder_mesh": model.mesh_decoder,
        "moge": model.moge,
    }
    for name, module in modules.items():
        ours = module.state_dict()
        assert set(ours) == set(stored[name]), name
        for key, tensor in ours.items():
            # Matrices in `dtype`, vectors (norms, biases) in fp32.
            expected = dtype if tensor.dim() >= 2 else torch.float32
            if not tensor.is_floating_point():
                expected = stored[name][key].dtype
            assert tensor.dtype == expected and torch.equal(tensor, stored[name][key].to(expected)), f"{name}: {key}"
        assert not module.training and not any(p.requires_grad for p in module.parameters()), name
        assert not any(t.is_meta for t in [*module.parameters(), *module.buffers()]), name


def test_samplers_carry_the_pipeline_settings(loaded: Sam3DObjects) -> None:
    settings = loaded.settings
    assert (settings.ss_image_size, settings.slat_image_size, settings.ss_steps, settings.slat_steps) == (56, 56, 4, 4)
    ss, slat = loaded.ss_sampler, loaded.slat_sampler
    assert (ss.steps, ss.rescale_t, ss.cfg_strength, ss.cfg_interval) == (4, 3.0, 7.0, (0.0, 500.0))
    assert ss.shortcut_model and ss.no_shortcut
    assert (slat.steps, slat.rescale_t, slat.cfg_strength, slat.shortcut_model) == (4, 1.0, 2.0, False)


@torch.no_grad()
def test_tiny_stages_chain(loaded: Sam3DObjects) -> None:
    """embed -> one guided ss velocity -> decoder -> a few hundred voxels of 64³ (the calibrated occupancy)."""
    size = loaded.settings.ss_image_size
    torch.manual_seed(0)
    image, pointmap = torch.rand(1, 3, size, size), torch.randn(1, 3, size, size)
    mask = (torch.rand(1, 1, size, size) > 0.5).float()
    cond = loaded.ss_embedder(
        image=image, rgb_image=image, mask=mask, rgb_image_mask=mask, pointmap=pointmap, rgb_pointmap=pointmap
    )
    assert cond.shape[-1] == loaded.ss_flow.blocks[0].cross_attn["shape"].to_kv.in_features
    shapes = {k: (1, v.token_len, v.input_layer.in_features) for k, v in loaded.ss_flow.latent_mapping.items()}
    x = draw_noise(shapes)
    v = loaded.ss_sampler.velocity(loaded.ss_flow, x, 0.0, cond)
    latent = x["shape"] + v["shape"]
    coords = occupied_coords(loaded.ss_decoder(loaded.ss_decoder.flat_to_cube(latent)))
    assert 20 < coords.shape[0] < 2000 and int(coords[:, 1:].max()) < 64


# ------------------------------------------------------------------------------------------ refusals


def test_missing_and_misshaped_keys_are_named(copy_of: tuple[Path, Path]) -> None:
    checkpoints, moge = copy_of
    _edit_ckpt(checkpoints / "ss_decoder.ckpt", lambda s: s.pop("out_layer.2.bias"))
    with pytest.raises(CheckpointError, match=r"missing key\(s\): out_layer\.2\.bias"):
        load_sam3d_objects(checkpoints, moge)
    _edit_ckpt(checkpoints / "ss_decoder.ckpt", lambda s: s.update({"out_layer.2.bias": torch.zeros(1)}))
    key = EMBEDDER_PREFIX + "idx_emb"

    def reshape(state: dict[str, torch.Tensor]) -> None:
        state[key] = torch.zeros(7, 5)

    _edit_ckpt(checkpoints / "slat_generator.ckpt", reshape)
    with pytest.raises(CheckpointError, match=rf"mismatched key\(s\): {key} \(7, 5\)"):
        verify_sam3d_objects(checkpoints)


def test_unexplained_generator_keys_are_ignored_but_stray_generator_keys_are_not(copy_of: tuple[Path, Path]) -> None:
    checkpoints, moge = copy_of
    _edit_ckpt(checkpoints / "ss_generator.ckpt", lambda s: s.update({"_base_models.ss_decoder.w": torch.ones(9)}))
    assert verify_sam3d_objects(checkpoints).startswith("all keys match")
    stray = GENERATOR_PREFIX + "reverse_fn.other.weight"
    _edit_ckpt(checkpoints / "ss_generator.ckpt", lambda s: s.update({stray: torch.ones(2)}))
    with pytest.raises(CheckpointError, match=rf"unexpected key\(s\): {stray}"):
        load_sam3d_objects(checkpoints, moge)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"pose_decoder_name": "default"}, "pose_decoder_name"),
        ({"decode_formats": ["gaussian_4"]}, "decode_formats"),
        ({"ss_cfg_strength_pm": 1.0}, "ss_cfg_strength_pm"),
        ({"layout_post_optimization_method": "icp"}, "layout_post_optimization_method"),
        ({"bogus": 1}, "bogus"),
        (
            {
                "depth_model": {
                    "_target_": "sam3d_objects.pipeline.depth_models.moge.MoGe",
                    "model": {"_target_": "moge.model.v2.MoGeModel.from_pretrained"},
                }
            },
            "moge.model.v2",
        ),
    ],
)
def test_unsupported_pipeline_values_are_refused_by_name(copy_of: tuple[Path, Path], edit: dict, message: str) -> None:
    checkpoints, moge = copy_of
    config = yaml.safe_load((checkpoints / "pipeline.yaml").read_text())
    (checkpoints / "pipeline.yaml").write_text(yaml.safe_dump({**config, **edit}))
    with pytest.raises(PipelineConfigError, match=message):
        load_sam3d_objects(checkpoints, moge)


def test_unsupported_preprocessor_transform_is_refused(copy_of: tuple[Path, Path]) -> None:
    checkpoints, moge = copy_of
    config = yaml.safe_load((checkpoints / "pipeline.yaml").read_text())
    config["slat_preprocessor"]["img_mask_joint_transform"][0]["padding_factor"] = 0.1
    (checkpoints / "pipeline.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(PipelineConfigError, match="padding_factor"):
        verify_sam3d_objects(checkpoints)


def test_checkpoint_with_metadata_loads_only_inside_the_checkpoints_folder(
    copy_of: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Like the body loader: a Lightning-style ckpt with pickled objects goes through the full unpickler only
    inside the weights folder (here the checkpoints folder); a file resolving outside it is refused."""
    checkpoints, moge = copy_of
    path = checkpoints / "slat_generator.ckpt"
    data = torch.load(path, weights_only=True)
    torch.save({**data, "hyper_parameters": argparse.Namespace(lr=1e-4)}, path)
    assert verify_sam3d_objects(checkpoints).startswith("all keys match")
    assert "full unpickler" in caplog.text

    outside = tmp_path / "elsewhere.ckpt"
    path.rename(outside)
    path.symlink_to(outside)
    with pytest.raises(CheckpointError, match="outside"):
        load_sam3d_objects(checkpoints, moge)
