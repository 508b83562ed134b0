"""attnlab's int8 products against float32 and PyTorch's int8, on the CPU, in one run.

Two cases, each on random weights of the trained models' shapes (``runs/tiny``: d_model 128, d_ff 256,
4000 target ids; ``multi30k-de-en``: 256, 1024, 8000), for several numbers of rows (the decoder step's
rows shrink as sentences end; the encoder's are a batch's tokens):

(a) a linear layer, x Wᵀ + b: float32 ``torch.addmm``; PyTorch's dynamic int8
    (``quantized::linear_dynamic`` on per-channel int8 weights, the path int8 translators take where
    attnlab's kernels are not built); attnlab's int8 kernel (``fast_decode._apply`` on an
    ``Int8Linear``: ``csrc/int8_output.c``).
(b) greedy search's choice from the output layer: PyTorch's int8 logits followed by attnlab's
    choosing kernel (``native.GreedyPickKernel.pick``), what int8 greedy search ran before; and
    ``fast_decode.int8_pick``, which chooses as its kernel forms the int8 logits.

The process runs with the attnlab command's settings (``attnlab.app.process``). The implementations
take turns, one timed call each per round (each call repeated enough times to
last about a millisecond), so that they share the machine's noise; the figures are the median over
the rounds, in microseconds a call, with the ratio of PyTorch's int8 to attnlab's (above 1: attnlab's
is faster), both measured in this run.

Usage: python benchmarks/bench_int8.py [--rounds 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from attnlab.app.process import set_process_defaults

set_process_defaults()  # as the attnlab command runs: freed memory kept, so no contender pays page faults for
# another's freed outputs (alternating calls of different sizes otherwise made glibc hand memory back
# and forth: attnlab's 128 x 384 product of 1024 rows took 1.47 ms in the race, 0.69 ms alone)

import torch  # noqa: E402

from attnlab.nn import fast_decode, native  # noqa: E402

LINEAR_SHAPES = [(128, 384), (128, 128), (128, 256), (256, 128), (256, 768), (256, 256), (256, 1024), (1024, 256)]
OUTPUT_SHAPES = [(128, 4000), (256, 8000)]
ROWS = [1, 4, 16, 64, 256, 1024]


def _per_call(fn: Callable[[], object]) -> Callable[[], float]:
    """A timer of ``fn``: seconds a call, over enough calls to last about a millisecond."""
    fn()
    start = time.perf_counter()
    fn()
    repeat = max(1, int(1e-3 / max(time.perf_counter() - start, 1e-7)))

    def timed() -> float:
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        return (time.perf_counter() - start) / repeat

    return timed


def _race(rounds: int, contenders: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Median microseconds a call of each contender, taking turns round by round."""
    timers = {name: _per_call(fn) for name, fn in contenders.items()}
    times: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            times[name].append(timer())
    return {name: 1e6 * statistics.median(values) for name, values in times.items()}


def _weights(fan_in: int, fan_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(fan_in, fan_out, generator=generator) / fan_in**0.5,
            torch.randn(fan_out, generator=generator) * 0.1)


def _pytorch_int8(affine: tuple[torch.Tensor, torch.Tensor]) -> object:
    weight = affine[0].t().contiguous()
    return torch.ops.quantized.linear_prepack(fast_decode._per_channel_int8(weight), affine[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if native.int8_output_kernel() is None:
        raise SystemExit("bench_int8: attnlab's kernels are not built here (see attnlab.nn.native); nothing to compare")
    print(f"# attnlab int8 products, CPU, {args.threads} thread(s), median of {args.rounds} rounds, microseconds a call")
    print("\n(a) x Wᵀ + b")
    print("| in x out | rows | float32 addmm | PyTorch int8 | attnlab int8 | PyTorch int8 / attnlab int8 |")
    print("|---|---|---|---|---|---|")
    for fan_in, fan_out in LINEAR_SHAPES:
        affine = _weights(fan_in, fan_out, fan_in + fan_out)
        pytorch, ours = _pytorch_int8(affine), fast_decode._quantized(affine)
        for rows in ROWS:
            x = torch.randn(rows, fan_in, generator=torch.Generator().manual_seed(rows))
            t = _race(args.rounds, {
                "f32": lambda: torch.addmm(affine[1], x, affine[0]),
                "pytorch": lambda: torch.ops.quantized.linear_dynamic(x, pytorch, True),
                "ours": lambda: fast_decode._apply(x, ours),
            })
            print(f"| {fan_in} x {fan_out} | {rows} | {t['f32']:.1f} | {t['pytorch']:.1f} | {t['ours']:.1f} | "
                  f"{t['pytorch'] / t['ours']:.2f} |")
    print("\n(b) greedy search's choice from the output layer's int8 logits")
    print("| E x V | rows | PyTorch int8 + choosing kernel | attnlab int8_pick | ratio |")
    print("|---|---|---|---|---|")
    pick = native.greedy_pick_kernel().pick
    banned = torch.tensor([1, 2])
    for fan_in, fan_out in OUTPUT_SHAPES:
        affine = _weights(fan_in, fan_out, fan_out)
        pytorch, ours = _pytorch_int8(affine), fast_decode._quantized(affine)
        for rows in ROWS[:-1]:
            x = torch.randn(rows, fan_in, generator=torch.Generator().manual_seed(rows))
            t = _race(args.rounds, {
                "pytorch": lambda: pick(torch.ops.quantized.linear_dynamic(x, pytorch, True), banned),
                "ours": lambda: fast_decode.int8_pick(ours, x, banned),
            })
            print(f"| {fan_in} x {fan_out} | {rows} | {t['pytorch']:.1f} | {t['ours']:.1f} | "
                  f"{t['pytorch'] / t['ours']:.2f} |")


if __name__ == "__main__":
    main()
