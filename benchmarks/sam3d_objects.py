"""SAM 3D Objects benchmark: `python -m benchmarks.sam3d_objects [--weights-dir weights]`.

Each heavy measure runs in its own subprocess (`--part NAME`), so each has its own peak RSS; the parent
collects their JSON. Speed is reported as ratios within one run (these machines are noisy), never asserted.

  (a) `--part small`: end to end through `Sam3DObjectsPredictor` (pointmap + reconstruct) with the "quality"
      and "fast" presets: median seconds per stage after a warm-up, peak memory, fast / quality. Without
      --weights-dir this is the tiny seeded random release (random_checkpoint.write_random_snapshot, whose
      pipeline.yaml sets 4 steps per flow stage) on CPU in fp32, a few seconds in all. With --weights-dir
      (weights/sam-3d-objects/checkpoints + weights/moge/model.pt) it is the real release, on CUDA in bf16
      when there is one: the full-size seconds per object.
  (b) `--part params`: the full-size networks built from the release's yamls with meta parameters; their
      sizes (checked against the manifests of the official checkpoints) and the bytes of the weights the server
      holds in bf16 (matrices 2 bytes, the 1-D tensors our loader keeps in fp32 4 bytes) next to the official
      pipeline's all-fp32 load.
  (c) `--part geometry`: one full-size geometry-flow (ss_generator velocity net) forward on CPU in fp32, random
      weights, 518-px condition tokens; against the official code's time recorded by the fixture author.
  (d) `--part decoders`: the full-size Gaussian and mesh decoders on CPU in fp32, random weights, on a spherical
      shell of voxels (a surface, as the pruned structure is).
  (e) computed: the peak a GPU holding every stage needs in bf16, against a 24 GB card.

Results go to benchmarks/results/sam3d_objects.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS, SHARED, device_name

FIXTURES = SHARED / "fixtures" / "sam3d_objects"
RELEASE_CONFIGS = FIXTURES / "configs_used"
MANIFESTS = FIXTURES / "manifests"
OFFICIAL_TIMING = FIXTURES / "ss_generator_cpu_timing.json"
HEIGHT, WIDTH = 240, 320
SEED = 0
GB = 1e9
GIB = 2**30
STRUCTURE_CAP = 42_000  # official downsample_sparse_structure's max_coords
CARD_BYTES = 24 * GB
# 518-px release config: 4 DINOv2 streams of 1 + 4 + 37² tokens, 2 pointmap streams of 32² tokens.
COND_TOKENS = 4 * 1370 + 2 * 1024
COND_CHANNELS = 1024
SHELL_RADIUS = 24.0
GRID = 64
MESH_RESOLUTION = 64  # the likely released value (PIPELINE.md §0/§9); the kpfeifer yaml says 96
# Bytes in ss_generator.ckpt that no loaded key explains (manifests/ss_generator.json size_check).
SS_GENERATOR_EXTRA_BYTES = 295_568_176
PARTS = ("small", "params", "geometry", "decoders")


# --------------------------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    """Current resident set size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux `clear_refs` 5); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return peak_rss_bytes() <= rss_bytes() + (64 << 20)


def gib(n: float) -> float:
    return round(n / GIB, 2)


# --------------------------------------------------------------------------------------------- (a) small


def picture() -> tuple[np.ndarray, np.ndarray]:
    """A seeded image (soft gradient, mild noise, a shaded disc) and the disc as the object mask."""
    rng = np.random.default_rng(SEED)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    image = np.stack([x / WIDTH, y / HEIGHT, 0.5 * np.ones_like(x)], axis=-1) * 160 + 40
    cy, cx, r = HEIGHT * 0.55, WIDTH * 0.5, HEIGHT * 0.3
    disc = (y - cy) ** 2 + (x - cx) ** 2 < r**2
    shade = np.clip(1.2 - ((y - cy + r / 2) ** 2 + (x - cx + r / 2) ** 2) / (2 * r * r), 0.2, 1.0)
    image[disc] = np.array([200, 60, 50], np.float32) * shade[disc, None]
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), disc


