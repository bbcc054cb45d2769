"""SAM 3D Body inference on whole images: "body" (one decoder pass) and "full" (hands refined).

Every person of every image in a call shares one backbone pass and one decoder pass; in "full"
mode all hand crops (left hands from the mirrored image, right hands from the image) share one
more. "full" then follows the release step by step: hand boxes from the body pass, hand passes,
four validity tests per hand, a second body pass prompted with the wrists and elbows, and the
fusion of valid hands (pose, hand scales, shared scale and shape, wrist rotation by IK).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import roma
import torch

from models.sam3d_body.crop import BODY_PADDING, HAND_PADDING, Crops, crop_people, crop_rays, default_intrinsics
from models.sam3d_body.heads import MHRHead
from models.sam3d_body.prompt_encoder import INVALID_POINT
from models.sam3d_body.sam3d_body import CropGeometry, DecoderOutput, Sam3DBody, dummy_prompts

Mode = Literal["body", "full"]
MODES: tuple[Mode, ...] = ("body", "full")

WRIST_ANGLE_LIMIT = 1.4  # radians between the body's and the hand's wrist rotation
HAND_MIN_SIDE = 64  # pixels of the hand crop
WRIST_DISTANCE_LIMIT = 0.25  # of the hand crop side
HAND_INSIDE_LIMIT = 0.5  # every hand keypoint within this of the hand crop's centre (crop-normalised)
# MHR70 keypoints and MHR joints used by the hand refinement.
RIGHT_WRIST, LEFT_WRIST, RIGHT_ELBOW, LEFT_ELBOW = 41, 62, 8, 7
LOWER_ARM_JOINTS = [76, 40]  # left, right
WRIST_TWIST_JOINTS = [77, 41]  # left, right
RIGHT_WRIST_JOINT, LEFT_WRIST_JOINT = 42, 78
# Body-pose slots of the (left, right) wrist Euler angles, in XZY order.
WRIST_POSE_SLOTS = [41, 43, 42, 31, 33, 32]
WRIST_LIMITS = ((-2.2, 1.0), (-2.2, 1.5), (-1.2, 1.5))  # X, Z, Y


@dataclass
class BodyRequest:
    """One image and the people to reconstruct in it."""

    image: np.ndarray  # [H, W, 3] RGB uint8
    boxes: np.ndarray  # [N, 4] xyxy pixels
    masks: np.ndarray | None = None  # [N, H, W] 0/1, one per box
    cam_int: np.ndarray | None = None  # [3, 3]; default: focal = image diagonal

    def intrinsics(self) -> np.ndarray:
        if self.cam_int is not None:
            return np.asarray(self.cam_int, dtype=np.float32)
        h, w = self.image.shape[:2]
        return default_intrinsics(w, h)


@dataclass
class _Pass:
    """The inputs and outputs of one backbone + decoder pass over a set of crops."""

    crops: Crops
    geometry: CropGeometry
    context: torch.Tensor
    context_pe: torch.Tensor
    out: DecoderOutput


def rotation_angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle in radians of the rotation between rotation matrices a and b ([..., 3, 3])."""
    rel = a @ b.transpose(-2, -1)
    cos = (rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    return torch.acos(cos.clamp(-1.0, 1.0))


def fix_wrist_euler(xzy: torch.Tensor) -> torch.Tensor:
    """Pick, per wrist, the equivalent XZY Euler triple that violates the joint limits least."""
    x, z, y = xzy.unbind(-1)
    wrap = lambda a: torch.atan2(torch.sin(a), torch.cos(a))  # noqa: E731
    alt = torch.stack([wrap(x + torch.pi), wrap(-(z + torch.pi)), wrap(y + torch.pi)], dim=-1)

    def violation(angles: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(angles[..., 0])
        for i, (lo, hi) in enumerate(WRIST_LIMITS):
            total = total + (lo - angles[..., i]).clamp(min=0) ** 2 + (angles[..., i] - hi).clamp(min=0) ** 2
        return total

    return torch.where((violation(alt) < violation(xzy))[..., None], alt, xzy)


class Sam3DBodyPredictor:
    """Runs a loaded `Sam3DBody` on images; returns the release's per-person output dicts."""

    def __init__(self, model: Sam3DBody, max_crops: int = 16) -> None:
        self.model = model
        self.max_crops = max_crops

    @property
    def device(self) -> torch.device:
        return self.model.image_mean.device

    @property
    def faces(self) -> np.ndarray:
        return self.model.head_pose.faces.cpu().numpy()

    @torch.inference_mode()
    def predict(self, requests: list[BodyRequest], mode: Mode = "full") -> list[list[dict[str, np.ndarray]]]:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        size = self.model.image_size
        counts = [len(np.asarray(r.boxes).reshape(-1, 4)) for r in requests]
        if sum(counts) == 0:
            return [[] for _ in requests]
        crops = _concat([crop_people(r.image, r.boxes, size, BODY_PADDING, r.masks) for r in requests])
        cams = _per_person([torch.from_numpy(r.intrinsics()) for r in requests], counts)
        body = self._run(crops, cams, hand=False)
        first = body.out.pose
        if mode == "body":
            return self._split(first, crops, counts)
        pose, hands = self._refine_hands(requests, counts, body, cams)
        results = self._split(pose, crops, counts)
        for person, (left, right) in zip((p for image in results for p in image), hands):
            person["lhand_bbox"], person["rhand_bbox"] = left, right
        return results

    def _run(self, crops: Crops, cams: torch.Tensor, hand: bool) -> _Pass:
        device = self.device
        size = self.model.image_size
        geometry = CropGeometry(
            centers=crops.centers.to(device),
            scales=crops.scales.to(device),
            affines=crops.affines.to(device),
            cam_int=cams.to(device),
        )
        features = torch.cat(
            [self.model.encode(chunk.to(device)) for chunk in crops.images.split(self.max_crops)], dim=0
        )
        rays = crop_rays(geometry.affines, geometry.cam_int, size)
        context, pe = self.model.image_context(
            features, crops.masks.to(device), crops.mask_scores.to(device), rays, hand=hand
        )
        out = self.model.decode(context, pe, geometry, dummy_prompts(len(crops), device), hand=hand)
        return _Pass(crops, geometry, context, pe, out)

    def _hand_boxes(self, body: _Pass) -> tuple[np.ndarray, np.ndarray]:
        """Square xyxy boxes (image pixels) of the left and right hand from the body pass's hand tokens."""
        boxes = body.out.hand_box.float().cpu().numpy() * self.model.image_size
        affines = body.crops.affines.numpy()
        zoom = affines[:, 0, 0][:, None]
        shift = affines[:, [0, 1], [2, 2]]
        result = []
        for side in (0, 1):
            center = (boxes[:, side, :2] - shift) / zoom
            half = boxes[:, side, 2:].max(axis=1, keepdims=True).repeat(2, axis=1) / zoom / 2
            result.append(np.concatenate([center - half, center + half], axis=1))
        return result[0], result[1]

    def _refine_hands(
        self, requests: list[BodyRequest], counts: list[int], body: _Pass, cams: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], list[tuple[np.ndarray, np.ndarray]]]:
        size = self.model.image_size
        head: MHRHead = self.model.head_pose
        first = body.out.pose
        widths = torch.tensor(
            [r.image.shape[1] for r, n in zip(requests, counts) for _ in range(n)], device=self.device
        ).float()
        left_boxes, right_boxes = self._hand_boxes(body)

        # Left hands are cut from the mirrored image, where they look like right hands.
        left_crops, right_crops, start = [], [], 0
        for request, n in zip(requests, counts):
            w = request.image.shape[1]
            lb = left_boxes[start : start + n].copy()
            lb[:, 0], lb[:, 2] = w - left_boxes[start : start + n, 2] - 1, w - left_boxes[start : start + n, 0] - 1
            left_crops.append(crop_people(np.ascontiguousarray(request.image[:, ::-1]), lb, size, HAND_PADDING))
            right_crops.append(crop_people(request.image, right_boxes[start : start + n], size, HAND_PADDING))
            start += n
        total = sum(counts)
        hands = self._run(_concat(left_crops + right_crops), torch.cat([cams, cams]), hand=True)
        left = {k: v[:total].clone() for k, v in hands.out.pose.items()}
        right = {k: v[total:] for k, v in hands.out.pose.items()}
        left_scales, right_scales = hands.crops.scales[:total], hands.crops.scales[total:]
        left_centers = hands.crops.centers[:total].clone()
        left_centers[:, 0] = widths.cpu() - left_centers[:, 0] - 1

        # Mirror the left-hand prediction back.
        mean, comps = head.scale_mean, head.scale_comps
        left["scale"][:, 9] = ((mean[8] + comps[8, 8] * left["scale"][:, 8]) - mean[9]) / comps[9, 9]
        left["joint_global_rots"][:, LEFT_WRIST_JOINT] = left["joint_global_rots"][:, RIGHT_WRIST_JOINT]
        left["joint_global_rots"][:, LEFT_WRIST_JOINT, 1:3] *= -1
        left["hand"][:, :54] = left["hand"][:, 54:]

        # Which hands to trust: wrist rotation close to the body's, big enough crop, all hand
        # keypoints inside their crop, wrist where the body put it.
        wrist_euler = first["body_pose"][:, WRIST_POSE_SLOTS].unflatten(1, (2, 3))
        body_wrist_local = roma.euler_to_rotmat("XZY", wrist_euler)
        hand_wrist_local = self._hand_wrist_local(first["joint_global_rots"], left, right)
        angle_ok = rotation_angle(body_wrist_local, hand_wrist_local) < WRIST_ANGLE_LIMIT
        size_ok = torch.stack(
            [(left_scales > HAND_MIN_SIDE).all(dim=1), (right_scales > HAND_MIN_SIDE).all(dim=1)], dim=1
        ).to(self.device)
        inside_ok = torch.stack(
            [
                left["pred_keypoints_2d_cropped"].abs().amax(dim=(1, 2)) < HAND_INSIDE_LIMIT,
                right["pred_keypoints_2d_cropped"].abs().amax(dim=(1, 2)) < HAND_INSIDE_LIMIT,
            ],
            dim=1,
        )
        right_wrist = right["pred_keypoints_2d"][:, RIGHT_WRIST].clone()
        left_wrist = left["pred_keypoints_2d"][:, RIGHT_WRIST].clone()
        left_wrist[:, 0] = widths - left_wrist[:, 0] - 1
        # As released: each wrist distance is measured against the other hand's crop side.
        right_dist = (right_wrist - first["pred_keypoints_2d"][:, RIGHT_WRIST]).norm(dim=-1) / left_scales[:, 0].to(
            self.device
        )
        left_dist = (left_wrist - first["pred_keypoints_2d"][:, LEFT_WRIST]).norm(dim=-1) / right_scales[:, 0].to(
            self.device
        )
        dist_ok = torch.stack([left_dist < WRIST_DISTANCE_LIMIT, right_dist < WRIST_DISTANCE_LIMIT], dim=1)
        hand_ok = angle_ok & size_ok & inside_ok & dist_ok  # [P, 2]: left, right

        # Prompt the body decoder again with the hands' wrists and the body's elbows.
        body_2d = first["pred_keypoints_2d"]
        clicks = torch.stack([right_wrist, left_wrist, body_2d[:, RIGHT_ELBOW], body_2d[:, LEFT_ELBOW]], dim=1)
        crop_xy = body.geometry.to_crop(clicks, size)
        labels = torch.tensor([RIGHT_WRIST, LEFT_WRIST, RIGHT_ELBOW, LEFT_ELBOW], device=self.device).float()
        pose = self._prompted_pass(body, counts, crop_xy, labels, hand_ok[:, [1, 0, 1, 0]])

        pose = self._fuse_hands(pose, left, right, hand_ok, body_wrist_local)
        kp = pose["pred_keypoints_3d"] + pose["pred_cam_t"][:, None]
        heights = torch.tensor(
            [r.image.shape[0] for r, n in zip(requests, counts) for _ in range(n)], device=self.device
        ).float()
        # The release re-projects the fused body with the image centre as principal point.
        focal = pose["focal_length"][:, None]
        xy = kp[..., :2] * focal[..., None] + torch.stack([widths / 2, heights / 2], dim=-1)[:, None] * kp[..., 2:3]
        pose["pred_keypoints_2d"] = xy / kp[..., 2:3]

        hand_boxes = []
        for i in range(total):
            lc, ls = left_centers[i].numpy(), left_scales[i].numpy()
            rc, rs = hands.crops.centers[total + i].numpy(), right_scales[i].numpy()
            hand_boxes.append((np.concatenate([lc - ls / 2, lc + ls / 2]), np.concatenate([rc - rs / 2, rc + rs / 2])))
        return pose, hand_boxes

    def _hand_wrist_local(
        self, joint_rots: torch.Tensor, left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The local wrist rotations [P, 2, 3, 3] (left, right) that put the wrists where the hand passes saw them."""
        head: MHRHead = self.model.head_pose
        zero_wrist = joint_rots[:, LOWER_ARM_JOINTS] @ head.joint_rotation[WRIST_TWIST_JOINTS]
        hand_global = torch.stack(
            [left["joint_global_rots"][:, LEFT_WRIST_JOINT], right["joint_global_rots"][:, RIGHT_WRIST_JOINT]], dim=1
        )
        return zero_wrist.transpose(-2, -1) @ hand_global

    def _prompted_pass(
        self, body: _Pass, counts: list[int], crop_xy: torch.Tensor, labels: torch.Tensor, ok: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Second body-decoder pass with the wrist/elbow clicks; people grouped by click count.

        A click is usable when its hand is valid and it lies on the crop. As released: in an image
        with several people unusable clicks become invalid clicks; with one person they are dropped
        (and there "on the crop" excludes its border), and without any click that person keeps the
        first pass.
        """
        first = body.out.pose
        prev = torch.cat([first[k] for k in ("pred_pose_raw", "shape", "scale", "hand", "face", "pred_cam")], dim=1)
        clicks = torch.cat([(crop_xy + 0.5).clamp(0.0, 1.0), labels.expand(len(crop_xy), -1)[..., None]], dim=-1)
        dummy = torch.tensor([0.0, 0.0, INVALID_POINT], device=clicks.device)
        on_crop = ((crop_xy >= -0.5) & (crop_xy <= 0.5)).all(dim=-1) & ok
        inside_crop = ((crop_xy > -0.5) & (crop_xy < 0.5)).all(dim=-1) & ok
        groups: dict[int, list[tuple[int, torch.Tensor]]] = {}
        start = 0
        for n in counts:
            for i in range(start, start + n):
                if n > 1:
                    person_clicks = torch.where(on_crop[i, :, None], clicks[i], dummy)
                else:
                    person_clicks = clicks[i][inside_crop[i]]
                if len(person_clicks):
                    groups.setdefault(len(person_clicks), []).append((i, person_clicks))
            start += n
        pose = {k: v.clone() for k, v in first.items()}
        for members in groups.values():
            idx = torch.tensor([i for i, _ in members], device=clicks.device)
            geometry = CropGeometry(*(t[idx] for t in vars(body.geometry).values()))
            out = self.model.decode(
                body.context[idx],
                body.context_pe,
                geometry,
                torch.stack([c for _, c in members]),
                prev_estimate=prev[idx],
            )
            for k, v in out.pose.items():
                pose[k][idx] = v
        return pose

    def _fuse_hands(
        self,
        pose: dict[str, torch.Tensor],
        left: dict[str, torch.Tensor],
        right: dict[str, torch.Tensor],
        hand_ok: torch.Tensor,
        body_wrist_local: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Swap in the valid hands: pose, hand scales, shared scales and shape, and the wrists by IK."""
        head: MHRHead = self.model.head_pose
        hand_pose = torch.cat([left["hand"][:, :54], right["hand"][:, 54:]], dim=1)
        scale = pose["scale"].clone()
        scale[:, 9], scale[:, 8] = left["scale"][:, 9], right["scale"][:, 8]
        scale[:, 18:] = (left["scale"][:, 18:] + right["scale"][:, 18:]) / 2
        shape = pose["shape"].clone()
        shape[:, 40:] = (left["shape"][:, 40:] + right["shape"][:, 40:]) / 2

        joint_rots = head.mhr_forward(pose["global_rot"], pose["body_pose"], hand_pose, scale, shape, pose["face"])[
            "joint_global_rots"
        ]
        wrist_local = self._hand_wrist_local(joint_rots, left, right)
        wrist_xzy = fix_wrist_euler(roma.rotmat_to_euler("XZY", wrist_local))
        use = (rotation_angle(body_wrist_local, wrist_local) < WRIST_ANGLE_LIMIT) & hand_ok  # [P, 2]

        wrists = pose["body_pose"][:, WRIST_POSE_SLOTS].unflatten(1, (2, 3))
        pose["body_pose"][:, WRIST_POSE_SLOTS] = torch.where(use[..., None], wrist_xzy, wrists).flatten(1, 2)
        pose["hand"] = torch.where(
            use[..., None], hand_pose.unflatten(1, (2, 54)), pose["hand"].unflatten(1, (2, 54))
        ).flatten(1, 2)
        pose["scale"][:, 9] = torch.where(use[:, 0], scale[:, 9], pose["scale"][:, 9])
        pose["scale"][:, 8] = torch.where(use[:, 1], scale[:, 8], pose["scale"][:, 8])
        weights = use.to(scale.dtype)
        count = weights.sum(dim=1, keepdim=True)
        for key, cut in (("scale", 18), ("shape", 40)):
            mixed = (left[key][:, cut:] * weights[:, :1] + right[key][:, cut:] * weights[:, 1:]) / (count + 1e-8)
            pose[key][:, cut:] = torch.where(count > 0, mixed, pose[key][:, cut:])

        mesh = head.mhr_forward(
            pose["global_rot"], pose["body_pose"], pose["hand"], pose["scale"], pose["shape"], pose["face"]
        )
        # As released, the joint rotations keep the prompted pass's values.
        for key in ("pred_vertices", "pred_keypoints_3d", "pred_joint_coords", "mhr_model_params"):
            pose[key] = mesh[key]
        pose["pred_pose_raw"] = torch.zeros_like(pose["pred_pose_raw"])
        return pose

    def _split(
        self, pose: dict[str, torch.Tensor], crops: Crops, counts: list[int]
    ) -> list[list[dict[str, np.ndarray]]]:
        names = {
            "focal_length": "focal_length",
            "pred_keypoints_3d": "pred_keypoints_3d",
            "pred_keypoints_2d": "pred_keypoints_2d",
            "pred_vertices": "pred_vertices",
            "pred_cam_t": "pred_cam_t",
            "pred_pose_raw": "pred_pose_raw",
            "global_rot": "global_rot",
            "body_pose_params": "body_pose",
            "hand_pose_params": "hand",
            "scale_params": "scale",
            "shape_params": "shape",
            "expr_params": "face",
            "pred_joint_coords": "pred_joint_coords",
            "pred_global_rots": "joint_global_rots",
            "mhr_model_params": "mhr_model_params",
        }
        arrays = {out: pose[key].float().cpu().numpy() for out, key in names.items()}
        boxes = crops.boxes.numpy()
        results, start = [], 0
        for n in counts:
            people = []
            for i in range(start, start + n):
                person = {"bbox": boxes[i]}
                person.update({name: values[i] for name, values in arrays.items()})
                people.append(person)
            results.append(people)
            start += n
        return results


def _concat(parts: list[Crops]) -> Crops:
    return Crops(*(torch.cat([getattr(p, f) for p in parts]) for f in Crops.__dataclass_fields__))


def _per_person(cams: list[torch.Tensor], counts: list[int]) -> torch.Tensor:
    return torch.cat([cam[None].expand(n, -1, -1) for cam, n in zip(cams, counts)]).float()
