"""SAM 3D Objects parity: our networks against the official code's recorded outputs, one component at a time.

A set folder (e.g. `shared/fixtures/sam3d_objects/parity_a`) holds one subfolder per component, each with its
`config.yaml`/`config.json`, the weights in the official layout, `inputs*.npz`, `expected*.npz` and a README giving
the call convention and the tolerances. Every function here takes one component folder and returns rows
`(key, max_abs_error, tolerance)`; absent components are skipped by `run_sam3d_objects`.

Conventions: integer and boolean outputs (coords, faces, masks, +inf patterns) are exact, their error being the number
of differing entries (sets are compared sorted); a float row whose README gives `atol` and `rtol` uses the tolerance
`atol + rtol * max|expected|`. Sizes, seeds, steps, CFG settings and thread counts come from the set's own files.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

Row = tuple[str, float, float]

# Tolerances of the components' READMEs.
TOL_FORWARD = 1e-4  # network outputs (every component)
TOL_SAMPLE = 1e-3  # flow sampling results (the generators' READMEs)
TOL_PLY = 1e-3  # PLY log(scale) / logit(opacity) amplify the raw-field 1e-4 a little (the README has no figure)
MOGE_RTOL = 1e-4  # MoGe: atol 1e-4, rtol 1e-4 on points, depth, forward outputs and features
MOGE_FOCAL_SHIFT = 1e-5
MOGE_INTRINSICS = 1e-6
FACE_NORMAL_TOL = 1e-6


class FixtureError(Exception):
    """The folder cannot be run (missing files or settings); the runner exits 2."""


class Rows(list):
    """Collected comparison rows, with helpers for float, exact and set comparisons."""

    def close(self, key: str, ours: Any, expected: np.ndarray, atol: float, rtol: float = 0.0) -> None:
        """Max |ours - expected| on the finite entries; the non-finite pattern (and values) must match exactly."""
        ours = _numpy(ours)
        expected = np.asarray(expected)
        if ours.size != expected.size:
            self.append((f"{key} (shape {ours.shape} vs {expected.shape})", float("inf"), atol))
            return
        ours = ours.astype(np.float64).reshape(expected.shape)
        expected = expected.astype(np.float64)
        finite = np.isfinite(expected)
        if not finite.all():
            same = (np.isfinite(ours) == finite) & ((ours == expected) | finite)
            self.append((f"{key}:non-finite", float((~same).sum()), 0.0))
        error = np.abs(ours[finite] - expected[finite])
        scale = float(np.abs(expected[finite]).max()) if finite.any() else 0.0
        self.append((key, float(error.max()) if error.size else 0.0, atol + rtol * scale))

    def missing(self, key: str, atol: float) -> None:
        """An expected output our code did not produce."""
        self.append((f"{key} (not produced)", float("inf"), atol))

    def exact(self, key: str, ours: Any, expected: np.ndarray) -> None:
        """Number of differing entries (inf when the shapes differ)."""
        ours, expected = _numpy(ours), np.asarray(expected)
        if ours.shape != expected.shape:
            self.append((f"{key} (shape {ours.shape} vs {expected.shape})", float("inf"), 0.0))
            return
        self.append((key, float((ours != expected).sum()), 0.0))

    def same_set(
        self, key: str, ours: Any, expected: np.ndarray, exempt: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> None:
        """Rows compared as sets: the number of rows in only one of them (`exempt` marks rows allowed to differ)."""
        ours, expected = _numpy(ours), np.asarray(expected)
        ours_set = {tuple(row) for row in ours.reshape(len(ours), -1).tolist()}
        theirs = {tuple(row) for row in expected.reshape(len(expected), -1).tolist()}
        differing = np.array(sorted(ours_set ^ theirs), dtype=np.int64).reshape(-1, expected.shape[1])
        if exempt is not None and len(differing):
            differing = differing[~exempt(differing)]
        self.append((key, float(len(differing)), 0.0))


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _tensors(npz: np.lib.npyio.NpzFile, prefix: str = "") -> dict[str, torch.Tensor]:
    """The arrays of `npz` whose key starts with `prefix`, prefix removed, as tensors."""
    return {key[len(prefix) :]: torch.from_numpy(npz[key]) for key in npz.files if key.startswith(prefix)}


def _readme(folder: Path) -> str:
    path = folder / "README.md"
    return path.read_text() if path.is_file() else ""


@contextlib.contextmanager
def readme_threads(folder: Path) -> Iterator[None]:
    """Run with the intra-op thread count the README says the fixture was made with (summation order), if any."""
    text = _readme(folder)
    match = re.search(r"set_num_threads\((\d+)\)", text) or re.search(r"\b(\d+) threads?\b", text)
    threads = torch.get_num_threads()
    if match:
        torch.set_num_threads(int(match.group(1)))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def readme_seed(folder: Path) -> int | None:
    """The `torch.manual_seed(N)` before the official noise draw, as the README gives it."""
    match = re.search(r"manual_seed\((\d+)\)", _readme(folder))
    return int(match.group(1)) if match else None


def readme_cfg(folder: Path) -> tuple[float, tuple[float, float]] | None:
    """CFG strength and interval of the official call, as the README gives them ("strength 2.0 interval [0,500]")."""
    text = _readme(folder)
    strength = re.search(r"strength\s*=?\s*([0-9.]+)", text)
    interval = re.search(r"interval\s*=?\s*\[\s*([0-9.]+)\s*,\s*([0-9.]+)\s*\]", text)
    if not (strength and interval):
        return None
    return float(strength.group(1)), (float(interval.group(1)), float(interval.group(2)))


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FixtureError(f"{path}: checkpoint not found")
    return torch.load(path, map_location="cpu", weights_only=True)


def _pipeline_yaml(folder: Path) -> Path | None:
    """The pipeline.yaml holding slat_mean/slat_std: in the component or set folder, or the fixtures' configs_used."""
    for candidate in (folder, folder.parent, folder.parent.parent / "configs_used"):
        if (candidate / "pipeline.yaml").is_file():
            return candidate / "pipeline.yaml"
    return None


