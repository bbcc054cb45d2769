"""SAM 3D Body: crop -> backbone -> prompt/ray-conditioned features -> promptable decoder -> MHR + camera.

The model holds two decoders over one backbone: the body decoder and a hand decoder that sees
hand crops (the "full" mode refines hands with it, see `predictor.py`). Each decoder reads
145 + K tokens: the pose token, the previous-estimate token, K prompt clicks, two hand-box
tokens and 70 + 70 keypoint tokens. After every layer but the last, the pose is decoded; the 2D
keypoint tokens then receive the projected keypoints' positions and the features under them, and
the 3D keypoint tokens the pelvis-relative 3D keypoints.

Attribute names are the release checkpoint's key names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.sam3d_body.backbone import build_backbone
from models.sam3d_body.camera_encoder import CameraEncoder
from models.sam3d_body.config import Sam3DBodyConfig
from models.sam3d_body.heads import NUM_KEYPOINTS, MHRHead, PerspectiveHead
from models.sam3d_body.prompt_encoder import INVALID_POINT, PromptEncoder, RandomPositionEmbedding
from models.sam3d_body.transformer import MLP, FeedForward, PromptableDecoder

PELVIS = (9, 10)  # left and right hip: the 3D keypoint tokens are relative to their midpoint
CONDITION_DIM = 3  # CLIFF condition: box centre offset and side, over the focal length


@dataclass
class CropGeometry:
    """Where each crop lies in its image, and that image's camera."""

    centers: torch.Tensor  # [N, 2]
    scales: torch.Tensor  # [N, 2]
    affines: torch.Tensor  # [N, 2, 3] image -> crop pixels
    cam_int: torch.Tensor  # [N, 3, 3]

    def condition(self) -> torch.Tensor:
        """CLIFF condition [N, 3]: ((cx - px) / f, (cy - py) / f, side / f)."""
        focal = self.cam_int[:, 0, 0:1]
        offset = (self.centers - self.cam_int[:, [0, 1], 2]) / focal
        return torch.cat([offset, self.scales[:, :1] / focal], dim=1)

    def to_crop(self, points: torch.Tensor, size: int) -> torch.Tensor:
        """[N, K, 2] image pixels -> crop coordinates normalised to [-0.5, 0.5]."""
        homogeneous = torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)
        return (homogeneous @ self.affines.mT)[..., :2] / size - 0.5


@dataclass
class DecoderOutput:
    pose: dict[str, torch.Tensor]  # final prediction
    layers: list[dict[str, torch.Tensor]]  # the prediction after every layer (the last is `pose`)
    hand_box: torch.Tensor  # [N, 2, 4] (cx, cy, w, h) of left and right hand, normalised to the crop
    hand_logits: torch.Tensor  # [N, 2]


class _Branch:
    """The modules of the body or the hand decoding path, by role."""

    def __init__(self, model: Sam3DBody, hand: bool) -> None:
        s = "_hand" if hand else ""
        self.head_pose: MHRHead = getattr(model, "head_pose" + s)
        self.init_pose: nn.Embedding = getattr(model, "init_pose" + s)
        self.head_camera: PerspectiveHead = getattr(model, "head_camera" + s)
        self.init_camera: nn.Embedding = getattr(model, "init_camera" + s)
        self.init_to_token: nn.Linear = getattr(model, "init_to_token_mhr" + s)
        self.prev_to_token: nn.Linear = getattr(model, "prev_to_token_mhr" + s)
        self.decoder: PromptableDecoder = getattr(model, "decoder" + s)
        self.ray_cond_emb: CameraEncoder = getattr(model, "ray_cond_emb" + s)
        self.keypoint_embedding: nn.Embedding = getattr(model, "keypoint_embedding" + s)
        self.keypoint_posemb_linear: FeedForward = getattr(model, "keypoint_posemb_linear" + s)
        self.keypoint_feat_linear: nn.Linear = getattr(model, "keypoint_feat_linear" + s)
        self.keypoint3d_embedding: nn.Embedding = getattr(model, "keypoint3d_embedding" + s)
        self.keypoint3d_posemb_linear: FeedForward = getattr(model, "keypoint3d_posemb_linear" + s)
        self.pe_layer: RandomPositionEmbedding = model.hand_pe_layer if hand else model.prompt_encoder.pe_layer


