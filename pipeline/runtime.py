"""The models of one worker process: loaded once at start-up, shared by every task that needs them.

SAM 3 is loaded once and serves sam3-image and, as the models join, the detection step of the
3D pipelines. A task runs a whole batch of jobs so that stages can batch across them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from models.sam3 import Sam3Predictor, load_sam3
from models.sam3d_body.checkpoint import load_sam3d_body
from models.sam3d_body.predictor import Mode, Sam3DBodyPredictor
from models.sam3d_body.smplx_fit import find_smplx_model
from models.sam3d_objects.checkpoint import load_sam3d_objects
from models.sam3d_objects.predictor import Sam3DObjectsPredictor
from pipeline import sam3_image, sam3d_body, sam3d_objects
from pipeline.task import TaskError, TaskInput, TaskOutput

log = logging.getLogger(__name__)


class Runtime:
    def __init__(
        self,
        weights_dir: Path,
        weight_sets: set[str],
        device: str,
        dtype: torch.dtype,
        embedding_cache_size: int,
        max_batch_size: int,
        body_variant: str = "dinov3",
        body_mode: Mode = "full",
    ) -> None:
        self.sam3: Sam3Predictor | None = None
        if "sam3" in weight_sets:
            models = load_sam3(weights_dir / "sam3", device=device, dtype=dtype)
            # On CPU a batched ViT pass costs more per image than single ones (measured: 3.0 s at
            # batch 1, 4.4 s/image at batch 8 on 2 cores, quarter-width ViT at 1008 px), so jobs are
            # still batched but their images go through the ViT one at a time there.
            vit_batch = max_batch_size if str(device).startswith("cuda") else 1
            self.sam3 = Sam3Predictor(models, cache_size=embedding_cache_size, max_vit_batch=vit_batch)
            log.info("SAM 3 loaded on %s (%s)", device, dtype)
        self.body: Sam3DBodyPredictor | None = None
        body_set = f"sam-3d-body-{body_variant}"
        if body_set in weight_sets:
            # The release runs its backbone in half precision on GPU; the heads and MHR stay fp32.
            backbone_dtype = dtype if str(device).startswith("cuda") else torch.float32
            model = load_sam3d_body(weights_dir / body_set, device=device, backbone_dtype=backbone_dtype)
            self.body = Sam3DBodyPredictor(model, max_crops=max(8, 2 * max_batch_size))
            log.info("SAM 3D Body (%s) loaded on %s, backbone %s", body_variant, device, backbone_dtype)
        self.objects: Sam3DObjectsPredictor | None = None
        if {"sam-3d-objects", "moge"} <= weight_sets:
            # Every stage stays loaded, in `dtype`: 3.4 B parameters, 6.8 GB in bf16 (see README, Memory).
            objects = load_sam3d_objects(
                weights_dir / "sam-3d-objects" / "checkpoints", weights_dir / "moge" / "model.pt", device, dtype
            )
            self.objects = Sam3DObjectsPredictor(objects)
            log.info("SAM 3D Objects loaded on %s (%s)", device, dtype)
        smplx_model = find_smplx_model(weights_dir)
        self._runners = {
            "sam3-image": lambda items: sam3_image.run(self.sam3, items),
            "sam-3d-body": lambda items: sam3d_body.run(self.body, self.sam3, items, body_mode, smplx_model),
            "sam-3d-objects": lambda items: sam3d_objects.run(self.objects, self.sam3, items),
        }

    def run(self, task: str, items: list[TaskInput]) -> list[TaskOutput | TaskError]:
        return self._runners[task](items)
