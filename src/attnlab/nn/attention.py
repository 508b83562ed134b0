"""Attention, from the tutorials' bare dot product to multi-head attention.

One mask rule, everywhere in attnlab: a mask is a boolean tensor in which **True means "this
query may attend to this key"** (the convention of ``torch.nn.functional.scaled_dot_product_attention``).
It must broadcast to the attention scores, shape (B, H, T, S). ``causal_mask`` and ``padding_mask``
build masks in this form; combine them with ``&``. Other conventions (PyTorch's
``nn.MultiheadAttention`` uses True = blocked) are converted once, at the edge, by the caller.

Shape legend: B batch, T query length, S key length, H heads, D head dim, E model dim.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "KV",
    "causal_mask",
    "padding_mask",
    "scaled_dot_product_attention",
    "simple_self_attention",
    "SelfAttention",
    "MultiHeadAttention",
]


class KV(NamedTuple):
    """Projected keys and values of one attention layer, split into heads: a cache entry."""

    k: Tensor  # (B, H, S, D)
    v: Tensor  # (B, H, S, D)

    def extend(self, new: "KV") -> "KV":
        """Append the keys/values of newer positions (self-attention caches grow this way)."""
        return KV(torch.cat([self.k, new.k], dim=2), torch.cat([self.v, new.v], dim=2))

    def select(self, index: Tensor) -> "KV":
        """Keep batch rows ``index`` (beam search reorders caches by parent beam this way)."""
        return KV(self.k.index_select(0, index), self.v.index_select(0, index))


def causal_mask(T: int, S: int | None = None, *, device: torch.device | str | None = None) -> Tensor:
    """Boolean (T, S) mask letting query i see keys 0 .. i + (S - T), never a later position.

    With S > T the queries are taken to be the *last* T positions of S (incremental decoding with
    a cache of S - T earlier positions).
    """
    S = T if S is None else S
    if T < 0 or S < T:
        raise ValueError(f"causal_mask needs 0 <= T <= S, got T={T}, S={S}")
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


def padding_mask(tokens: Tensor, pad_id: int) -> Tensor:
    """Boolean (B, 1, 1, S) mask that is False at padding tokens, so no query attends to them."""
    _check_token_ids(tokens, "tokens")
    return (tokens != pad_id)[:, None, None, :]


def _check_token_ids(tokens: Tensor, name: str) -> None:
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids, got dtype {tokens.dtype}")
    if tokens.dim() != 2:
        raise ValueError(f"{name} must have shape (batch, length), got {tuple(tokens.shape)}")


def _check_mask(mask: Tensor, scores_shape: torch.Size) -> None:
    if mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be boolean (True = may attend), got dtype {mask.dtype}; "
            "convert it with `mask.bool()` or `~blocked`"
        )
    try:
        broadcast = torch.broadcast_shapes(mask.shape, scores_shape)
    except RuntimeError:
        broadcast = None
    if broadcast != scores_shape:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to the attention scores "
            f"of shape {tuple(scores_shape)} (batch, heads, queries, keys)"
        )


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention(Q, K, V) = softmax(Q Kᵀ · scale) V, with scale = 1/√d_k unless given.

    Args:
        q: queries (..., T, D). k: keys (..., S, D). v: values (..., S, Dv).
        mask: boolean, True = may attend, broadcastable to (..., T, S).
        scale: multiplies the raw scores; ``scale=1.0`` reproduces tutorials that skip the √d_k.
        dropout_p: dropout on the attention weights (pass 0.0 in evaluation).
        need_weights: also return the softmax weights (..., T, S); this takes the reference path.

    A query whose keys are all masked gets a zero output (and zero weights), never NaN.
    """
    if q.size(-1) != k.size(-1):
        raise ValueError(
            f"query and key feature sizes differ: q has {q.size(-1)}, k has {k.size(-1)}"
        )
    if k.size(-2) != v.size(-2):
        raise ValueError(f"keys and values differ in length: {k.size(-2)} vs {v.size(-2)}")
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    if mask is not None:
        _check_mask(mask, torch.Size(q.shape[:-1] + k.shape[-2:-1]))
    if need_weights:
        return _reference_attention(q, k, v, mask, scale, dropout_p)
    return _fused_attention(q, k, v, mask, scale, dropout_p)


