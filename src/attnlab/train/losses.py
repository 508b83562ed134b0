"""Label-smoothed cross-entropy, the paper's training loss (ε = 0.1).

The smoothed target puts 1 − ε on the true token and spreads ε evenly over the whole vocabulary
(PyTorch's convention): loss = (1 − ε) · (−log p_y) + ε · mean_v(−log p_v). Padding positions
contribute nothing.

Two functions compute it. ``label_smoothed_loss`` takes logits. ``linear_cross_entropy`` takes the
hidden states under the output layer and that layer's weight and bias, and computes the same loss
without ever holding the (N, V) logits: it walks over blocks of rows, and for each block computes
the logits, the loss and at once their gradient, which it folds into the gradients of the hidden
states, the weight and the bias. With a large vocabulary the logits and the passes over them
(log-softmax, its backward, the zero-filled gradient) cost about as much as the rest of a training
step; a block of logits stays in the cache instead. The training tasks use it.

Shape legend: B batch, T length, N = B·T rows, E model dim, V vocab size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["label_smoothed_loss", "linear_cross_entropy"]

# Rows per block of ``linear_cross_entropy``: 256 rows of an 8000-word vocabulary are 8 MB of fp32
# logits, which stay in the cache while a block is processed.
CHUNK_ROWS = 256
# ... and on a GPU, where a block's dozen kernel launches, not the cache, set the pace: blocks of up to
# this many logits (128 MB in fp32), so that a batch of a few thousand rows is one block or a few.
GPU_CHUNK_LOGITS = 2**25


def _check_smoothing(smoothing: float) -> None:
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")


def label_smoothed_loss(
    logits: Tensor, target: Tensor, pad_id: int, smoothing: float = 0.1
) -> tuple[Tensor, Tensor]:
    """Summed label-smoothed loss over non-pad targets, and their count.

    Half-precision logits are taken to fp32 first; fp32 and fp64 ones stay as they are.
    Shape: logits (B, T, V), target (B, T) -> (scalar sum, scalar count).
    """
    _check_smoothing(smoothing)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=pad_id,
        label_smoothing=smoothing, reduction="sum",
    )
    return loss, (target != pad_id).sum()


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, pad_id: int,
    smoothing: float = 0.1, chunk_rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``label_smoothed_loss(F.linear(hidden, weight, bias), target, pad_id, smoothing)``, computed in
    blocks of ``chunk_rows`` rows without the logits; padding rows are skipped altogether.

    The gradients are computed during the forward pass (a block's logits are at hand only then)
    and kept for ``backward``, which scales them by the incoming gradient. Under autocast the
    products run in the autocast dtype, as ``F.linear`` would run them, and the softmax in fp32.

    ``chunk_rows`` (None: ``CHUNK_ROWS`` on the CPU, as many rows as make ``GPU_CHUNK_LOGITS``
    logits on a GPU) sets the block size.

    Shape: hidden (B, T, E), weight (V, E), bias (V,) or None, target (B, T)
    -> (scalar sum, scalar count).
    """
    _check_smoothing(smoothing)
    if chunk_rows is None:  # the default: cache-sized blocks on the CPU, large ones on a GPU
        chunk_rows = CHUNK_ROWS if hidden.device.type == "cpu" else max(CHUNK_ROWS, GPU_CHUNK_LOGITS // weight.size(0))
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    if hidden.shape[:-1] != target.shape or hidden.size(-1) != weight.size(1):
        raise ValueError(
            f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and target {tuple(target.shape)} "
            "do not fit: expected (..., E), (V, E) and (...)"
        )
    keep = (target != pad_id).reshape(-1)  # (N,)
    rows = keep.nonzero().squeeze(1)  # (n,) the non-pad rows
    hidden = hidden.reshape(-1, hidden.size(-1)).index_select(0, rows)  # (n, E)
    labels = target.reshape(-1).index_select(0, rows)  # (n,)
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    elif hidden.dtype != weight.dtype:
        raise ValueError(f"hidden is {hidden.dtype} but the weight is {weight.dtype}")
    inputs = (hidden, weight) if bias is None else (hidden, weight, bias)
    need_grads = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    with torch.autocast(device, enabled=False):
        loss = _LinearCrossEntropy.apply(hidden, weight, bias, labels, smoothing, chunk_rows, need_grads)
    return loss, keep.sum()


class _LinearCrossEntropy(torch.autograd.Function):
    """The summed loss of ``linear_cross_entropy`` over rows that are all targets (no padding)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                smoothing: float, chunk_rows: int, need_grads: bool) -> Tensor:
        loss, grads = _blockwise_loss(hidden, weight, bias, labels, smoothing, chunk_rows, need_grads)
        ctx.save_for_backward(*grads)
        ctx.has_bias = bias is not None
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_hidden, grad_weight, *grad_bias = (g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)
        return grad_hidden, grad_weight, grad_bias[0] if ctx.has_bias else None, None, None, None, None


def _logits(h: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
    """h Wᵀ + b written into ``out``, one buffer for every block."""
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


def _blockwise_loss(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, smoothing: float,
    chunk_rows: int, need_grads: bool,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The summed loss and, when ``need_grads``, its gradients (hidden, weight[, bias]).

    Per row, with logits z and lse = log Σ_v exp z_v:
        loss = (1 − ε)(lse − z_y) + ε (lse − mean_v z_v)
        ∂loss/∂z = softmax(z) − (1 − ε)·onehot(y) − ε/V
    and the gradients of the linear layer follow from ∂loss/∂z = g: g W, gᵀ h and Σ_rows g.
    """
    n, V = hidden.size(0), weight.size(0)
    acc = torch.promote_types(hidden.dtype, torch.float32)  # of the softmax and the sums
    loss = torch.zeros((), dtype=acc, device=hidden.device)
    grads: tuple[Tensor, ...] = ()
    if need_grads:
        grad_hidden = torch.empty_like(hidden)  # (n, E)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)  # (V, E)
        grad_bias = None if bias is None else torch.zeros(V, dtype=acc, device=weight.device)  # (V,)
    block = torch.empty(min(n, chunk_rows), V, dtype=hidden.dtype, device=hidden.device)  # reused
    for start in range(0, n, chunk_rows):
        h = hidden[start : start + chunk_rows]  # (C, E)
        y = labels[start : start + chunk_rows, None]  # (C, 1)
        z = _logits(h, weight, bias, out=block[: h.size(0)]).to(acc)  # (C, V) a block of logits
        z_y = z.gather(1, y)  # (C, 1)
        z_sum = z.sum()
        z_max = z.amax(dim=1, keepdim=True)  # (C, 1)
        e = z.sub_(z_max).exp_()  # (C, V) exp(z - max), in place of the logits
        e_sum = e.sum(dim=1, keepdim=True)  # (C, 1)
        lse = z_max + e_sum.log()  # (C, 1) log Σ_v exp z_v
        loss += (lse - (1.0 - smoothing) * z_y).sum() - (smoothing / V) * z_sum
        if not need_grads:
            continue
        g = e.mul_(e_sum.reciprocal_())  # (C, V) softmax
        if smoothing > 0:
            g.sub_(smoothing / V)
        g.scatter_add_(1, y, torch.full_like(z_y, smoothing - 1.0))  # ∂loss/∂z
        g = g.to(hidden.dtype)
        torch.mm(g, weight, out=grad_hidden[start : start + chunk_rows])  # (C, E)
        if g.dtype == acc:
            grad_weight.addmm_(g.t(), h)  # (V, E)
        else:
            grad_weight += torch.mm(g.t(), h)
        if grad_bias is not None:
            grad_bias += g.sum(0, dtype=acc)
    if need_grads:
        grads = (grad_hidden, grad_weight.to(weight.dtype))
        if grad_bias is not None:
            grads += (grad_bias.to(bias.dtype),)
    return loss, grads
