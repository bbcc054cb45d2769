"""Load a SAM 3D Objects release: the `facebook/sam-3d-objects` `checkpoints/` folder plus MoGe's `model.pt`.

`checkpoints/pipeline.yaml` names one hydra yaml and one `.ckpt` per network (paths relative to that folder, as the
official `notebook/inference.py` sets `workspace_dir`) and holds the pipeline settings; the rest of the settings
are the official `InferencePipeline.__init__` defaults. Loaded, in the official way (`InferencePipeline.__init__`,
`instantiate_and_load_from_pretrained`, fixtures/sam3d_objects/PIPELINE.md §1):

- `ss_generator.ckpt` / `slat_generator.ckpt`: `ckpt["state_dict"]`; `_base_models.generator.` keys (the velocity
  net under `reverse_fn.backbone.`) and `_base_models.condition_embedder.` keys (the EmbedderFuser, both DINOv2
  copies included). Keys under any other prefix are ignored, as the official prefix filter drops them (the released
  ss_generator.ckpt carries ~296 MB of them); inside the two prefixes matching is strict.
- the decoders: plain state dicts, stored with the transformer/res-block torso in fp16 and the rest in fp32.
- MoGe (`Ruicheng/moge-vitl/model.pt`): `{"model_config": ..., "model": state_dict}`.

`slat_decoder_gs_4` is not loaded: the official default `decode_formats=["gaussian", "mesh"]` never runs it
(only `"gaussian_4"` would), and a pipeline.yaml asking for it is refused. The ss encoder is not used at
inference either.

Every module is built with its parameters on the meta device (buffers and constant tables real), each checkpoint
tensor is cast to the target dtype/device as it is assigned, and each checkpoint dict is dropped after use, so the
peak is about one copy of the weights. Files are read as data (`weights_only=True`); one holding other objects is
re-read with the full unpickler only when it lies inside its weights folder (`read_checkpoint`).
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from models.checkpoint_io import read_checkpoint, torch_load
from models.sam3.checkpoint import CheckpointError, KeyReport
from models.sam3d_objects.condition_embedder import EmbedderFuser, build_condition_embedder
from models.sam3d_objects.flow_sampler import FlowSampler
from models.sam3d_objects.gaussian_decoder import SLatGaussianDecoder
from models.sam3d_objects.latent_flow import SLatFlowModel, build_slat_flow
from models.sam3d_objects.mesh_decoder import SLatMeshDecoder
from models.sam3d_objects.moge import MOGE_ENCODERS, MoGeConfig, MoGeModel, encoder_config_from_spec
from models.sam3d_objects.sparse_structure_decoder import SparseStructureDecoder
from models.sam3d_objects.structure_flow import SparseStructureFlow, build_structure_flow

log = logging.getLogger(__name__)

PIPELINE_FILE = "pipeline.yaml"
GENERATOR_PREFIX = "_base_models.generator."
EMBEDDER_PREFIX = "_base_models.condition_embedder."
# The generator module (ShortCut / FlowMatching) holds only its CFG wrapper's backbone.
VELOCITY_SUBPREFIX = "reverse_fn.backbone."

# Official `InferencePipeline.__init__` defaults for what pipeline.yaml may leave out (PIPELINE.md §0).
PIPELINE_DEFAULTS: dict[str, Any] = {
    "ss_inference_steps": 25,
    "ss_rescale_t": 3,
    "ss_cfg_strength": 7,
    "ss_cfg_interval": [0, 500],
    "ss_cfg_strength_pm": 0.0,
    "slat_inference_steps": 25,
    "slat_rescale_t": 3,
    "slat_cfg_strength": 5,
    "slat_cfg_interval": [0, 500],
    "downsample_ss_dist": 0,
    "decode_formats": ["gaussian", "mesh"],
    "ss_condition_input_mapping": ["image"],
    "slat_condition_input_mapping": ["image"],
    "pose_decoder_name": "default",
}
_PIPELINE_TARGET = "sam3d_objects.pipeline.inference_pipeline_pointmap.InferencePipelinePointMap"
_LOADED = ("ss_generator", "slat_generator", "ss_decoder", "slat_decoder_gs", "slat_decoder_mesh")
_PATH_KEYS = {
    f"{name}_{kind}_path" for name in (*_LOADED, "slat_decoder_gs_4", "ss_encoder") for kind in ("config", "ckpt")
}
_SETTING_KEYS = set(PIPELINE_DEFAULTS) | {
    "slat_mean",
    "slat_std",
    "ss_preprocessor",
    "slat_preprocessor",
    "depth_model",
}
# Keys with no effect on what inference computes here:
# - dtype / shape_model_dtype: the official autocast precision; ours is the caller's `dtype` argument.
# - compile_model (torch.compile), device, workspace_dir: runtime placement.
# - rendering_engine: only the texture baking / video renderers use it, which this server does not run.
# - version: a label; pad_size: stored but read nowhere in the official pipeline.
_IGNORED_KEYS = {
    "dtype",
    "shape_model_dtype",
    "compile_model",
    "device",
    "workspace_dir",
    "rendering_engine",
    "version",
    "pad_size",
}
# InferencePipelinePointMap options we only support switched off.
_MUST_BE_NONE = {"layout_post_optimization_method", "clip_pointmap_beyond_scale"}

_TDFY = "sam3d_objects.data.dataset.tdfy."
_PREPROCESSOR_TARGET = _TDFY + "preprocessor.PreProcessor"
_CROP_TARGET = _TDFY + "img_and_mask_transforms.crop_around_mask_with_padding"
_RESIZE_ALL_TARGET = _TDFY + "img_and_mask_transforms.resize_all_to_same_size"
_PAD_TARGET = _TDFY + "img_processing.pad_to_square_centered"
_SSI_TARGET = _TDFY + "img_and_mask_transforms.ObjectCentricSSI"
_MOGE_TARGET = "sam3d_objects.pipeline.depth_models.moge.MoGe"
_MOGE_V1_TARGET = "moge.model.v1.MoGeModel.from_pretrained"
_BILINEAR, _NEAREST = 2, 0  # torchvision InterpolationMode as hydra passes it (an int)


class PipelineConfigError(ValueError):
    """pipeline.yaml asks for something this implementation does not do."""


@dataclass(frozen=True)
class PipelineSettings:
    """pipeline.yaml plus the official `InferencePipeline.__init__` defaults (PIPELINE.md §0)."""

    ss_image_size: int  # ss_preprocessor Resize size (518 in the release, 770 in the kpfeifer yamls)
    slat_image_size: int  # slat_preprocessor Resize size
    ss_steps: int
    ss_rescale_t: float
    ss_cfg_strength: float
    ss_cfg_interval: tuple[float, float]
    slat_steps: int
    slat_rescale_t: float
    slat_cfg_strength: float
    slat_cfg_interval: tuple[float, float]
    slat_mean: tuple[float, ...]
    slat_std: tuple[float, ...]
    downsample_ss_dist: int  # >0: keep only surface voxels (prune_sparse_structure), 0: keep all
    box_size_factor: float  # crop_around_mask_with_padding: box side = int(max(w, h, 2) * factor)


@dataclass
class Sam3DObjects:
    """Every network of the pipeline, loaded, in eval mode and without gradients.

    `ss_sampler` and `slat_sampler` are `FlowSampler`s carrying the pipeline's settings: the geometry one is the
    ShortCut in plain flow mode (`no_shortcut=True`, d=0), run with `FlowSampler.sample_iter(ss_flow, ...)`; the
    SLAT one is FlowMatching, run with `latent_flow.sample_slat_iter(slat_flow, slat_sampler, ...)`.
    """

    settings: PipelineSettings
    moge: MoGeModel
    ss_embedder: EmbedderFuser
    ss_flow: SparseStructureFlow
    ss_sampler: FlowSampler
    ss_decoder: SparseStructureDecoder
    slat_embedder: EmbedderFuser
    slat_flow: SLatFlowModel
    slat_sampler: FlowSampler
    gs_decoder: SLatGaussianDecoder
    mesh_decoder: SLatMeshDecoder


# --------------------------------------------------------------------------------------------- pipeline.yaml


def _refuse(where: str, what: str) -> PipelineConfigError:
    return PipelineConfigError(f"{where}: {what}")


def _node(value: Any, where: str, target: str, accepted: set[str]) -> Mapping[str, Any]:
    """A hydra node with the given `_target_` and no keys besides `accepted` (+ `_target_`, `_partial_`)."""
    if not isinstance(value, Mapping) or value.get("_target_") != target:
        found = value.get("_target_") if isinstance(value, Mapping) else value
        raise _refuse(where, f"unsupported _target_ {found!r} (only {target!r})")
    unknown = set(value) - accepted - {"_target_", "_partial_"}
    if unknown:
        raise _refuse(where, f"unsupported keys {sorted(unknown)}")
    return value


def _crop_factor(transforms: Any, where: str, allow_resize_all: bool) -> float:
    """The box_size_factor of a joint-transform list: [resize_all_to_same_size,] crop_around_mask_with_padding."""
    if not isinstance(transforms, list):
        raise _refuse(where, f"expected a list of transforms, got {transforms!r}")
    factors = []
    for i, item in enumerate(transforms):
        target = item.get("_target_") if isinstance(item, Mapping) else item
        if target == _RESIZE_ALL_TARGET and allow_resize_all:
            _node(item, f"{where}[{i}]", _RESIZE_ALL_TARGET, set())
        elif target == _CROP_TARGET:
            node = _node(item, f"{where}[{i}]", _CROP_TARGET, {"box_size_factor", "padding_factor"})
            if float(node.get("padding_factor", 0.0)) != 0.0:
                raise _refuse(f"{where}[{i}]", f"padding_factor={node['padding_factor']!r} is not supported (only 0)")
            factors.append(float(node["box_size_factor"]))
        else:
            raise _refuse(f"{where}[{i}]", f"unsupported transform {target!r}")
    if len(factors) != 1:
        raise _refuse(where, f"expected exactly one {_CROP_TARGET.rsplit('.', 1)[1]}, found {len(factors)}")
    return factors[0]


def _resize_size(compose: Any, where: str, interpolation: int) -> int:
    """Size of a `Compose([pad_to_square_centered, Resize(size, interpolation)])` node."""
    node = _node(compose, where, "torchvision.transforms.Compose", {"transforms"})
    steps = node["transforms"]
    if not isinstance(steps, list) or len(steps) != 2:
        raise _refuse(where, "expected [pad_to_square_centered, Resize]")
    _node(steps[0], f"{where}.transforms[0]", _PAD_TARGET, set())
    resize = _node(
        steps[1], f"{where}.transforms[1]", "torchvision.transforms.Resize", {"size", "interpolation", "antialias"}
    )
    if int(resize.get("interpolation", _BILINEAR)) != interpolation:
        raise _refuse(f"{where}.transforms[1]", f"interpolation={resize['interpolation']!r} (only {interpolation})")
    if resize.get("antialias", True) is not True:
        raise _refuse(f"{where}.transforms[1]", "antialias=False is not supported")
    if not isinstance(resize["size"], int):
        raise _refuse(f"{where}.transforms[1]", f"size={resize['size']!r} (only a single int: square output)")
    return resize["size"]


def _empty(value: Any) -> bool:
    return value is None or value == [] or value == [None]


def _preprocessor(config: Any, where: str, pointmap: bool) -> tuple[int, float]:
    """(Resize size, crop box factor) of an ss (pointmap) or slat preprocessor node; refuses anything else."""
    keys = {"img_transform", "mask_transform", "img_mask_joint_transform", "rgb_img_mask_joint_transform"}
    if pointmap:
        keys |= {"img_mask_pointmap_joint_transform", "pointmap_transform", "normalize_pointmap"}
        keys |= {"pointmap_normalizer", "rgb_pointmap_normalizer"}
    node = _node(config, where, _PREPROCESSOR_TARGET, keys)
    if not _empty(node.get("rgb_img_mask_joint_transform")):
        raise _refuse(where, "rgb_img_mask_joint_transform is not supported")
    size = _resize_size(node.get("img_transform"), f"{where}.img_transform", _BILINEAR)
    sizes = {"mask_transform": _resize_size(node.get("mask_transform"), f"{where}.mask_transform", _NEAREST)}
    if pointmap:
        if node.get("normalize_pointmap") is not True:
            raise _refuse(where, "normalize_pointmap must be true")
        ssi = _node(
            node.get("pointmap_normalizer"),
            f"{where}.pointmap_normalizer",
            _SSI_TARGET,
            {"use_scene_scale", "scale_factor", "quantile_drop_threshold", "clip_beyond_scale"}
            | {"allow_scale_and_shift_override", "raise_on_no_valid_points"},
        )
        for key, value in {"use_scene_scale": True, "scale_factor": 1.0, "clip_beyond_scale": None}.items():
            if ssi.get(key, value) != value:
                raise _refuse(f"{where}.pointmap_normalizer", f"{key}={ssi[key]!r} is not supported (only {value!r})")
        if node.get("rgb_pointmap_normalizer") is not None:
            raise _refuse(where, "rgb_pointmap_normalizer is not supported (the pointmap normalizer is reused)")
        sizes["pointmap_transform"] = _resize_size(
            node.get("pointmap_transform"), f"{where}.pointmap_transform", _NEAREST
        )
        # The official PreProcessor prefers the pointmap joint list when it is non-empty.
        joint_key = "img_mask_pointmap_joint_transform"
        if _empty(node.get(joint_key)):
            joint_key = "img_mask_joint_transform"
        elif not _empty(node.get("img_mask_joint_transform")):
            raise _refuse(where, "both img_mask_joint_transform and img_mask_pointmap_joint_transform are set")
    else:
        joint_key = "img_mask_joint_transform"
    factor = _crop_factor(node.get(joint_key), f"{where}.{joint_key}", allow_resize_all=pointmap)
    for name, other in sizes.items():
        if other != size:
            raise _refuse(where, f"{name} size {other} differs from img_transform size {size}")
    return size, factor


def _depth_model(config: Any) -> None:
    node = _node(config, "depth_model", _MOGE_TARGET, {"model", "device"})
    model = _node(node.get("model"), "depth_model.model", _MOGE_V1_TARGET, {"pretrained_model_name_or_path"})
    del model  # the weights come from the `moge` path given to the loader


def _interval(value: Any, where: str) -> tuple[float, float]:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise _refuse(where, f"expected [low, high], got {value!r}")
    return float(value[0]), float(value[1])


def read_pipeline_config(checkpoints: Path) -> tuple[PipelineSettings, dict[str, Path], dict[str, Path]]:
    """Settings, per-network yaml paths and ckpt paths (the loaded networks only) from `pipeline.yaml`."""
    path = Path(checkpoints) / PIPELINE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, Mapping):
        raise _refuse(str(path), "not a mapping")
    if raw.get("_target_", _PIPELINE_TARGET) != _PIPELINE_TARGET:
        raise _refuse("pipeline.yaml", f"unsupported _target_ {raw['_target_']!r} (only {_PIPELINE_TARGET!r})")
    unknown = set(raw) - {"_target_"} - _PATH_KEYS - _SETTING_KEYS - _IGNORED_KEYS - _MUST_BE_NONE
    if unknown:
        raise _refuse("pipeline.yaml", f"unsupported keys {sorted(unknown)}")
    for key in sorted(_MUST_BE_NONE):
        if raw.get(key) is not None:
            raise _refuse("pipeline.yaml", f"{key}={raw[key]!r} is not supported (only null)")
    missing = [
        key
        for key in ("slat_mean", "slat_std", "ss_preprocessor", "slat_preprocessor", "depth_model")
        if key not in raw
    ]
    missing += sorted(f"{n}_{k}_path" for n in _LOADED for k in ("config", "ckpt") if not raw.get(f"{n}_{k}_path"))
    if missing:
        raise _refuse("pipeline.yaml", f"missing keys {missing}")
    cfg = {**PIPELINE_DEFAULTS, **{k: v for k, v in raw.items() if k in PIPELINE_DEFAULTS}}

    if cfg["pose_decoder_name"] != "ScaleShiftInvariant":
        raise _refuse("pipeline.yaml", f"pose_decoder_name={cfg['pose_decoder_name']!r} (only 'ScaleShiftInvariant')")
    if float(cfg["ss_cfg_strength_pm"]) != 0.0:
        raise _refuse("pipeline.yaml", f"ss_cfg_strength_pm={cfg['ss_cfg_strength_pm']!r} (only 0)")
    formats = cfg["decode_formats"]
    if not isinstance(formats, list) or set(formats) - {"gaussian", "mesh"}:
        raise _refuse("pipeline.yaml", f"decode_formats={formats!r} (only 'gaussian' and 'mesh')")
    for key in ("ss_condition_input_mapping", "slat_condition_input_mapping"):
        if cfg[key] != []:
            raise _refuse("pipeline.yaml", f"{key}={cfg[key]!r} (only []: the condition embedder takes every input)")
    if int(cfg["downsample_ss_dist"]) < 0:
        raise _refuse("pipeline.yaml", f"downsample_ss_dist={cfg['downsample_ss_dist']!r} (must be >= 0)")
    mean, std = (tuple(float(v) for v in raw[key]) for key in ("slat_mean", "slat_std"))
    if len(mean) != len(std):
        raise _refuse("pipeline.yaml", f"slat_mean has {len(mean)} values, slat_std {len(std)}")
    _depth_model(raw["depth_model"])
    ss_size, ss_factor = _preprocessor(raw["ss_preprocessor"], "ss_preprocessor", pointmap=True)
    slat_size, slat_factor = _preprocessor(raw["slat_preprocessor"], "slat_preprocessor", pointmap=False)
    if ss_factor != slat_factor:
        raise _refuse("pipeline.yaml", f"box_size_factor differs: ss {ss_factor}, slat {slat_factor}")

    settings = PipelineSettings(
        ss_image_size=ss_size,
        slat_image_size=slat_size,
        ss_steps=int(cfg["ss_inference_steps"]),
        ss_rescale_t=float(cfg["ss_rescale_t"]),
        ss_cfg_strength=float(cfg["ss_cfg_strength"]),
        ss_cfg_interval=_interval(cfg["ss_cfg_interval"], "ss_cfg_interval"),
        slat_steps=int(cfg["slat_inference_steps"]),
        slat_rescale_t=float(cfg["slat_rescale_t"]),
        slat_cfg_strength=float(cfg["slat_cfg_strength"]),
        slat_cfg_interval=_interval(cfg["slat_cfg_interval"], "slat_cfg_interval"),
        slat_mean=mean,
        slat_std=std,
        downsample_ss_dist=int(cfg["downsample_ss_dist"]),
        box_size_factor=ss_factor,
    )
    folder = Path(checkpoints)
    configs = {name: folder / raw[f"{name}_config_path"] for name in _LOADED}
    ckpts = {name: folder / raw[f"{name}_ckpt_path"] for name in _LOADED}
    return settings, configs, ckpts


# --------------------------------------------------------------------------------------------- building


_META_LOCK = threading.Lock()


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device; buffers and plain tensors stay real.

    `torch.device("meta")` would also put non-persistent buffers (DINOv2 mean/std, timestep frequencies) and the
    FlexiCubes tables on meta, and no checkpoint restores those. Patches `nn.Module.register_parameter` for the
    duration (under a lock, so two loads do not interleave their patches).
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    with _META_LOCK:
        nn.Module.register_parameter = register  # type: ignore[method-assign]
        try:
            yield
        finally:
            nn.Module.register_parameter = original  # type: ignore[method-assign]


def _yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}")
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict):
        raise PipelineConfigError(f"{path}: not a mapping")
    return config


def _generator_nodes(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(generator node = ShortCut/FlowMatching, condition embedder node) of a generator yaml."""
    config = _yaml(path)
    try:
        module = config["module"]
        return module["generator"]["backbone"], module["condition_embedder"]["backbone"]
    except (KeyError, TypeError) as err:
        raise PipelineConfigError(f"{path}: no module.generator.backbone / module.condition_embedder.backbone") from err


