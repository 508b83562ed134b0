"""The Transformer's layers: positional encoding, Add & Norm, feed-forward, encoder and decoder layers.

Masks follow attnlab's one rule (see ``attnlab.nn.attention``): boolean, True = may attend.

Each layer has ``forward`` (a tensor in, a tensor out, like PyTorch's layers; it checks its inputs)
and ``run``, which also takes a cache of earlier positions and returns the grown cache and, on
request, the attention weights; ``run`` trusts its inputs, as the models check theirs once. Both go
through the same sublayer blocks, written once for the two layers (``_Sublayers``).

Shape legend: B batch, S source length, T target length, H heads, E model dim (d_model).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import KV, MultiHeadAttention, _check_mask, dropout

__all__ = [
    "Dropout",
    "PositionalEncoding",
    "AddNorm",
    "PositionwiseFeedForward",
    "EncoderLayer",
    "DecoderLayer",
    "EncoderLayerResult",
    "DecoderLayerResult",
]


class Dropout(nn.Dropout):
    """``nn.Dropout`` computed by ``attnlab.nn.attention.dropout``: masks of the same distribution,
    drawn faster on the CPU. Its probability must be below 1."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


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
        self.dropout = Dropout(dropout)
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
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor, sublayer_output: Tensor) -> Tensor:
        return self.norm(x + self.dropout(sublayer_output))


class PositionwiseFeedForward(nn.Module):
    """FFN(x) = max(0, x W1 + b1) W2 + b2, applied to each position alone (512 → 2048 → 512 in the paper).

    Shape: (..., E) -> (..., E). ``activation`` is the paper's ReLU (the lean decoding step of
    ``attnlab.nn.fast_decode`` checks that it still is).
    """

    activation = staticmethod(F.relu)

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_ff)
        self.w_2 = nn.Linear(d_ff, d_model)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        # In place: the hidden layer is a fresh tensor, and ReLU's backward reads only its output.
        return self.w_2(self.dropout(self.activation(self.w_1(x), inplace=True)))


class EncoderLayerResult(NamedTuple):
    x: Tensor  # (B, S, E)
    kv: KV  # this layer's self-attention keys/values, cache included
    weights: Tensor | None  # (B, H, S, S) when asked for


class DecoderLayerResult(NamedTuple):
    x: Tensor  # (B, T, E)
    kv: KV  # the masked self-attention cache, grown by T positions
    self_weights: Tensor | None  # (B, H, T, T_total)
    cross_weights: Tensor | None  # (B, H, T, S)


class _Sublayers(nn.Module):
    """The blocks both layers are built from, written once: each sublayer sits in a residual
    connection with a LayerNorm, after it (``norm_first=False``, the paper's post-LN:
    x = LN(x + dropout(f(x)))) or before it (pre-LN: x = x + dropout(f(LN(x)))).

    A subclass owns ``self_attn``, ``feed_forward``, ``norm1``, ``dropout1`` and the norm and
    dropout of its feed-forward block; those names are its checkpoint keys.
    """

    norm_first: bool
    self_attn: MultiHeadAttention
    feed_forward: PositionwiseFeedForward
    norm1: nn.LayerNorm
    dropout1: nn.Dropout

    def _sublayer_input(self, x: Tensor, norm: nn.LayerNorm) -> Tensor:
        return norm(x) if self.norm_first else x

    def _add_norm(self, x: Tensor, sublayer_output: Tensor, norm: nn.LayerNorm, dropout: nn.Dropout) -> Tensor:
        x = x + dropout(sublayer_output)
        return x if self.norm_first else norm(x)

    def _self_attention_block(
        self, x: Tensor, mask: Tensor | None, past: KV | None, need_weights: bool
    ) -> tuple[Tensor, KV, Tensor | None]:
        attended = self.self_attn._self_attention(self._sublayer_input(x, self.norm1), mask, past, need_weights)
        return self._add_norm(x, attended.output, self.norm1, self.dropout1), attended.kv, attended.weights

    def _feed_forward_block(self, x: Tensor, norm: nn.LayerNorm, dropout: nn.Dropout) -> Tensor:
        return self._add_norm(x, self.feed_forward(self._sublayer_input(x, norm)), norm, dropout)

    def _check_input(self, x: Tensor, mask: Tensor | None, keys: int, mask_name: str = "mask") -> None:
        """What ``forward`` checks (``run`` trusts its caller): x's features and the mask's shape."""
        self.self_attn._check_features("x", x)
        if mask is not None:
            _check_mask(mask, (x.size(0), self.self_attn.num_heads, x.size(1), keys), mask_name)


class EncoderLayer(_Sublayers):
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
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        self._check_input(x, mask, keys=x.size(1))
        return self.run(x, mask).x

    def run(
        self, x: Tensor, mask: Tensor | None = None, past: KV | None = None, need_weights: bool = False
    ) -> EncoderLayerResult:
        """The layer with a cache of earlier positions (``past``); its inputs are trusted, unchecked."""
        x, kv, weights = self._self_attention_block(x, mask, past, need_weights)
        return EncoderLayerResult(self._feed_forward_block(x, self.norm2, self.dropout2), kv, weights)


class DecoderLayer(_Sublayers):
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
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.dropout3 = Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        self_mask: Tensor | None = None,
        cross_mask: Tensor | None = None,
    ) -> Tensor:
        self._check_input(x, self_mask, keys=x.size(1), mask_name="self_mask")
        self.cross_attn._check_features("memory", memory)
        if memory.size(0) != x.size(0):
            raise ValueError(f"x has batch {x.size(0)} but memory has batch {memory.size(0)}")
        if cross_mask is not None:
            _check_mask(cross_mask, (x.size(0), self.cross_attn.num_heads, x.size(1), memory.size(1)), "cross_mask")
        memory_kv = self.cross_attn._project_kv(memory, memory)
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
        """The layer with a cache of earlier positions (``past``); its inputs are trusted, unchecked."""
        x, kv, self_weights = self._self_attention_block(x, self_mask, past, need_weights)
        x, cross_weights = self._cross_attention_block(x, memory_kv, cross_mask, need_weights)
        return DecoderLayerResult(self._feed_forward_block(x, self.norm3, self.dropout3), kv, self_weights, cross_weights)

    def _cross_attention_block(
        self, x: Tensor, memory_kv: KV, mask: Tensor | None, need_weights: bool
    ) -> tuple[Tensor, Tensor | None]:
        attended = self.cross_attn._attend(self._sublayer_input(x, self.norm2), memory_kv, mask, need_weights)
        return self._add_norm(x, attended.output, self.norm2, self.dropout2), attended.weights
