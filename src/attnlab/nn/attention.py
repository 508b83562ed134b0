"""Attention, from the tutorials' bare dot product to multi-head attention.

One mask rule, everywhere in attnlab: a mask is a boolean tensor in which **True means "this
query may attend to this key"** (the convention of ``torch.nn.functional.scaled_dot_product_attention``).
It must broadcast to the attention scores, shape (B, H, T, S). ``causal_mask`` and ``padding_mask``
build masks in this form; combine them with ``&``. Other conventions (PyTorch's
``nn.MultiheadAttention`` uses True = blocked) are converted once, at the edge, by the caller.

Every function and module here returns one type whatever its flags: ``AttentionOutput(output,
weights)``, whose ``weights`` is None unless ``need_weights=True`` asked for them.

Inputs are checked at the public entry points (``scaled_dot_product_attention``, the modules'
``forward``, ``self_attention``, ``attend``, ``project_kv``). The layers and models call the
underscored twins of those methods, which trust their inputs: the models check theirs once.

Shape legend: B batch, T query length, S key length, H heads, D head dim, E model dim.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.nn import native

__all__ = [
    "KV",
    "AttentionOutput",
    "SelfAttentionOutput",
    "Projection",
    "causal_mask",
    "padding_mask",
    "dropout",
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


class AttentionOutput(NamedTuple):
    """The result of attention: its output, and the softmax weights when they were asked for."""

    output: Tensor  # (..., T, Dv)
    weights: Tensor | None  # (..., T, S) with need_weights=True, else None


class SelfAttentionOutput(NamedTuple):
    """``MultiHeadAttention.self_attention``'s result: the output, the grown cache, the weights."""

    output: Tensor  # (B, T, E)
    kv: KV  # keys/values of every position so far, the cache included: (B, H, t + T, D)
    weights: Tensor | None  # (B, H, T, t + T) with need_weights=True, else None


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


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout, as ``F.dropout``: each element is kept with probability 1 − p and scaled
    by 1/(1 − p), or zeroed.

    On the CPU the keep/drop draws come from NumPy's PCG64 generator, seeded by one draw from
    PyTorch's generator, so ``torch.manual_seed`` and a checkpoint's RNG state still fix them.
    PyTorch draws CPU masks one element at a time from its Mersenne Twister, about three times
    slower, which made the masks a tenth of a training step. Other devices use ``F.dropout``.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    return x * _kept_and_scaled(x.shape, p, x.dtype)


def _kept_and_scaled(shape: torch.Size, p: float, dtype: torch.dtype) -> Tensor:
    """CPU dropout's multipliers: 1/(1 − p) with probability 1 − p, else 0 (see ``dropout``)."""
    seed = int(torch.empty((), dtype=torch.int64).random_())
    uniform = np.random.Generator(np.random.PCG64(seed)).random(math.prod(shape), dtype=np.float32)  # [0, 1)
    keep = torch.from_numpy(uniform).view(shape).ge_(p)  # 1.0 with probability 1 − p, else 0.0
    return keep.to(dtype).mul_(1.0 / (1.0 - p))


def _check_token_ids(tokens: Tensor, name: str) -> None:
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids, got dtype {tokens.dtype}")
    if tokens.dim() != 2:
        raise ValueError(f"{name} must have shape (batch, length), got {tuple(tokens.shape)}")


