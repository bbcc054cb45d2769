"""The promptable pose decoder: SAM-style cross-attention layers over person tokens and image features.

Unlike SAM's two-way transformer the image context is never updated; tokens self-attend, then
cross-attend to the (constant) image features, then pass an MLP. Positional embeddings are
re-added at every layer after their own LayerNorm (REPEAT_PE), except in self-attention of the
first layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

P = TypeVar("P")


class FeedForward(nn.Module):
    """`num_layers` Linear layers with an activation between them.

    Parameter names follow the release (`layers.0.0`, ..., `layers.{n-1}`): every hidden layer is
    a Sequential(Linear, act, Dropout) and the last Linear stands alone.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int = 2,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Sequential(nn.Linear(dim, hidden_dim), activation(), nn.Dropout(0.0)))
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MLP(nn.Module):
    """DETR-style box MLP: Linear layers with ReLU between them (`layers.i`)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [out_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a [B, C, H, W] map."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class LayerNorm32(nn.LayerNorm):
    """LayerNorm evaluated in float32 (input and affine parameters upcast); returns the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight.float(), self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v input widths and an inner width of heads x head_dim."""

    def __init__(self, inner_dim: int, num_heads: int, query_dim: int, context_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(query_dim, inner_dim)
        self.k_proj = nn.Linear(context_dim, inner_dim)
        self.v_proj = nn.Linear(context_dim, inner_dim)
        self.proj = nn.Linear(inner_dim, query_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, n, _ = q.shape
        out = F.scaled_dot_product_attention(
            self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        )
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class DecoderLayer(nn.Module):
    """Token self-attention, cross-attention to the image, MLP; each pre-normed and residual."""

    def __init__(
        self, dim: int, context_dim: int, num_heads: int, head_dim: int, mlp_dim: int, skip_first_pe: bool
    ) -> None:
        super().__init__()
        self.skip_first_pe = skip_first_pe
        inner = num_heads * head_dim
        self.ln_pe_1 = LayerNorm32(dim, eps=1e-6)
        self.ln_pe_2 = LayerNorm32(context_dim, eps=1e-6)
        self.ln1 = LayerNorm32(dim, eps=1e-6)
        self.self_attn = Attention(inner, num_heads, dim, dim)
        self.ln2_1 = LayerNorm32(dim, eps=1e-6)
        self.ln2_2 = LayerNorm32(context_dim, eps=1e-6)
        self.cross_attn = Attention(inner, num_heads, dim, context_dim)
        self.ln3 = LayerNorm32(dim, eps=1e-6)
        self.ffn = FeedForward(dim, mlp_dim, dim, num_layers=2, activation=nn.GELU)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, x_pe: torch.Tensor, context_pe: torch.Tensor
    ) -> torch.Tensor:
        x_pe = self.ln_pe_1(x_pe)
        context_pe = self.ln_pe_2(context_pe)

        normed = self.ln1(x)
        qk = normed if self.skip_first_pe else normed + x_pe
        x = x + self.self_attn(qk, qk, normed)

        context_normed = self.ln2_2(context)
        x = x + self.cross_attn(self.ln2_1(x) + x_pe, context_normed + context_pe, context_normed)
        return x + self.ffn(self.ln3(x))


class PromptableDecoder(nn.Module):
    """DEPTH decoder layers; between layers a callback refines the tokens from an intermediate prediction."""

    def __init__(self, dim: int, context_dim: int, depth: int, num_heads: int, head_dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(dim, context_dim, num_heads, head_dim, mlp_dim, skip_first_pe=i == 0) for i in range(depth)
        )
        self.norm_final = LayerNorm32(dim, eps=1e-6)

    def forward(
        self,
        tokens: torch.Tensor,
        context: torch.Tensor,
        token_pe: torch.Tensor,
        context_pe: torch.Tensor,
        predict: Callable[[torch.Tensor], P],
        refine: Callable[[torch.Tensor, torch.Tensor, P], tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, P]:
        """Run the layers on [B, N, D] tokens and [B, HW, C] context.

        After every layer but the last, `predict` decodes the normed tokens into a pose and
        `refine` writes what that pose says (keypoint positions, features under them) back into
        the tokens and their positional embeddings. Returns the final normed tokens and the
        prediction made from them.
        """
        for layer in self.layers[:-1]:
            tokens = layer(tokens, context, token_pe, context_pe)
            tokens, token_pe = refine(tokens, token_pe, predict(self.norm_final(tokens)))
        tokens = self.norm_final(self.layers[-1](tokens, context, token_pe, context_pe))
        return tokens, predict(tokens)
