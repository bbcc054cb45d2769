"""Heads on the pose token: MHR body parameters (and the mesh they give), and the perspective camera.

The body model itself, Meta's MHR, ships as a TorchScript file (`assets/mhr_model.pt`). It is not
part of the checkpoint, so it is held outside the module tree (`BodyModel`) and shared by the
body and hand heads instead of being loaded once per head.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import roma
import torch
from torch import nn

from models.sam3d_body.pose_params import (
    BODY_CONT_DIM,
    BODY_HAND_SLOTS,
    HAND_CONT_DIM,
    body_params_from_cont,
    hand_params_from_cont,
    rot6d_to_rotmat,
)
from models.sam3d_body.transformer import FeedForward

NUM_VERTICES = 18439
NUM_JOINTS = 127
NUM_KEYPOINTS = 70  # MHR70; the checkpoint's mapping has 308 rows, the rest are face points
NUM_SHAPE = 45
NUM_SCALE = 28
NUM_FACE = 72
# Keypoints the hand head keeps (the right hand, 21..41); the others are zeroed.
HAND_KEYPOINTS = slice(21, 42)


class BodyModel:
    """MHR as a TorchScript module: (identity [B,45], model params [B,204], expression [B,72]).

    Returns vertices [B, 18439, 3] and joint positions [B, 127, 3] in metres (MHR frame, y up)
    and joint rotations [B, 127, 3, 3]. The file speaks centimetres and x, y, z, w quaternions.
    """

    def __init__(self, module: torch.jit.ScriptModule) -> None:
        self.module = module

    @classmethod
    def load(cls, path: Path, device: torch.device | str) -> BodyModel:
        with warnings.catch_warnings():
            # TorchScript is how MHR ships; its deprecation notice is not actionable here.
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location=device)
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
        return cls(module)

    def __call__(
        self, shape: torch.Tensor, model_params: torch.Tensor, expression: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        verts, skeleton = self.module(shape.float(), model_params.float(), expression.float())
        coords, quats, _ = torch.split(skeleton, [3, 4, 1], dim=2)
        return verts / 100, coords / 100, roma.unitquat_to_rotmat(quats)


class MHRHead(nn.Module):
    """Pose token -> 519 pose numbers -> MHR parameters -> mesh, joints and 70 keypoints.

    The 519 numbers are a 6D global rotation, 260 continuous body-pose values, 45 shape, 28 scale,
    2 x 54 hand-pose and 72 face coefficients (the face is always multiplied by 0). The hand head
    (`hand=True`) predicts a right hand in a wrist-centred frame; its global rotation and
    translation are mapped back through the wrist, and every non-hand parameter is zeroed.
    """

    npose = 6 + BODY_CONT_DIM + NUM_SHAPE + NUM_SCALE + 2 * HAND_CONT_DIM + NUM_FACE

    def __init__(self, dim: int, mlp_depth: int, mlp_div: int, hand: bool) -> None:
        super().__init__()
        self.hand = hand
        self.proj = FeedForward(dim, dim // mlp_div, self.npose, num_layers=mlp_depth)
        # Rig data that travels in the checkpoint.
        self.register_buffer("joint_rotation", torch.zeros(NUM_JOINTS, 3, 3))
        self.register_buffer("scale_mean", torch.zeros(68))
        self.register_buffer("scale_comps", torch.zeros(NUM_SCALE, 68))
        self.register_buffer("faces", torch.zeros(36874, 3, dtype=torch.long))
        self.register_buffer("hand_pose_mean", torch.zeros(HAND_CONT_DIM))
        self.register_buffer("hand_pose_comps", torch.eye(HAND_CONT_DIM))
        self.register_buffer("hand_joint_idxs_left", torch.zeros(27, dtype=torch.long))
        self.register_buffer("hand_joint_idxs_right", torch.zeros(27, dtype=torch.long))
        self.register_buffer("keypoint_mapping", torch.zeros(308, NUM_VERTICES + NUM_JOINTS))
        self.register_buffer("right_wrist_coords", torch.zeros(3))
        self.register_buffer("root_coords", torch.zeros(3))
        self.register_buffer("local_to_world_wrist", torch.zeros(3, 3))
        self.register_buffer("nonhand_param_idxs", torch.zeros(145, dtype=torch.long))
        self.body_model: BodyModel | None = None

    def mhr_forward(
        self,
        global_rot: torch.Tensor,
        body_pose: torch.Tensor,
        hand_pose: torch.Tensor,
        scale: torch.Tensor,
        shape: torch.Tensor,
        face: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Run MHR on decoded parameters; outputs in metres, camera axes (y and z negated).

        `joint_global_rots` stay in MHR's frame, as the release returns them.
        """
        if self.body_model is None:
            raise RuntimeError("MHRHead has no body model; load one with load_sam3d_body")
        global_trans = torch.zeros_like(global_rot)
        if self.hand:
            rot = roma.euler_to_rotmat("xyz", global_rot) @ self.local_to_world_wrist
            global_rot = roma.rotmat_to_euler("xyz", rot)
            wrist = self.right_wrist_coords - self.root_coords
            global_trans = -(roma.euler_to_rotmat("xyz", global_rot) @ wrist + self.root_coords) + global_trans
        scales = self.scale_mean[None] + scale @ self.scale_comps
        pose = torch.cat([global_trans * 10, global_rot, body_pose[:, :130]], dim=1)
        left, right = hand_pose.split(HAND_CONT_DIM, dim=1)
        pose[:, self.hand_joint_idxs_left] = hand_params_from_cont(self.hand_pose_mean + left @ self.hand_pose_comps)
        pose[:, self.hand_joint_idxs_right] = hand_params_from_cont(self.hand_pose_mean + right @ self.hand_pose_comps)
        model_params = torch.cat([pose, scales], dim=1)
        if self.hand:
            model_params[:, self.nonhand_param_idxs] = 0

        verts, joints, joint_rots = self.body_model(shape, model_params, face)
        points = torch.cat([verts, joints], dim=1)
        keypoints = torch.einsum("kv,bvc->bkc", self.keypoint_mapping[:NUM_KEYPOINTS], points)
        if self.hand:
            keep = torch.zeros(NUM_KEYPOINTS, dtype=torch.bool, device=keypoints.device)
            keep[HAND_KEYPOINTS] = True
            keypoints = keypoints * keep[None, :, None]
        flip = torch.tensor([1.0, -1.0, -1.0], device=verts.device)
        return {
            "pred_vertices": verts * flip,
            "pred_keypoints_3d": keypoints * flip,
            "pred_joint_coords": joints * flip,
            "joint_global_rots": joint_rots,
            "mhr_model_params": model_params,
        }

    def forward(self, token: torch.Tensor, init: torch.Tensor) -> dict[str, torch.Tensor]:
        """[B, D] pose token, [B, 519] initial estimate -> parameters and MHR outputs."""
        pred = self.proj(token) + init
        rot6d, body_cont, shape, scale, hand, face = pred.split(
            [6, BODY_CONT_DIM, NUM_SHAPE, NUM_SCALE, 2 * HAND_CONT_DIM, NUM_FACE], dim=1
        )
        global_rot = roma.rotmat_to_euler("ZYX", rot6d_to_rotmat(rot6d))
        body_pose = body_params_from_cont(body_cont)
        body_pose[:, BODY_HAND_SLOTS] = 0
        body_pose[:, -3:] = 0  # jaw
        face = face * 0
        out = {
            "pred_pose_raw": torch.cat([rot6d, body_cont], dim=1),
            "global_rot": global_rot,
            "body_pose": body_pose,
            "shape": shape,
            "scale": scale,
            "hand": hand,
            "face": face,
        }
        out.update(self.mhr_forward(global_rot, body_pose, hand, scale, shape, face))
        return out


