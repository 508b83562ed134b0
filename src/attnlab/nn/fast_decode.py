"""A lean decoding step for the decoder-only model: the layers' maths as plain tensor operations.

Generating one token with a KV cache touches a few kilobytes of activations, so with a small model
the time goes to Python and dispatch overhead, not to arithmetic: each ``nn.Module`` call,
attribute lookup, dropout in evaluation mode and input check costs about as much as a 128 x 128
matrix-vector product. ``pack`` gathers the weights of an evaluation-mode ``DecoderOnlyTransformer``
once per generation (W_q, W_k and W_v are already one matrix); ``step`` then runs new positions
in about fifteen tensor operations per layer, with the same cache (``LMState``) as
``DecoderOnlyTransformer.step``, whose logits it reproduces (tests/test_fast_decode.py). It is what
``attnlab.decode.generate`` runs; the modules stay the readable definition of the model. Because
it re-implements their maths, ``pack`` checks every assumption it makes about them and refuses a
model that differs.

Activations are kept 2-D, (B·T, E), so each projection is one ``addmm`` (a single row: one
matrix-vector product), and sums are done in place on tensors created a line earlier.

Shape legend: B batch, T new positions, t cached positions, H heads, D head dim, E model dim,
V vocab size.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import KV, MultiHeadAttention, causal_mask
from .layers import EncoderLayer, PositionwiseFeedForward
from .model import DecoderOnlyTransformer, LMState

__all__ = ["PackedLM", "pack", "step"]

Affine = tuple[Tensor, Tensor]  # a LayerNorm's (γ, β), or a Linear's (Wᵀ (in, out), b): x Wᵀ + b


class _PackedLayer(NamedTuple):
    norm1: Affine
    qkv: Affine  # the fused [W_q; W_k; W_v]ᵀ (E, 3E) and its biases (3E,)
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


_LAYER_NORM_EPS = 1e-5  # the eps ``step`` normalises with: nn.LayerNorm's default, which the layers use
_LAYER_CHILDREN = {"self_attn", "feed_forward", "norm1", "norm2", "dropout1", "dropout2"}
_MODEL_CHILDREN = {"embed", "positional", "layers", "norm", "output"}


def _require(condition: bool, assumption: str) -> None:
    """Refuse a model that differs from what ``step`` computes, rather than decode it wrongly."""
    if not condition:
        raise ValueError(f"the lean decoding step (attnlab.nn.fast_decode) assumes {assumption}")


def _check_norm(norm: nn.Module, E: int, where: str) -> Affine:
    _require(type(norm) is nn.LayerNorm, f"{where} is an nn.LayerNorm, found {type(norm).__name__}")
    _require(norm.normalized_shape == (E,) and norm.weight is not None and norm.bias is not None,
             f"{where} normalises the {E} features with a learned gain and bias")
    _require(norm.eps == _LAYER_NORM_EPS, f"{where} has eps {_LAYER_NORM_EPS}, found {norm.eps}")
    return norm.weight, norm.bias


def _check_layer(layer: nn.Module, config, index: int) -> _PackedLayer:
    """Every assumption ``step`` makes about one layer, checked; then the layer's weights."""
    where = f"layer {index}"
    _require(type(layer) is EncoderLayer, f"{where} is an EncoderLayer, found {type(layer).__name__}")
    children = {name for name, _ in layer.named_children()}
    _require(children == _LAYER_CHILDREN, f"{where} has exactly the modules {sorted(_LAYER_CHILDREN)}, "
             f"found {sorted(children)}")
    _require(layer.norm_first == config.norm_first,
             f"{where} places its norms as the config says (norm_first={config.norm_first})")
    attn, ff, E = layer.self_attn, layer.feed_forward, config.d_model
    _require(type(attn) is MultiHeadAttention and attn.d_model == E and attn.num_heads == config.num_heads,
             f"{where}'s attention splits d_model={E} into num_heads={config.num_heads} heads")
    _require(attn.in_proj_bias is not None and attn.w_o.bias is not None,
             f"{where}'s attention projections have biases")
    _require(type(ff) is PositionwiseFeedForward and ff.activation is F.relu,
             f"{where}'s feed-forward block is PositionwiseFeedForward with a ReLU")
    _require(ff.w_1.bias is not None and ff.w_2.bias is not None, f"{where}'s feed-forward layers have biases")
    return _PackedLayer(
        _check_norm(layer.norm1, E, f"{where}'s norm1"),
        (attn.in_proj_weight.t(), attn.in_proj_bias),  # [W_q; W_k; W_v]ᵀ (E, 3E), (3E,)
        _linear_weights(attn.w_o),
        _check_norm(layer.norm2, E, f"{where}'s norm2"),
        _linear_weights(ff.w_1),
        _linear_weights(ff.w_2),
    )