def _check_mask(mask: Tensor, scores_shape: tuple[int, ...], name: str = "mask") -> None:
    if mask.dtype != torch.bool:
        raise ValueError(
            f"{name} must be boolean (True = may attend), got dtype {mask.dtype}; "
            "convert it with `mask.bool()` or `~blocked`"
        )
    try:
        broadcast = torch.broadcast_shapes(mask.shape, scores_shape)
    except RuntimeError:
        broadcast = None
    if broadcast != torch.Size(scores_shape):
        raise ValueError(
            f"{name} of shape {tuple(mask.shape)} does not broadcast to the attention scores "
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
) -> AttentionOutput:
    """Attention(Q, K, V) = softmax(Q Kᵀ · scale) V, with scale = 1/√d_k unless given.

    Args:
        q: queries (..., T, D). k: keys (..., S, D). v: values (..., S, Dv).
        mask: boolean, True = may attend, broadcastable to (..., T, S).
        scale: multiplies the raw scores; ``scale=1.0`` reproduces tutorials that skip the √d_k.
        dropout_p: dropout on the attention weights (pass 0.0 in evaluation).
        need_weights: also return the softmax weights (..., T, S); this takes the reference path.
    Returns:
        ``AttentionOutput(output (..., T, Dv), weights (..., T, S) or None)``.

    A query whose keys are all masked gets a zero output (and zero weights), never NaN.
    """
    if q.size(-1) != k.size(-1):
        raise ValueError(
            f"query and key feature sizes differ: q has {q.size(-1)}, k has {k.size(-1)}"
        )
    if k.size(-2) != v.size(-2):
        raise ValueError(f"keys and values differ in length: {k.size(-2)} vs {v.size(-2)}")
    if mask is not None:
        _check_mask(mask, q.shape[:-1] + k.shape[-2:-1])
    return _attention(q, k, v, mask, scale, dropout_p, need_weights)


def _attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None, dropout_p: float,
    need_weights: bool,
) -> AttentionOutput:
    """Choose the path, trusting the inputs: the reference one when the weights are wanted, and for
    dropout on the CPU, where PyTorch's fused kernels cannot drop weights and its own fallback path
    (the same products) draws the masks slowly (see ``dropout``); the fused one otherwise."""
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    if need_weights or (dropout_p > 0 and q.device.type == "cpu"):
        output, weights = _reference_attention(q, k, v, mask, scale, dropout_p)
        return AttentionOutput(output, weights if need_weights else None)
    return AttentionOutput(_fused_attention(q, k, v, mask, scale, dropout_p), None)


def _reference_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, dropout_p: float
) -> tuple[Tensor, Tensor]:
    """The tutorials' path: matmul, mask, softmax, matmul. Returns (output, weights)."""
    scores = q @ k.transpose(-2, -1) * scale  # (..., T, S)
    if mask is not None:
        # A large negative number (not -inf) keeps fully masked rows finite; they are zeroed below.
        blocked = ~mask
        scores = scores.masked_fill(blocked, torch.finfo(scores.dtype).min)
    weights = scores.softmax(dim=-1)  # (..., T, S); exactly 0 where blocked, in a row that has a key
    if mask is not None and not bool(mask.any(dim=-1).all()):
        weights = weights.masked_fill(blocked, 0.0)  # rows without a key: 0, not uniform weights
    return dropout(weights, dropout_p) @ v, weights  # (..., T, Dv), (..., T, S)


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


_NOTHING = torch.zeros(())  # baddbmm's ignored input (beta=0)

# Self-attention over at most this many positions trains through ``_ShortSelfAttention`` on the CPU.
SHORT_ATTENTION_MAX_LEN = 64


