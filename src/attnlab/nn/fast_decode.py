"""Lean decoding steps for both models: the layers' maths as plain tensor operations.

Generating one token with a KV cache touches a few kilobytes of activations, so with a small model
the time goes to Python and dispatch overhead, not to arithmetic: each ``nn.Module`` call,
attribute lookup, dropout in evaluation mode and input check costs about as much as a 128 x 128
matrix-vector product. ``pack`` gathers the weights of an evaluation-mode ``DecoderOnlyTransformer``
once per generation (W_q, W_k and W_v are already one matrix); ``step`` then runs new positions
in about fifteen tensor operations per layer, with the same cache (``LMState``) as
``DecoderOnlyTransformer.step``, whose logits it reproduces (tests/test_fast_decode.py). It is what
``attnlab.decode.generate`` runs; the modules stay the readable definition of the model. Because
it re-implements their maths, ``pack`` checks every assumption it makes about them and refuses a
model that differs. The encoder-decoder ``Transformer`` has its own lean step (``pack_decoder``,
``start_decoding``, ``decoder_step``, below), which ``attnlab.decode.translate`` runs.

Activations are kept 2-D, (B·T, E), so each projection is one ``addmm`` (a single row: one
matrix-vector product), and sums are done in place on tensors created a line earlier.

Shape legend: B batch, T new positions, t cached positions, H heads, D head dim, E model dim,
V vocab size.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native
from .attention import KV, MultiHeadAttention, causal_mask
from .layers import (
    DecoderLayer,
    EncoderLayer,
    PositionalEncoding,
    PositionwiseFeedForward,
)
from .model import DecoderOnlyTransformer, Encoded, LMState, TokenEmbedding, Transformer

__all__ = ["PackedLM", "pack", "step", "PackedDecoder", "LeanDecoderState", "NativeDecoderState", "pack_decoder",
           "start_decoding", "decoder_step", "PackedEncoder", "pack_encoder", "encode", "Int8Linear", "int8_from_rows",
           "OutputScreen", "output_screen", "screened_pick", "Int8Weights", "int8_weights", "int8_pick"]

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


def _final_norm(norm: nn.Module, config, name: str) -> Affine | None:
    """A stack's final norm: a pre-LN stack has one (checked, its weights returned), a post-LN none."""
    if config.norm_first:
        return _check_norm(norm, config.d_model, f"the {name} (pre-LN)")
    _require(type(norm) is nn.Identity, f"no {name} in a post-LN model")
    return None


def _check_embeddings(model: Transformer, embed: nn.Module, side: str) -> Tensor:
    """One side's embeddings of a ``Transformer``, as the lean paths compute them: a ``TokenEmbedding``
    scaled by √E, then the sinusoidal ``PositionalEncoding``; the embedding weights."""
    _require(type(model.positional) is PositionalEncoding, "the sinusoidal PositionalEncoding adds the positions")
    _require(type(embed) is TokenEmbedding and embed.scale == math.sqrt(model.config.d_model),
             f"{side} embeddings scaled by sqrt(d_model)")
    return embed.embedding.weight


def _check_attention(attn: nn.Module, config, where: str) -> MultiHeadAttention:
    E = config.d_model
    _require(type(attn) is MultiHeadAttention and attn.d_model == E and attn.num_heads == config.num_heads,
             f"{where} splits d_model={E} into num_heads={config.num_heads} heads")
    _require(attn.in_proj_bias is not None and attn.w_o.bias is not None, f"{where}'s projections have biases")
    return attn


def _check_feed_forward(ff: nn.Module, where: str) -> PositionwiseFeedForward:
    _require(type(ff) is PositionwiseFeedForward and ff.activation is F.relu,
             f"{where}'s feed-forward block is PositionwiseFeedForward with a ReLU")
    _require(ff.w_1.bias is not None and ff.w_2.bias is not None, f"{where}'s feed-forward layers have biases")
    return ff


def _check_frame(layer: nn.Module, kind: type, children: set[str], config, where: str) -> None:
    """The layer's class, its exact submodules, and its norms placed as the config says."""
    _require(type(layer) is kind, f"{where} is of type {kind.__name__}, found {type(layer).__name__}")
    found = {name for name, _ in layer.named_children()}
    _require(found == children, f"{where} has exactly the modules {sorted(children)}, found {sorted(found)}")
    _require(layer.norm_first == config.norm_first,
             f"{where} places its norms as the config says (norm_first={config.norm_first})")


