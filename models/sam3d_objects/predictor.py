"""SAM 3D Objects inference: an image and an object mask in, the object's Gaussians, mesh and layout out.

The stages run in sequence on models loaded once (PIPELINE.md): pointmap (MoGe, once per image) ->
condition tokens -> geometry flow (shape latent and layout) -> sparse structure decoder -> voxels ->
structured-latent flow -> Gaussian and mesh decoders. Every object is sampled on its own with a
per-request `torch.Generator`, so its result does not depend on what else is in the batch; the noise
is drawn on the CPU, so it does not depend on the device either.

Weights are held in the serving dtype (bf16 or fp16 on GPU) and the stages run under autocast, which
keeps the sampled latents, the layout and the mesh extraction in fp32 as the release does.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from models.sam3d_objects.checkpoint import Sam3DObjects
from models.sam3d_objects.flow_sampler import FlowSampler, draw_noise
from models.sam3d_objects.gaussian_decoder import GaussianSet
from models.sam3d_objects.latent_flow import denormalize_slat, sample_slat_iter
from models.sam3d_objects.layout import ObjectPose, decode_pose
from models.sam3d_objects.mesh_decoder import MeshExtractResult
from models.sam3d_objects.preprocess import latent_inputs, opencv_to_pytorch3d, structure_inputs
from models.sam3d_objects.sparse_attention import SparseVoxels
from models.sam3d_objects.sparse_structure_decoder import downsample_coords, occupied_coords, prune_interior


class EmptyStructureError(RuntimeError):
    """The geometry model placed no voxel: there is no object to decode."""


@dataclass(frozen=True)
class SamplingPlan:
    """Steps per flow stage, None for the release's (pipeline.yaml: 25 each). `geometry_shortcut` is the
    release's distilled stage-1 path: the shortcut step size d = 1/steps and no guidance (official
    `use_stage1_distillation`)."""

    geometry_steps: int | None = None
    geometry_shortcut: bool = False
    latent_steps: int | None = None


PRESETS: dict[str, SamplingPlan] = {
    "quality": SamplingPlan(),
    "fast": SamplingPlan(geometry_steps=4, geometry_shortcut=True, latent_steps=12),
}


@dataclass
class Pointmap:
    """MoGe's view of one image: points (H, W, 3) in the PyTorch3D camera frame (x left, y up, z forward),
    +inf where MoGe masks the pixel out, and normalised intrinsics (3, 3)."""

    points: torch.Tensor
    intrinsics: torch.Tensor


@dataclass
class ObjectResult:
    """One reconstructed object. Gaussians and mesh are in the object frame ([-0.5, 0.5]³, Z up); `pose`
    places them in the camera frame."""

    pose: ObjectPose
    voxels: torch.Tensor  # (N, 3) int, occupied cells of the 64³ structure after pruning
    gaussians: GaussianSet
    mesh: MeshExtractResult
    seconds: dict[str, float] = field(default_factory=dict)


class Sam3DObjectsPredictor:
    """Runs the stages of a loaded `Sam3DObjects` on one object at a time."""

    def __init__(self, models: Sam3DObjects) -> None:
        self.models = models
        param = next(models.ss_flow.parameters())
        self.device, self.dtype = param.device, param.dtype

    @contextmanager
    def _precision(self) -> Iterator[None]:
        with torch.inference_mode(), torch.autocast(self.device.type, self.dtype, enabled=self.dtype != torch.float32):
            yield

    def pointmap(self, image: np.ndarray) -> Pointmap:
        """MoGe on the whole image (official `compute_pointmap`: masked points, no forced projection).

        The release runs MoGe's fp32 weights under fp16 autocast; ours are already in the serving dtype, so MoGe
        runs under the same autocast as every stage (fp16 autocast over bf16 weights would mix the two types).
        """
        rgb = torch.from_numpy(image).to(self.device).permute(2, 0, 1).float() / 255
        with self._precision():
            out = self.models.moge.infer(rgb, force_projection=False, use_fp16=False)
        return Pointmap(opencv_to_pytorch3d(out["points"].float()), out["intrinsics"].float())

    def reconstruct(
        self,
        image: np.ndarray,
        mask: np.ndarray,
        pointmap: Pointmap,
        seed: int,
        plan: SamplingPlan = PRESETS["quality"],
    ) -> ObjectResult:
        """Reconstruct the object under `mask` (H, W) of `image` (H, W, 3) uint8."""
        m, s = self.models, self.models.settings
        plan = self.resolve(plan)
        seconds: dict[str, float] = {}
        generator = torch.Generator().manual_seed(seed)
        rgb = torch.from_numpy(image).to(self.device).permute(2, 0, 1).float() / 255
        mask_t = torch.from_numpy(np.asarray(mask, dtype=np.float32)).to(self.device)

        with self._timed(seconds, "geometry"), self._precision():
            inputs = structure_inputs(rgb, mask_t, pointmap.points, s.ss_image_size)
            cond = m.ss_embedder(**inputs)
            shapes = {
                name: (1, latent.token_len, latent.input_layer.in_features)
                for name, latent in m.ss_flow.latent_mapping.items()
            }
            noise = {name: x.to(self.device) for name, x in draw_noise(shapes, generator).items()}
            latents = self._geometry_sampler(plan).sample(m.ss_flow, noise, cond)
            del cond
        with self._timed(seconds, "structure"), self._precision():
            logits = m.ss_decoder(m.ss_decoder.flat_to_cube(latents["shape"]))
            coords = occupied_coords(logits)
            del logits
            if s.downsample_ss_dist > 0:
                coords = prune_interior(coords, s.downsample_ss_dist)
            coords, factor = downsample_coords(coords, generator=generator)
        if len(coords) == 0:
            raise EmptyStructureError("the geometry model placed no voxel for this object")
        pose = decode_pose(latents, inputs["pointmap_scale"], inputs["pointmap_shift"], factor)

        with self._timed(seconds, "latent"), self._precision():
            inputs = latent_inputs(rgb, mask_t, s.slat_image_size)
            cond = m.slat_embedder(**inputs)
            noise = torch.randn((1, len(coords), m.slat_flow.input_layer.in_features), generator=generator)
            sampler = replace(m.slat_sampler, steps=plan.latent_steps)
            steps = sample_slat_iter(m.slat_flow, sampler, noise.to(self.device), cond, coords)
            feats = deque(steps, maxlen=1)[0]
            mean, std = (torch.tensor(v, device=self.device) for v in (s.slat_mean, s.slat_std))
            slat = SparseVoxels(coords, denormalize_slat(feats[0].float(), mean, std))
            del cond
        with self._timed(seconds, "gaussians"), self._precision():
            gaussians = m.gs_decoder(slat)[0]
        with self._timed(seconds, "mesh"), self._precision():
            mesh = m.mesh_decoder(slat)[0]
        return ObjectResult(pose, coords[:, 1:], gaussians, mesh, seconds)

    def resolve(self, plan: SamplingPlan) -> SamplingPlan:
        """`plan` with the release's step counts filled in."""
        return replace(
            plan,
            geometry_steps=plan.geometry_steps or self.models.ss_sampler.steps,
            latent_steps=plan.latent_steps or self.models.slat_sampler.steps,
        )

    def _geometry_sampler(self, plan: SamplingPlan) -> FlowSampler:
        sampler = replace(self.models.ss_sampler, steps=plan.geometry_steps)
        if plan.geometry_shortcut:
            return replace(sampler, no_shortcut=False, cfg_strength=0.0)
        return sampler

    @contextmanager
    def _timed(self, seconds: dict[str, float], stage: str) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds[stage] = round(time.perf_counter() - start, 4)
