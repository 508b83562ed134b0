"""A lean decoding step for the decoder-only model: the layers' maths as plain tensor operations.

Generating one token with a KV cache touches a few kilobytes of activations, so with a small model
the time goes to Python and dispatch overhead, not to arithmetic: each ``nn.Module`` call,
attribute lookup, dropout in evaluation mode and input check costs about as much as a 128 x 128
matrix-vector product. ``pack`` gathers the weights of an evaluation-mode ``DecoderOnlyTransformer``
once per generation (joining W_q, W_k and W_v into one matrix); ``step`` then runs new positions
in about fifteen tensor operations per layer, with the same cache (``LMState``) as
``DecoderOnlyTransformer.step``, whose logits it reproduces (tests/test_fast_decode.py). It is what
``attnlab.lm.generate`` runs; the modules stay the readable definition of the model.

Activations are kept 2-D, (B·T, E), so each projection is one ``addmm`` (a single row: one
matrix-vector product), and sums are done in place on tensors created a line earlier.

Shape legend: B batch, T new positions, t cached positions, H heads, D head dim, E model dim,
V vocab size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import KV, causal_mask
from .model import DecoderOnlyTransformer, LMState

__all__ = ["PackedLM", "pack", "step"]

Affine = tuple[Tensor, Tensor]  # a LayerNorm's (γ, β), or a Linear's (Wᵀ (in, out), b): x Wᵀ + b


class _PackedLayer(NamedTuple):
    norm1: Affine
    qkv: Affine  # [W_q; W_k; W_v]ᵀ (E, 3E) and the joined biases (3E,)
    out: Affine  # W_oᵀ (E, E)
    norm2: Affine
    ff1: Affine  # W_1ᵀ (E, d_ff)
    ff2: Affine  # W_2ᵀ (d_ff, E)


class PackedLM(NamedTuple):
    """The weights of a ``DecoderOnlyTransformer``, gathered once for ``step``."""

    embedding: Tensor  # (V, E)
    scale: float  # √E, the embeddings' scale
    positions: Tensor  # the sinusoidal table, (max_len, E)
    layers: tuple[_PackedLayer, ...]
    final_norm: Affine | None  # pre-LN models only
    output: Tensor  # the output projection's Wᵀ, (E, V)
    num_heads: int
    norm_first: bool


def _linear_weights(linear) -> Affine:
    return linear.weight.t(), linear.bias  # a transposed view, taken once rather than at every product


def pack(model: DecoderOnlyTransformer) -> PackedLM:
    """Gather the model's weights for ``step``: views of them, plus one joined Q/K/V matrix per layer."""
    if model.training:
        raise ValueError("pack() is for decoding, which has no dropout: call model.eval() first")
    layers = []
    for layer in model.layers:
        attn, ff = layer.self_attn, layer.feed_forward
        if attn.w_q.bias is None:
            raise ValueError("the lean decoding step expects attention projections with biases")
        qkv = (torch.cat([attn.w_q.weight, attn.w_k.weight, attn.w_v.weight]).t(),  # (E, 3E)
               torch.cat([attn.w_q.bias, attn.w_k.bias, attn.w_v.bias]))  # (3E,)
        layers.append(_PackedLayer(
            (layer.norm1.weight, layer.norm1.bias), qkv, _linear_weights(attn.w_o),
            (layer.norm2.weight, layer.norm2.bias), _linear_weights(ff.w_1), _linear_weights(ff.w_2),
        ))
    c, embedding = model.config, model.embed.embedding.weight
    return PackedLM(
        embedding=embedding, scale=model.embed.scale, positions=model.positional.P[0].to(embedding.dtype),
        layers=tuple(layers), final_norm=(model.norm.weight, model.norm.bias) if c.norm_first else None,
        output=model.output.weight.t(), num_heads=c.num_heads, norm_first=c.norm_first,
    )


def _linear(x: Tensor, affine: Affine) -> Tensor:
    weight_t, bias = affine
    return torch.addmm(bias, x, weight_t)  # (N, out)


def step(packed: PackedLM, tokens: Tensor, state: LMState) -> tuple[Tensor, LMState]:
    """Logits (B, V) of the last of the new positions ``tokens`` (B, T), and the grown cache.

    Either a prefix read into an empty cache (T >= 1) or any T after cached positions. Token ids
    are trusted: ``generate`` checks the prompt, and later tokens come from the model itself.
    """
    B, T = tokens.shape
    t = state.length
    if t + T > packed.positions.size(0):
        raise ValueError(f"{t + T} positions do not fit the model's {packed.positions.size(0)}")
    H, E = packed.num_heads, packed.embedding.size(1)
    mask = None if T == 1 else causal_mask(T, t + T, device=tokens.device)  # one new token sees all
    x = torch.add(packed.positions[t : t + T], F.embedding(tokens, packed.embedding), alpha=packed.scale)
    x = x.view(B * T, E)
    pasts = state.self_kv or (None,) * len(packed.layers)
    new_kv = []
    for layer, past in zip(packed.layers, pasts):
        h = torch.layer_norm(x, (E,), *layer.norm1) if packed.norm_first else x
        q, k, v = _linear(h, layer.qkv).view(B, T, 3, H, E // H).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, D)
        kv = KV(k, v) if past is None else past.extend(KV(k, v))  # (B, H, t + T, D)
        attended = F.scaled_dot_product_attention(q, kv.k, kv.v, attn_mask=mask)  # (B, H, T, D)
        x = _linear(attended.transpose(1, 2).reshape(B * T, E), layer.out).add_(x)
        if not packed.norm_first:
            x = torch.layer_norm(x, (E,), *layer.norm1)
        h = torch.layer_norm(x, (E,), *layer.norm2) if packed.norm_first else x
        x = _linear(_linear(h, layer.ff1).relu_(), layer.ff2).add_(x)
        if not packed.norm_first:
            x = torch.layer_norm(x, (E,), *layer.norm2)
        new_kv.append(kv)
    last = x.view(B, T, E)[:, -1]  # (B, E)
    if packed.final_norm is not None:
        last = torch.layer_norm(last, (E,), *packed.final_norm)
    return last @ packed.output, LMState(tuple(new_kv), t + T)  # (B, V)