def _check_layer(layer: nn.Module, config, index: int, kind: str = "layer") -> _PackedLayer:
    """Every assumption ``step`` (or ``encode``) makes about one layer, checked; then the layer's weights."""
    where = f"{kind} {index}"
    _check_frame(layer, EncoderLayer, _LAYER_CHILDREN, config, where)
    attn = _check_attention(layer.self_attn, config, f"{where}'s attention")
    ff = _check_feed_forward(layer.feed_forward, where)
    E = config.d_model
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
    final_norm = _final_norm(model.norm, c, "final norm")
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
        h = _sublayer_input(x, layer.norm1, packed.norm_first)
        q, k, v = _linear(h, layer.qkv).view(B, T, 3, H, E // H).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, D)
        kv = KV(k, v) if past is None else past.extend(KV(k, v))  # (B, H, t + T, D)
        attended = F.scaled_dot_product_attention(q, kv.k, kv.v, attn_mask=mask)  # (B, H, T, D)
        x = _linear(attended.transpose(1, 2).reshape(B * T, E), layer.out).add_(x)
        x = _after_residual(x, layer.norm1, packed.norm_first)
        x = _feed_forward(x, layer.norm2, layer.ff1, layer.ff2, packed.norm_first)
        new_kv.append(kv)
    last = x.view(B, T, E)[:, -1]  # (B, E)
    if packed.final_norm is not None:
        last = torch.layer_norm(last, (E,), *packed.final_norm, _LAYER_NORM_EPS)
    return last @ packed.output, LMState(tuple(new_kv), t + T)  # (B, V)


# -- the encoder-decoder Transformer ---------------------------------------------------------------------
#
# Translating one token at a time runs the decoder only (the encoder runs once per sentence, through the
# modules). ``pack_decoder`` gathers the decoder's weights (optionally as int8), ``start_decoding``
# projects each source's cross-attention keys/values once, and ``decoder_step`` runs one new token per
# row. Its state is a value, as ``DecoderState`` is, with two differences that make beam search cheap:
#
# - The cross-attention keys/values are kept once per *source*, not once per row: the G rows (beams) of
#   one source attend to them together, as G queries of one attention call, ``rows_per_source`` = G.
# - ``select`` (beam reordering, finished rows leaving) does not copy the self-attention cache at once:
#   it records the rows to keep, and the next step gathers them into the cache it grows, so that
#   reordering and growing cost one copy of the cache, not two (``torch.cat`` plus ``index_select``).
#   Every step writes a new cache of its own and never into one it was given: two searches from one
#   state cannot disturb each other.
#
# Shape legend (decoder): N rows, Bs sources, G = N / Bs rows per source, S source length, t cached
# target positions, H heads, D head dim, E model dim, V target vocab size.

class Int8Weights(NamedTuple):
    """A Linear's weights quantized and packed for attnlab's int8 kernel (``csrc/int8_output.c``,
    ``native.Int8OutputKernel``): each output row in 8 bits with its own step. V16 and E4 are the
    outputs and inputs rounded up to multiples of 16 and 4, the padding zero."""

    weights: Tensor  # int8 (V16 / 16, E4 / 4, 16, 4): panels of 16 outputs, 4 inputs of each side by side
    scale: Tensor  # (V16,) float32: each output row's step, max |w_v| / 127
    colsum: Tensor  # (V16,) int32: each output row's sum of integers
    bias: Tensor  # (V16,)
    in_features: int
    out_features: int


class Int8Linear(NamedTuple):
    """A Linear's weights for int8 decoding (``pack_decoder(..., int8=True)``), copies taken when packed:
    attnlab's int8 weights, which run every product, where its kernels are built; else PyTorch's packed
    int8 parameters, with a float32 copy for the products too small for those to pay (``int8_from_rows``)."""

    packed: Any  # torch.ops.quantized.linear_prepack's parameters, or None where ``kernel`` runs the products
    affine: Affine  # Wᵀ (in, out) and b, float32: the products of fewer than ``from_rows`` rows, and of
    # rows holding a NaN or an infinity
    from_rows: int  # the products of at least this many rows run in int8
    kernel: Int8Weights | None  # attnlab's int8 weights, where its kernels are built


Weights = Affine | Int8Linear  # a Linear's weights for ``_apply``


# attnlab's int8 product (``csrc/int8_output.c``) quantizes each row of activations with its own range (7
# bits, as PyTorch's x86 int8 kernels), multiplies four rows at a time by panels of 16 weight rows kept
# in the cache, and converts the integer sums back as it goes. Measured on this project's CPU (AVX2, one
# thread, ``python benchmarks/bench_int8.py``, median of 7 alternating rounds, microseconds a call):
# float32 ``addmm`` / PyTorch's int8 (``quantized::linear_dynamic``) / attnlab's int8, for
# (rows, in) x (in, out):
#     in x out     1 row            4 rows           64 rows            1024 rows
#     128 x 384    7.2 / 28 / 9.3   19 / 29 / 11     85 / 77 / 51       1104 / 819 / 695
#     128 x 128    4.6 / 25 / 8.2   7.2 / 26 / 9.2   29 / 44 / 25       386 / 334 / 265
#     256 x 128    6.2 / 25 / 9.0   11 / 27 / 10     55 / 59 / 38       777 / 559 / 481
#     1024 x 256   33 / 34 / 15     72 / 42 / 23     418 / 247 / 213    5930 / 3738 / 3360
# Faster than PyTorch's int8 everywhere (1.1-3x), and than float32 but for a row or two of the smallest
# weights (a few microseconds of calling it): so where it is built every product of an ``Int8Linear``
# runs in it, from one row.
#
# PyTorch's int8 product, which runs where attnlab's kernels are not built, first finds the activations'
# range over the whole batch and quantizes them, and converts its int32 sums back to float32: a cost per
# call and per row that only a large enough product repays. Measured as above, int8 time against
# float32 ``addmm`` for (rows, in) x (in, out): a weight of 128 x 4000 was 2.2x faster in int8 from 4
# rows (0.93x at 1 row), 256 x 1024 and 1024 x 256 1.6-1.7x from 4 rows; but 128 x 128 broke even only
# at 256 rows (0.65x at 64), 128 x 256 and 256 x 128 at 128 rows (0.92x at 64), 128 x 384 at 32-64,
# 256 x 256 at 16-32. So there a product runs in int8 from 4 rows where its weight holds 2^18 numbers
# or more, and otherwise once rows x in x out reaches 2^22; below that its float32 copy runs.
INT8_LARGE_WEIGHT = 2**18
INT8_FROM_PRODUCTS = 2**22


def int8_from_rows(fan_in: int, fan_out: int) -> int:
    """The fewest rows whose product runs in PyTorch's int8, for a weight of ``fan_in`` x ``fan_out``
    (the rule above)."""
    size = fan_in * fan_out
    return 4 if size >= INT8_LARGE_WEIGHT else -(-INT8_FROM_PRODUCTS // size)


def _symmetric_int8(weight_t: Tensor) -> tuple[Tensor, Tensor]:
    """Wᵀ (in, out) as attnlab's int8 kernel holds it: each output row's integers in [-127, 127], (out, in)
    as floats, and its step, (out,): max |w_v| / 127 (1 for a row of zeros)."""
    step = weight_t.abs().amax(dim=0) / 127  # (V,)
    step = torch.where(step > 0, step, torch.ones_like(step))
    return torch.round(weight_t.t() / step[:, None]).clamp_(-127, 127), step


def int8_weights(affine: Affine) -> Int8Weights:
    """A Linear's Wᵀ (in, out) and b quantized and packed for attnlab's int8 kernel (copies)."""
    weight_t, bias = (t.detach().float() for t in affine)
    if not (bool(torch.isfinite(weight_t).all()) and bool(torch.isfinite(bias).all())):
        raise ValueError("int8 weights: the layer holds a NaN or an infinity")
    E, V = weight_t.shape
    V16, E4 = -(-V // 16) * 16, -(-E // 4) * 4
    integers, step = _symmetric_int8(weight_t)  # (V, E), (V,)
    padded = integers.new_zeros(V16, E4)
    padded[:V, :E] = integers
    weights = padded.view(V16 // 16, 16, E4 // 4, 4).transpose(1, 2).to(torch.int8).contiguous()

    def padded_vector(values: Tensor) -> Tensor:
        return F.pad(values.float(), (0, V16 - V)).contiguous()

    colsum = padded_vector(integers.sum(dim=1)).to(torch.int32)
    table = Int8Weights(weights, padded_vector(step), colsum, padded_vector(bias), E, V)
    native.Int8OutputKernel.check(table)
    return table


class _PackedDecoderLayer(NamedTuple):
    norm1: Affine
    qkv: Weights  # self-attention's fused [W_q; W_k; W_v]ᵀ (E, 3E)
    self_out: Weights  # self-attention's W_oᵀ (E, E)
    norm2: Affine
    cross_q: Weights  # cross-attention's W_qᵀ (E, E)
    cross_kv: Affine  # cross-attention's [W_k; W_v]ᵀ (E, 2E): once per sentence, kept in float32
    cross_out: Weights  # cross-attention's W_oᵀ (E, E)
    norm3: Affine
    ff1: Weights  # W_1ᵀ (E, d_ff)
    ff2: Weights  # W_2ᵀ (d_ff, E)


class PackedDecoder(NamedTuple):
    """The decoder weights of a ``Transformer``, gathered once for ``decoder_step``."""

    embedding: Tensor  # the target embeddings (V, E)
    scale: float  # √E, the embeddings' scale
    positions: Tensor  # the sinusoidal table, (max_len, E)
    layers: tuple[_PackedDecoderLayer, ...]
    final_norm: Affine | None  # pre-LN models only
    output: Weights  # the output layer's Wᵀ (E, V) and bias (V,)
    num_heads: int
    norm_first: bool
    int8: bool  # the products of ``Weights`` run in int8 (``Int8Linear``)


_DECODER_LAYER_CHILDREN = {"self_attn", "cross_attn", "feed_forward", "norm1", "norm2", "norm3",
                           "dropout1", "dropout2", "dropout3"}


def _quantized(affine: Affine) -> Int8Linear:
    """A Linear's weights for int8 products, copied: attnlab's int8 weights where its kernels are built,
    else PyTorch's packed int8 parameters (each output row its own symmetric scale, the per-channel
    observer of ``torch.ao.quantization``; the activations quantized per call); with a float32 copy."""
    weight_t, bias = affine
    weight = weight_t.t().detach().float().clone(memory_format=torch.contiguous_format)  # (out, in), a copy
    fan_out, fan_in = weight.shape
    copy = (weight.t(), bias.detach().float().clone())  # later changes to the model are not seen
    if native.int8_output_kernel() is not None and fan_in <= native.MAX_INT8_INPUTS:
        return Int8Linear(None, copy, 1, int8_weights(copy))
    packed = torch.ops.quantized.linear_prepack(_per_channel_int8(weight), copy[1])
    return Int8Linear(packed, copy, int8_from_rows(fan_in, fan_out), None)


def _copied(value: Any) -> Any:
    """A packed model's weights as tensors of their own (detached copies): an int8 pack is a snapshot
    of the model as it was packed, not partly a view of it. ``Int8Linear`` holds copies already."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, Int8Linear) or not isinstance(value, tuple):
        return value
    items = [_copied(item) for item in value]
    return type(value)(*items) if hasattr(value, "_fields") else tuple(items)


def _per_channel_int8(weight: Tensor) -> Tensor:
    """A weight (out, in) quantized to int8, each output row with its own symmetric scale (the
    per-channel observer of ``torch.ao.quantization``)."""
    from torch.ao.quantization import default_per_channel_weight_observer

    observer = default_per_channel_weight_observer()
    observer(weight)
    scale, zero_point = observer.calculate_qparams()
    with warnings.catch_warnings():  # PyTorch marks quantized tensors deprecated; its int8 kernels need one
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        return torch.quantize_per_channel(weight, scale.float(), zero_point, 0, torch.qint8)


def _check_decoder_layer(layer: nn.Module, config, index: int, int8: bool) -> _PackedDecoderLayer:
    """Every assumption ``decoder_step`` makes about one decoder layer, checked; then its weights."""
    where = f"decoder layer {index}"
    _check_frame(layer, DecoderLayer, _DECODER_LAYER_CHILDREN, config, where)
    attn = _check_attention(layer.self_attn, config, f"{where}'s self-attention")
    cross = _check_attention(layer.cross_attn, config, f"{where}'s cross-attention")
    ff = _check_feed_forward(layer.feed_forward, where)
    E = config.d_model
    weights = _quantized if int8 else (lambda affine: affine)
    return _PackedDecoderLayer(
        _check_norm(layer.norm1, E, f"{where}'s norm1"),
        weights((attn.in_proj_weight.t(), attn.in_proj_bias)),  # (E, 3E), (3E,)
        weights(_linear_weights(attn.w_o)),
        _check_norm(layer.norm2, E, f"{where}'s norm2"),
        weights((cross.in_proj_weight[:E].t(), cross.in_proj_bias[:E])),  # W_qᵀ (E, E), b_q
        (cross.in_proj_weight[E:].t(), cross.in_proj_bias[E:]),  # [W_k; W_v]ᵀ (E, 2E), [b_k; b_v]
        weights(_linear_weights(cross.w_o)),
        _check_norm(layer.norm3, E, f"{where}'s norm3"),
        weights(_linear_weights(ff.w_1)),
        weights(_linear_weights(ff.w_2)),
    )


def pack_decoder(model: Transformer, int8: bool = False) -> PackedDecoder:
    """Gather a ``Transformer``'s decoder weights for ``decoder_step``, after checking every assumption
    it makes: evaluation mode (no dropout) throughout, the norms where the config puts them with the eps
    ``decoder_step`` uses, ReLU feed-forward blocks, the head split, biases where it adds them, target
    embeddings scaled by √E and shared with the source and the output layer exactly when the config
    says, an output layer with a bias, and no module it would leave out.

    With ``int8`` every product of the step (not the embeddings, norms, attention or the per-sentence
    cross-attention keys/values) runs on int8 weights with activations quantized as it runs, CPU only:
    in attnlab's int8 kernel where its kernels are built, else in PyTorch's
    (``quantized::linear_dynamic``) when it is large enough for that to pay, and on a float32 copy when
    it is not (``int8_from_rows``); the weights are then copies, taken now. Without it the packed
    weights are views of the model's parameters.
    """
    if any(m.training for m in model.modules()):
        raise ValueError("pack_decoder() is for decoding, which has no dropout: call model.eval() first")
    _require(type(model) is Transformer, f"a Transformer, found {type(model).__name__}")
    c = model.config
    shared = model.tgt_embed is model.src_embed
    _require(shared == c.share_embeddings, f"target embeddings {'shared with' if c.share_embeddings else 'separate from'} "
             "the source's, as the config says")
    expected = {"src_embed", "positional", "encoder_layers", "decoder_layers", "encoder_norm", "decoder_norm",
                "output"} | (set() if shared else {"tgt_embed"})
    children = {name for name, _ in model.named_children()}
    _require(children == expected, f"the model has exactly the modules {sorted(expected)}, found {sorted(children)}")
    embed = model.tgt_embed
    embedding = _check_embeddings(model, embed, "target")
    _require(len(model.decoder_layers) == c.num_decoder_layers, f"{c.num_decoder_layers} decoder layers, as the config says")
    layers = tuple(_check_decoder_layer(layer, c, i, int8) for i, layer in enumerate(model.decoder_layers))
    final_norm = _final_norm(model.decoder_norm, c, "final decoder norm")
    _require(type(model.output) is nn.Linear and model.output.bias is not None, "an output layer with a bias")
    tied = model.output.weight is embedding
    _require(tied == c.share_embeddings, f"output weights {'tied to' if c.share_embeddings else 'separate from'} "
             "the target embeddings, as the config says")
    output = _linear_weights(model.output)
    packed = PackedDecoder(
        embedding=embedding, scale=embed.scale, positions=model.positional.P[0].to(embedding.dtype), layers=layers,
        final_norm=final_norm, output=_quantized(output) if int8 else output, num_heads=c.num_heads,
        norm_first=c.norm_first, int8=int8,
    )
    return _copied(packed) if int8 else packed


def _apply(x: Tensor, weights: Weights) -> Tensor:
    """x Wᵀ + b for (N, in) -> (N, out): in float32, or for an ``Int8Linear`` in attnlab's int8 kernel,
    else in PyTorch's int8 from its ``from_rows``."""
    if type(weights) is tuple:
        return torch.addmm(weights[1], x, weights[0])
    if weights.kernel is not None:
        kernel = native.int8_output_kernel()
        y = None if kernel is None else kernel.linear(x, weights.kernel)
        # a row holding a NaN or an infinity, or the kernels switched off since: the whole product in float32
        return torch.addmm(weights.affine[1], x, weights.affine[0]) if y is None else y
    if x.size(0) < weights.from_rows:
        return torch.addmm(weights.affine[1], x, weights.affine[0])
    return torch.ops.quantized.linear_dynamic(x, weights.packed, True)  # reduce_range: x86's int8 kernels need it


def _sublayer_input(x: Tensor, norm: Affine, norm_first: bool) -> Tensor:
    """What a sublayer reads from the rows x (N, E): x normalised in a pre-LN layer, x in a post-LN one."""
    return torch.layer_norm(x, (x.size(-1),), *norm, _LAYER_NORM_EPS) if norm_first else x


def _after_residual(x: Tensor, norm: Affine, norm_first: bool) -> Tensor:
    """The residual sum x (N, E) as the layer passes it on: normalised in a post-LN layer, as it is in a
    pre-LN one."""
    return x if norm_first else torch.layer_norm(x, (x.size(-1),), *norm, _LAYER_NORM_EPS)


def _feed_forward(x: Tensor, norm: Affine, ff1: Weights, ff2: Weights, norm_first: bool) -> Tensor:
    """The feed-forward sublayer with its residual and norm, on (N, E) rows."""
    h = _sublayer_input(x, norm, norm_first)
    return _after_residual(_apply(_apply(h, ff1).relu_(), ff2).add_(x), norm, norm_first)


class LeanDecoderState(NamedTuple):
    """What ``decoder_step`` carries from token to token, as a value. Row r reads source r // G: the
    memory row ``sources[r // G]``, or r // G itself when ``sources`` is None."""

    memory_kv: tuple[KV, ...]  # per layer: cross-attention keys/values, one per source, (Bs, H, S, D)
    src_mask: Tensor  # (Bs, 1, 1, S), True = a source position the decoder may attend to
    rows_per_source: int  # G
    self_kv: tuple[KV, ...] | None  # per layer: the self-attention cache, (N_cache, H, t, D)
    rows: Tensor | None  # the cache rows the next step continues, (N,); None: all, in order
    length: int  # target positions decoded so far
    sources: Tensor | None = None  # the memory row each group of G rows reads, (N / G,); None: all, in order

    def select(self, index: Tensor) -> "LeanDecoderState":
        """Keep (or repeat, or reorder) rows, as ``DecoderState.select`` does. The cache is gathered by
        the next step. The sources' keys/values stay where they are while at least half of them are
        still read, each group of rows naming its own (``sources``); they are gathered when fewer are
        left, or when rows of one source split or repeat it."""
        rows = index if self.rows is None else self.rows.index_select(0, index)
        groups = [row // self.rows_per_source for row in index.tolist()]  # the group each row continues
        G = _group_size(groups)
        kept = groups[::G]
        if self.sources is not None:
            kept = self.sources[kept].tolist()  # in memory rows
        memory_kv, src_mask, sources = self.memory_kv, self.src_mask, None
        Bs = src_mask.size(0)
        if kept != list(range(Bs)):
            which = torch.tensor(kept, device=index.device)
            if 2 * len(kept) >= Bs and len(set(kept)) == len(kept):
                sources = which
            else:
                memory_kv = tuple(kv.select(which) for kv in memory_kv)
                src_mask = src_mask.index_select(0, which)
        return LeanDecoderState(memory_kv, src_mask, G, self.self_kv, rows, self.length, sources)


def _group_size(sources: list[int]) -> int:
    """G, the length of the first run of equal entries, when every G consecutive rows read one source
    (the beams of a sentence, as beam search keeps them); otherwise 1, a group per row."""
    G = 1
    while G < len(sources) and sources[G] == sources[0]:
        G += 1
    if len(sources) % G or sources != [s for s in sources[::G] for _ in range(G)]:
        return 1
    return G


class NativeDecoderState(NamedTuple):
    """``decoder_step``'s state where the compiled attention kernel runs (``attnlab.nn.native``,
    ``csrc/decode_attention.c``): a value too, but nothing in it is ever copied, gathered or grown.

    Each step's fused projection (N_p, 3E) is kept as the step wrote it, with the map from its rows
    to the rows of the step before (beam search reorders rows, finished ones leave); the kernel
    follows those maps to find each row's keys and values. The sources' keys and values stay as
    projected, (P, 2E) for the P source positions not masked (padding is left out: no product, no
    memory), each row naming the source it reads. ``select`` only composes maps, and
    a step adds one projection and one map: tuples that grow, holding tensors no step writes to
    again, so two searches from one state cannot disturb each other. Rows that leave stay in the
    steps they were part of until those hold more than twice the rows still decoding and the rest
    take over ``COMPACT_BYTES``: then the next step gathers the live rows' lines into new, compact
    steps (as the PyTorch path's cache holds them, once)."""

    memory_kv: tuple[Tensor, ...]  # per layer: the cross-attention key and value of each source position to
    # attend to, (P, 2E), one source after another (the positions the source mask closes are left out)
    offsets: Tensor  # (Bs + 1,) int64: source b's positions are rows offsets[b] .. offsets[b + 1] - 1
    steps: tuple[tuple[Tensor, ...], ...]  # per layer: each step's fused projection (N_p, 3E), oldest first
    addresses: tuple[tuple[int, ...], ...]  # per layer: their data pointers, for the kernel
    parents: tuple[Tensor | None, ...]  # per step: the rows of the step before its rows continue; None: the same
    parent_addresses: tuple[int, ...]  # their data pointers (0 for None)
    rows: Tensor | None  # the rows of the last step the next step continues, (N,); None: all, in order
    sources: Tensor | None  # the source each row of the next step reads, (N,); None: row r reads source r
    length: int  # target positions decoded so far
    held: int = 0  # the rows of all the steps kept, Σ N_p: what ``_native_step`` compacts when it grows

    def select(self, index: Tensor) -> "NativeDecoderState":
        """Keep (or repeat, or reorder) rows, as ``DecoderState.select`` does: maps composed, nothing copied.
        The index is copied (the state must not change if the caller's tensor does) and checked: the
        kernel reads the rows it names."""
        index = index.to(device="cpu", dtype=torch.int64, copy=True).contiguous()
        if index.numel() and not (0 <= int(index.min()) and int(index.max()) < self.num_rows):
            raise IndexError(f"select's index names rows outside the state's {self.num_rows}: "
                             f"{int(index.min())} to {int(index.max())}")
        rows = None if self.length == 0 else index if self.rows is None else self.rows.index_select(0, index)
        sources = index if self.sources is None else self.sources.index_select(0, index)
        return self._replace(rows=rows, sources=sources)

    @property
    def num_rows(self) -> int:
        return self.offsets.numel() - 1 if self.sources is None else self.sources.numel()


def _readdressed(state: NativeDecoderState) -> NativeDecoderState:
    """The state with the addresses of the tensors it holds."""
    return state._replace(
        addresses=tuple(tuple(qkv.data_ptr() for qkv in steps) for steps in state.steps),
        parent_addresses=tuple(0 if rows is None else rows.data_ptr() for rows in state.parents),
    )


# ``_native_step`` compacts a state whose steps hold more than twice the rows still decoding once the
# rows no longer decoding take more than this many bytes (float32 Q, K and V of every layer). On the tiny
# model a threshold of 0 (compacting at twice) made beam search 3% slower (2.46 s against 2.38 s, 1000
# sentences, alternating, median of 5): its sentences finish one by one. Without any, a batch whose
# last sentence runs long keeps every finished sentence's steps until it ends.
COMPACT_BYTES = 64 * 2**20


def _compacted(state: NativeDecoderState) -> NativeDecoderState:
    """The state with each step holding only the lines of the rows the next step continues, in its
    order: one gather per step and layer, after which no row needs a map."""
    N, t = state.num_rows, state.length
    slots = torch.arange(N) if state.rows is None else state.rows  # each next row's row in the last step
    lines = [slots] * t
    for p in range(t - 1, 0, -1):  # back through the maps: each next row's row in every step
        if state.parents[p] is not None:
            slots = state.parents[p].index_select(0, slots)
        lines[p - 1] = slots
    steps = tuple(tuple(qkv.index_select(0, rows) for qkv, rows in zip(layer, lines)) for layer in state.steps)
    return _readdressed(state._replace(steps=steps, parents=(None,) * t, rows=None, held=N * t))


def _takes_native(packed: PackedDecoder, memory: Tensor) -> bool:
    """Whether the compiled attention kernel decodes this: float32 on the CPU, within its positions."""
    return (
        memory.device.type == "cpu"
        and memory.dtype == torch.float32
        and packed.embedding.dtype == torch.float32
        and packed.positions.size(0) <= native.MAX_DECODE_POSITIONS
        and memory.size(1) <= native.MAX_DECODE_POSITIONS
        and native.decoder_attention_kernel() is not None
    )


@torch.no_grad()
def start_decoding(packed: PackedDecoder, encoded: Encoded,
                   compiled: bool | None = None) -> LeanDecoderState | NativeDecoderState:
    """The empty state of a decode from ``encoded`` (one row per source): each decoder layer's
    cross-attention keys and values, projected once.

    ``compiled``: whether the steps' attentions run in attnlab's compiled kernel (a
    ``NativeDecoderState``) or in PyTorch's operations (a ``LeanDecoderState``, the reference);
    None (the default) takes the kernel where it runs: float32 on the CPU, once it could be built.
    """
    memory, src_mask = encoded.memory, encoded.src_mask
    Bs, S, E = memory.shape
    _require(bool(src_mask.any(dim=-1).all()), "every source has a position the decoder may attend to")
    if compiled is None:
        compiled = _takes_native(packed, memory)
    elif compiled and not _takes_native(packed, memory):
        raise ValueError("the compiled decoder attention runs float32 on the CPU, with attnlab's kernels built "
                         "(see attnlab.nn.native), within its positions")
    H = packed.num_heads
    if compiled:  # the keys and values of the positions to attend to only: padding takes no product, no memory
        open_ = src_mask.reshape(Bs, S)
        positions = memory.reshape(Bs * S, E)
        if not bool(open_.all()):
            positions = positions.index_select(0, open_.reshape(-1).nonzero()[:, 0])
        offsets = F.pad(open_.sum(dim=1).cumsum(0), (1, 0))  # (Bs + 1,) int64
        memory_kv = tuple(_apply(positions, layer.cross_kv).contiguous() for layer in packed.layers)
        empty = ((),) * len(packed.layers)
        return NativeDecoderState(memory_kv, offsets, empty, empty, (), (), None, None, 0)
    memory_kv = []
    for layer in packed.layers:
        kv = _apply(memory.reshape(Bs * S, E), layer.cross_kv)  # (Bs·S, 2E)
        k, v = kv.view(Bs, S, 2, H, E // H).permute(2, 0, 3, 1, 4).contiguous().unbind(0)  # (Bs, H, S, D) each
        memory_kv.append(KV(k, v))
    return LeanDecoderState(tuple(memory_kv), src_mask, 1, None, None, 0)


def _grow(past: Tensor | None, rows: Tensor | None, new: Tensor) -> Tensor:
    """The cache of the rows to continue, ``past`` gathered by ``rows``, with ``new`` (N, H, 1, D)
    appended: (N, H, t + 1, D), written into a tensor of its own in one copy."""
    if past is None:
        return new.contiguous()
    N, H, _, D = new.shape
    t = past.size(2)
    grown = new.new_empty(N, H, t + 1, D)
    if rows is None:
        grown[:, :, :t].copy_(past)
    else:
        torch.index_select(past, 0, rows, out=grown[:, :, :t])
    grown[:, :, t:].copy_(new)
    return grown


def _step_input(packed: PackedDecoder, tokens: Tensor, rows: int, t: int) -> Tensor:
    """The new tokens (N, 1), one for each of a state's ``rows``, at position t: embedded, scaled and
    with their position added, (N, E); the tokens' shape and the position checked."""
    N, T = tokens.shape
    if T != 1 or N != rows:
        raise ValueError(f"decoder_step takes one token for each of the state's {rows} rows, got {tuple(tokens.shape)}")
    if t + 1 > packed.positions.size(0):
        raise ValueError(f"{t + 1} positions do not fit the model's {packed.positions.size(0)}")
    return torch.add(packed.positions[t], F.embedding(tokens[:, 0], packed.embedding), alpha=packed.scale)


@torch.no_grad()
def decoder_step(packed: PackedDecoder, tokens: Tensor, state: LeanDecoderState | NativeDecoderState,
                 project: bool = True) -> tuple[Tensor, LeanDecoderState | NativeDecoderState]:
    """Logits (N, V) of one new token per row, ``tokens`` (N, 1), and the grown state; with
    ``project=False`` the decoder's last hidden states (N, E) instead, what the output layer reads
    (for ``screened_pick``, which applies the output layer its own way).

    Reproduces ``Transformer.decode_step`` (tests/test_fast_decode.py). Token ids are trusted: they
    come from the search, which takes them from the model's own vocabulary. No gradients: decoding
    needs none.
    """
    if type(state) is NativeDecoderState:
        return _native_step(packed, tokens, state, project)
    t, G = state.length, state.rows_per_source
    Bs = state.src_mask.size(0)  # memory rows
    groups = Bs if state.sources is None else state.sources.size(0)  # sources read, N / G
    x = _step_input(packed, tokens, groups * G, t)  # (N, E)
    N = x.size(0)
    H, E = packed.num_heads, packed.embedding.size(1)
    D = E // H
    pasts = state.self_kv or (None,) * len(packed.layers)
    # The source mask as an additive bias, 0 or -inf, (Bs, 1, 1, S): cross-attention is written out as two
    # batched products around a softmax, which for one query per row is faster on the CPU than the fused
    # kernel (every source has a position to attend to: ``start_decoding`` checks it).
    src_bias = torch.zeros(state.src_mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~state.src_mask,
                                                                                           float("-inf"))
    scale = 1.0 / math.sqrt(D)
    new_kv = []
    for layer, memory, past in zip(packed.layers, state.memory_kv, pasts):
        # Masked self-attention: the one new query sees every cached position.
        h = _sublayer_input(x, layer.norm1, packed.norm_first)
        qkv = _apply(h, layer.qkv).view(N, 3, H, 1, D)
        k = _grow(None if past is None else past.k, state.rows, qkv[:, 1])  # (N, H, t + 1, D)
        v = _grow(None if past is None else past.v, state.rows, qkv[:, 2])
        attended = F.scaled_dot_product_attention(qkv[:, 0], k, v)  # (N, H, 1, D)
        x = _apply(attended.transpose(1, 2).reshape(N, E), layer.self_out).add_(x)
        x = _after_residual(x, layer.norm1, packed.norm_first)
        # Cross-attention: the G rows of a source are G queries of one attention over its keys/values.
        h = _sublayer_input(x, layer.norm2, packed.norm_first)
        q = _apply(h, layer.cross_q).view(groups, G, E)
        if state.sources is not None:  # each group's queries in its memory row; the rows no group reads stay 0
            q = q.new_zeros(Bs, G, E).index_copy_(0, state.sources, q)
        q = q.view(Bs, G, H, D).transpose(1, 2).mul(scale)  # (Bs, H, G, D)
        weights = torch.matmul(q, memory.k.transpose(-1, -2)).add_(src_bias).softmax(dim=-1)  # (Bs, H, G, S)
        attended = torch.matmul(weights, memory.v).transpose(1, 2)  # (Bs, G, H, D)
        if state.sources is not None:
            attended = attended.index_select(0, state.sources)  # (N / G, G, H, D)
        x = _apply(attended.reshape(N, E), layer.cross_out).add_(x)
        x = _after_residual(x, layer.norm2, packed.norm_first)
        x = _feed_forward(x, layer.norm3, layer.ff1, layer.ff2, packed.norm_first)
        new_kv.append(KV(k, v))
    if packed.final_norm is not None:
        x = torch.layer_norm(x, (E,), *packed.final_norm, _LAYER_NORM_EPS)
    state = LeanDecoderState(state.memory_kv, state.src_mask, G, tuple(new_kv), None, t + 1, state.sources)
    return (_apply(x, packed.output) if project else x), state  # (N, V) or (N, E)


def _native_step(packed: PackedDecoder, tokens: Tensor, state: NativeDecoderState,
                 project: bool = True) -> tuple[Tensor, NativeDecoderState]:
    """``decoder_step`` with its attentions in the compiled kernel: the same layers, in the same order."""
    t = state.length
    x = _step_input(packed, tokens, state.num_rows, t)  # (N, E)
    N = x.size(0)
    kernel = native.decoder_attention_kernel()
    H, E = packed.num_heads, packed.embedding.size(1)
    D = E // H
    scale = 1.0 / math.sqrt(D)
    if t and state.steps and state.addresses[0][-1] != state.steps[0][-1].data_ptr():
        state = _readdressed(state)  # a copy of a state (deepcopy, pickle): new tensors, old addresses
    if state.held > 2 * N * t and (state.held - N * t) * 12 * E * len(state.steps) > COMPACT_BYTES:
        state = _compacted(state)  # more finished rows kept than live ones, and megabytes of them
    parents = state.parents + (state.rows,)
    parent_addresses = state.parent_addresses + (0 if state.rows is None else state.rows.data_ptr(),)
    steps, addresses = [], []
    for layer, memory, past, past_addresses in zip(packed.layers, state.memory_kv, state.steps, state.addresses):
        h = _sublayer_input(x, layer.norm1, packed.norm_first)
        qkv = _apply(h, layer.qkv).contiguous()  # (N, 3E): this step's queries, and its keys and values kept
        steps.append(past + (qkv,))
        addresses.append(past_addresses + (qkv.data_ptr(),))
        attended = kernel.self_attention(addresses[-1], parent_addresses, N, H, D, scale)  # (N, E)
        x = _apply(attended, layer.self_out).add_(x)
        x = _after_residual(x, layer.norm1, packed.norm_first)
        h = _sublayer_input(x, layer.norm2, packed.norm_first)
        attended = kernel.cross_attention(memory, state.offsets, state.sources, _apply(h, layer.cross_q), H, scale)
        x = _apply(attended, layer.cross_out).add_(x)
        x = _after_residual(x, layer.norm2, packed.norm_first)
        x = _feed_forward(x, layer.norm3, layer.ff1, layer.ff2, packed.norm_first)
    if packed.final_norm is not None:
        x = torch.layer_norm(x, (E,), *packed.final_norm, _LAYER_NORM_EPS)
    state = NativeDecoderState(state.memory_kv, state.offsets, tuple(steps), tuple(addresses), parents,
                               parent_addresses, None, state.sources, t + 1, state.held + N)
    return (_apply(x, packed.output) if project else x), state  # (N, V) or (N, E)


# -- greedy search's choice through an int8 screen ------------------------------------------------------
#
# Greedy search wants each row's best token, not its V logits, and on the CPU the output layer is the
# largest product of the step (N x E x V: half the decoder's arithmetic on the tiny model). Its int8 form
# (attnlab's int8 product, ``Int8Weights``) is faster (``benchmarks/bench_int8.py``) and provably close:
# with each row's activations quantized to steps of s (the row's range, zero included, over 127; half a
# step of error at most) and weight rows Ŵ_v, the int8 logit of token v is within
#     e_v = (s / 2) · Σ_e |W_ve| + (Σ_e |x_e| + E s / 2) · max_e |W_ve - Ŵ_ve| + (float32 rounding)
# of its float32 logit. So the best token's int8 logit plus its e_v reaches every token's int8 logit
# minus its own, and only the tokens that reach the largest of those lower bounds can be the best: on
# the trained models a few a row (at most a few dozen of 8000). They are computed in float32
# and the best taken (``native.GreedyPickKernel.screened``): the same token as the float32 logits give,
# to float32 rounding (the few logits are summed in another order than the product's). The tests
# check the bound against the int8 product and the choices against the float32 ones.
# ``attnlab.decode.translate`` screens greedy search's float32 steps on the CPU this way.


class OutputScreen(NamedTuple):
    """A float32 output layer prepared for ``screened_pick`` (copies of its weights, taken when made)."""

    int8: Int8Weights  # the layer for attnlab's int8 product
    rows: Tensor  # W (V, E), float32, contiguous: the logits of the tokens in contention come from these
    bias: Tensor  # (V,)
    l1: Tensor  # (V,) Σ_e |W_ve|
    error: Tensor  # (V,) max_e |W_ve - Ŵ_ve|, with room for the products' float32 rounding
    slack: float  # room for the rounding of the biases


def output_screen(packed: PackedDecoder) -> OutputScreen | None:
    """The screen of a float32 decoder's output layer; None where it does not apply: an int8 decoder
    (its logits are int8 already), weights not float32 on the CPU, or attnlab's kernels not built."""
    if packed.int8 or type(packed.output) is not tuple:
        return None
    weight_t, bias = packed.output
    if (weight_t.device.type != "cpu" or weight_t.dtype != torch.float32 or bias.dtype != torch.float32
            or native.int8_output_kernel() is None):
        return None
    rows = weight_t.t().detach().clone(memory_format=torch.contiguous_format)  # (V, E)
    bias = bias.detach().clone()
    V, E = rows.shape
    integers, step = _symmetric_int8(rows.t())
    largest = rows.abs().amax(dim=1)
    # Each logit's float32 rounding, in the int8 product's conversion and in the few float32 sums, is
    # within (E + 8) ulp-sized steps of Σ_e |x_e W_ve| <= Σ_e |x_e| · max_e |W_ve|: four times that here.
    rounding = 4 * (E + 8) * 2.0**-24
    error = (rows - integers * step[:, None]).abs().amax(dim=1) + rounding * largest
    slack = 1e-5 * (float(bias.abs().max()) + 1.0) if V else 0.0
    return OutputScreen(int8_weights((rows.t(), bias)), rows, bias, rows.abs().sum(dim=1), error, slack)


def _argmax_allowed(logits: Tensor, banned: Tensor) -> Tensor:
    """Each row's best id that is not ``banned`` (ids outside the logits passed over), with PyTorch's
    operations: where attnlab's kernels were switched off after the weights were packed."""
    banned = banned[(banned >= 0) & (banned < logits.size(1))]
    return logits.index_fill(1, banned, float("-inf")).argmax(dim=1)


def screened_pick(screen: OutputScreen, hidden: Tensor, banned: Tensor) -> Tensor:
    """Each row's best token that is not ``banned``, (N,) int64: the choice of greedy search
    (``native.GreedyPickKernel.pick``) over the float32 logits ``hidden Wᵀ + b`` of the decoder's last
    hidden states (N, E), found through the int8 screen above. Where a row holds a NaN or an infinity,
    every row takes the float32 logits."""
    kernel, int8 = native.greedy_pick_kernel(), native.int8_output_kernel()
    if hidden.dtype != torch.float32 or hidden.device.type != "cpu":
        raise ValueError(f"screened_pick takes float32 hidden states on the CPU, got {hidden.dtype} on {hidden.device}")
    if kernel is None or int8 is None:  # switched off since the screen was made
        return _argmax_allowed(torch.addmm(screen.bias, hidden, screen.rows.t()), banned)
    approx = int8.linear(hidden, screen.int8)
    if approx is not None:
        low, high = torch.aminmax(hidden, dim=1)
        # half of each row's quantization step (csrc/int8_output.c): its range, zero included, over 127,
        # with room for the rounding of x / s
        step = (high.clamp(min=0) - low.clamp(max=0)) / 127
        half_step = step.clamp_(min=1e-30).mul_(0.5 * (1 + 1e-3))
        chosen = kernel.screened(approx, hidden, screen.rows, screen.bias, screen.l1, screen.error, half_step,
                                 screen.slack, banned)
        if chosen is not None:
            return chosen
    return kernel.pick(torch.addmm(screen.bias, hidden, screen.rows.t()), banned)


# -- int8 greedy search's choice ------------------------------------------------------------------------
#
# An int8 translator's greedy search needs the output layer's int8 logits only to take each row's best:
# attnlab's int8 kernel forms them panel by panel and keeps each row's best as it goes, so the (N, V)
# logits are never written and read again. ``python benchmarks/bench_int8.py``, against PyTorch's int8
# logits and then the choosing kernel: 26 against 71 us for a row of the tiny model's 128 x 4000 output
# layer, 450 against 605 for 64 rows; 61 against 127 and 1621 against 1947 for de-en's 256 x 8000.


def int8_pick(output: Int8Linear, hidden: Tensor, banned: Tensor) -> Tensor:
    """Each row's best token that is not ``banned``, (N,) int64, over the int8 logits of the decoder's
    last hidden states (N, E) through ``output``, an output layer with attnlab's int8 weights: greedy
    search's choice in an int8 translator. Where a row holds a NaN or an infinity (or the kernels are
    switched off since the weights were packed) every row takes the float32 logits."""
    kernel = native.int8_output_kernel()
    result = None if kernel is None else kernel.pick(hidden, output.kernel, banned)
    if result is not None:
        return result[0]
    logits = torch.addmm(output.affine[1], hidden, output.affine[0])
    picker = native.greedy_pick_kernel()
    return _argmax_allowed(logits, banned) if picker is None else picker.pick(logits, banned)


# -- the encoder, for translation on the CPU -------------------------------------------------------------
#
# ``pack_encoder`` gathers the encoder's weights, checked as the decoder's are, and ``encode`` runs the
# layers' maths on whole (B·S, E) batches, giving the modules' memory to the bit: the translator encodes
# through it on the CPU. With int8 the encoder's feed-forward and Q/K/V products run on int8 weights too
# (as the decoder's, ``Int8Linear``): with PyTorch's int8 product, de-en int8 greedy 2.06-2.11 s against
# 2.12-2.23 with the feed-forward products alone (BLEU 26.15 against 26.32, float32 26.29), tiny
# 0.70-0.74 s against 0.70-0.75 (21.84 against 21.67, float32 21.89). The attention's output projection
# stays float32: quantized as well (an earlier measurement: de-en greedy 1.92 s against 2.05), on the
# tests' random model a translation's first tokens left float32's, which tests/test_int8.py then
# required.


class PackedEncoder(NamedTuple):
    """The encoder weights of a ``Transformer``, gathered once for ``encode``."""

    embedding: Tensor  # the source embeddings (V, E)
    scale: float  # √E
    positions: Tensor  # the sinusoidal table, (max_len, E)
    layers: tuple[_PackedLayer, ...]  # products as ``Weights``: float32 ``Affine`` or int8
    final_norm: Affine | None  # pre-LN models only
    num_heads: int
    norm_first: bool
    int8: bool


def pack_encoder(model: Transformer, int8: bool = False) -> PackedEncoder:
    """Gather a ``Transformer``'s encoder weights for ``encode``, after checking what ``encode``
    assumes of the layers (as ``pack_decoder`` does for the decoder); with ``int8`` the layers'
    feed-forward and Q/K/V products run on a quantized copy of their weights, and every other weight is
    a copy too, taken now."""
    if any(m.training for m in model.modules()):
        raise ValueError("pack_encoder() is for translating, which has no dropout: call model.eval() first")
    _require(type(model) is Transformer, f"a Transformer, found {type(model).__name__}")
    c = model.config
    embed = model.src_embed
    embedding = _check_embeddings(model, embed, "source")
    _require(len(model.encoder_layers) == c.num_encoder_layers,
             f"{c.num_encoder_layers} encoder layers, as the config says")
    layers = tuple(_check_layer(layer, c, i, "encoder layer") for i, layer in enumerate(model.encoder_layers))
    if int8:  # the feed-forward and Q/K/V products, 11/12 of the encoder's products at d_ff = 4E
        layers = tuple(layer._replace(qkv=_quantized(layer.qkv), ff1=_quantized(layer.ff1), ff2=_quantized(layer.ff2))
                       for layer in layers)
    final_norm = _final_norm(model.encoder_norm, c, "final encoder norm")
    packed = PackedEncoder(embedding, embed.scale, model.positional.P[0].to(embedding.dtype), layers, final_norm,
                           c.num_heads, c.norm_first, int8)
    return _copied(packed) if int8 else packed


@torch.no_grad()
def encode(packed: PackedEncoder, src: Tensor, src_mask: Tensor) -> Encoded:
    """``Transformer.encode`` of source ids (B, S) under their mask (B, 1, 1, S) (True = a position
    to attend to), on the packed weights: ``Encoded(memory (B, S, E), src_mask, None)``."""
    B, S = src.shape
    if S > packed.positions.size(0):
        raise ValueError(f"a source of {S} positions does not fit the model's {packed.positions.size(0)}")
    H, E = packed.num_heads, packed.embedding.size(1)
    D = E // H
    scale = 1.0 / math.sqrt(D)
    x = F.embedding(src, packed.embedding).mul_(packed.scale).add_(packed.positions[:S]).view(B * S, E)  # as modules do
    mask = src_mask.expand(B, 1, 1, S)
    for layer in packed.layers:
        h = _sublayer_input(x, layer.norm1, packed.norm_first)
        qkv = _apply(h, layer.qkv).view(B, S, 3 * E)
        kernel = native.short_attention_for(qkv, D, mask)
        if kernel is not None:
            _, attended = kernel.forward(qkv, H, mask, scale, None)  # (B, S, E)
        else:
            q, k, v = qkv.view(B, S, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, S, D) each
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)  # (B, S, H, D)
        x = _apply(attended.reshape(B * S, E), layer.out).add_(x)
        x = _after_residual(x, layer.norm1, packed.norm_first)
        x = _feed_forward(x, layer.norm2, layer.ff1, layer.ff2, packed.norm_first)
    if packed.final_norm is not None:
        x = torch.layer_norm(x, (E,), *packed.final_norm, _LAYER_NORM_EPS)
    return Encoded(x.view(B, S, E), src_mask, None)