def build_modules(configs: Mapping[str, Path]) -> dict[str, nn.Module]:
    """Every network from its yaml, parameters on the meta device. Keys: the names `_match` reports with."""
    ss_node, ss_embedder_node = _generator_nodes(configs["ss_generator"])
    slat_node, slat_embedder_node = _generator_nodes(configs["slat_generator"])
    with parameters_on_meta():
        return {
            "ss_generator:flow": build_structure_flow(ss_node["reverse_fn"]["backbone"]),
            "ss_generator:embedder": build_condition_embedder(ss_embedder_node),
            "slat_generator:flow": build_slat_flow(slat_node["reverse_fn"]["backbone"]),
            "slat_generator:embedder": build_condition_embedder(slat_embedder_node),
            "ss_decoder": SparseStructureDecoder.from_config(_yaml(configs["ss_decoder"])),
            "slat_decoder_gs": SLatGaussianDecoder.from_config(_yaml(configs["slat_decoder_gs"])),
            "slat_decoder_mesh": SLatMeshDecoder.from_config(_yaml(configs["slat_decoder_mesh"])),
        }


def split_generator_state(
    state: dict[str, torch.Tensor], source: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """(velocity-net state, embedder state, unexpected keys) of a generator ckpt's `state_dict`.

    Keys outside the two official prefixes are dropped (logged), as the official prefix filter drops them. Under
    `_base_models.generator.` the official module holds only `reverse_fn.backbone.*`, so anything else there is
    unexpected.
    """
    flow, embedder, unexpected, ignored = {}, {}, [], 0
    for key in list(state):
        if key.startswith(GENERATOR_PREFIX):
            name = key[len(GENERATOR_PREFIX) :]
            if name.startswith(VELOCITY_SUBPREFIX):
                flow[name[len(VELOCITY_SUBPREFIX) :]] = state.pop(key)
            else:
                unexpected.append(key)
        elif key.startswith(EMBEDDER_PREFIX):
            embedder[key[len(EMBEDDER_PREFIX) :]] = state.pop(key)
        else:
            ignored += 1
    if ignored:
        log.info("%s: ignoring %d tensors outside %s / %s", source, ignored, GENERATOR_PREFIX, EMBEDDER_PREFIX)
    return flow, embedder, unexpected


def match_keys(module: nn.Module, state: Mapping[str, torch.Tensor], prefix: str = "") -> KeyReport:
    """Strict comparison of a module's state dict with checkpoint tensors (names reported with `prefix`)."""
    expected = module.state_dict()
    return KeyReport(
        missing=sorted(prefix + k for k in set(expected) - set(state)),
        unexpected=sorted(prefix + k for k in set(state) - set(expected)),
        mismatched=sorted(
            f"{prefix}{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ),
    )


def _merge(reports: list[KeyReport]) -> KeyReport:
    return KeyReport(
        missing=[k for r in reports for k in r.missing],
        unexpected=[k for r in reports for k in r.unexpected],
        mismatched=[k for r in reports for k in r.mismatched],
    )


def _storage_dtype(target: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """Matrices, kernels and embeddings (all but a few MB of the weights) in `dtype`; vectors (norm affines,
    biases, LayerScale) in fp32, as the release's fp16 conversion leaves them, so that norms run in fp32 on any
    device's autocast."""
    if not target.is_floating_point():
        return target.dtype
    return dtype if target.dim() >= 2 else torch.float32


def _assign(module: nn.Module, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> None:
    """Move `state` into `module` (consumed: each tensor is dropped once cast), then finish the module."""
    expected = module.state_dict()
    cast = {}
    for key, target in expected.items():
        tensor = state.pop(key)
        cast[key] = tensor.to(device=device, dtype=_storage_dtype(target, dtype))
    module.load_state_dict(cast, strict=True, assign=True)
    del cast
    # Constants built in code (timestep frequencies, ImageNet statistics, FlexiCubes tables) keep their fp32.
    module.to(device=device)
    leftover = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f"tensors not loaded: {', '.join(leftover)}")
    module.eval().requires_grad_(False)


def _checked(checks: list[tuple[nn.Module, dict[str, torch.Tensor], str]], unexpected: list[str], source: Path) -> None:
    report = _merge([match_keys(module, state, prefix) for module, state, prefix in checks])
    report.unexpected.extend(unexpected)
    if not report.ok:
        raise CheckpointError(f"{source}: {report.describe()}")


def _load_network(
    name: str,
    modules: dict[str, nn.Module],
    ckpt: Path,
    trusted_root: Path,
    assign: tuple[torch.device, torch.dtype] | None,
) -> None:
    """Read one checkpoint, check its keys against the network(s) it feeds, and (if `assign`) load them."""
    state = read_checkpoint(ckpt, trusted_root=trusted_root)
    if name in ("ss_generator", "slat_generator"):
        flow, embedder, unexpected = split_generator_state(state, str(ckpt))
        del state
        parts = [
            (modules[f"{name}:flow"], flow, GENERATOR_PREFIX + VELOCITY_SUBPREFIX),
            (modules[f"{name}:embedder"], embedder, EMBEDDER_PREFIX),
        ]
        _checked(parts, unexpected, ckpt)
    else:
        parts = [(modules[name], state, "")]
        _checked(parts, [], ckpt)
        del state
    if assign is not None:
        for module, part, _ in parts:
            _assign(module, part, *assign)


def _read_moge(path: Path) -> tuple[MoGeModel, dict[str, torch.Tensor]]:
    """MoGe model (parameters on meta) and its state dict from an official `model.pt`."""
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}")
    try:
        # MoGe's own `from_pretrained` reads it with weights_only=True too, so no full-unpickler fallback here.
        data = torch_load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: holds objects other than tensors and plain configuration") from err
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict) or "model_config" not in data:
        raise CheckpointError(f"{path}: not a MoGe model.pt ({{'model_config': ..., 'model': state_dict}})")
    specs = {}
    stored = data.get("fixture_encoder_spec")  # tiny encoders of fixtures and random snapshots name their spec
    if stored is not None and stored["name"] not in MOGE_ENCODERS:
        specs[stored["name"]] = encoder_config_from_spec(stored)
    config = MoGeConfig.from_model_config(data["model_config"], specs)
    with parameters_on_meta():
        model = MoGeModel(config)
    return model, data["model"]


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------- entry points


def load_sam3d_objects(
    checkpoints: Path,
    moge: Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Sam3DObjects:
    """Load the release in `checkpoints` (the folder holding pipeline.yaml) and MoGe's `model.pt` onto `device`.

    Checkpoint matrices, kernels and embeddings are cast to `dtype` (the release's fp16 torso weights included),
    vectors and the constants built in code stay fp32.
    Raises `PipelineConfigError` naming a pipeline/yaml value we do not implement, `CheckpointError` naming the
    missing, unexpected or mis-shaped keys.
    """
    checkpoints, moge, device = Path(checkpoints), Path(moge), torch.device(device)
    settings, configs, ckpts = read_pipeline_config(checkpoints)
    ss_node, _ = _generator_nodes(configs["ss_generator"])
    slat_node, _ = _generator_nodes(configs["slat_generator"])
    ss_sampler = FlowSampler.from_config(
        ss_node,
        steps=settings.ss_steps,
        rescale_t=settings.ss_rescale_t,
        cfg_strength=settings.ss_cfg_strength,
        cfg_interval=settings.ss_cfg_interval,
        no_shortcut=True,
    )
    slat_sampler = FlowSampler.from_config(
        slat_node,
        steps=settings.slat_steps,
        rescale_t=settings.slat_rescale_t,
        cfg_strength=settings.slat_cfg_strength,
        cfg_interval=settings.slat_cfg_interval,
    )
    modules = build_modules(configs)
    for name in _LOADED:
        _load_network(name, modules, ckpts[name], checkpoints, (device, dtype))
    moge_model, moge_state = _read_moge(moge)
    _checked([(moge_model, moge_state, "")], [], moge)
    _assign(moge_model, moge_state, device, dtype)
    del moge_state
    return Sam3DObjects(
        settings=settings,
        moge=moge_model,
        ss_embedder=modules["ss_generator:embedder"],
        ss_flow=modules["ss_generator:flow"],
        ss_sampler=ss_sampler,
        ss_decoder=modules["ss_decoder"],
        slat_embedder=modules["slat_generator:embedder"],
        slat_flow=modules["slat_generator:flow"],
        slat_sampler=slat_sampler,
        gs_decoder=modules["slat_decoder_gs"],
        mesh_decoder=modules["slat_decoder_mesh"],
    )


def verify_sam3d_objects(checkpoints: Path) -> str:
    """Check a release without loading it: pipeline.yaml, every yaml, and every checkpoint's keys and shapes.

    Networks are built with meta parameters and the checkpoints are memory-mapped, so this needs little memory.
    Returns a one-line summary with parameter counts; raises naming the offending values or keys.
    """
    checkpoints = Path(checkpoints)
    settings, configs, ckpts = read_pipeline_config(checkpoints)
    for name in ("ss_generator", "slat_generator"):
        FlowSampler.from_config(_generator_nodes(configs[name])[0])
    modules = build_modules(configs)
    for name in _LOADED:
        _load_network(name, modules, ckpts[name], checkpoints, None)
    counts = {name: _count(module) for name, module in modules.items()}
    parts = ", ".join(f"{name} {count:,}" for name, count in counts.items())
    return (
        f"all keys match; {sum(counts.values()):,} parameters ({parts}); "
        f"ss {settings.ss_image_size}px x{settings.ss_steps} steps, slat {settings.slat_image_size}px "
        f"x{settings.slat_steps} steps"
    )


def verify_moge(path: Path) -> str:
    """Check MoGe's `model.pt` without loading its weights: config and every key and shape."""
    model, state = _read_moge(Path(path))
    _checked([(model, state, "")], [], Path(path))
    return f"all keys match; {_count(model):,} parameters"
