"""attnlab translating test_2016_flickr on a CUDA GPU: sentences/s in float32 (TF32 off), greedy and
beam search, median of ``--rounds`` after a warm-up, and the share of translations identical to the
CPU's (which is timed once, for reference, with all the machine's cores).

Usage: python benchmarks/bench_gpu_translate.py --checkpoint runs/de-en [--rounds 3] [--beam 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from attnlab.data.corpus import load_multi30k
from attnlab.decode.translate import DecodeConfig, bleu_scores, load_translator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="translation run or checkpoint directory")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs per search (median)")
    parser.add_argument("--beam", type=int, default=4, help="beam size of the beam search (greedy always runs)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu_translate.py: PyTorch sees no CUDA GPU on this machine")
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 as on the CPU, so that outputs can be compared
    torch.set_num_threads(os.cpu_count() or 1)
    pairs = load_multi30k("test_2016_flickr", "de", "en")
    sources, references = [s for s, _ in pairs], [t for _, t in pairs]
    gpu, cpu = load_translator(args.checkpoint, device="cuda"), load_translator(args.checkpoint)
    print(f"{args.checkpoint}, {torch.cuda.get_device_name()}, torch {torch.__version__}, {len(sources)} sentences, "
          f"float32, median of {args.rounds}")
    for beam in (1, args.beam):
        config = DecodeConfig(beam_size=beam)
        gpu.translate(sources[:100], config)  # warm-up
        times = []
        for _ in range(args.rounds):
            torch.cuda.synchronize()
            start = time.perf_counter()
            outputs = gpu.translate(sources, config)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        on_cpu = cpu.translate(sources, config)
        cpu_seconds = time.perf_counter() - start
        seconds = statistics.median(times)
        same = sum(a == b for a, b in zip(outputs, on_cpu))
        print(f"{'greedy' if beam == 1 else f'beam {beam}'}: GPU {len(sources) / seconds:.1f} sentences/s "
              f"({seconds:.2f} s), BLEU {bleu_scores(outputs, references)['bleu']}; CPU ({torch.get_num_threads()} "
              f"threads, one run) {len(sources) / cpu_seconds:.1f} sentences/s; identical {same}/{len(sources)}")


if __name__ == "__main__":
    main()
