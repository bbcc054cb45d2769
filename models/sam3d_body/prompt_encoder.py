"""Prompts of the pose decoder: 2D keypoint clicks and a person mask.

Clicks are embedded SAM-style (random Fourier features of the position plus a learned
embedding per keypoint label); the mask is downscaled 16x by a small conv stack and added to
the backbone features, or replaced by a learned no-mask embedding when there is none.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from models.sam3d_body.transformer import LayerNorm2d

NUM_PROMPT_KEYPOINTS = 70
# Labels of special clicks; labels >= 0 name the keypoint (MHR70 index) that was clicked.
INVALID_POINT = -2
NOT_A_POINT = -1


class RandomPositionEmbedding(nn.Module):
    """sin/cos of 2*pi * (2p - 1) @ G for a fixed Gaussian matrix G [2, C/2] (a checkpoint buffer)."""

    def __init__(self, num_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_feats))

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """[..., 2] positions in [0, 1] -> [..., C]."""
        proj = 2 * math.pi * ((2 * coords - 1) @ self.positional_encoding_gaussian_matrix)
        return torch.cat([proj.sin(), proj.cos()], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Dense [1, C, h, w] embedding of the cell centres of an h x w grid."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)
        return self.encode(grid).permute(2, 0, 1).unsqueeze(0)


class PromptEncoder(nn.Module):
    """Keypoint-click and mask embeddings in the backbone's width C."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.pe_layer = RandomPositionEmbedding(embed_dim // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(NUM_PROMPT_KEYPOINTS))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.invalid_point_embed = nn.Embedding(1, embed_dim)
        chans = [1, 4, 16, 64, 256]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(c_in, c_out, kernel_size=2, stride=2), LayerNorm2d(c_out), nn.GELU()]
        layers.append(nn.Conv2d(chans[-1], embed_dim, kernel_size=1))
        self.mask_downscaling = nn.Sequential(*layers)
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def embed_points(self, points: torch.Tensor) -> torch.Tensor:
        """[B, K, 3] clicks (x, y in [0, 1] of the crop, label) -> [B, K, C]."""
        labels = points[..., 2]
        emb = self.pe_layer.encode(points[..., :2].float())
        special = (labels == INVALID_POINT) | (labels == NOT_A_POINT)
        emb = torch.where(special[..., None], torch.zeros_like(emb), emb)
        emb = emb + (labels == INVALID_POINT)[..., None] * self.invalid_point_embed.weight
        emb = emb + (labels == NOT_A_POINT)[..., None] * self.not_a_point_embed.weight
        table = torch.cat([e.weight for e in self.point_embeddings])
        keypoint = labels.clamp(min=0).long()
        return emb + (labels >= 0)[..., None] * table[keypoint]

    def embed_masks(self, masks: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """[B, 1, S, S] crop masks and [B] scores -> [B, C, S/16, S/16] to add to the image features.

        A person without a mask (score 0) gets the learned no-mask embedding.
        """
        mask_emb = self.mask_downscaling(masks)
        no_mask = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand_as(mask_emb)
        scores = scores.view(-1, 1, 1, 1).to(mask_emb)
        return torch.where(scores > 0, scores * mask_emb, no_mask)