class _ShortSelfAttention(torch.autograd.Function):
    """Multi-head self-attention for training over short sequences on the CPU.

    Takes the fused projection ``qkv`` (B, T, 3E) and returns the heads' outputs merged, (B, T, E):
    softmax(Q Kᵀ · scale) V per head. In float32, with a head dimension that is a multiple of 8, the
    compiled kernel of ``attnlab.nn.native`` computes it where it could be built; otherwise (and
    as the readable statement of the same maths) two batched matrix products with the weights kept
    for the backward pass, which writes the Q, K and V gradients into one (B, T, 3E) tensor.
    PyTorch's fused CPU kernel walks (batch, head) blocks sized for long sequences, zero-fills its
    gradients and leaves their concatenation to autograd: at 128 x 24 tokens this path is faster
    (``benchmarks/bench_core.py``); in a first measurement with 3072 tokens a batch the fused kernel
    was about as fast at 48-64 positions and faster at 128, hence ``SHORT_ATTENTION_MAX_LEN``.
    Longer sequences take the other paths (the fused kernel, or the reference one for dropout).

    Masks follow the module's rule (True = may attend); a query with no key gets a zero output, as
    on the other paths. Dropout on the weights (``dropout_p``) draws its masks as ``dropout`` does:
    the same draws as the reference path makes. First derivatives only: a backward pass that is
    itself to be differentiated (``create_graph=True``) raises.
    """

    @staticmethod
    def forward(ctx, qkv: Tensor, num_heads: int, mask: Tensor | None, scale: float,  # type: ignore[override]
                dropout_p: float = 0.0) -> Tensor:
        B, T, E3 = qkv.shape
        H, D = num_heads, E3 // (3 * num_heads)
        kernel = native.short_attention_for(qkv, D, mask)
        ctx.kernel, ctx.scale, ctx.num_heads = kernel, scale, num_heads
        # The weights' dropout masks, (B·H, T, T), drawn first: the only draw of either path.
        kept = _kept_and_scaled(torch.Size((B * H, T, T)), dropout_p, qkv.dtype) if dropout_p > 0 else None
        if kernel is not None:  # the compiled kernel (nn/csrc/short_attention.c): the same maths
            qkv = qkv.contiguous()
            weights, out = kernel.forward(qkv, H, mask, scale, kept)
            ctx.save_for_backward(qkv, weights, kept)
            return out
        q, k, v = (t.view(B, T, H, D).transpose(1, 2).reshape(B * H, T, D) for t in qkv.split(H * D, -1))
        scores = torch.baddbmm(_NOTHING.to(q.dtype), q, k.transpose(1, 2), beta=0.0, alpha=scale)  # (B·H, T, T)
        if mask is not None:
            scores.view(B, H, T, T).masked_fill_(~mask, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1, out=scores)
        if mask is not None:
            has_key = mask.any(dim=-1, keepdim=True)
            if not bool(has_key.all()):
                weights.view(B, H, T, T).masked_fill_(~has_key, 0.0)
        ctx.save_for_backward(q, k, v, weights, kept)
        out = torch.bmm(weights if kept is None else weights * kept, v)  # (B·H, T, D)
        return out.view(B, H, T, D).transpose(1, 2).reshape(B, T, H * D)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None, None, None]:  # type: ignore[override]
        if torch.is_grad_enabled():  # backward(create_graph=True): this pass is not itself differentiable
            raise RuntimeError(
                "MultiHeadAttention's training path for short sequences on the CPU gives first "
                "derivatives only; for higher-order gradients set "
                "attnlab.nn.attention.SHORT_ATTENTION_MAX_LEN = 0 (the reference path)"
            )
        if ctx.kernel is not None:
            qkv, weights, kept = ctx.saved_tensors
            grad_qkv = ctx.kernel.backward(qkv, weights, kept, grad_out, ctx.num_heads, ctx.scale)
            return grad_qkv, None, None, None, None
        q, k, v, weights, kept = ctx.saved_tensors
        BH, T, D = q.shape
        B = grad_out.size(0)
        H = BH // B
        grad_heads = grad_out.reshape(B, T, H, D).transpose(1, 2).reshape(BH, T, D)
        grads = grad_out.new_empty(3, BH, T, D)  # dQ, dK, dV by head, moved to (B, T, 3E) in one copy
        dropped = weights if kept is None else weights * kept
        torch.bmm(dropped.transpose(1, 2), grad_heads, out=grads[2])  # dV = Wᵀ dO
        grad_weights = torch.bmm(grad_heads, v.transpose(1, 2))  # dW = dO Vᵀ
        if kept is not None:
            grad_weights.mul_(kept)
        grad_scores = torch._softmax_backward_data(grad_weights, weights, -1, weights.dtype)
        nothing, scale = _NOTHING.to(q.dtype), ctx.scale
        torch.baddbmm(nothing, grad_scores, k, beta=0.0, alpha=scale, out=grads[0])  # dQ = dS K · scale
        torch.baddbmm(nothing, grad_scores.transpose(1, 2), q, beta=0.0, alpha=scale, out=grads[1])  # dK = dSᵀ Q · scale
        grad_qkv = grads.view(3, B, H, T, D).permute(1, 3, 0, 2, 4).reshape(B, T, 3 * H * D)
        return grad_qkv, None, None, None, None


