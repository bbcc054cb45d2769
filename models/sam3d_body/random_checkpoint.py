"""Write a SAM 3D Body release folder with random network weights, for benchmarks at the released size.

The rig tensors of the MHR heads (keypoint mapping, faces, scale and hand-pose bases, wrist frames)
and the initial pose and camera do not depend on the network's size; they are copied from a
donor checkpoint (e.g. the parity fixture's) so that the random model still puts a body in front
of the camera. The backbone is stored in bfloat16 as the release reportedly is.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml

from models.sam3d_body.checkpoint import CHECKPOINT_FILE, CONFIG_FILE, MHR_FILE, NOT_IN_CHECKPOINT
from models.sam3d_body.config import Sam3DBodyConfig
from models.sam3d_body.sam3d_body import Sam3DBody

SIZE_INDEPENDENT = ("head_pose.", "head_pose_hand.", "init_pose", "init_camera")


def write_random_release(folder: Path, config: dict, donor: Path, mhr: Path, seed: int = 0) -> Path:
    """`model_config.yaml`, `model.ckpt` and `assets/mhr_model.pt` in `folder`; returns the folder."""
    torch.manual_seed(seed)
    model = Sam3DBody(Sam3DBodyConfig.from_dict(config))
    state = model.state_dict()
    rig = torch.load(donor, map_location="cpu", weights_only=True)
    for key, value in rig.items():
        if key.startswith(SIZE_INDEPENDENT) and ".proj." not in key and key in state:
            state[key] = value
    state = {
        k: v.to(torch.bfloat16) if k.startswith("backbone.") and k != "backbone.encoder.rope_embed.periods" else v
        for k, v in state.items()
        if k not in NOT_IN_CHECKPOINT
    }
    (folder / MHR_FILE).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / CHECKPOINT_FILE)
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
    shutil.copy(mhr, folder / MHR_FILE)
    return folder