# --- condition embedder -------------------------------------------------------------------------------------------

EMBEDDER_PREFIX = "_base_models.condition_embedder."


def embedder_checkpoint(folder: Path) -> Path:
    """The generator checkpoint holding this embedder's weights: the sibling whose config embeds the same backbone
    (ss-style: ../ss_generator, slat-style: ../slat_generator), else the one the README names."""
    config = yaml.safe_load((folder / "config.yaml").read_text())
    for sibling in sorted(folder.parent.iterdir()):
        if sibling == folder or not (sibling / "config.yaml").is_file():
            continue
        other = yaml.safe_load((sibling / "config.yaml").read_text())
        backbone = (other or {}).get("module", {}).get("condition_embedder", {}).get("backbone")
        if backbone == config and list(sibling.glob("*.ckpt")):
            return next(iter(sorted(sibling.glob("*.ckpt"))))
    match = re.search(r"\.\./(\w+)/(\w+\.ckpt)", _readme(folder))
    if match and (folder.parent / match.group(1) / match.group(2)).is_file():
        return folder.parent / match.group(1) / match.group(2)
    raise FixtureError(f"{folder}: no generator checkpoint with this condition embedder next to it")


def embedder_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """The `_base_models.condition_embedder.*` entries of a generator checkpoint, prefix stripped."""
    state = _load_state(ckpt)["state_dict"]
    return {key.removeprefix(EMBEDDER_PREFIX): value for key, value in state.items() if key.startswith(EMBEDDER_PREFIX)}


def condition_embedder_rows(folder: Path) -> Rows:
    """Tokens of the fuser plus each input's raw embedder output and projection (atol 1e-4)."""
    from models.sam3d_objects.condition_embedder import build_condition_embedder

    model = build_condition_embedder(folder / "config.yaml").eval()
    model.load_state_dict(embedder_state(embedder_checkpoint(folder)), strict=True)
    inputs = _tensors(np.load(folder / "inputs.npz"))
    expected = np.load(folder / "expected.npz")
    with readme_threads(folder), torch.no_grad():
        actual = {"tokens": model(**inputs)}
        for spec in model.inputs:
            raw = model.module_list[spec.embedder](inputs[spec.name])
            actual[f"raw.{spec.name}"] = raw
            actual[f"proj.{spec.name}"] = model.projection_nets[spec.embedder](raw)
    rows = Rows()
    for key in expected.files:
        if key in actual:
            rows.close(key, actual[key], expected[key], TOL_FORWARD)
        else:
            rows.missing(key, TOL_FORWARD)
    return rows


