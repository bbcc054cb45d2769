"""Load a SAM 3D Body release folder: `model_config.yaml`, `model.ckpt` and `assets/mhr_model.pt`.

The checkpoint is read as data (`weights_only=True`). The released `.ckpt` is a flat pickled dict
of tensors; should a release carry training metadata that the safe unpickler refuses, it is
re-read with the full unpickler only when the file lies inside the trusted weights folder, with
a warning. Keys are matched strictly: every model tensor must come from the file (except
`backbone.encoder.mask_token`, which the release leaves out and which is zero), and every file
tensor must land in the model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.checkpoint_io import read_checkpoint
from models.sam3.checkpoint import CheckpointError, KeyReport
from models.sam3d_body.config import Sam3DBodyConfig
from models.sam3d_body.heads import NUM_FACE, NUM_JOINTS, NUM_SHAPE, NUM_VERTICES, BodyModel
from models.sam3d_body.sam3d_body import Sam3DBody

CONFIG_FILE = "model_config.yaml"
CHECKPOINT_FILE = "model.ckpt"
MHR_FILE = "assets/mhr_model.pt"
# Tensors the release does not store: DINOv3's mask token is used only as `cls + 0 * mask_token`.
NOT_IN_CHECKPOINT = {"backbone.encoder.mask_token"}
# Tensors of the official model that inference never reads; tolerated should a checkpoint carry them.
UNUSED = {"head_pose.hand_pose_comps_ori", "head_pose_hand.hand_pose_comps_ori"}


def build_model(config: Sam3DBodyConfig, state: dict[str, torch.Tensor]) -> tuple[Sam3DBody, KeyReport]:
    """Build on the meta device and take every tensor from `state`, cast to the model's dtype.

    Consumes `state`: each tensor is dropped once cast, so the checkpoint and the model are not
    both in memory at full size.
    """
    with torch.device("meta"):
        model = Sam3DBody(config)
    expected = model.state_dict()
    report = KeyReport(
        missing=sorted(set(expected) - set(state) - NOT_IN_CHECKPOINT),
        unexpected=sorted(set(state) - set(expected) - UNUSED),
        mismatched=sorted(
            f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ),
    )
    if not report.ok:
        raise CheckpointError(f"checkpoint does not match {config.backbone_type} config: {report.describe()}")
    cast = {k: state.pop(k).to(expected[k].dtype) for k in expected if k in state}
    model.load_state_dict(cast, strict=False, assign=True)
    # What the checkpoint does not hold: the zero mask token and the normalisation constants.
    for name in NOT_IN_CHECKPOINT:
        module_name, attr = name.rsplit(".", 1)
        module = model.get_submodule(module_name)
        setattr(module, attr, torch.nn.Parameter(torch.zeros_like(getattr(module, attr), device="cpu")))
    model.image_mean = torch.tensor(config.image_mean).view(-1, 1, 1)
    model.image_std = torch.tensor(config.image_std).view(-1, 1, 1)
    return model, report


def load_sam3d_body(
    folder: Path,
    device: torch.device | str = "cpu",
    backbone_dtype: torch.dtype = torch.float32,
    mhr_path: Path | None = None,
) -> Sam3DBody:
    """Load a release folder (`weights/sam-3d-body-dinov3/` or `-vith/`) onto `device`.

    The backbone runs in `backbone_dtype` (the release uses fp16 on GPU); the decoder, heads and
    MHR stay fp32, they are a few percent of the compute and MHR needs the precision.
    """
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        config_path = folder.parent / CONFIG_FILE
    for needed in (config_path, folder / CHECKPOINT_FILE):
        if not needed.is_file():
            raise FileNotFoundError(f"missing {needed}")
    mhr_path = mhr_path or folder / MHR_FILE
    if not mhr_path.is_file():
        raise FileNotFoundError(f"missing {mhr_path}")
    config = Sam3DBodyConfig.from_yaml(config_path)
    model, _ = build_model(config, read_checkpoint(folder / CHECKPOINT_FILE, trusted_root=folder))
    model.backbone.to(backbone_dtype)
    model.to(device).eval()
    body_model = BodyModel.load(mhr_path, device)
    model.head_pose.body_model = body_model
    model.head_pose_hand.body_model = body_model
    return model


def verify_sam3d_body(folder: Path) -> str:
    """Check a release folder without building the model on a device: keys, shapes, and MHR's interface."""
    config = Sam3DBodyConfig.from_yaml(folder / CONFIG_FILE)
    _, report = build_model(config, read_checkpoint(folder / CHECKPOINT_FILE, trusted_root=folder))
    body_model = BodyModel.load(folder / MHR_FILE, "cpu")
    with torch.inference_mode():
        verts, joints, _ = body_model(torch.zeros(1, NUM_SHAPE), torch.zeros(1, 204), torch.zeros(1, NUM_FACE))
    if verts.shape != (1, NUM_VERTICES, 3) or joints.shape != (1, NUM_JOINTS, 3):
        raise CheckpointError(
            f"{folder / MHR_FILE}: returns {tuple(verts.shape)} vertices and {tuple(joints.shape)} joints, "
            f"expected (1, {NUM_VERTICES}, 3) and (1, {NUM_JOINTS}, 3)"
        )
    return f"{report.describe()}; MHR body model returns {NUM_VERTICES} vertices and {NUM_JOINTS} joints"