def part_small(args: argparse.Namespace) -> dict:
    from models.sam3d_objects.checkpoint import load_sam3d_objects
    from models.sam3d_objects.predictor import PRESETS, Sam3DObjectsPredictor
    from models.sam3d_objects.random_checkpoint import write_random_snapshot

    torch.manual_seed(SEED)
    cuda = torch.cuda.is_available()
    real = args.weights_dir is not None
    device, dtype = ("cuda", torch.bfloat16) if cuda and real else ("cpu", torch.float32)
    with tempfile.TemporaryDirectory(prefix="sam3d-objects-bench-") as tmp:
        if real:
            checkpoints = args.weights_dir / "sam-3d-objects" / "checkpoints"
            moge = args.weights_dir / "moge" / "model.pt"
            what = f"real weights in {args.weights_dir}"
        else:
            checkpoints, moge = write_random_snapshot(Path(tmp), seed=SEED)
            what = "tiny seeded random release (random_checkpoint.write_random_snapshot)"
        begin = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # MoGe's legacy model_config keys
            models = load_sam3d_objects(checkpoints, moge, device, dtype)
        load_s = time.perf_counter() - begin
    predictor = Sam3DObjectsPredictor(models)
    params = sum(
        p.numel() for name, m in vars(models).items() if isinstance(m, torch.nn.Module) for p in m.parameters()
    )
    image, mask = picture()
    plans = {name: predictor.resolve(PRESETS[name]) for name in ("quality", "fast")}

    def one_round() -> dict:
        begin = time.perf_counter()
        pointmap = predictor.pointmap(image)
        if cuda and real:
            torch.cuda.synchronize()
        out = {"pointmap": {"total": time.perf_counter() - begin}}
        for name, plan in plans.items():
            begin = time.perf_counter()
            result = predictor.reconstruct(image, mask, pointmap, seed=SEED, plan=plan)
            out[name] = {**result.seconds, "total": time.perf_counter() - begin, "voxels": len(result.voxels)}
            out[name]["gaussians_n"] = int(result.gaussians._xyz.shape[0])
            out[name]["mesh_faces"] = int(result.mesh.faces.shape[0])
        return out

    one_round()  # warm-up
    rounds = [one_round() for _ in range(args.repeats)]
    stages: dict[str, dict] = {}
    for key in ("pointmap", "quality", "fast"):
        stages[key] = {
            stage: round(statistics.median(r[key][stage] for r in rounds), 4)
            if isinstance(rounds[0][key][stage], float)
            else rounds[-1][key][stage]
            for stage in rounds[0][key]
        }
    s = models.settings
    result = {
        "checkpoint": what,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "parameters": params,
        "load_s": round(load_s, 3),
        "image": [HEIGHT, WIDTH],
        "repeats": args.repeats,
        "release_steps": {"geometry": s.ss_steps, "latent": s.slat_steps},
        "plans": {
            name: {
                "geometry_steps": p.geometry_steps,
                "geometry_shortcut": p.geometry_shortcut,
                "latent_steps": p.latent_steps,
            }
            for name, p in plans.items()
        },
        "seconds": stages,
        "fast_over_quality": round(stages["fast"]["total"] / stages["quality"]["total"], 3),
        "peak_rss_gib": gib(peak_rss_bytes()),
    }
    if cuda and real:
        result["peak_cuda_gib"] = gib(torch.cuda.max_memory_allocated())
    return result


# --------------------------------------------------------------------------------------------- (b) params


def release_yamls(root: Path) -> dict[str, Path]:
    names = ("ss_generator", "slat_generator", "ss_decoder", "slat_decoder_gs", "slat_decoder_gs_4")
    return {name: root / f"{name}.yaml" for name in (*names, "slat_decoder_mesh")}


def manifest_totals() -> dict[str, int]:
    """Elements (parameters + stored buffers) per network from the official checkpoints' manifests."""
    totals: dict[str, int] = {}
    for name in ("ss_generator", "slat_generator"):
        keys = json.loads((MANIFESTS / f"{name}.json").read_text())["keys"]
        for part, prefix in (("flow", "_base_models.generator."), ("embedder", "_base_models.condition_embedder.")):
            totals[f"{name}:{part}"] = sum(int(np.prod(v["shape"])) for k, v in keys.items() if k.startswith(prefix))
    for name in ("ss_decoder", "slat_decoder_gs", "slat_decoder_gs_4", "slat_decoder_mesh", "moge_vitl"):
        totals[name] = json.loads((MANIFESTS / f"{name}.json").read_text())["total_numel"]
    return totals