# --- MoGe -----------------------------------------------------------------------------------------------------------


def moge_image(folder: Path) -> torch.Tensor:
    """input.png as SAM 3D Objects' `image_to_float` makes it: (3, H, W) float32 in [0, 1]."""
    pixels = np.array(Image.open(folder / "input.png").convert("RGB"))
    return torch.from_numpy((pixels / 255).astype(np.float32)).permute(2, 0, 1).contiguous()


def moge_calls(expected: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """The recorded `infer` calls (key prefix -> kwargs besides use_fp16=False), as the README lists them."""
    calls: dict[str, dict[str, Any]] = {}
    for key in list(expected):
        prefix = key.split("_", 1)[0]
        if prefix in calls or f"{prefix}_points" not in expected:
            continue
        if prefix == "default":
            calls[prefix] = {}
        elif prefix == "sam3d":
            calls[prefix] = {"force_projection": False}
        elif prefix == "debug":
            calls[prefix] = {"num_tokens": int(expected["debug_num_tokens"]), "force_projection": False}
        elif match := re.fullmatch(r"fovx(\d+(?:\.\d+)?)", prefix):
            calls[prefix] = {"fov_x": float(match.group(1)), "force_projection": False}
    return calls


def moge_solver_rows(expected: Mapping[str, np.ndarray]) -> Rows:
    """The focal/shift solver replayed on the official float32 arrays (`*_solver_uv`/`_xyz`)."""
    from models.sam3d_objects.moge_geometry import solve_optimal_focal_shift, solve_optimal_shift

    rows = Rows()
    for key in list(expected):
        if not key.endswith("_solver_uv"):
            continue
        prefix = key.removesuffix("_solver_uv")
        uv, xyz = expected[key], expected[f"{prefix}_solver_xyz"]
        if f"{prefix}_solver_in_focal" in expected:
            shift = solve_optimal_shift(uv, xyz, expected[f"{prefix}_solver_in_focal"])
        else:
            shift, focal = solve_optimal_focal_shift(uv, xyz)
            rows.close(
                f"{prefix}_solver_out_focal (official inputs)",
                focal,
                expected[f"{prefix}_solver_out_focal"],
                MOGE_FOCAL_SHIFT,
            )
        rows.close(
            f"{prefix}_solver_out_shift (official inputs)",
            shift,
            expected[f"{prefix}_solver_out_shift"],
            MOGE_FOCAL_SHIFT,
        )
    return rows


@contextlib.contextmanager
def _moge_recorder(model: Any, record: dict[str, Any], cache: dict[int, Any] | None = None) -> Iterator[None]:
    """Copies the intermediate values the fixture stores, under the fixture's names, while `model.infer` runs.

    With `cache`, calls with a token count already run reuse that network output (the forward is deterministic and
    the official calls differ only after it), so only their post-processing runs again."""
    import torch.nn.functional as F

    import models.sam3d_objects.moge as moge_module
    import models.sam3d_objects.moge_geometry as geometry

    restore: list[Callable[[], None]] = []

    def patch(owner: Any, name: str, wrapper: Callable[[Callable], Callable]) -> None:
        """Wraps a module function (restored afterwards) or shadows a bound method on the instance (then removed)."""
        original = getattr(owner, name)
        if name in vars(owner):
            restore.append(lambda: setattr(owner, name, original))
        else:
            restore.append(lambda: delattr(owner, name))
        setattr(owner, name, wrapper(original))

    def interpolate(original: Callable) -> Callable:
        def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
            out = original(*args, **kwargs)
            count = sum(key.startswith("interp_") for key in record)
            record[f"interp_{count:02d}_{kwargs.get('mode', 'nearest')}"] = out
            return out

        return wrapped

    def forward(original: Callable) -> Callable:
        def wrapped(image: torch.Tensor, num_tokens: int) -> dict[str, torch.Tensor]:
            record["num_tokens"] = num_tokens
            out = cache[num_tokens] if cache is not None and num_tokens in cache else original(image, num_tokens)
            if cache is not None:
                cache[num_tokens] = out
            record["forward_points"], record["forward_mask"] = out["points"], out["mask"]
            return out

        return wrapped

    def features(original: Callable) -> Callable:
        def wrapped(image_14: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
            record["image_14_shape"] = np.array(image_14.shape)
            out = original(image_14)
            for i, (patch_tokens, cls_token) in enumerate(out):
                record[f"feat_patch_{i}"], record[f"feat_cls_{i}"] = patch_tokens, cls_token
            return out

        return wrapped

    def store(name: str) -> Callable[[Callable], Callable]:
        def wrapper(original: Callable) -> Callable:
            def wrapped(*args: Any, **kwargs: Any) -> Any:
                out = original(*args, **kwargs)
                record[name] = out
                return out

            return wrapped

        return wrapper

    def store_input(name: str) -> Callable[[Callable], Callable]:
        def wrapper(original: Callable) -> Callable:
            def wrapped(points: torch.Tensor) -> torch.Tensor:
                record[name] = points
                return original(points)

            return wrapped

        return wrapper

    def solver(original: Callable) -> Callable:
        def wrapped(uv: np.ndarray, xyz: np.ndarray, *focal: Any) -> Any:
            record["solver_uv"], record["solver_xyz"] = uv, xyz
            out = original(uv, xyz, *focal)
            if focal:
                record["solver_in_focal"], record["solver_out_shift"] = focal[0], out
            else:
                record["solver_out_shift"], record["solver_out_focal"] = out
            return out

        return wrapped

    def recover(original: Callable) -> Callable:
        def wrapped(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            record["rfs_focal"], record["rfs_shift"] = out = original(*args, **kwargs)
            return out

        return wrapped

    patch(F, "interpolate", interpolate)
    patch(model, "forward", forward)
    patch(model, "intermediate_features", features)
    patch(model, "remap_points", store_input("forward_points_preremap"))
    patch(model.backbone, "prepare_tokens", store("bb_tokens_in"))
    patch(geometry, "solve_optimal_focal_shift", solver)
    patch(geometry, "solve_optimal_shift", solver)
    patch(moge_module, "recover_focal_shift", recover)

    def hook(name: str) -> Callable:
        return lambda _module, _inputs, output: record.__setitem__(name, output)

    head = model.head
    modules = {"bb_patch_embed_out": model.backbone.patch_embed}
    modules |= {f"bb_block_{i:02d}_out": block for i, block in enumerate(model.backbone.blocks)}
    modules |= {f"head_project_{i}_out": proj for i, proj in enumerate(head.projects)}
    for i, block in enumerate(head.upsample_blocks):
        modules |= {f"head_up_{i}_{j}_out": layer for j, layer in enumerate(block)}
    modules |= {f"head_output_block_{i}_out": block for i, block in enumerate(head.output_block)}
    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    handles += [
        block.register_forward_pre_hook(lambda _m, inputs, name=f"head_up_{i}_in": record.__setitem__(name, inputs[0]))
        for i, block in enumerate(head.upsample_blocks)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for undo in reversed(restore):
            undo()


def _moge_tolerance(name: str) -> tuple[float, float]:
    """(atol, rtol) of one MoGe output, as the fixture README suggests."""
    if name.endswith(("focal", "shift")):
        return MOGE_FOCAL_SHIFT, 0.0
    if name.endswith("intrinsics"):
        return MOGE_INTRINSICS, 0.0
    return TOL_FORWARD, MOGE_RTOL


def moge_rows(folder: Path) -> Rows:
    """Every `infer` call of the fixture (outputs, forward outputs, features, every recorded stage, solver inputs
    and results), and the solver replayed on the official arrays. Calls with the same token count (sam3d, default,
    fovx60) share one network run; their expected values beyond it are only the post-processed outputs."""
    from models.sam3d_objects.moge import load_moge

    expected = np.load(folder / "expected.npz")
    meta = json.loads(str(expected["meta_json"])) if "meta_json" in expected else {}
    duplicates = {k: v for k, v in meta.get("dropped_duplicates", {}).items() if v in expected}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # legacy output_mask/split_head keys, as in the official loader
        model = load_moge(folder / "model.pt")
    image = moge_image(folder)
    rows = Rows()
    rows.close("input_image", image, expected["input_image"], 0.0)
    skipped = []
    forward_cache: dict[int, Any] = {}
    with readme_threads(folder):
        for prefix, kwargs in moge_calls(expected).items():
            record: dict[str, Any] = {}
            with _moge_recorder(model, record, forward_cache):
                record |= model.infer(image, use_fp16=False, **kwargs)
            names = {key.removeprefix(f"{prefix}_") for key in [*expected, *duplicates] if key.startswith(f"{prefix}_")}
            for name in sorted(names):
                key = f"{prefix}_{name}"
                reference = expected[duplicates.get(key, key)]
                if name not in record:
                    skipped.append(key)
                elif reference.dtype == bool or np.issubdtype(reference.dtype, np.integer):
                    rows.exact(key, np.asarray(_numpy(record[name])).reshape(reference.shape), reference)
                else:
                    rows.close(key, record[name], reference, *_moge_tolerance(name))
    rows.extend(moge_solver_rows(expected))
    if skipped:
        print(f"moge: not produced by our code, not compared: {', '.join(skipped)}")
    return rows


# --- sparse-structure flow (ss_generator) --------------------------------------------------------------------------


def ss_noise_rows(folder: Path) -> Rows:
    """Our noise draw after the README's seed against the official `x0.*` (exact), when the README gives a seed."""
    from models.sam3d_objects.flow_sampler import draw_noise

    rows = Rows()
    seed = readme_seed(folder)
    if seed is None:
        return rows
    x0 = np.load(folder / "expected_sampling.npz")
    shapes = {key.removeprefix("x0."): x0[key].shape for key in x0.files if key.startswith("x0.")}
    torch.manual_seed(seed)
    for name, noise in sorted(draw_noise(shapes).items()):
        rows.exact(f"x0.{name} (seed {seed})", noise, x0[f"x0.{name}"])
    return rows


def ss_generator_rows(folder: Path) -> Rows:
    """Velocity net (cond / uncond / CFG), the CFG and shortcut sampling runs from the official noise, the draw."""
    from models.sam3d_objects.flow_sampler import FlowSampler, guided_velocity
    from models.sam3d_objects.structure_flow import build_structure_flow, load_generator_config, velocity_state_dict

    config = load_generator_config(folder / "config.yaml")
    net = build_structure_flow(config["reverse_fn"]["backbone"]).eval()
    net.load_state_dict(velocity_state_dict(_load_state(folder / "ss_generator.ckpt")["state_dict"]), strict=True)
    inputs = np.load(folder / "inputs.npz")
    cond = torch.from_numpy(inputs["cond"])
    rows = Rows()
    with readme_threads(folder), torch.no_grad():
        if (folder / "expected_forward.npz").is_file():
            expected = np.load(folder / "expected_forward.npz")
            sampler = FlowSampler.from_config(config)  # CFG strength and interval of the config's reverse_fn
            x = _tensors(inputs, "x.")
            t, d = torch.from_numpy(inputs["t"]), torch.from_numpy(inputs["d"])
            outputs = {
                "v_cond.": net(x, t, cond, d),
                "v_uncond.": net(x, t, cond, d, unconditional=True),
                "v_cfg.": guided_velocity(net, x, t, cond, d, sampler.cfg_strength, sampler.cfg_interval),
            }
            for prefix, velocities in outputs.items():
                for name in sorted(x):
                    rows.close(prefix + name, velocities[name], expected[prefix + name], TOL_FORWARD)
        if (folder / "expected_sampling.npz").is_file():
            expected = np.load(folder / "expected_sampling.npz")
            steps = len(expected["t_seq"]) - 1
            # Pipeline default use_stage1_distillation=False: plain flow (d = 0) with the config's CFG.
            sampler = FlowSampler.from_config(config, steps=steps, no_shortcut=True)
            rows.close("t_seq", sampler.time_sequence(), expected["t_seq"], 1e-7)
            x0 = _tensors(expected, "x0.")
            rows.extend(ss_noise_rows(folder))
            for i, x in enumerate(sampler.sample_iter(net, x0, cond)):
                for name in sorted(x):
                    rows.close(f"step{i}.{name}", x[name], expected[f"step{i}.{name}"], TOL_SAMPLE)
            if "shortcut.d" in expected.files:
                shortcut = FlowSampler.from_config(config, steps=steps, no_shortcut=False, cfg_strength=0.0)
                rows.close("shortcut.d", 1 / shortcut.steps, expected["shortcut.d"], 1e-12)
                final = shortcut.sample(net, _tensors(expected, "shortcut.x0."), cond)
                for name in sorted(final):
                    rows.close(f"shortcut.final.{name}", final[name], expected[f"shortcut.final.{name}"], TOL_SAMPLE)
    return rows


# --- sparse-structure decoder --------------------------------------------------------------------------------------


def ss_decoder_rows(folder: Path) -> Rows:
    """Logits of the generator's shape tokens (reshaped as the pipeline does) and the occupied coords.

    Coords are compared as sets; voxels with |official logit| < 1e-4 may differ (README)."""
    from models.sam3d_objects.sparse_structure_decoder import SparseStructureDecoder, occupied_coords

    model = SparseStructureDecoder.from_config(folder / "config.yaml").eval()
    model.load_state_dict(_load_state(folder / "ss_decoder.ckpt"), strict=True)
    inputs = np.load(folder / "inputs.npz")
    expected = np.load(folder / "expected.npz")
    rows = Rows()
    x = SparseStructureDecoder.flat_to_cube(torch.from_numpy(inputs["shape_latent_tokens"]))
    rows.exact("x (tokens reshaped)", x, inputs["x"])
    with readme_threads(folder), torch.no_grad():
        logits = model(x)
    rows.close("logits", logits, expected["logits"], TOL_FORWARD)
    reference = expected["logits"]

    def near_zero(coords: np.ndarray) -> np.ndarray:
        b, i, j, k = coords.T
        return np.abs(reference[b, 0, i, j, k]) < TOL_FORWARD

    rows.same_set("coords", occupied_coords(logits), expected["coords"], exempt=near_zero)
    return rows


# --- structured-latent flow (slat_generator) -----------------------------------------------------------------------


def slat_generator_rows(folder: Path) -> Rows:
    """Sparse velocity net (cond / uncond / CFG), the noise draw, the CFG sampling run and the de-normalisation."""
    from models.sam3d_objects.flow_sampler import FlowSampler, guided_velocity
    from models.sam3d_objects.latent_flow import (
        FixedCoordsVelocity,
        build_slat_flow,
        denormalize_slat,
        sample_slat_iter,
    )
    from models.sam3d_objects.structure_flow import load_generator_config, velocity_state_dict

    config = load_generator_config(folder / "config.yaml")
    net = build_slat_flow(config["reverse_fn"]["backbone"]).eval()
    net.load_state_dict(velocity_state_dict(_load_state(folder / "slat_generator.ckpt")["state_dict"]), strict=True)
    # The pipeline's CFG settings (the config's reverse_fn has strength 0): the README gives the official call's.
    cfg = readme_cfg(folder)
    if cfg is None:
        raise FixtureError(f"{folder}: README gives no CFG strength / interval")
    strength, interval = cfg
    inputs = np.load(folder / "inputs.npz")
    expected = np.load(folder / "expected.npz")
    x, t, cond = (torch.from_numpy(inputs[k]) for k in ("x", "t", "cond"))
    coords = inputs["coords"]
    rows = Rows()
    with readme_threads(folder), torch.no_grad():
        rows.close("v_cond", net(x, t, cond, coords), expected["v_cond"], TOL_FORWARD)
        rows.close("v_uncond", net(x, t, cond, coords, unconditional=True), expected["v_uncond"], TOL_FORWARD)
        v_cfg = guided_velocity(FixedCoordsVelocity(net, coords), {"feats": x}, t, cond, None, strength, interval)
        rows.close("v_cfg", v_cfg["feats"], expected["v_cfg"], TOL_FORWARD)
        x0 = torch.from_numpy(expected["x0"])
        seed = readme_seed(folder)
        if seed is not None:
            torch.manual_seed(seed)
            rows.exact(f"x0 (seed {seed})", torch.randn(x0.shape), expected["x0"])
        sampler = FlowSampler.from_config(
            config, steps=len(expected["t_seq"]) - 1, cfg_strength=strength, cfg_interval=interval
        )
        rows.close("t_seq", sampler.time_sequence(), expected["t_seq"], 1e-6)
        steps = list(sample_slat_iter(net, sampler, x0, cond, coords))
    for i, step in enumerate(steps):
        rows.close(f"step{i}", step, expected[f"step{i}"], TOL_SAMPLE)
    rows.close("final", steps[-1], expected["final"], TOL_SAMPLE)
    pipeline = _pipeline_yaml(folder)
    if pipeline is None:
        print(f"{folder}: no pipeline.yaml (slat_mean/slat_std) found, slat_feats_denorm not compared")
    else:
        settings = yaml.safe_load(pipeline.read_text())
        mean, std = (torch.tensor(settings[k], dtype=torch.float32) for k in ("slat_mean", "slat_std"))
        rows.close(
            "slat_feats_denorm", denormalize_slat(steps[-1][0], mean, std), expected["slat_feats_denorm"], TOL_SAMPLE
        )
    return rows


# --- structured-latent decoders ------------------------------------------------------------------------------------

GAUSSIAN_FIELDS = ("_xyz", "_features_dc", "_scaling", "_rotation", "_opacity")
GAUSSIAN_ACTIVATED = ("get_xyz", "get_scaling", "get_rotation", "get_opacity")


def _sparse_inputs(folder: Path) -> Any:
    from models.sam3d_objects.sparse_attention import SparseVoxels

    inputs = np.load(folder / "inputs.npz")
    return SparseVoxels(torch.from_numpy(inputs["coords"]), torch.from_numpy(inputs["feats"]))


def ply_rows(ours: bytes, theirs: bytes, atol: float = TOL_PLY) -> Rows:
    """A binary float32 PLY: header exact, then one row per property group (xyz, normals, f_dc, opacity, ...)."""
    rows = Rows()
    marker = b"end_header\n"
    split = theirs.index(marker) + len(marker)
    header = theirs[:split].decode("ascii")
    rows.append(("ply:header", float(ours[:split] != theirs[:split]), 0.0))
    names = re.findall(r"property float (\w+)", header)
    if len(ours) != len(theirs):
        rows.append((f"ply:bytes ({len(ours)} vs {len(theirs)})", float("inf"), 0.0))
        return rows
    ours_table = np.frombuffer(ours[split:], dtype="<f4").reshape(-1, len(names))
    theirs_table = np.frombuffer(theirs[split:], dtype="<f4").reshape(-1, len(names))
    groups: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        group = {"x": "xyz", "y": "xyz", "z": "xyz", "nx": "normal", "ny": "normal", "nz": "normal"}.get(name)
        groups.setdefault(group or re.sub(r"_\d+$", "", name), []).append(index)
    for group, columns in groups.items():
        rows.close(f"ply:{group}", ours_table[:, columns], theirs_table[:, columns], atol)
    return rows


def slat_decoder_gs_rows(folder: Path) -> Rows:
    """Raw and activated Gaussian fields, the Hammersley offsets our constructor computes, and the PLY file."""
    from models.sam3d_objects.gaussian_decoder import SLatGaussianDecoder, gaussians_ply

    model = SLatGaussianDecoder.from_config(folder / "config.yaml").eval()
    expected = np.load(folder / "expected.npz")
    rows = Rows()
    if "offset_perturbation" in expected.files:
        rows.close(
            "offset_perturbation", model.offset_perturbation.clone(), expected["offset_perturbation"], TOL_FORWARD
        )
    model.load_state_dict(_load_state(folder / "slat_decoder_gs.ckpt"), strict=True)
    with readme_threads(folder), torch.no_grad():
        (gaussians,) = model(_sparse_inputs(folder))
    for name in GAUSSIAN_FIELDS + GAUSSIAN_ACTIVATED:
        if name in expected.files:
            rows.close(name, getattr(gaussians, name), expected[name], TOL_FORWARD)
    if (folder / "expected_gaussians.ply").is_file():
        rows.extend(ply_rows(gaussians_ply(gaussians), (folder / "expected_gaussians.ply").read_bytes()))
    return rows


def slat_decoder_mesh_rows(folder: Path) -> Rows:
    """Features entering FlexiCubes (coords exact), the mesh (faces as a set, exact), vertex colour/normal channels,
    and the face-normal formula on the official vertices (noise on near-degenerate faces would swamp ours)."""
    from models.sam3d_objects.mesh_decoder import MeshExtractResult, SLatMeshDecoder

    model = SLatMeshDecoder.from_config(folder / "config.yaml").eval()
    model.load_state_dict(_load_state(folder / "slat_decoder_mesh.ckpt"), strict=True)
    expected = np.load(folder / "expected.npz")
    with readme_threads(folder), torch.no_grad():
        features = model.features(_sparse_inputs(folder))
        mesh = model.mesh_extractor(features.coords[:, 1:], features.feats)
    rows = Rows()
    rows.exact("out_layer_coords", features.coords, expected["out_layer_coords"])
    rows.close("out_layer_feats", features.feats, expected["out_layer_feats"], TOL_FORWARD)
    rows.close("vertices", mesh.vertices, expected["vertices"], TOL_FORWARD)
    rows.same_set("faces", mesh.faces, expected["faces"])
    if "vertex_attrs" not in expected.files:
        pass
    elif mesh.vertex_attrs is None:
        rows.missing("vertex_attrs", TOL_FORWARD)
    else:
        rows.close("vertex_attrs", mesh.vertex_attrs, expected["vertex_attrs"], TOL_FORWARD)
    official = MeshExtractResult(
        torch.from_numpy(expected["vertices"]), torch.from_numpy(expected["faces"]), None, mesh.res
    )
    rows.close("face_normal (official vertices)", official.face_normal, expected["face_normal"], FACE_NORMAL_TOL)
    return rows


# --- the set -------------------------------------------------------------------------------------------------------

COMPONENTS: dict[str, Callable[[Path], Rows]] = {
    "condition_embedder": condition_embedder_rows,
    "moge": moge_rows,
    "ss_generator": ss_generator_rows,
    "ss_decoder": ss_decoder_rows,
    "slat_generator": slat_generator_rows,
    "slat_decoder_gs": slat_decoder_gs_rows,
    "slat_decoder_mesh": slat_decoder_mesh_rows,
}


def components_in(folder: Path) -> list[str]:
    """The known component subfolders present in a set folder, in pipeline order."""
    return [name for name in COMPONENTS if (folder / name).is_dir()]


def run_sam3d_objects(folder: Path) -> list[Row]:
    """Rows of every component present, keys prefixed with the component's name."""
    rows: list[Row] = []
    for name in components_in(folder):
        rows.extend((f"{name}/{key}", error, tol) for key, error, tol in COMPONENTS[name](folder / name))
    return rows


def assert_within_tolerance(rows: list[Row]) -> None:
    """Prints the rows and fails listing those above their tolerance (for the component tests)."""
    for key, error, tol in rows:
        print(f"{'ok  ' if error <= tol else 'FAIL'} {key}: {error:.3e} (tol {tol:.0e})")
    failed = {key: error for key, error, tol in rows if not error <= tol}
    assert rows and not failed, failed