class Sam3DBody(nn.Module):
    def __init__(self, config: Sam3DBodyConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("image_mean", torch.tensor(config.image_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(config.image_std).view(-1, 1, 1), persistent=False)
        self.backbone = build_backbone(config.backbone_type)
        c, d = self.backbone.embed_dim, config.decoder_dim

        self.head_pose = MHRHead(d, config.head_mlp_depth, config.head_mlp_div, hand=False)
        self.init_pose = nn.Embedding(1, MHRHead.npose)
        self.head_pose_hand = MHRHead(d, config.head_mlp_depth, config.head_mlp_div, hand=True)
        self.init_pose_hand = nn.Embedding(1, MHRHead.npose)
        self.head_camera = PerspectiveHead(d, config.camera_mlp_depth, config.camera_mlp_div, 1.0)
        self.init_camera = nn.Embedding(1, PerspectiveHead.ncam)
        self.head_camera_hand = PerspectiveHead(
            d, config.camera_mlp_depth, config.camera_mlp_div, config.hand_scale_factor
        )
        self.init_camera_hand = nn.Embedding(1, PerspectiveHead.ncam)

        estimate_dim = MHRHead.npose + PerspectiveHead.ncam
        self.init_to_token_mhr = nn.Linear(estimate_dim + CONDITION_DIM, d)
        self.prev_to_token_mhr = nn.Linear(estimate_dim, d)
        self.init_to_token_mhr_hand = nn.Linear(estimate_dim + CONDITION_DIM, d)
        self.prev_to_token_mhr_hand = nn.Linear(estimate_dim, d)

        self.prompt_encoder = PromptEncoder(c)
        self.prompt_to_token = nn.Linear(c, d)
        layers = (config.decoder_depth, config.decoder_heads, config.decoder_head_dim, config.decoder_mlp_dim)
        self.decoder = PromptableDecoder(d, c, *layers)
        self.decoder_hand = PromptableDecoder(d, c, *layers)
        self.hand_pe_layer = RandomPositionEmbedding(c // 2)
        self.ray_cond_emb = CameraEncoder(c, self.backbone.patch_size)
        self.ray_cond_emb_hand = CameraEncoder(c, self.backbone.patch_size)

        self.keypoint_embedding = nn.Embedding(NUM_KEYPOINTS, d)
        self.keypoint_embedding_hand = nn.Embedding(NUM_KEYPOINTS, d)
        self.hand_box_embedding = nn.Embedding(2, d)
        self.hand_cls_embed = nn.Linear(d, 2)
        self.bbox_embed = MLP(d, d, 4, 3)
        self.keypoint_posemb_linear = FeedForward(2, d, d)
        self.keypoint_posemb_linear_hand = FeedForward(2, d, d)
        self.keypoint_feat_linear = nn.Linear(c, d)
        self.keypoint_feat_linear_hand = nn.Linear(c, d)
        self.keypoint3d_embedding = nn.Embedding(NUM_KEYPOINTS, d)
        self.keypoint3d_embedding_hand = nn.Embedding(NUM_KEYPOINTS, d)
        self.keypoint3d_posemb_linear = FeedForward(3, d, d)
        self.keypoint3d_posemb_linear_hand = FeedForward(3, d, d)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def _feature_crop(self) -> int:
        """Feature columns cut from each side for backbones that see a narrower-than-square crop."""
        return self.backbone.input_crop // self.backbone.patch_size

    def _cut_width(self, x: torch.Tensor, amount: int) -> torch.Tensor:
        return x[..., amount:-amount] if amount else x

    def encode(self, crops: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] RGB crops in [0, 1] -> fp32 features [N, C, h, w]."""
        x = (crops - self.image_mean) / self.image_std
        return self.backbone(self._cut_width(x, self.backbone.input_crop)).float()

    def image_context(
        self, features: torch.Tensor, masks: torch.Tensor, mask_scores: torch.Tensor, rays: torch.Tensor, hand: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the mask prompt, then the camera rays: the decoder's context [N, C, h, w] and its PE [1, C, h, w]."""
        mask_emb = self._cut_width(self.prompt_encoder.embed_masks(masks, mask_scores), self._feature_crop)
        branch = _Branch(self, hand)
        context = branch.ray_cond_emb(features + mask_emb.to(features), self._cut_width(rays, self.backbone.input_crop))
        grid = self.image_size // self.backbone.patch_size
        pe = self._cut_width(branch.pe_layer((grid, grid)), self._feature_crop)
        return context, pe

    def decode(
        self,
        context: torch.Tensor,
        context_pe: torch.Tensor,
        geometry: CropGeometry,
        prompts: torch.Tensor,
        hand: bool = False,
        prev_estimate: torch.Tensor | None = None,
    ) -> DecoderOutput:
        """Run the body (or hand) decoder for N crops with K prompt clicks each ([N, K, 3])."""
        branch = _Branch(self, hand)
        n = context.shape[0]
        init_pose = branch.init_pose.weight.expand(n, -1)
        init_camera = branch.init_camera.weight.expand(n, -1)
        init_estimate = torch.cat([init_pose, init_camera], dim=1)
        if prev_estimate is None:
            prev_estimate = init_estimate
        pose_token = branch.init_to_token(torch.cat([geometry.condition(), init_estimate], dim=1))
        prev_token = branch.prev_to_token(prev_estimate)
        prompt_tokens = self.prompt_to_token(self.prompt_encoder.embed_points(prompts))
        k = prompt_tokens.shape[1]
        tokens = torch.cat(
            [
                pose_token[:, None],
                prev_token[:, None],
                prompt_tokens,
                self.hand_box_embedding.weight.expand(n, -1, -1),
                branch.keypoint_embedding.weight.expand(n, -1, -1),
                branch.keypoint3d_embedding.weight.expand(n, -1, -1),
            ],
            dim=1,
        )
        token_pe = torch.zeros_like(tokens)
        token_pe[:, 1] = prev_token
        token_pe[:, 2 : 2 + k] = prompt_tokens
        hand_start = 2 + k
        kp2d = slice(hand_start + 2, hand_start + 2 + NUM_KEYPOINTS)
        kp3d = slice(kp2d.stop, kp2d.stop + NUM_KEYPOINTS)

        layers: list[dict[str, torch.Tensor]] = []

        def predict(normed: torch.Tensor) -> dict[str, torch.Tensor]:
            pose = branch.head_pose(normed[:, 0], init_pose)
            pose["pred_cam"] = branch.head_camera(normed[:, 0], init_camera)
            box = (geometry.centers, geometry.scales[:, 0], geometry.cam_int)
            pose.update(branch.head_camera.project(pose["pred_keypoints_3d"], pose["pred_cam"], *box))
            pose["pred_keypoints_2d_cropped"] = geometry.to_crop(pose["pred_keypoints_2d"], self.image_size)
            layers.append(pose)
            return pose

        def refine(
            tokens: torch.Tensor, token_pe: torch.Tensor, pose: dict[str, torch.Tensor]
        ) -> tuple[torch.Tensor, torch.Tensor]:
            tokens, token_pe = tokens.clone(), token_pe.clone()
            crop_xy = pose["pred_keypoints_2d_cropped"]
            inside = ((crop_xy >= -0.5) & (crop_xy <= 0.5)).all(dim=-1)
            valid = (inside & (pose["pred_keypoints_2d_depth"] >= 1e-5))[..., None]
            token_pe[:, kp2d] = branch.keypoint_posemb_linear(crop_xy) * valid
            sample = crop_xy * 2
            # Backbones with a narrower input see the same square crop squeezed horizontally.
            sample[..., 0] = sample[..., 0] * self.image_size / (self.image_size - 2 * self.backbone.input_crop)
            feats = F.grid_sample(context, sample[:, :, None], mode="bilinear", align_corners=False)
            tokens[:, kp2d] += branch.keypoint_feat_linear(feats[..., 0].transpose(1, 2) * valid)
            kp = pose["pred_keypoints_3d"]
            pelvis = (kp[:, PELVIS[0]] + kp[:, PELVIS[1]])[:, None] / 2
            token_pe[:, kp3d] = branch.keypoint3d_posemb_linear(kp - pelvis)
            return tokens, token_pe

        flat_context = context.flatten(2).transpose(1, 2)
        flat_pe = context_pe.flatten(2).transpose(1, 2).expand(n, -1, -1)
        normed, pose = branch.decoder(tokens, flat_context, token_pe, flat_pe, predict, refine)
        hand_tokens = normed[:, hand_start : hand_start + 2]
        return DecoderOutput(
            pose=pose,
            layers=layers,
            hand_box=self.bbox_embed(hand_tokens).sigmoid(),
            hand_logits=self.hand_cls_embed(hand_tokens),
        )


def dummy_prompts(n: int, device: torch.device | str) -> torch.Tensor:
    """One invalid click per crop: the decoder's input when nobody clicked anything."""
    prompts = torch.zeros(n, 1, 3, device=device)
    prompts[..., 2] = INVALID_POINT
    return prompts