def _linear_weights(linear: nn.Linear) -> Affine:
    return linear.weight.t(), linear.bias  # a transposed view, taken once rather than at every product


def pack(model: DecoderOnlyTransformer) -> PackedLM:
    """Gather the model's weights for ``step`` (views of them), after checking every assumption
    ``step`` makes: evaluation mode (no dropout) throughout, the norms where the config puts them
    with the eps ``step`` uses, ReLU feed-forward blocks, the head split, biases where ``step``
    adds them, an output layer without bias (tied to the embeddings exactly when the config says),
    and no module ``step`` would leave out. A change to the layers then fails here, loudly,
    instead of decoding differently from the modules.
    """
    if any(m.training for m in model.modules()):
        raise ValueError("pack() is for decoding, which has no dropout: call model.eval() first")
    c = model.config
    _require(type(model) is DecoderOnlyTransformer, f"a DecoderOnlyTransformer, found {type(model).__name__}")
    children = {name for name, _ in model.named_children()}
    _require(children == _MODEL_CHILDREN, f"the model has exactly the modules {sorted(_MODEL_CHILDREN)}, "
             f"found {sorted(children)}")
    embedding = model.embed.embedding.weight
    _require(model.embed.scale == math.sqrt(c.d_model), "embeddings scaled by sqrt(d_model)")
    _require(len(model.layers) == c.num_layers, f"{c.num_layers} layers, as the config says")
    layers = tuple(_check_layer(layer, c, i) for i, layer in enumerate(model.layers))
    if c.norm_first:
        final_norm = _check_norm(model.norm, c.d_model, "the final norm (pre-LN)")
    else:
        _require(type(model.norm) is nn.Identity, "no final norm in a post-LN model")
        final_norm = None
    _require(model.output.bias is None, "an output layer without bias")
    tied = model.output.weight is embedding
    _require(tied == c.tie_embeddings, f"output weights {'tied to' if c.tie_embeddings else 'separate from'} "
             "the embeddings, as the config says")
    return PackedLM(
        embedding=embedding, scale=model.embed.scale, positions=model.positional.P[0].to(embedding.dtype),
        layers=layers, final_norm=final_norm, output=model.output.weight.t(), num_heads=c.num_heads,
        norm_first=c.norm_first,
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
        h = torch.layer_norm(x, (E,), *layer.norm1, _LAYER_NORM_EPS) if packed.norm_first else x
        q, k, v = _linear(h, layer.qkv).view(B, T, 3, H, E // H).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, D)
        kv = KV(k, v) if past is None else past.extend(KV(k, v))  # (B, H, t + T, D)
        attended = F.scaled_dot_product_attention(q, kv.k, kv.v, attn_mask=mask)  # (B, H, T, D)
        x = _linear(attended.transpose(1, 2).reshape(B * T, E), layer.out).add_(x)
        if not packed.norm_first:
            x = torch.layer_norm(x, (E,), *layer.norm1, _LAYER_NORM_EPS)
        h = torch.layer_norm(x, (E,), *layer.norm2, _LAYER_NORM_EPS) if packed.norm_first else x
        x = _linear(_linear(h, layer.ff1).relu_(), layer.ff2).add_(x)
        if not packed.norm_first:
            x = torch.layer_norm(x, (E,), *layer.norm2, _LAYER_NORM_EPS)
        new_kv.append(kv)
    last = x.view(B, T, E)[:, -1]  # (B, E)
    if packed.final_norm is not None:
        last = torch.layer_norm(last, (E,), *packed.final_norm, _LAYER_NORM_EPS)
    return last @ packed.output, LMState(tuple(new_kv), t + T)  # (B, V)
