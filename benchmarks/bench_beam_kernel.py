"""Beam search with and without attnlab's compiled scoring kernel, in one run on the same machine.

Translates the test_2016_flickr sentences with beam search twice per round, once with the kernel
(``attnlab.nn.native.beam_scores_kernel``: log-softmax, beam scores and the best 2K extensions per
sentence in one pass) and once with it switched off (PyTorch's log_softmax, addition and selection),
the two taking turns; prints the median of the rounds, the ratio, and how many translations are
identical (all of them should be).

Usage: python benchmarks/bench_beam_kernel.py --checkpoint runs/tiny [--threads 1] [--beam 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

from attnlab.app.process import set_process_defaults  # no torch inside

set_process_defaults()  # as the attnlab command sets them, before torch loads

import torch  # noqa: E402

from attnlab.data.corpus import load_multi30k  # noqa: E402
from attnlab.decode.load import load_checkpoint  # noqa: E402
from attnlab.decode.translate import DecodeConfig, load_translator  # noqa: E402
from attnlab.errors import AttnlabError  # noqa: E402
from attnlab.nn import native  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="translation run or checkpoint directory")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--beam", type=int, default=4, help="beam size (2 or more)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each (median)")
    args = parser.parse_args()
    if args.beam < 2:
        parser.error("--beam must be 2 or more: greedy search does not score with log-probabilities")
    torch.set_num_threads(args.threads)
    kernel = native.beam_scores_kernel()
    if kernel is None:
        raise SystemExit("no compiled kernels here (no C compiler, ATTNLAB_NATIVE=0, or a failed build)")
    try:
        translator = load_translator(args.checkpoint)
        languages = load_checkpoint(args.checkpoint, "translation").languages
    except AttnlabError as error:
        raise SystemExit(f"bench_beam_kernel.py: {error}") from None
    sources = [src for src, _ in load_multi30k("test_2016_flickr", *languages)]
    config = DecodeConfig(beam_size=args.beam)

    def run(with_kernel: bool) -> tuple[float, list[str]]:
        native.beam_scores_kernel = (lambda: kernel) if with_kernel else (lambda: None)
        start = time.perf_counter()
        out = translator.translate(sources, config)
        return time.perf_counter() - start, out

    run(True), run(False)  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    outputs: dict[bool, list[str]] = {}
    for r in range(args.rounds):
        for with_kernel in (True, False) if r % 2 == 0 else (False, True):
            seconds, outputs[with_kernel] = run(with_kernel)
            times[with_kernel].append(seconds)
    with_k, without = (statistics.median(times[flag]) for flag in (True, False))
    same = sum(a == b for a, b in zip(outputs[True], outputs[False]))
    print(f"{args.checkpoint}: {len(sources)} sentences, beam {args.beam}, {torch.get_num_threads()} thread(s), "
          f"median of {args.rounds} alternating rounds")
    print(f"    with the kernel {with_k:.3f} s, without {without:.3f} s: {without / with_k:.2f}x faster; "
          f"identical translations {same}/{len(sources)}")


if __name__ == "__main__":
    main()