def part_params(args: argparse.Namespace) -> dict:
    from models.sam3d_objects.checkpoint import _storage_dtype, build_modules, parameters_on_meta
    from models.sam3d_objects.gaussian_decoder import SLatGaussianDecoder
    from models.sam3d_objects.moge import MOGE_VITL_CONFIG, MoGeConfig, MoGeModel

    yamls = release_yamls(args.release_configs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # voxel_size 0.5's NaN offsets, MoGe's legacy keys: sizes are unaffected
        modules = build_modules({k: v for k, v in yamls.items() if k != "slat_decoder_gs_4"})
        with parameters_on_meta():
            modules["slat_decoder_gs_4"] = SLatGaussianDecoder.from_config(yamls["slat_decoder_gs_4"])
            modules["moge_vitl"] = MoGeModel(MoGeConfig.from_model_config(dict(MOGE_VITL_CONFIG)))
    expected = manifest_totals()
    rows = {}
    for name, module in modules.items():
        state = module.state_dict()
        numel = sum(t.numel() for t in state.values())
        bf16 = sum(t.numel() * _storage_dtype(t, torch.bfloat16).itemsize for t in state.values())
        fp32_1d = sum(t.numel() for t in state.values() if t.is_floating_point() and t.dim() < 2)
        stored = set(state)
        constants = sum(b.numel() * b.element_size() for n, b in module.named_buffers() if n not in stored)
        rows[name] = {
            "parameters": sum(p.numel() for p in module.parameters()),
            "numel": numel,
            "manifest_numel": expected[name],
            "matches_manifest": numel == expected[name],
            "loaded_by_server": name not in ("slat_decoder_gs_4",),
            "bf16_bytes": bf16,
            "fp32_1d_numel": fp32_1d,
            "fp32_constant_bytes": constants,
            "official_fp32_bytes": 4 * numel,
        }
    served = [r for r in rows.values() if r["loaded_by_server"]]
    served_bytes = sum(r["bf16_bytes"] + r["fp32_constant_bytes"] for r in served)
    official = sum(r["official_fp32_bytes"] for r in rows.values())
    return {
        "configs": str(args.release_configs),
        "networks": rows,
        "all_match_manifest": all(r["matches_manifest"] for r in rows.values()),
        "served_numel": sum(r["numel"] for r in served),
        "served_bf16_bytes": served_bytes,
        "official_fp32_bytes": official,
        "official_fp32_bytes_with_ckpt_extra": official + SS_GENERATOR_EXTRA_BYTES,
    }


# --------------------------------------------------------------------------------------------- (c) geometry


def part_geometry(args: argparse.Namespace) -> dict:
    import yaml

    from models.sam3d_objects.structure_flow import build_structure_flow

    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    config = yaml.safe_load((args.release_configs / "ss_generator.yaml").read_text())
    node = config["module"]["generator"]["backbone"]["reverse_fn"]["backbone"]
    rss_start = rss_bytes()
    begin = time.perf_counter()
    net = build_structure_flow(node).eval().requires_grad_(False)
    build_s = time.perf_counter() - begin
    build_peak = peak_rss_bytes()
    rss_built = rss_bytes()
    reset = reset_peak()
    g = torch.Generator().manual_seed(SEED)
    latents = {
        name: torch.randn(1, latent.token_len, latent.input_layer.in_features, generator=g)
        for name, latent in net.latent_mapping.items()
    }
    cond = torch.randn(1, COND_TOKENS, COND_CHANNELS, generator=g)
    t, d = torch.tensor([500.0]), torch.tensor([0.0])
    with torch.inference_mode():
        begin = time.perf_counter()
        out = net(latents, t, cond, d)
        forward_s = time.perf_counter() - begin
    assert all(bool(torch.isfinite(v).all()) for v in out.values())
    peak = peak_rss_bytes()
    official = json.loads(OFFICIAL_TIMING.read_text())
    return {
        "parameters": sum(p.numel() for p in net.parameters()),
        "numel": sum(v.numel() for v in net.state_dict().values()),
        "threads": torch.get_num_threads(),
        "tokens": {name: latent.token_len for name, latent in net.latent_mapping.items()},
        "cond": [1, COND_TOKENS, COND_CHANNELS],
        "build_s": round(build_s, 2),
        "forward_s": round(forward_s, 2),
        "rss_built_gib": gib(rss_built),
        "rss_before_build_gib": gib(rss_start),
        "build_peak_rss_gib": gib(build_peak),
        "peak_reset_after_build": reset,
        "peak_rss_gib": gib(max(peak, build_peak)),
        "activation_peak_bytes": peak - rss_built,
        "official": {
            "forward_s": official["cond_tokens_518"]["forward_s"],
            "build_s": official["build_s"],
            "max_rss_gib": official["max_rss_GiB"],
            "params": official["params"],
            "recorded_by": "fixture author, same machine type, not in this run (ss_generator_cpu_timing.json)",
        },
        "forward_ours_over_official": round(forward_s / official["cond_tokens_518"]["forward_s"], 3),
        "build_ours_over_official": round(build_s / official["build_s"], 3),
    }


# --------------------------------------------------------------------------------------------- (d) decoders


def shell_coords() -> torch.Tensor:
    """(N, 4) int32 [0, x, y, z]: the voxels of the 64³ grid within half a voxel of a sphere of radius 24."""
    axis = torch.arange(GRID, dtype=torch.float32)
    xyz = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    dist = ((xyz - (GRID - 1) / 2).norm(dim=1) - SHELL_RADIUS).abs()
    chosen = xyz[dist < 0.5].int()
    return torch.cat([torch.zeros(len(chosen), 1, dtype=torch.int32), chosen], dim=1)


def part_decoders(args: argparse.Namespace) -> dict:
    import yaml

    from models.sam3d_objects.gaussian_decoder import SLatGaussianDecoder
    from models.sam3d_objects.mesh_decoder import SLatMeshDecoder
    from models.sam3d_objects.sparse_attention import SparseVoxels

    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    gs_config = yaml.safe_load((args.release_configs / "slat_decoder_gs.yaml").read_text())
    yaml_voxel_size = gs_config["representation_config"]["voxel_size"]
    if yaml_voxel_size < 1:  # 0.5 gives NaN offsets (PIPELINE.md §0); the release (= TRELLIS) has 1.5
        gs_config["representation_config"]["voxel_size"] = 1.5
    mesh_config = yaml.safe_load((args.release_configs / "slat_decoder_mesh.yaml").read_text())
    yaml_resolution = mesh_config["resolution"]
    mesh_config["resolution"] = MESH_RESOLUTION
    begin = time.perf_counter()
    gs = SLatGaussianDecoder.from_config(gs_config).eval().requires_grad_(False)
    mesh = SLatMeshDecoder.from_config(mesh_config).eval().requires_grad_(False)
    build_s = time.perf_counter() - begin
    coords = shell_coords()
    slat = SparseVoxels(coords, torch.randn(len(coords), 8, generator=torch.Generator().manual_seed(SEED)))
    result: dict = {
        "voxels": len(coords),
        "shell_radius": SHELL_RADIUS,
        "gs_voxel_size": gs_config["representation_config"]["voxel_size"],
        "gs_yaml_voxel_size": yaml_voxel_size,
        "mesh_resolution": MESH_RESOLUTION,
        "mesh_yaml_resolution": yaml_resolution,
        "threads": torch.get_num_threads(),
        "build_s": round(build_s, 2),
        "parameters": {
            "gaussians": sum(p.numel() for p in gs.parameters()),
            "mesh": sum(p.numel() for p in mesh.parameters()),
        },
        "rss_built_gib": gib(rss_bytes()),
    }
    with torch.inference_mode():
        for name, decoder in (("gaussians", gs), ("mesh", mesh)):
            base = rss_bytes()  # the pipeline keeps the Gaussians while the mesh decodes: so does this
            reset = reset_peak()
            begin = time.perf_counter()
            out = decoder(slat)[0]
            seconds = time.perf_counter() - begin
            row = {
                "seconds": round(seconds, 2),
                "activation_peak_bytes": peak_rss_bytes() - base,
                "peak_reset": reset,
            }
            if name == "gaussians":
                row["gaussians"] = int(out._xyz.shape[0])
                kept = out
            else:
                row["vertices"], row["faces"] = int(out.vertices.shape[0]), int(out.faces.shape[0])
            result[name] = row
    del kept
    result["peak_rss_gib"] = gib(peak_rss_bytes())
    return result


# --------------------------------------------------------------------------------------------- (e) plan


def memory_plan(params: dict, geometry: dict | None, decoders: dict | None) -> dict:
    """Weights in bf16 plus the largest activation peak of the stages that run one after another."""
    weights = params["served_bf16_bytes"]
    candidates = {}
    if geometry is not None:
        # Our CFG runs the conditional and unconditional passes one after the other (flow_sampler.guided_velocity),
        # so one pass's activations are live at a time; the official CFG batches both (×2). bf16 halves fp32's.
        fp32 = geometry["activation_peak_bytes"]
        candidates["geometry flow (ours: sequential CFG, ×1 × 0.5 bf16)"] = fp32 * 0.5
        candidates["geometry flow (batched CFG bound: ×2 × 0.5 bf16)"] = fp32 * 2 * 0.5
    if decoders is not None:
        # Kept at the measured fp32 (conservative: the mesh extraction stays fp32 under autocast).
        candidates["Gaussian decoder (fp32 as measured)"] = decoders["gaussians"]["activation_peak_bytes"]
        candidates["mesh decoder (fp32 as measured)"] = decoders["mesh"]["activation_peak_bytes"]
    largest = max(candidates, key=candidates.get) if candidates else None
    peak = weights + (candidates[largest] if largest else 0)
    scaling = {}
    if decoders is not None:
        # Decoder activations grow with the voxel count: how many voxels the mesh decoder could take on the card.
        per_voxel = decoders["mesh"]["activation_peak_bytes"] / decoders["voxels"]
        scaling = {
            "mesh_bytes_per_voxel": round(per_voxel),
            "mesh_max_voxels_24gb": int((CARD_BYTES - weights) / per_voxel),
            "peak_at_structure_cap_bytes": round(weights + per_voxel * STRUCTURE_CAP),
        }
    return {
        **scaling,
        "weights_bf16_bytes": weights,
        "activations_bytes": {k: round(v) for k, v in candidates.items()},
        "largest": largest,
        "peak_bytes": round(peak),
        "card_bytes": CARD_BYTES,
        "fits_24gb": peak < CARD_BYTES,
        "headroom_bytes": round(CARD_BYTES - peak),
        "official_fp32_weights_bytes": params["official_fp32_bytes"],
        "official_fp32_with_ckpt_extra_bytes": params["official_fp32_bytes_with_ckpt_extra"],
    }


# --------------------------------------------------------------------------------------------- driver


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all but idle and iowait) since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def children_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_part(part: str, args: argparse.Namespace) -> dict:
    """Run one measure in a fresh interpreter (its own peak RSS) and return its JSON, with how many cores other
    processes kept busy meanwhile (machine busy time minus the measure's own CPU time, over its wall time)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, "-m", "benchmarks.sam3d_objects", "--part", part, "--out", out.name]
        command += ["--repeats", str(args.repeats), "--release-configs", str(args.release_configs)]
        if args.weights_dir is not None:
            command += ["--weights-dir", str(args.weights_dir)]
        begin, busy, own = time.perf_counter(), busy_seconds(), children_seconds()
        subprocess.run(command, check=True, cwd=Path(__file__).resolve().parents[1])
        wall = time.perf_counter() - begin
        others = (busy_seconds() - busy) - (children_seconds() - own)
        result = json.loads(Path(out.name).read_text())
        result["part_wall_s"] = round(wall, 1)
        result["other_processes_cores"] = round(max(others, 0.0) / wall, 2)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights-dir", type=Path, help="(a) on the real release (CUDA bf16 if available)")
    parser.add_argument("--release-configs", type=Path, default=RELEASE_CONFIGS, help="the release's yamls")
    parser.add_argument("--repeats", type=int, default=3, help="(a) rounds per median, after one warm-up")
    parser.add_argument("--part", choices=PARTS, help="run one measure in this process and print its JSON")
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--skip", choices=PARTS, action="append", default=[], help="leave a measure out")
    args = parser.parse_args()

    if args.part is not None:
        result = {"small": part_small, "params": part_params, "geometry": part_geometry, "decoders": part_decoders}[
            args.part
        ](args)
        text = json.dumps(result, indent=2)
        if args.out is not None:
            args.out.write_text(text + "\n")
        print(text, flush=True)
        return

    begin = time.perf_counter()
    results: dict = {"device": device_name()}
    for part, key in (
        ("small", "a_small"),
        ("params", "b_params"),
        ("geometry", "c_geometry"),
        ("decoders", "d_decoders"),
    ):
        if part not in args.skip:
            print(f"== {part}", flush=True)
            results[key] = run_part(part, args)
    if "b_params" in results:
        results["e_memory_plan"] = memory_plan(
            results["b_params"], results.get("c_geometry"), results.get("d_decoders")
        )
    results["total_wall_s"] = round(time.perf_counter() - begin, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sam3d_objects.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "sam3d_objects.md").write_text(markdown(results))
    print(markdown(results))


# --------------------------------------------------------------------------------------------- markdown


def _gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


def markdown(results: dict) -> str:
    lines = [
        f"Device: {results['device']}  ",
        f"Total wall time {results['total_wall_s']} s. Cores kept busy by other processes during each measure "
        "(machine busy time minus the measure's own CPU time, over its wall time; timings are noisy above ~0.1): "
        + ", ".join(
            f"{key[0]} {results[key]['other_processes_cores']}"
            for key in ("a_small", "b_params", "c_geometry", "d_decoders")
            if key in results
        )
        + ".",
    ]
    if "a_small" in results:
        lines += _markdown_small(results["a_small"])
    if "b_params" in results:
        lines += _markdown_params(results["b_params"])
    if "c_geometry" in results:
        lines += _markdown_geometry(results["c_geometry"])
    if "d_decoders" in results:
        lines += _markdown_decoders(results["d_decoders"])
    if "e_memory_plan" in results:
        lines += _markdown_plan(results["e_memory_plan"], results.get("c_geometry"))
    return "\n".join(lines) + "\n"


def _markdown_small(a: dict) -> list[str]:
    q, f, p = a["seconds"]["quality"], a["seconds"]["fast"], a["seconds"]["pointmap"]
    plans = a["plans"]
    stages = ("geometry", "structure", "latent", "gaussians", "mesh", "total")
    lines = [
        "",
        f"## (a) End to end, {a['checkpoint']}, {a['device']} {a['dtype']}",
        "",
        f"{a['parameters'] / 1e6:.2f} M parameters, loaded in {a['load_s']} s; {a['image'][0]}×{a['image'][1]} image, "
        f"seed {SEED}; median of {a['repeats']} rounds after a warm-up. The release's pipeline.yaml sets "
        f"{a['release_steps']['geometry']} geometry / {a['release_steps']['latent']} latent steps"
        + (" (the tiny release's 4 per stage, not the real 25)" if "tiny" in a["checkpoint"] else "")
        + f". quality: {plans['quality']['geometry_steps']} geometry steps with CFG, "
        f"{plans['quality']['latent_steps']} latent steps; fast: {plans['fast']['geometry_steps']} shortcut steps "
        f"(no CFG), {plans['fast']['latent_steps']} latent steps.",
        "",
        "| Stage | quality (s) | fast (s) | fast / quality |",
        "| --- | --- | --- | --- |",
        f"| pointmap (MoGe, once per image) | {p['total']} | | |",
    ]
    for stage in stages:
        ratio = round(f[stage] / q[stage], 2) if q[stage] else "—"
        label = "reconstruct, all stages" if stage == "total" else stage
        lines.append(f"| {label} | {q[stage]} | {f[stage]} | {ratio} |")
    lines += [
        f"| voxels / Gaussians / mesh faces | {q['voxels']} / {q['gaussians_n']} / {q['mesh_faces']} "
        f"| {f['voxels']} / {f['gaussians_n']} / {f['mesh_faces']} | |",
        "",
        f"Peak memory of the process: {a['peak_rss_gib']} GiB RSS"
        + (f", {a['peak_cuda_gib']} GiB CUDA allocated" if "peak_cuda_gib" in a else "")
        + ".",
    ]
    if "tiny" in a["checkpoint"]:
        lines += [
            "",
            "The tiny release's 4 latent steps are fewer than the fast preset's 12, so fast is not faster here; on "
            "the real release (25 + 25 steps, 19 of the geometry steps with CFG: 44 geometry forwards) fast runs 4 "
            "geometry forwards and 12 latent steps. The tiny networks make per-step costs unlike the full size: "
            "see (c) and (d) for those.",
        ]
    return lines


def _markdown_params(b: dict) -> list[str]:
    lines = [
        "",
        "## (b) Full-size networks (built from the release yamls on the meta device)",
        "",
        "Elements = parameters + stored buffers, compared with the manifests of the official checkpoints. "
        "bf16 bytes as the server holds them: ≥2-D tensors 2 bytes, the 1-D ones (norms, biases, LayerScale) fp32.",
        "",
        "| Network | Parameters | Elements | Manifest | Match | Server bf16 | Official fp32 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in b["networks"].items():
        served = _gb(r["bf16_bytes"]) if r["loaded_by_server"] else "not loaded"
        lines.append(
            f"| {name} | {r['parameters']:,} | {r['numel']:,} | {r['manifest_numel']:,} | "
            f"{'yes' if r['matches_manifest'] else '**NO**'} | {served} | {_gb(r['official_fp32_bytes'])} |"
        )
    lines += [
        f"| **total** | | {b['served_numel']:,} served | | {'all' if b['all_match_manifest'] else '**NOT all**'} "
        f"| {_gb(b['served_bf16_bytes'])} | {_gb(b['official_fp32_bytes'])} |",
        "",
        "The server loads both generators (velocity net + condition embedder, two DINOv2-L each), the ss decoder, "
        "the Gaussian and mesh decoders and MoGe; not slat_decoder_gs_4 nor the ss encoder. Server bf16 includes "
        "the few KB of fp32 non-persistent buffers (timestep frequencies, DINOv2 mean/std). The official pipeline "
        "loads everything in fp32, slat_decoder_gs_4 included; its ss_generator.ckpt also carries "
        f"{SS_GENERATOR_EXTRA_BYTES / 1e6:.0f} MB that no key loads (read at load time): "
        f"{_gb(b['official_fp32_bytes_with_ckpt_extra'])} with it.",
    ]
    return lines


def _markdown_geometry(c: dict) -> list[str]:
    o = c["official"]
    tokens = " + ".join(f"{n} {k}" for k, n in c["tokens"].items())
    return [
        "",
        "## (c) One full-size geometry-flow forward, CPU fp32, random weights",
        "",
        f"ss_generator velocity net from ss_generator.yaml ({c['parameters']:,} parameters), batch 1, tokens "
        f"{tokens}, cond {tuple(c['cond'])} (518-px config), t=500, d=0, {c['threads']} threads, inference_mode.",
        "",
        "| Measure | Ours | Official | Ours / official |",
        "| --- | --- | --- | --- |",
        f"| build (default init) | {c['build_s']} s | {o['build_s']} s | {c['build_ours_over_official']} |",
        f"| one forward | {c['forward_s']} s | {o['forward_s']} s | {c['forward_ours_over_official']} |",
        f"| peak RSS | {c['peak_rss_gib']} GiB | {o['max_rss_gib']} GiB | |",
        f"| RSS after build | {c['rss_built_gib']} GiB | | |",
        f"| activation peak (peak RSS during the forward − RSS after build) | {gib(c['activation_peak_bytes'])} GiB "
        f"| | |",
        "",
        f"The official numbers were recorded by the fixture author on this machine type ({OFFICIAL_TIMING.name}), "
        "not in this run.",
    ]


def _markdown_decoders(d: dict) -> list[str]:
    g, m = d["gaussians"], d["mesh"]
    return [
        "",
        "## (d) Full-size structured-latent decoders, CPU fp32, random weights",
        "",
        f"Input: a spherical shell (radius {d['shell_radius']:g}, one voxel thick) of N = {d['voxels']} voxels in the "
        f"64³ grid, random 8-channel latents; {d['threads']} threads. Gaussian decoder voxel_size "
        f"{d['gs_voxel_size']} (the yaml's {d['gs_yaml_voxel_size']} gives NaN offsets, PIPELINE.md §0). Mesh "
        f"decoder resolution {d['mesh_resolution']} (the yaml says {d['mesh_yaml_resolution']}; with 96 the "
        "FlexiCubes grid would be 384³ while the subdivided voxels reach only 256, PIPELINE.md §9, so 64 is the "
        f"likely released value). Both built in {d['build_s']} s; the pipeline runs them one after the other.",
        "",
        "| Decoder | Parameters | Seconds | Activation peak | Output |",
        "| --- | --- | --- | --- | --- |",
        f"| Gaussians | {d['parameters']['gaussians']:,} | {g['seconds']} | {gib(g['activation_peak_bytes'])} GiB "
        f"| {g['gaussians']:,} Gaussians |",
        f"| mesh (FlexiCubes at {4 * d['mesh_resolution']}³) | {d['parameters']['mesh']:,} | {m['seconds']} "
        f"| {gib(m['activation_peak_bytes'])} GiB | {m['vertices']:,} vertices, {m['faces']:,} faces |",
        "",
        f"Ratio mesh / Gaussians: {round(m['seconds'] / g['seconds'], 2)} in time. "
        f"Peak RSS of the process {d['peak_rss_gib']} GiB. With random weights the SDF changes sign all over the "
        "subdivided voxels, so FlexiCubes meets far more surface than a trained decoder would (the face count): "
        "the mesh row is a pessimistic bound.",
    ]


def _markdown_plan(e: dict, c: dict | None) -> list[str]:
    lines = [
        "",
        "## (e) Memory plan (computed): every stage resident on one GPU in bf16",
        "",
        "| Item | Bytes |",
        "| --- | --- |",
        f"| weights, as the server holds them (b) | {_gb(e['weights_bf16_bytes'])} |",
    ]
    for name, value in e["activations_bytes"].items():
        lines.append(f"| activations: {name} | {_gb(value)} |")
    lines += [
        f"| **peak = weights + largest activation ({e['largest']})** | **{_gb(e['peak_bytes'])}** |",
        f"| 24 GB card | {_gb(e['card_bytes'])}: {'fits' if e['fits_24gb'] else 'does NOT fit'}, "
        f"{_gb(e['headroom_bytes'])} left |",
        f"| official pipeline, all fp32 weights (gs_4 included) | {_gb(e['official_fp32_weights_bytes'])} "
        f"({_gb(e['official_fp32_with_ckpt_extra_bytes'])} with ss_generator.ckpt's unused tensors) |",
        "",
        "Stages load once and run in sequence, so only one stage's activations are live at a time. The geometry "
        "flow's are the fp32 CPU peak of (c) halved for bf16; our CFG runs the conditional and unconditional "
        "passes one after the other, so ×1 applies (the ×2 row is the bound for a batched CFG). The decoders' are "
        "kept at their fp32 measure of (d), conservatively (their mesh extraction stays fp32). Not measured here: "
        "the condition embedders' DINOv2-L passes, MoGe and the latent flow (a few thousand voxels); CPU RSS also "
        "counts allocator slack, so these are estimates, not a CUDA measurement.",
    ]
    if "mesh_bytes_per_voxel" in e:
        lines += [
            "",
            f"The mesh decoder's activations grow with the voxel count: {e['mesh_bytes_per_voxel'] / 1e6:.2f} MB per "
            f"input voxel at fp32 here, so a 24 GB card holding the bf16 weights has room for about "
            f"{e['mesh_max_voxels_24gb']:,} voxels. At the release's cap of {STRUCTURE_CAP:,} voxels the same "
            f"arithmetic gives {_gb(e['peak_at_structure_cap_bytes'])}"
            f"{', within' if e['peak_at_structure_cap_bytes'] < e['card_bytes'] else ', over'} 24 GB. With random "
            "weights nearly every subdivided cell holds surface (see the face count in (d)), which a trained "
            "decoder's does not, so this is a bound, not a measure.",
        ]
    return lines


if __name__ == "__main__":
    main()