class PerspectiveHead(nn.Module):
    """Pose token -> weak-perspective camera (s, tx, ty) -> translation and 2D projection."""

    ncam = 3

    def __init__(self, dim: int, mlp_depth: int, mlp_div: int, scale_factor: float) -> None:
        super().__init__()
        self.scale_factor = scale_factor
        self.proj = FeedForward(dim, dim // mlp_div, self.ncam, num_layers=mlp_depth)

    def forward(self, token: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
        return self.proj(token) + init

    def project(
        self,
        points: torch.Tensor,
        pred_cam: torch.Tensor,
        box_center: torch.Tensor,
        box_size: torch.Tensor,
        cam_int: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Camera translation from (s, tx, ty) and the crop box, then the pinhole projection of `points`.

        s scales the crop side to a depth (tz = 2 f / (side * s)); the box centre's offset from
        the principal point becomes the lateral translation (CLIFF with intrinsics centre).
        """
        s, tx, ty = -pred_cam[:, 0], pred_cam[:, 1], -pred_cam[:, 2]
        bs = box_size * s * self.scale_factor + 1e-8
        focal = cam_int[:, 0, 0]
        cam_t = torch.stack(
            [
                tx + 2 * (box_center[:, 0] - cam_int[:, 0, 2]) / bs,
                ty + 2 * (box_center[:, 1] - cam_int[:, 1, 2]) / bs,
                2 * focal / bs,
            ],
            dim=-1,
        )
        cam_points = points + cam_t[:, None]
        uv = torch.einsum("bij,bkj->bki", cam_int, cam_points / cam_points[..., 2:3])[..., :2]
        return {
            "pred_cam_t": cam_t,
            "focal_length": focal,
            "pred_keypoints_2d": uv,
            "pred_keypoints_2d_depth": cam_points[..., 2],
        }