def _reference_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, dropout_p: float
) -> tuple[Tensor, Tensor]:
    """The tutorials' path: matmul, mask, softmax, matmul. Returns (output, weights)."""
    scores = q @ k.transpose(-2, -1) * scale  # (..., T, S)
    if mask is not None:
        # A large negative number (not -inf) keeps fully masked rows finite; they are zeroed below.
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = scores.softmax(dim=-1)  # (..., T, S)
    if mask is not None:
        weights = weights.masked_fill(~mask, 0.0)
    attended = F.dropout(weights, dropout_p) if dropout_p > 0 else weights
    return attended @ v, weights  # (..., T, Dv), (..., T, S)


def _fused_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, dropout_p: float
) -> Tensor:
    """PyTorch's fused kernel; fully masked rows are opened for the kernel, then zeroed."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    has_key = mask.any(dim=-1, keepdim=True)  # (..., T, 1)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask | ~has_key, dropout_p=dropout_p, scale=scale
    )
    return out.masked_fill(~has_key, 0.0)


def simple_self_attention(x: Tensor) -> tuple[Tensor, Tensor]:
    """Self-attention with no trainable weights: scores = x xᵀ, weights = softmax, context = weights x.

    Args:
        x: token embeddings (T, E) or (B, T, E).
    Returns:
        (context, weights): context has the shape of ``x``; weights are (..., T, T), rows sum to 1.
    """
    scores = x @ x.transpose(-2, -1)  # (..., T, T)
    weights = scores.softmax(dim=-1)
    return weights @ x, weights


class SelfAttention(nn.Module):
    """Single-head self-attention with trainable projections: Q = X W_q, K = X W_k, V = X W_v.

    Shape: x (..., T, d_in) -> (..., T, d_out).

    Example:
        >>> attn = SelfAttention(d_in=4, d_out=3)
        >>> attn(torch.rand(2, 5, 4)).shape
        torch.Size([2, 5, 3])
    """

    def __init__(self, d_in: int, d_out: int, bias: bool = False) -> None:
        super().__init__()
        self.w_q = nn.Linear(d_in, d_out, bias=bias)
        self.w_k = nn.Linear(d_in, d_out, bias=bias)
        self.w_v = nn.Linear(d_in, d_out, bias=bias)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        *,
        scale: float | None = None,
        need_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        if x.size(-1) != self.w_q.in_features:
            raise ValueError(
                f"input has {x.size(-1)} features, SelfAttention expects d_in={self.w_q.in_features}"
            )
        q, k, v = self.w_q(x), self.w_k(x), self.w_v(x)  # (..., T, d_out) each
        return scaled_dot_product_attention(q, k, v, mask, scale=scale, need_weights=need_weights)


class MultiHeadAttention(nn.Module):
    """Multi-head attention: project, split into heads, attend per head in parallel, concatenate, W_o.

    Batch first. ``forward(query, key, value)`` serves the Transformer's three uses: encoder
    self-attention (all three the same tensor), decoder masked self-attention (plus a causal mask)
    and encoder-decoder attention (query from the decoder, key = value = encoder output).

    Incremental decoding uses the pieces directly, with caches passed in and returned as values:
    ``self_attention(x, past=...)`` returns the grown cache, ``project_kv`` computes the
    cross-attention keys/values once and ``attend`` reuses them.

    Shape: query (B, T, E), key/value (B, S, E), mask broadcastable to (B, H, T, S) -> (B, T, E);
    weights (B, H, T, S) when ``need_weights=True``.

    Example:
        >>> mha = MultiHeadAttention(d_model=512, num_heads=8)
        >>> x = torch.rand(2, 10, 512)
        >>> mha(x, x, x).shape
        torch.Size([2, 10, 512])
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        if num_heads <= 0 or d_model % num_heads != 0:
            raise ValueError(
                f"d_model ({d_model}) must be divisible by num_heads ({num_heads}): "
                "each head gets d_model / num_heads features"
            )
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.dropout = dropout
        self.w_q = nn.Linear(d_model, d_model, bias=bias)
        self.w_k = nn.Linear(d_model, d_model, bias=bias)
        self.w_v = nn.Linear(d_model, d_model, bias=bias)
        self.w_o = nn.Linear(d_model, d_model, bias=bias)

    def _split_heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def _merge_heads(self, x: Tensor) -> Tensor:
        B, _, T, _ = x.shape
        return x.transpose(1, 2).reshape(B, T, self.d_model)  # (B, T, E)

    def _check_features(self, name: str, x: Tensor) -> None:
        if x.dim() != 3:
            raise ValueError(f"{name} must have shape (batch, length, d_model), got {tuple(x.shape)}")
        if x.size(-1) != self.d_model:
            raise ValueError(
                f"{name} has {x.size(-1)} features, but this attention has d_model={self.d_model}"
            )

    def project_kv(self, key: Tensor, value: Tensor) -> KV:
        """Project keys and values and split them into heads: (B, S, E) -> KV of (B, H, S, D)."""
        self._check_features("key", key)
        self._check_features("value", value)
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(
                f"key and value must agree in batch and length, got {tuple(key.shape)} and {tuple(value.shape)}"
            )
        return KV(self._split_heads(self.w_k(key)), self._split_heads(self.w_v(value)))

    def attend(
        self, query: Tensor, kv: KV, mask: Tensor | None = None, need_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from ``query`` (B, T, E) to already projected keys/values. Returns (out, weights|None)."""
        self._check_features("query", query)
        q = self._split_heads(self.w_q(query))  # (B, H, T, D)
        return self._attend_heads(q, kv, mask, need_weights)

    def self_attention(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        past: KV | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, KV, Tensor | None]:
        """Self-attention of ``x`` (B, T, E), with an optional cache ``past`` of earlier positions.

        Q, K and V come from one matrix product over all positions; an incremental step (a cache
        and one new position) uses three small products instead, which is cheaper than joining the
        weights. Returns (out, present, weights|None), ``present`` being the cache grown by T.
        """
        self._check_features("input", x)
        if past is not None and x.size(1) == 1:
            q, k, v = self.w_q(x), self.w_k(x), self.w_v(x)  # (B, 1, E) each
        else:
            w = torch.cat([self.w_q.weight, self.w_k.weight, self.w_v.weight])  # (3E, E)
            b = None
            if self.w_q.bias is not None:
                b = torch.cat([self.w_q.bias, self.w_k.bias, self.w_v.bias])  # (3E,)
            q, k, v = F.linear(x, w, b).split(self.d_model, dim=-1)  # (B, T, E) each
        present = KV(self._split_heads(k), self._split_heads(v))
        if past is not None:
            present = past.extend(present)
        out, weights = self._attend_heads(self._split_heads(q), present, mask, need_weights)
        return out, present, weights

    def _attend_heads(
        self, q: Tensor, kv: KV, mask: Tensor | None, need_weights: bool
    ) -> tuple[Tensor, Tensor | None]:
        dropout_p = self.dropout if self.training else 0.0
        result = scaled_dot_product_attention(
            q, kv.k, kv.v, mask, dropout_p=dropout_p, need_weights=need_weights
        )
        out, weights = result if need_weights else (result, None)
        return self.w_o(self._merge_heads(out)), weights  # (B, T, E)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        mask: Tensor | None = None,
        need_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Returns the output (B, T, E), and the weights (B, H, T, S) too when ``need_weights``."""
        if query is key and key is value:
            out, _, weights = self.self_attention(query, mask, need_weights=need_weights)
        else:
            self._check_features("query", query)
            if query.size(0) != key.size(0):
                raise ValueError(
                    f"query and key differ in batch size: {query.size(0)} vs {key.size(0)}"
                )
            out, weights = self.attend(query, self.project_kv(key, value), mask, need_weights)
        return (out, weights) if need_weights else out
