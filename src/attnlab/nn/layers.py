"""The Transformer's layers: positional encoding, Add & Norm, feed-forward, encoder and decoder layers.

Masks follow attnlab's one rule (see ``attnlab.attention``): boolean, True = may attend.

Each layer has ``forward`` (a tensor in, a tensor out, like PyTorch's layers) and ``run``, which
also takes a cache of earlier positions and returns the grown cache and, on request, the attention
weights. Both go through the same sublayer blocks.

Shape legend: B batch, S source length, T target length, H heads, E model dim (d_model).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import KV, MultiHeadAttention

__all__ = [
    "PositionalEncoding",
    "AddNorm",
    "PositionwiseFeedForward",
    "EncoderLayer",
    "DecoderLayer",
    "EncoderLayerResult",
    "DecoderLayerResult",
]


class PositionalEncoding(nn.Module):
    """Adds the sinusoidal table P to token embeddings, then dropout: dropout(X + P).

    P[i, 2j] = sin(i / 10000^(2j/d)) and P[i, 2j+1] = cos(i / 10000^(2j/d)), precomputed for
    ``max_len`` positions as the buffer ``P`` of shape (1, max_len, d_model). Attention alone is
    blind to order; these values tell the model where each token stands.

    Shape: x (B, T, E) -> (B, T, E). ``start`` offsets the positions (incremental decoding).

    Example:
        >>> pe = PositionalEncoding(d_model=32, dropout=0.0)
        >>> pe(torch.zeros(1, 60, 32)).shape
        torch.Size([1, 60, 32])
    """

    def __init__(self, d_model: int, dropout: float = 0.1, max_len: int = 1000) -> None:
        super().__init__()
        if d_model % 2 != 0:
            raise ValueError(f"d_model must be even for sine/cosine pairs, got {d_model}")
        self.max_len = max_len
        self.dropout = nn.Dropout(dropout)
        position = torch.arange(max_len, dtype=torch.float64)[:, None]  # (max_len, 1)
        frequency = torch.pow(10000.0, -torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
        angles = position * frequency  # (max_len, E/2)
        P = torch.zeros(1, max_len, d_model, dtype=torch.float64)
        P[0, :, 0::2] = torch.sin(angles)
        P[0, :, 1::2] = torch.cos(angles)
        self.register_buffer("P", P.float(), persistent=False)

    def forward(self, x: Tensor, start: int = 0) -> Tensor:
        T = x.size(1)
        if start + T > self.max_len:
            raise ValueError(
                f"sequence of length {start + T} is longer than max_len={self.max_len} "
                "positions; raise max_len in the model config or shorten the input"
            )
        return self.dropout(x + self.P[:, start : start + T].to(x.dtype))  # (B, T, E)


class AddNorm(nn.Module):
    """Add & Norm: LayerNorm(x + dropout(sublayer_output)), the paper's residual wrapper (post-LN).

    LayerNorm(v) = γ · (v − μ) / σ + β over the feature dimension, γ and β learned.
    """

    def __init__(self, d_model: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, sublayer_output: Tensor) -> Tensor:
        return self.norm(x + self.dropout(sublayer_output))


class PositionwiseFeedForward(nn.Module):
    """FFN(x) = max(0, x W1 + b1) W2 + b2, applied to each position alone (512 → 2048 → 512 in the paper).

    Shape: (..., E) -> (..., E).
    """

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_ff)
        self.w_2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(self.dropout(F.relu(self.w_1(x))))


class EncoderLayerResult(NamedTuple):
    x: Tensor  # (B, S, E)
    kv: KV  # this layer's self-attention keys/values, cache included
    weights: Tensor | None  # (B, H, S, S) when asked for


class DecoderLayerResult(NamedTuple):
    x: Tensor  # (B, T, E)
    kv: KV  # the masked self-attention cache, grown by T positions
    self_weights: Tensor | None  # (B, H, T, T_total)
    cross_weights: Tensor | None  # (B, H, T, S)


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward, each wrapped in a residual connection and LayerNorm.

    ``norm_first=False`` is the paper's post-LN: x = LN(x + SA(x)); ``True`` is pre-LN:
    x = x + SA(LN(x)), which trains more stably in deep stacks. With a causal mask this same
    layer is the block of a decoder-only (GPT-style) language model.

    Shape: x (B, S, E), mask broadcastable to (B, H, S, S) -> (B, S, E).
    """

    def __init__(
        self, d_model: int, num_heads: int, d_ff: int, dropout: float = 0.1, norm_first: bool = False
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, num_heads, dropout)
        self.feed_forward = PositionwiseFeedForward(d_model, d_ff, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.run(x, mask).x

    def run(
        self, x: Tensor, mask: Tensor | None = None, past: KV | None = None, need_weights: bool = False
    ) -> EncoderLayerResult:
        if self.norm_first:
            attended, kv, weights = self._sa_block(self.norm1(x), mask, past, need_weights)
            x = x + attended
            x = x + self._ff_block(self.norm2(x))
        else:
            attended, kv, weights = self._sa_block(x, mask, past, need_weights)
            x = self.norm1(x + attended)
            x = self.norm2(x + self._ff_block(x))
        return EncoderLayerResult(x, kv, weights)

    def _sa_block(
        self, x: Tensor, mask: Tensor | None, past: KV | None, need_weights: bool
    ) -> tuple[Tensor, KV, Tensor | None]:
        out, kv, weights = self.self_attn.self_attention(x, mask, past, need_weights)
        return self.dropout1(out), kv, weights

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.dropout2(self.feed_forward(x))


class DecoderLayer(nn.Module):
    """Masked self-attention, encoder-decoder (cross) attention, feed-forward; each with Add & Norm.

    Cross-attention takes its queries from the decoder and its keys and values from the encoder
    output ``memory``; in incremental decoding those keys/values are projected once
    (``cross_attn.project_kv``) and passed in as ``memory_kv``.

    Shape: x (B, T, E), memory (B, S, E), self_mask -> (B, H, T, T), cross_mask -> (B, H, T, S).
    """

    def __init__(
        self, d_model: int, num_heads: int, d_ff: int, dropout: float = 0.1, norm_first: bool = False
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, num_heads, dropout)
        self.cross_attn = MultiHeadAttention(d_model, num_heads, dropout)
        self.feed_forward = PositionwiseFeedForward(d_model, d_ff, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        self_mask: Tensor | None = None,
        cross_mask: Tensor | None = None,
    ) -> Tensor:
        memory_kv = self.cross_attn.project_kv(memory, memory)
        return self.run(x, memory_kv, self_mask, cross_mask).x

    def run(
        self,
        x: Tensor,
        memory_kv: KV,
        self_mask: Tensor | None = None,
        cross_mask: Tensor | None = None,
        past: KV | None = None,
        need_weights: bool = False,
    ) -> DecoderLayerResult:
        if self.norm_first:
            attended, kv, self_weights = self._sa_block(self.norm1(x), self_mask, past, need_weights)
            x = x + attended
            crossed, cross_weights = self._mha_block(self.norm2(x), memory_kv, cross_mask, need_weights)
            x = x + crossed
            x = x + self._ff_block(self.norm3(x))
        else:
            attended, kv, self_weights = self._sa_block(x, self_mask, past, need_weights)
            x = self.norm1(x + attended)
            crossed, cross_weights = self._mha_block(x, memory_kv, cross_mask, need_weights)
            x = self.norm2(x + crossed)
            x = self.norm3(x + self._ff_block(x))
        return DecoderLayerResult(x, kv, self_weights, cross_weights)

    def _sa_block(
        self, x: Tensor, mask: Tensor | None, past: KV | None, need_weights: bool
    ) -> tuple[Tensor, KV, Tensor | None]:
        out, kv, weights = self.self_attn.self_attention(x, mask, past, need_weights)
        return self.dropout1(out), kv, weights

    def _mha_block(
        self, x: Tensor, memory_kv: KV, mask: Tensor | None, need_weights: bool
    ) -> tuple[Tensor, Tensor | None]:
        out, weights = self.cross_attn.attend(x, memory_kv, mask, need_weights)
        return self.dropout2(out), weights

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.dropout3(self.feed_forward(x))
