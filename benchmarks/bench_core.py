"""Speed of attnlab's core against PyTorch's own modules, on the CPU or a CUDA GPU, in one run.

(a) forward + backward of ``attnlab.MultiHeadAttention`` vs ``torch.nn.MultiheadAttention``
    (self-attention, d_model 256, 8 heads, batch 128 x 24 tokens, same weights);
(b) one training step (forward, label-smoothed cross-entropy, backward, Adam) of ``attnlab.Transformer``
    vs ``torch.nn.Transformer`` (d_model 256, 3+3 layers, 8 heads, d_ff 512, dropout 0.1, batch 128 x 24
    source and 24 target tokens, vocabulary 8000 on both sides, label smoothing 0.1). The PyTorch model
    is wrapped in the same embeddings (attnlab's TokenEmbedding, scaled by √d_model, and
    PositionalEncoding, its dropout included) and an output ``nn.Linear``, gets the same masks (source
    padding, causal + target padding) and takes its loss as PyTorch users do: ``F.cross_entropy``
    over the logits.
    attnlab's step runs what its training runs (``TranslationTask.loss``): the decoder's hidden
    states (``model(src, tgt, features_only=True)``) into ``linear_cross_entropy``, which applies
    the output layer block by block without holding the logits and skips padding rows.

attnlab's self-attention over these 24 positions trains through its compiled kernel
(``attnlab.nn.native``) where that could be built, as it does in training; the header says which
path ran, and ``ATTNLAB_NATIVE=0`` measures the one with PyTorch's operations instead.

Both sides of (b) use the same optimizer, the one attnlab trains with (``attnlab.train.optim.build_adam``:
PyTorch's Adam, fused into one pass over all parameters where the device allows).

Each case warms up, then the two implementations take turns, one timed call each per repeat, so
that they share the machine's noise; the median (and the fastest call) is reported, with ours/PyTorch's
ratio of medians, both measured in this run (goal: <= 0.80 for both cases).
Each case's matmul FLOP count (``mha_fwd_bwd_flops``, ``transformer_train_flops``) gives its achieved
GFLOP/s, shown as a fraction of the machine's matmul rate in the dtype in use (fp32; bf16 under
``--bf16``), sampled between the timed calls of the same run (``MatmulRate``). Both sides are credited with the same count, padding rows of the
output layer included, though attnlab's loss leaves those out.

On a GPU (``--device cuda``) both sides' models, inputs and batches live on the device, and every
timed call, and every sampled matmul, starts and ends with ``torch.cuda.synchronize()``, so that the
clock reads the GPU's work and not only its launch. ``--bf16`` runs both sides' forward passes and
losses under ``torch.autocast("cuda", dtype=torch.bfloat16)``, as attnlab's training does with
``amp``, and the matmul rate is then sampled in bf16; ``--tf32`` lets float32 matmuls use TF32
(``torch.backends.cuda.matmul.allow_tf32``, off by default, as PyTorch's own default). The header
names the GPU, the dtype and the TF32 setting. On the GPU attnlab's self-attention runs PyTorch's
fused kernel (``scaled_dot_product_attention``), not the compiled CPU kernel.

Usage: python benchmarks/bench_core.py [--repeats 10] [--warmup 3] [--threads N] [--device cpu|cuda] [--bf16] [--tf32]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable

# attnlab's own default, set here because torch is imported first: spinning OpenMP waits make both
# sides several times slower, and noisier, on a machine whose cores are busy with other work.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab import (
    MultiHeadAttention,
    PositionalEncoding,
    Transformer,
    TransformerConfig,
)
from attnlab.nn import native
from attnlab.nn.model import TokenEmbedding
from attnlab.train.losses import linear_cross_entropy
from attnlab.train.optim import build_adam

D_MODEL, HEADS, LAYERS, D_FF, DROPOUT = 256, 8, 3, 512, 0.1
BATCH, SRC_LEN, TGT_LEN, VOCAB, PAD, SMOOTHING = 128, 24, 24, 8000, 0, 0.1


# -- what the two sides run -------------------------------------------------------------------------
class TorchSeq2Seq(nn.Module):
    """``torch.nn.Transformer`` inside the same embeddings and output layer as ``attnlab.Transformer``."""

    def __init__(self) -> None:
        super().__init__()
        self.src_embed = TokenEmbedding(VOCAB, D_MODEL, PAD)
        self.tgt_embed = TokenEmbedding(VOCAB, D_MODEL, PAD)
        self.positional = PositionalEncoding(D_MODEL, DROPOUT)
        self.transformer = nn.Transformer(
            D_MODEL, HEADS, LAYERS, LAYERS, D_FF, DROPOUT, batch_first=True
        )
        self.output = nn.Linear(D_MODEL, VOCAB)

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        # PyTorch's boolean masks mean True = blocked: the opposite of attnlab's.
        src_pad = src == PAD  # (B, S)
        tgt_pad = tgt == PAD  # (B, T)
        T = tgt.size(1)
        future = torch.ones(T, T, dtype=torch.bool, device=tgt.device).triu(1)  # (T, T)
        x = self.transformer(
            self.positional(self.src_embed(src)),
            self.positional(self.tgt_embed(tgt)),
            tgt_mask=future,
            src_key_padding_mask=src_pad,
            tgt_key_padding_mask=tgt_pad,
            memory_key_padding_mask=src_pad,
        )
        return self.output(x)  # (B, T, V)


def random_batch(generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Token ids with some end padding: src (B, S), target input (B, T), target output (B, T)."""

    def ids(length: int) -> Tensor:
        tokens = torch.randint(3, VOCAB, (BATCH, length), generator=generator)
        lengths = torch.randint(length // 2, length + 1, (BATCH, 1), generator=generator)
        return tokens.masked_fill(torch.arange(length) >= lengths, PAD)

    src, tgt = ids(SRC_LEN), ids(TGT_LEN + 1)
    return src, tgt[:, :-1], tgt[:, 1:]


def attnlab_loss(model: Transformer, src: Tensor, tgt_in: Tensor, tgt_out: Tensor) -> Tensor:
    """The mean loss per target token, computed as ``TranslationTask.loss`` and ``train_step`` do."""
    hidden = model(src, tgt_in, features_only=True)  # (B, T, E)
    loss_sum, tokens = linear_cross_entropy(
        hidden, model.output.weight, model.output.bias, tgt_out, PAD, SMOOTHING
    )
    return loss_sum / tokens


def pytorch_loss(model: TorchSeq2Seq, src: Tensor, tgt_in: Tensor, tgt_out: Tensor) -> Tensor:
    """The mean loss per target token from the logits, with PyTorch's own label smoothing."""
    logits = model(src, tgt_in)  # (B, T, V)
    return F.cross_entropy(
        logits.reshape(-1, VOCAB), tgt_out.reshape(-1), ignore_index=PAD, label_smoothing=SMOOTHING
    )


Autocast = Callable[[], contextlib.AbstractContextManager]  # a fresh autocast context (or a no-op one) for each call


def train_step_fn(
    model: nn.Module, loss_fn: Callable[..., Tensor], batch: tuple[Tensor, Tensor, Tensor],
    autocast: Autocast = contextlib.nullcontext,
) -> Callable[[], None]:
    """One training step; the forward pass and the loss under ``autocast``, as attnlab's ``train_step``
    runs them (the backward pass follows the forward's dtypes)."""
    optimizer = build_adam(model)  # β = (0.9, 0.98), ε = 1e-9, as attnlab trains
    for group in optimizer.param_groups:
        group["lr"] = 1e-4
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn(model, *batch)
        loss.backward()
        optimizer.step()

    return step


def mha_fn(module: nn.Module, x: Tensor, grad: Tensor, autocast: Autocast = contextlib.nullcontext) -> Callable[[], None]:
    def step() -> None:
        x.grad = None
        module.zero_grad(set_to_none=True)
        with autocast():
            out, _ = module(x, x, x, need_weights=False)  # both return (output, None)
        out.backward(grad.to(out.dtype))

    return step


# -- FLOPs ------------------------------------------------------------------------------------------
def transformer_train_flops(B: int, S: int, T: int, E: int, F_: int, V: int, n_enc: int, n_dec: int) -> int:
    """Matmul FLOPs of one training step; a (m x k) @ (k x n) product costs 2·m·n·k forward and
    3x that forward + backward (the backward pass computes two products of the same size).

    Per encoder layer (N_s = B·S source tokens):
        QKV projection 2·N_s·E·3E + output projection 2·N_s·E·E
        + scores Q·Kᵀ 2·B·S·S·E + weights·V 2·B·S·S·E   (summed over heads: H·D = E)
        + FFN 2·N_s·E·F + 2·N_s·F·E
    Per decoder layer (N_t = B·T target tokens):
        self-attention  2·N_t·E·3E + 2·N_t·E·E + 4·B·T·T·E   (the causal half is computed, then masked)
        cross-attention 2·N_t·E·E (Q) + 2·N_s·E·2E (K, V of the memory) + 2·N_t·E·E (out) + 4·B·T·S·E
        + FFN 4·N_t·E·F
    Output layer 2·N_t·E·V. Embeddings, softmax, LayerNorm, Adam: not counted (not matmuls).
    """
    Ns, Nt = B * S, B * T
    encoder = 2 * Ns * E * 3 * E + 2 * Ns * E * E + 4 * B * S * S * E + 4 * Ns * E * F_
    decoder = (
        2 * Nt * E * 3 * E + 2 * Nt * E * E + 4 * B * T * T * E
        + 2 * Nt * E * E + 2 * Ns * E * 2 * E + 2 * Nt * E * E + 4 * B * T * S * E
        + 4 * Nt * E * F_
    )
    forward = n_enc * encoder + n_dec * decoder + 2 * Nt * E * V
    return 3 * forward


def mha_fwd_bwd_flops(B: int, T: int, E: int) -> int:
    """Self-attention forward + backward: 3 x (QKV 2·N·E·3E + out 2·N·E·E + scores/values 4·B·T·T·E)."""
    N = B * T
    return 3 * (2 * N * E * 3 * E + 2 * N * E * E + 4 * B * T * T * E)


# -- timing -----------------------------------------------------------------------------------------
def synchronizer(device: torch.device) -> Callable[[], None]:
    """What waits for the device's queued work before the clock is read: nothing on the CPU."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


class MatmulRate:
    """The machine's matmul rate in the dtype in use, sampled between the timed calls of the whole run:
    the fastest n x n product is the rate the machine reaches (a slower one was disturbed by other work).
    2048 x 2048 in float32 on the CPU; 8192 x 8192 on a GPU, where a smaller product is over before
    the GPU is busy, in bf16 under ``--bf16``."""

    def __init__(self, n: int = 2048, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        generator = torch.Generator().manual_seed(0)
        self.n = n
        self.a, self.b = (torch.randn(n, n, generator=generator).to(device, dtype) for _ in range(2))
        self.sync = synchronizer(torch.device(device))
        self.samples: list[float] = []
        self.a @ self.b  # warm-up
        self.sync()

    def sample(self) -> None:
        self.sync()
        start = time.perf_counter()
        self.a @ self.b
        self.sync()
        self.samples.append(2 * self.n**3 / (time.perf_counter() - start) / 1e9)

    @property
    def gflops(self) -> float:
        return max(self.samples)


def time_pair(ours: Callable[[], None], theirs: Callable[[], None], warmup: int, repeats: int, rate: MatmulRate,
              sync: Callable[[], None] = lambda: None):
    """Seconds per call of each, (median, fastest), the two taking turns (and swapping who goes first);
    the matmul rate is sampled once per repeat. ``sync`` (a GPU's ``torch.cuda.synchronize``) runs
    before the clock starts and at the end of every timed call, before the clock is read."""
    for _ in range(warmup):
        ours()
        theirs()
    sync()
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    for r in range(repeats):
        order = [("ours", ours), ("theirs", theirs)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
        rate.sample()
    return tuple((statistics.median(times[name]), min(times[name])) for name in ("ours", "theirs"))


def report(title: str, flops: int, timings, peak: float, extra: tuple[str, str] = ("", ""), digits: int = 0) -> None:
    (ours_t, ours_min), (theirs_t, theirs_min) = timings
    print(f"\n{title} ({flops / 1e9:.2f} GFLOP of matmuls)")
    for name, (median, fastest), more in (("attnlab", (ours_t, ours_min), extra[0]),
                                          ("PyTorch", (theirs_t, theirs_min), extra[1])):
        print(f"    {name} {median * 1e3:8.2f} ms (min {fastest * 1e3:8.2f})   {flops / median / 1e9:6.1f} GFLOP/s "
              f"= {flops / median / 1e9 / peak:.{digits}%} of the matmul rate{more}")
    print(f"    ratio attnlab/PyTorch: {ours_t / theirs_t:.3f} (goal <= 0.80)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed calls of each side (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls of each side first")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both sides run (default: cpu)")
    parser.add_argument("--bf16", action="store_true",
                        help="both sides' forward passes and losses under bf16 autocast (--device cuda only)")
    parser.add_argument("--tf32", action="store_true",
                        help="let float32 matmuls use TF32 (torch.backends.cuda.matmul.allow_tf32; --device cuda only)")
    args = parser.parse_args()
    if args.device == "cpu" and (args.bf16 or args.tf32):
        parser.error(f"{'--bf16' if args.bf16 else '--tf32'} is for the GPU: use it with --device cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: PyTorch sees no CUDA GPU on this machine")
    device = torch.device(args.device)
    sync = synchronizer(device)

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.bf16)

    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        precision = "bf16 autocast" if args.bf16 else "float32"
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {precision}, "
              f"TF32 matmuls {'allowed' if torch.backends.cuda.matmul.allow_tf32 else 'off'}, "
              f"{torch.get_num_threads()} CPU threads; warm-up {args.warmup}, median of {args.repeats} alternating "
              "repeats, each call synchronized")
        print("attnlab's self-attention: PyTorch's fused kernel (scaled_dot_product_attention) on the GPU")
    else:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU float32, "
              f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; "
              f"warm-up {args.warmup}, median of {args.repeats} alternating repeats")
        kernel = native.short_attention_kernel()  # built here, if it must be, not inside a timed call
        print("attnlab's short self-attention: " + (f"the compiled kernel ({kernel.path})" if kernel else
              "PyTorch's operations (no compiled kernel: no C compiler, ATTNLAB_NATIVE=0, or a failed build)"))
    rate_dtype = torch.bfloat16 if args.bf16 else torch.float32
    rate = MatmulRate(8192 if device.type == "cuda" else 2048, device, rate_dtype)
    for _ in range(3):
        rate.sample()

    # (a) multi-head self-attention, forward + backward
    torch.manual_seed(0)
    ours_mha = MultiHeadAttention(D_MODEL, HEADS)
    theirs_mha = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True)
    with torch.no_grad():  # the same weights on both sides
        theirs_mha.in_proj_weight.copy_(ours_mha.in_proj_weight)  # [W_q; W_k; W_v] on both sides
        theirs_mha.in_proj_bias.copy_(ours_mha.in_proj_bias)
        theirs_mha.out_proj.weight.copy_(ours_mha.w_o.weight)
        theirs_mha.out_proj.bias.copy_(ours_mha.w_o.bias)
    ours_mha.to(device)
    theirs_mha.to(device)
    x = torch.randn(BATCH, SRC_LEN, D_MODEL).to(device).requires_grad_()
    grad = torch.randn(BATCH, SRC_LEN, D_MODEL).to(device)
    mha_timings = time_pair(mha_fn(ours_mha, x, grad, autocast), mha_fn(theirs_mha, x, grad, autocast),
                            args.warmup, args.repeats, rate, sync)

    # (b) a full training step
    torch.manual_seed(0)
    config = TransformerConfig(
        VOCAB, VOCAB, d_model=D_MODEL, num_heads=HEADS, num_encoder_layers=LAYERS,
        num_decoder_layers=LAYERS, d_ff=D_FF, dropout=DROPOUT, pad_id=PAD,
    )
    ours_model, theirs_model = Transformer(config).to(device), TorchSeq2Seq().to(device)
    batch = tuple(t.to(device) for t in random_batch(torch.Generator().manual_seed(0)))
    n_ours = sum(p.numel() for p in ours_model.parameters())
    n_theirs = sum(p.numel() for p in theirs_model.parameters())
    step_timings = time_pair(
        train_step_fn(ours_model, attnlab_loss, batch, autocast), train_step_fn(theirs_model, pytorch_loss, batch, autocast),
        args.warmup, args.repeats, rate, sync,
    )

    peak = rate.gflops
    kind = "bf16" if args.bf16 else "fp32" + (" (TF32 allowed)" if device.type == "cuda" and args.tf32 else "")
    print(f"{kind} matmul {rate.n}x{rate.n}: {peak:.1f} GFLOP/s (the fastest of {len(rate.samples)} products "
          f"timed through the run; median {statistics.median(rate.samples):.1f})")
    digits = 1 if device.type == "cuda" else 0  # a GPU's small cases reach a few percent of its rate, or less
    report(f"(a) MultiHeadAttention fwd+bwd, self-attention, d_model {D_MODEL}, {HEADS} heads, "
           f"batch {BATCH} x {SRC_LEN} tokens", mha_fwd_bwd_flops(BATCH, SRC_LEN, D_MODEL), mha_timings, peak,
           digits=digits)
    report(f"(b) training step (fwd, label-smoothed cross-entropy, bwd, Adam): d_model {D_MODEL}, {LAYERS}+{LAYERS} layers, "
           f"{HEADS} heads, d_ff {D_FF}, dropout {DROPOUT}, vocab {VOCAB}, batch {BATCH} x {SRC_LEN}+{TGT_LEN} "
           "tokens", transformer_train_flops(BATCH, SRC_LEN, TGT_LEN, D_MODEL, D_FF, VOCAB, LAYERS, LAYERS),
           step_timings, peak, (f"   {n_ours / 1e6:.2f} M parameters", f"   {n_theirs / 1e6:.2f} M parameters"), digits)


if __name__ == "__main__":
    main()