# Whether torch.func's transforms (grad, vmap, ...) are running: a private function of PyTorch's, so
# looked up once, with "no" where a version lacks it.
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def _graph_capture_active() -> bool:
    """Whether ``torch.jit.trace``, ``torch.export`` or ``torch.compile`` is recording the model: the
    compiled kernels, called through their data pointers, cannot be recorded (a trace would keep one
    call's output as a constant)."""
    compiler = getattr(torch, "compiler", None)
    return bool(
        torch.jit.is_tracing()
        or (compiler is not None and getattr(compiler, "is_compiling", lambda: False)())
        or (compiler is not None and getattr(compiler, "is_exporting", lambda: False)())
    )


def _use_short_attention(qkv: Tensor) -> bool:
    """Training on the CPU, short and non-empty; not under torch.func's transforms, which
    ``_ShortSelfAttention`` (a classic autograd Function) does not support."""
    return (
        qkv.device.type == "cpu"
        and 0 < qkv.size(1) <= SHORT_ATTENTION_MAX_LEN
        and qkv.size(0) > 0
        and qkv.requires_grad
        and torch.is_grad_enabled()
        and not _functorch_active()
    )


def simple_self_attention(x: Tensor) -> AttentionOutput:
    """Self-attention with no trainable weights: scores = x xᵀ, weights = softmax, context = weights x.

    Args:
        x: token embeddings (T, E) or (B, T, E).
    Returns:
        ``AttentionOutput(context, weights)``: the context vectors have the shape of ``x``; the
        weights are (..., T, T), each row summing to 1.
    """
    scores = x @ x.transpose(-2, -1)  # (..., T, T)
    weights = scores.softmax(dim=-1)
    return AttentionOutput(weights @ x, weights)


class SelfAttention(nn.Module):
    """Single-head self-attention with trainable projections: Q = X W_q, K = X W_k, V = X W_v.

    Shape: x (..., T, d_in) -> ``AttentionOutput`` of (..., T, d_out) and, when asked for, the
    weights (..., T, T).

    Example:
        >>> attn = SelfAttention(d_in=4, d_out=3)
        >>> attn(torch.rand(2, 5, 4)).output.shape
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
    ) -> AttentionOutput:
        if x.size(-1) != self.w_q.in_features:
            raise ValueError(
                f"input has {x.size(-1)} features, SelfAttention expects d_in={self.w_q.in_features}"
            )
        q, k, v = self.w_q(x), self.w_k(x), self.w_v(x)  # (..., T, d_out) each
        return scaled_dot_product_attention(q, k, v, mask, scale=scale, need_weights=need_weights)


class Projection(NamedTuple):
    """One of W_q, W_k, W_v of a ``MultiHeadAttention``: views of its rows of the fused matrix.

    Called on x it computes x Wᵀ + b, as the ``nn.Linear`` it stands for would. Writing into
    ``weight`` (under ``torch.no_grad()``) writes into the fused parameter.
    """

    weight: Tensor  # (E, E)
    bias: Tensor | None  # (E,)

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


def _reset_like_linear(weight: Tensor, bias: Tensor | None) -> None:
    """The initialisation ``nn.Linear`` gives its weight and bias."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        bound = 1 / math.sqrt(weight.size(1))
        nn.init.uniform_(bias, -bound, bound)


