"""Write a tiny seeded random-weight SAM 3D Objects release in the exact Hub layout, plus a tiny MoGe `model.pt`.

The real checkpoints are gated, so tests and benchmarks run the real loading and inference code on these. Layout:

    out/sam-3d-objects/checkpoints/{pipeline.yaml, ss_generator.yaml/.ckpt, slat_generator.yaml/.ckpt,
                                    ss_decoder.yaml/.ckpt, slat_decoder_gs.yaml/.ckpt, slat_decoder_gs_4.yaml/.ckpt,
                                    slat_decoder_mesh.yaml/.ckpt}
    out/moge/model.pt

The yamls are the official ones (fixtures/sam3d_objects/configs_used) with the sizes shrunk; the containers are
the official ones (generators `{"state_dict": {...}}` under `_base_models.generator.` / `_base_models.condition_
embedder.`; decoders plain state dicts, their transformer / res-block torso stored in fp16 like the release).
Tiny sizes, chosen so every stage chains and one CPU run of the whole pipeline takes seconds:

- images: both preprocessors Resize to 56; DINOv2 `dinov2_tiny14_reg_b` (96 wide, 3 blocks, a name our
  DINOV2_SPECS knows) at 56 px for the ss embedder (1+16 tokens) and 70 px for the slat embedder (5+25 tokens);
  PointPatchEmbed 32 wide on a 32 px pointmap (16 tokens). Condition width 96: ss 4*17+2*16 = 100 tokens, slat
  4*30 = 120 tokens.
- geometry flow: the real latent layout (shape 16^3 x 8 = 4096 tokens, which the official pipeline hard-codes in
  its decoder reshape; pose 6+3+3+1), 32 wide, 1 block, 2 heads (4096-token attention dominates).
- ss decoder: 16^3 x 8 -> 64^3 logits, widths 32/16/8, one res-block per level.
- slat flow: 64 wide, 2 blocks, io channels 32, patch 2, resolution 64.
- decoders: gs 32 wide / 2 blocks (32 Gaussians per voxel; gs_4: 4), mesh 256 wide / 1 block at resolution 64
  (256 is the narrowest width whose subdivision GroupNorms of 32 groups work: 256 -> 64 -> 32 channels).
- pipeline.yaml sets ss/slat_inference_steps to 4 (keys of the official InferencePipeline) to keep runs short.
- MoGe: a 64-wide, 4-block DINOv2 (its spec stored in model.pt as `fixture_encoder_spec`, as the MoGe fixtures
  do), head widths 32, and a token range of 100-200 patches.

Weights: each network is built with its default initialisation under `seed`; parameters the constructors set to
constants (norm gains, position embeddings, tokens, LayerScale) get seeded Gaussian noise on top, so a load that
silently kept the constructor values is caught. Two calibrations make random weights give usable outputs:

- ss decoder: random weights put the occupied (logit > 0) fraction of the 64^3 grid anywhere between nothing and
  everything. Its last layer's bias is shifted so that a typical latent (standard normal, like the flow's noise
  and, since the decoder's last norm makes its logits insensitive to the input scale, like its random-net outputs)
  occupies about `TARGET_VOXELS` voxels: enough for a non-empty mesh, few enough for tests to run fast.
- MoGe: its mask logit gets +8 so every pixel is valid (random weights would mask about half the image at random,
  leaving the object's pointmap mostly NaN).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from models.sam3d_objects.condition_embedder import build_condition_embedder
from models.sam3d_objects.gaussian_decoder import SLatGaussianDecoder
from models.sam3d_objects.latent_flow import build_slat_flow
from models.sam3d_objects.mesh_decoder import SLatMeshDecoder
from models.sam3d_objects.moge import MoGeConfig, MoGeModel, encoder_config_from_spec
from models.sam3d_objects.sparse_structure_decoder import SparseStructureDecoder
from models.sam3d_objects.structure_flow import build_structure_flow

TARGET_VOXELS = 200
IMAGE_SIZE = 56
DINO = "dinov2_tiny14_reg_b"
COND_CHANNELS = 96  # the fuser width: the widest embedder (DINOv2 tiny b)

_EMB = "sam3d_objects.model.backbone.dit.embedder."
_GEN = "sam3d_objects.model.backbone.generator."
_MODELS = "sam3d_objects.model.backbone.tdfy_dit.models."
_TDFY = "sam3d_objects.data.dataset.tdfy."
_LATENT = _MODELS + "mm_latent."


def _dino(input_size: int, prenorm: bool) -> dict[str, Any]:
    node = {"_target_": _EMB + "dino.Dino", "dino_model": DINO, "input_size": input_size, "normalize_images": True}
    return {**node, "prenorm_features": True} if prenorm else node


def _embedder(input_size: int, slat: bool) -> dict[str, Any]:
    images = [["image", "cropped"], ["rgb_image", "full"]]
    masks = [["mask", "cropped"], ["rgb_image_mask", "full"]]
    node: dict[str, Any] = {"_target_": _EMB + "embedder_fuser.EmbedderFuser"}
    embedders = [[_dino(input_size, slat), images], [_dino(input_size, slat), masks]]
    if slat:
        return {**node, "embedder_list": embedders, "projection_net_hidden_dim_multiplier": 4.0}
    point = {
        "_target_": _EMB + "pointmap.PointPatchEmbed",
        "embed_dim": 32,
        "input_size": 32,
        "patch_size": 8,
        "remap_output": "linear",
    }
    return {
        **node,
        "drop_modalities_weight": [[["pointmap", "rgb_pointmap"], 1.0]],
        "dropout_prob": 0.1,
        "embedder_list": [*embedders, [point, [["pointmap", "cropped"], ["rgb_pointmap", "full"]]]],
        "force_drop_modalities": None,
        "freeze": True,
        "projection_net_hidden_dim_multiplier": 4.0,
        "use_pos_embedding": "learned",
    }


def _latent(in_channels: int, channels: int, shape: bool = False) -> dict[str, Any]:
    if shape:
        pos = {"_target_": _LATENT + "ShapePositionEmbedder", "model_channels": channels, "patch_size": 1}
        pos["resolution"] = 16
    else:
        pos = {"_target_": _LATENT + "LearntPositionEmbedder", "model_channels": channels, "token_len": 1}
    return {"_target_": _LATENT + "Latent", "in_channels": in_channels, "model_channels": channels, "pos_embedder": pos}


def ss_generator_config() -> dict[str, Any]:
    """The official ss_generator.yaml with the sizes shrunk."""
    c = 32
    flow = {
        "_target_": _MODELS + "mot_sparse_structure_flow.SparseStructureFlowTdfyWrapper",
        "cond_channels": COND_CHANNELS,
        "condition_embedder": None,
        "force_zeros_cond": True,
        "freeze_d_time_embedder": True,
        "freeze_shared_parameters": True,
        "in_channels": 8,
        "is_shortcut_model": True,
        "latent_mapping": {
            "6drotation_normalized": _latent(6, c),
            "scale": _latent(3, c),
            "shape": _latent(8, c, shape=True),
            "translation": _latent(3, c),
            "translation_scale": _latent(1, c),
        },
        "latent_share_transformer": {
            "6drotation_normalized": ["6drotation_normalized", "translation", "scale", "translation_scale"]
        },
        "mlp_ratio": 4,
        "model_channels": c,
        "num_blocks": 1,
        "num_heads": 2,
        "out_channels": 8,
        "patch_size": 1,
        "pe_mode": "ape",
        "qk_rms_norm": True,
        "resolution": 16,
        "use_checkpoint": False,
        "use_fp16": True,
    }
    generator = {
        "_target_": _GEN + "shortcut.model.ShortCut",
        "batch_mode": True,
        "cfg_modalities": ["shape"],
        "inference_steps": 2,
        "loss_weights": {
            "6drotation_normalized": 0.1,
            "_target_": "sam3d_objects.config.utils.make_dict",
            "scale": 0.1,
            "shape": 0,
            "translation": 1.0,
            "translation_scale": 0.0,
        },
        "ratio_cfg_samples_in_self_consistency_target": 0.25,
        "rescale_t": 1,
        "reverse_fn": {
            "_target_": _GEN + "classifier_free_guidance.ClassifierFreeGuidanceWithExternalUnconditionalProbability",
            "backbone": flow,
            "interval": [0, 500],
            "p_unconditional": 0.1,
            "strength": 2.0,
            "unconditional_handling": "add_flag",
        },
        "self_consistency_cfg_strength": 2.0,
        "self_consistency_prob": 0.25,
        "shortcut_loss_weight": 1.0,
        "sigma_min": 0.0,
        "time_scale": 1000.0,
        "training_time_sampler_fn": _lognorm(),
    }
    return {
        "module": {
            "condition_embedder": {"backbone": _embedder(IMAGE_SIZE, slat=False)},
            "generator": {"backbone": generator},
        }
    }


def _lognorm() -> dict[str, Any]:
    return {"_partial_": True, "_target_": _GEN + "flow_matching.model.lognorm_sampler", "mean": -1.0, "std": 1.0}


def slat_generator_config() -> dict[str, Any]:
    """The official slat_generator.yaml with the sizes shrunk (DINOv2 at 70 px: unlike the ss one, as released)."""
    flow = {
        "_target_": _MODELS + "structured_latent_flow.SLatFlowModelTdfyWrapper",
        "cond_channels": COND_CHANNELS,
        "condition_embedder": None,
        "force_zeros_cond": True,
        "in_channels": 8,
        "io_block_channels": [32],
        "mlp_ratio": 4,
        "model_channels": 64,
        "num_blocks": 2,
        "num_heads": 4,
        "num_io_res_blocks": 2,
        "out_channels": 8,
        "patch_size": 2,
        "pe_mode": "ape",
        "qk_rms_norm": True,
        "resolution": 64,
        "use_fp16": True,
    }
    generator = {
        "_target_": _GEN + "flow_matching.model.FlowMatching",
        "inference_steps": 12,
        "reverse_fn": {
            "_target_": _GEN + "classifier_free_guidance.ClassifierFreeGuidance",
            "backbone": flow,
            "p_unconditional": 0.0,
            "strength": 0.0,
            "unconditional_handling": "add_flag",
        },
        "sigma_min": 0.0,
        "time_scale": 1000.0,
        "training_time_sampler_fn": _lognorm(),
    }
    return {
        "module": {"condition_embedder": {"backbone": _embedder(70, slat=True)}, "generator": {"backbone": generator}}
    }


def ss_decoder_config() -> dict[str, Any]:
    return {
        "_target_": _MODELS + "sparse_structure_vae.SparseStructureDecoderTdfyWrapper",
        "out_channels": 1,
        "latent_channels": 8,
        "num_res_blocks": 1,
        "num_res_blocks_middle": 1,
        "channels": [32, 16, 8],
        "reshape_input_to_cube": False,
    }


def gs_decoder_config(num_gaussians: int) -> dict[str, Any]:
    return {
        "_target_": _MODELS + "structured_latent_vae.decoder_gs.SLatGaussianDecoderTdfyWrapper",
        "resolution": 64,
        "model_channels": 32,
        "latent_channels": 8,
        "num_blocks": 2,
        "num_heads": 2,
        "mlp_ratio": 4,
        "attn_mode": "swin",
        "window_size": 8,
        "representation_config": {
            "lr": {"_xyz": 1.0, "_features_dc": 1.0, "_opacity": 1.0, "_scaling": 1.0, "_rotation": 0.1},
            "perturb_offset": True,
            "voxel_size": 1.5,
            "num_gaussians": num_gaussians,
            "2d_filter_kernel_size": 0.1 if num_gaussians == 32 else 0.2,
            "3d_filter_kernel_size": 0.0009,
            "scaling_bias": 0.004,
            "opacity_bias": 0.1,
            "scaling_activation": "softplus",
        },
        "use_fp16": True,
    }


def mesh_decoder_config() -> dict[str, Any]:
    return {
        "_target_": _MODELS + "structured_latent_vae.decoder_mesh.SLatMeshDecoderTdfyWrapper",
        "resolution": 64,
        "model_channels": 256,
        "latent_channels": 8,
        "num_blocks": 1,
        "num_heads": 4,
        "mlp_ratio": 4,
        "attn_mode": "swin",
        "window_size": 8,
        "representation_config": {"use_color": True},
        "use_fp16": True,
    }


def _compose(*resize: dict[str, Any]) -> dict[str, Any]:
    pad = {"_partial_": True, "_target_": _TDFY + "img_processing.pad_to_square_centered"}
    return {"_target_": "torchvision.transforms.Compose", "transforms": [pad, *resize]}


def _resize(nearest: bool) -> dict[str, Any]:
    node: dict[str, Any] = {"_target_": "torchvision.transforms.Resize", "size": IMAGE_SIZE}
    return {**node, "interpolation": 0} if nearest else node


def _crop() -> dict[str, Any]:
    return {
        "_partial_": True,
        "_target_": _TDFY + "img_and_mask_transforms.crop_around_mask_with_padding",
        "box_size_factor": 1.2,
        "padding_factor": 0.0,
    }


def pipeline_config(slat_mean: list[float], slat_std: list[float]) -> dict[str, Any]:
    """The official pipeline.yaml with Resize 56 and 4 sampling steps per stage."""
    paths = {}
    for name in (
        "ss_generator",
        "slat_generator",
        "ss_decoder",
        "slat_decoder_gs",
        "slat_decoder_gs_4",
        "slat_decoder_mesh",
    ):
        paths[f"{name}_config_path"] = f"{name}.yaml"
        paths[f"{name}_ckpt_path"] = f"{name}.ckpt"
    ss_preprocessor = {
        "_target_": _TDFY + "preprocessor.PreProcessor",
        "img_mask_joint_transform": [],
        "img_mask_pointmap_joint_transform": [
            {"_partial_": True, "_target_": _TDFY + "img_and_mask_transforms.resize_all_to_same_size"},
            _crop(),
        ],
        "img_transform": _compose(_resize(False)),
        "mask_transform": _compose(_resize(True)),
        "normalize_pointmap": True,
        "pointmap_normalizer": {
            "_target_": _TDFY + "img_and_mask_transforms.ObjectCentricSSI",
            "allow_scale_and_shift_override": True,
            "use_scene_scale": True,
        },
        "pointmap_transform": _compose(_resize(True)),
    }
    slat_preprocessor = {
        "_target_": _TDFY + "preprocessor.PreProcessor",
        "img_transform": _compose(_resize(False)),
        "mask_transform": _compose(_resize(True)),
        "img_mask_joint_transform": [_crop()],
    }
    return {
        "_target_": "sam3d_objects.pipeline.inference_pipeline_pointmap.InferencePipelinePointMap",
        **paths,
        "pad_size": 1.0,
        "dtype": "float16",
        "version": "3dfy_v9",
        "slat_cfg_strength": 2,
        "slat_rescale_t": 1,
        "downsample_ss_dist": 1,
        "compile_model": True,
        "ss_inference_steps": 4,
        "slat_inference_steps": 4,
        "ss_condition_input_mapping": [],
        "ss_preprocessor": ss_preprocessor,
        "pose_decoder_name": "ScaleShiftInvariant",
        "depth_model": {
            "_target_": "sam3d_objects.pipeline.depth_models.moge.MoGe",
            "model": {
                "_target_": "moge.model.v1.MoGeModel.from_pretrained",
                "pretrained_model_name_or_path": "Ruicheng/moge-vitl",
            },
        },
        "slat_condition_input_mapping": [],
        "slat_preprocessor": slat_preprocessor,
        "slat_mean": slat_mean,
        "slat_std": slat_std,
    }


MOGE_ENCODER_SPEC: dict[str, Any] = {
    "name": "dinov2_random_tiny14",
    "embed_dim": 64,
    "depth": 4,
    "num_heads": 4,
    "mlp_ratio": 4,
    "img_size": 224,
    "patch_size": 14,
    "num_register_tokens": 0,
    "init_values": 1.0,
    "ffn_layer": "mlp",
    "block_chunks": 0,
    "interpolate_antialias": False,
    "interpolate_offset": 0.1,
    "qkv_bias": True,
    "proj_bias": True,
    "ffn_bias": True,
    "layernorm_eps": 1e-06,
    "act": "GELU(exact)",
}
MOGE_CONFIG: dict[str, Any] = {
    "encoder": MOGE_ENCODER_SPEC["name"],
    "remap_output": "exp",
    "output_mask": True,
    "split_head": True,
    "intermediate_layers": 4,
    "dim_proj": 32,
    "dim_upsample": [32, 32, 32],
    "dim_times_res_block_hidden": 1,
    "num_res_blocks": 1,
    "trained_area_range": [100 * 14**2, 200 * 14**2],
    "last_conv_channels": 16,
    "last_conv_size": 1,
}


# --------------------------------------------------------------------------------------------- weights


def _randomize(module: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """State dict with seeded noise added to every parameter a constructor set to a constant.

    Buffers (the shape grid's sin-cos embedding, the Gaussians' offset perturbation, MoGe's mean/std) are
    computed values the release stores as they are, so they are left alone.
    """
    params = dict(module.named_parameters())
    state = {}
    for key, tensor in module.state_dict().items():
        tensor = tensor.detach().clone()
        if key in params and tensor.numel() > 1 and bool((tensor == tensor.flatten()[0]).all()):
            tensor += 0.02 * torch.randn(tensor.shape, generator=generator)
        state[key] = tensor.contiguous()
    return state


def _torso_fp16(state: dict[str, torch.Tensor], torso: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The release's mixed storage: torso Linear/Conv weights and biases fp16, norms and the rest fp32."""
    return {
        k: v.half() if k.startswith(torso) and ".norm" not in k and v.is_floating_point() else v
        for k, v in state.items()
    }


@torch.no_grad()
def _calibrate_occupancy(decoder: SparseStructureDecoder, generator: torch.Generator) -> None:
    """Shift the last conv's bias so a standard-normal latent occupies about TARGET_VOXELS voxels."""
    logits = torch.cat([decoder(torch.randn(1, 8, 16, 16, 16, generator=generator)).flatten() for _ in range(3)])
    fraction = TARGET_VOXELS / (logits.numel() / 3)
    threshold = torch.quantile(logits, 1 - fraction)
    decoder.out_layer[2].bias -= threshold


def _save(obj: Any, path: Path) -> None:
    torch.save(obj, path)


def _dump(config: dict[str, Any], path: Path) -> None:
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def write_random_snapshot(out: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write the tiny release under `out`; returns (the checkpoints folder, the MoGe model.pt)."""
    out = Path(out)
    ckpts = out / "sam-3d-objects" / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    (out / "moge").mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, config in (("ss_generator", ss_generator_config()), ("slat_generator", slat_generator_config())):
            module = config["module"]
            flow_node = module["generator"]["backbone"]["reverse_fn"]["backbone"]
            build = build_structure_flow if name == "ss_generator" else build_slat_flow
            flow = _randomize(build(flow_node), generator)
            embedder = _randomize(build_condition_embedder(module["condition_embedder"]["backbone"]), generator)
            state = {f"_base_models.generator.reverse_fn.backbone.{k}": v for k, v in flow.items()}
            state |= {f"_base_models.condition_embedder.{k}": v for k, v in embedder.items()}
            _dump(config, ckpts / f"{name}.yaml")
            _save({"state_dict": state}, ckpts / f"{name}.ckpt")

        ss_decoder = SparseStructureDecoder(**{k: v for k, v in ss_decoder_config().items() if k != "_target_"})
        ss_decoder.load_state_dict(_randomize(ss_decoder, generator))
        _calibrate_occupancy(ss_decoder, generator)
        _dump(ss_decoder_config(), ckpts / "ss_decoder.yaml")
        _save(_torso_fp16(ss_decoder.state_dict(), ("middle_block.", "blocks.")), ckpts / "ss_decoder.ckpt")

        for name, g in (("slat_decoder_gs", 32), ("slat_decoder_gs_4", 4)):
            config = gs_decoder_config(g)
            state = _randomize(SLatGaussianDecoder.from_config(config), generator)
            _dump(config, ckpts / f"{name}.yaml")
            _save(_torso_fp16(state, ("blocks.",)), ckpts / f"{name}.ckpt")

        config = mesh_decoder_config()
        _dump(config, ckpts / "slat_decoder_mesh.yaml")
        _save(_randomize(SLatMeshDecoder.from_config(config), generator), ckpts / "slat_decoder_mesh.ckpt")

        slat_mean = [round(float(v), 4) for v in torch.randn(8, generator=generator)]
        slat_std = [round(float(v), 4) for v in 1.5 + torch.rand(8, generator=generator)]
        _dump(pipeline_config(slat_mean, slat_std), ckpts / "pipeline.yaml")

        with warnings.catch_warnings():  # output_mask / split_head: kept because the released model_config has them
            warnings.simplefilter("ignore", UserWarning)
            moge_config = MoGeConfig.from_model_config(
                copy.deepcopy(MOGE_CONFIG), {MOGE_ENCODER_SPEC["name"]: encoder_config_from_spec(MOGE_ENCODER_SPEC)}
            )
        moge = MoGeModel(moge_config)
        state = _randomize(moge, generator)
        mask_bias = [k for k in state if k.startswith("head.output_block.1.") and k.endswith(".bias")][-1]
        state[mask_bias] += 8.0
        moge_path = out / "moge" / "model.pt"
        _save(
            {"model_config": copy.deepcopy(MOGE_CONFIG), "model": state, "fixture_encoder_spec": MOGE_ENCODER_SPEC},
            moge_path,
        )
    return ckpts, moge_path