def _join_separate_projections(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load hook for checkpoints saved before W_q, W_k, W_v were fused: join their three entries."""
    for kind in ("weight", "bias"):
        old = [f"{prefix}w_{name}.{kind}" for name in "qkv"]
        if all(key in state_dict for key in old):
            state_dict[f"{prefix}in_proj_{kind}"] = torch.cat([state_dict.pop(key) for key in old])


class MultiHeadAttention(nn.Module):
    """Multi-head attention: project, split into heads, attend per head in parallel, concatenate, W_o.

    Batch first. ``forward(query, key, value)`` serves the Transformer's three uses: encoder
    self-attention (all three the same tensor), decoder masked self-attention (plus a causal mask)
    and encoder-decoder attention (query from the decoder, key = value = encoder output).

    W_q, W_k and W_v are stored stacked in one parameter, ``in_proj_weight`` (3E, E) (and
    ``in_proj_bias`` (3E,)), as ``nn.MultiheadAttention`` stores them, so that self-attention makes
    Q, K and V in one matrix product; ``w_q``, ``w_k`` and ``w_v`` are views of their rows.
    Checkpoints that hold them as three ``nn.Linear`` weights still load.

    Incremental decoding uses the pieces directly, with caches passed in and returned as values:
    ``self_attention(x, past=...)`` returns the grown cache, ``project_kv`` computes the
    cross-attention keys/values once and ``attend`` reuses them.

    Shape: query (B, T, E), key/value (B, S, E), mask broadcastable to (B, H, T, S) ->
    ``AttentionOutput`` of (B, T, E) and, when ``need_weights=True``, the weights (B, H, T, S).

    Example:
        >>> mha = MultiHeadAttention(d_model=512, num_heads=8)
        >>> x = torch.rand(2, 10, 512)
        >>> mha(x, x, x).output.shape
        torch.Size([2, 10, 512])
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        if num_heads <= 0 or d_model % num_heads != 0:
            raise ValueError(
                f"d_model ({d_model}) must be divisible by num_heads ({num_heads}): "
                "each head gets d_model / num_heads features"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {dropout}")
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))  # [W_q; W_k; W_v]
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * d_model))  # [b_q; b_k; b_v]
        else:
            self.register_parameter("in_proj_bias", None)
        with torch.no_grad():
            for projection in (self.w_q, self.w_k, self.w_v):  # each as its own nn.Linear would be
                _reset_like_linear(projection.weight, projection.bias)
        self.w_o = nn.Linear(d_model, d_model, bias=bias)
        self.register_load_state_dict_pre_hook(_join_separate_projections)

    # -- W_q, W_k, W_v: views of the fused projection ----------------------------------------
    def _projection(self, index: int) -> Projection:
        rows = slice(index * self.d_model, (index + 1) * self.d_model)
        bias = None if self.in_proj_bias is None else self.in_proj_bias[rows]
        return Projection(self.in_proj_weight[rows], bias)

    @property
    def w_q(self) -> Projection:
        return self._projection(0)

    @property
    def w_k(self) -> Projection:
        return self._projection(1)

    @property
    def w_v(self) -> Projection:
        return self._projection(2)

    # -- shapes and checks -----------------------------------------------------------------
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

    def _check_kv(self, kv: KV, batch: int) -> None:
        if kv.k.dim() != 4 or kv.k.shape != kv.v.shape or kv.k.shape[:2] != (batch, self.num_heads):
            raise ValueError(
                f"keys/values of shape {tuple(kv.k.shape)} and {tuple(kv.v.shape)} do not fit a batch "
                f"of {batch} and {self.num_heads} heads: expected (batch, heads, length, head_dim)"
            )

    # -- the public pieces, checked ----------------------------------------------------------
    def project_kv(self, key: Tensor, value: Tensor) -> KV:
        """Project keys and values and split them into heads: (B, S, E) -> KV of (B, H, S, D)."""
        self._check_features("key", key)
        self._check_features("value", value)
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(
                f"key and value must agree in batch and length, got {tuple(key.shape)} and {tuple(value.shape)}"
            )
        return self._project_kv(key, value)

    def attend(
        self, query: Tensor, kv: KV, mask: Tensor | None = None, need_weights: bool = False
    ) -> AttentionOutput:
        """Attend from ``query`` (B, T, E) to already projected keys/values (``project_kv``)."""
        self._check_features("query", query)
        self._check_kv(kv, query.size(0))
        if mask is not None:
            _check_mask(mask, (query.size(0), self.num_heads, query.size(1), kv.k.size(2)))
        return self._attend(query, kv, mask, need_weights)

    def self_attention(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        past: KV | None = None,
        need_weights: bool = False,
    ) -> SelfAttentionOutput:
        """Self-attention of ``x`` (B, T, E), with an optional cache ``past`` of earlier positions.

        Q, K and V come from one matrix product. Returns ``SelfAttentionOutput(output, kv,
        weights)``, ``kv`` being the cache grown by T positions.
        """
        self._check_features("input", x)
        cached = 0
        if past is not None:
            self._check_kv(past, x.size(0))
            cached = past.k.size(2)
        if mask is not None:
            _check_mask(mask, (x.size(0), self.num_heads, x.size(1), cached + x.size(1)))
        return self._self_attention(x, mask, past, need_weights)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        mask: Tensor | None = None,
        need_weights: bool = False,
    ) -> AttentionOutput:
        """``AttentionOutput(output (B, T, E), weights (B, H, T, S) or None)``, like PyTorch's pair."""
        if query is key and key is value:
            out, _, weights = self.self_attention(query, mask, need_weights=need_weights)
            return AttentionOutput(out, weights)
        self._check_features("query", query)
        kv = self.project_kv(key, value)
        if query.size(0) != key.size(0):
            raise ValueError(f"query and key differ in batch size: {query.size(0)} vs {key.size(0)}")
        if mask is not None:
            _check_mask(mask, (query.size(0), self.num_heads, query.size(1), key.size(1)))
        return self._attend(query, kv, mask, need_weights)

    # -- the same pieces unchecked, for the layers: the models check their inputs once ---------
    def _project_kv(self, key: Tensor, value: Tensor) -> KV:
        if key is value:  # cross-attention: keys and values of the memory in one product
            E = self.d_model
            bias = None if self.in_proj_bias is None else self.in_proj_bias[E:]
            k, v = F.linear(key, self.in_proj_weight[E:], bias).split(E, dim=-1)  # (B, S, E) each
        else:
            k, v = self.w_k(key), self.w_v(value)  # (B, S, E) each
        return KV(self._split_heads(k), self._split_heads(v))

    def _attend(self, query: Tensor, kv: KV, mask: Tensor | None, need_weights: bool) -> AttentionOutput:
        q = self._split_heads(self.w_q(query))  # (B, H, T, D)
        return self._attend_heads(q, kv, mask, need_weights)

    def _self_attention(
        self, x: Tensor, mask: Tensor | None, past: KV | None, need_weights: bool
    ) -> SelfAttentionOutput:
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, T, 3E)
        q, k, v = (self._split_heads(t) for t in qkv.split(self.d_model, dim=-1))  # (B, H, T, D) each, views
        if past is None and not need_weights:
            scale = 1.0 / math.sqrt(self.head_dim)
            if _use_short_attention(qkv):
                out = _ShortSelfAttention.apply(qkv, self.num_heads, mask, scale, self._dropout_p)
                return SelfAttentionOutput(self.w_o(out), KV(k, v), None)
            kernel = self._inference_kernel(qkv, mask)
            if kernel is not None:  # no gradient wanted: the kernel's forward pass alone
                _, out = kernel.forward(qkv.contiguous(), self.num_heads, mask, scale, None)
                return SelfAttentionOutput(self.w_o(out), KV(k, v), None)
        kv = KV(k, v) if past is None else past.extend(KV(k, v))  # (B, H, t + T, D)
        out, weights = self._attend_heads(q, kv, mask, need_weights)
        return SelfAttentionOutput(out, kv, weights)

    def _inference_kernel(self, qkv: Tensor, mask: Tensor | None) -> native.ShortAttentionKernel | None:
        """The compiled kernel for self-attention that needs no gradient (evaluation, translating's
        encoder): short sequences on the CPU, no dropout, where the kernel takes the shapes."""
        if (qkv.requires_grad and torch.is_grad_enabled()) or self._dropout_p > 0 or _functorch_active():
            return None
        if _graph_capture_active():  # tracing or exporting records PyTorch's operations; a C call is opaque
            return None
        if qkv.size(1) > SHORT_ATTENTION_MAX_LEN:  # the module's own limit, which users may lower
            return None
        return native.short_attention_for(qkv, self.head_dim, mask)

    @property
    def _dropout_p(self) -> float:
        """The attention weights' dropout now: the module's in training, none in evaluation."""
        return self.dropout if self.training else 0.0

    def _attend_heads(self, q: Tensor, kv: KV, mask: Tensor | None, need_weights: bool) -> AttentionOutput:
        out, weights = _attention(q, kv.k, kv.v, mask, None, self._dropout_p, need_weights)  # (B, H, T, D)
        return AttentionOutput(self.w_o(self._merge_heads(out)), weights)  # (B, T, E)
