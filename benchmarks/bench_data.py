"""Speed and memory of ``attnlab prepare`` on a large corpus made on the fly, in one run.

The corpus: ``--pairs`` German-English pairs (default 2,000,000) built from the bundled Multi30k
training data (29,000 pairs). Each new pair joins the first half (in words) of one Multi30k pair with
the second half of another, on both sides, so lines are not verbatim repeats (the corpus is for speed
and memory, not for quality). It is written as a prefix (``big.de`` / ``big.en``, plain text) under
``--workdir``; Multi30k's validation split is the validation split.

Reported, per ``--workers`` setting:
- ``prepare``: wall time, pairs/s (pairs read / total time: hashing, counting, the vocabulary learned
  from a ``--vocab-sample`` sample, cleaning, encoding, writing), each stage's time, size on disk, peak
  resident memory (``prepare`` runs in a subprocess: the peak of that process, from its own
  ``getrusage``, and of its largest encoding worker; ``RUSAGE_CHILDREN`` of this process agrees);
- the time of a second, "up to date" run;
- the tokenizer alone, on the same sentences in the same run: the prepared vocabulary encoding both
  sides of the first ``--tokenizer-pairs`` pairs (default 500,000; 0: all) in chunks of 8,192 (as
  ``prepare`` does), timing only the encode calls, through attnlab's ``Vocab.encode_batch``
  (``tokenizers``' ``encode_batch``) and through ``encode_batch_fast`` (no offsets, what ``prepare``
  calls), each in pairs/s; the goal is prepare >= 0.8x the tokenizer alone. The machine is shared, and
  wall-clock rates taken minutes apart differ 2-3x with the other work on it, so the CPU time of
  both (pairs per CPU-second: ``prepare``'s process and workers, the encode calls' process time) is
  reported beside the wall-clock rates; it is the fairer comparison of the two.

The training half (a few hundred steps on the 2M-pair data against the 29k-pair data: startup time,
steps/s, peak memory) goes into ``bench_training``, which receives both prepared folders.

Usage: python benchmarks/bench_data.py [--pairs 2000000] [--workers 1,2] [--vocab-sample 1000000]
                                       [--tokenizer bpe|sentencepiece]
                                       [--tokenizer-pairs 500000]
                                       [--workdir /tmp/attnlab-bench-data] [--json results.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MULTI30K = REPO / "data" / "multi30k"
CHUNK = 8192


def make_corpus(folder: Path, pairs: int, seed: int = 0) -> str:
    """Write ``pairs`` recombined Multi30k pairs as ``folder/big.de`` + ``big.en``; return the prefix."""
    folder.mkdir(parents=True, exist_ok=True)
    prefix = folder / f"big{pairs}"
    if Path(f"{prefix}.de").exists() and Path(f"{prefix}.en").exists():
        return str(prefix)
    sides = {}
    for lang in ("de", "en"):
        lines = gzip.open(MULTI30K / f"train.{lang}.gz", "rt", encoding="utf-8").read().splitlines()
        halves = []
        for line in lines:
            words = line.split()
            cut = len(words) // 2
            halves.append((" ".join(words[:cut]), " ".join(words[cut:])))
        sides[lang] = halves
    rng = np.random.default_rng(seed)
    first, second = rng.integers(0, len(sides["de"]), size=(2, pairs))
    for lang, halves in sides.items():
        with open(f"{prefix}.{lang}.tmp", "w", encoding="utf-8") as f:
            for start in range(0, pairs, 100_000):
                f.write("".join(f"{halves[i][0]} {halves[j][1]}".strip() + "\n"
                                for i, j in zip(first[start:start + 100_000], second[start:start + 100_000])))
        os.replace(f"{prefix}.{lang}.tmp", f"{prefix}.{lang}")
    return str(prefix)


_CHILD = """
import json, resource, sys, time
from attnlab.data.prepared import prepare
kwargs = json.loads(sys.argv[1])
report = prepare(**kwargs)
print(json.dumps({"report": report.to_dict(),
                  "self_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "workers_maxrss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def run_prepare(kwargs: dict) -> dict:
    """``prepare(**kwargs)`` in a fresh Python process; its report, CPU time and peak memory."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(kwargs)], capture_output=True, text=True,
                          env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"prepare failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result["wall_s"] = wall
    result["cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    result["children_maxrss_kb"] = after.ru_maxrss
    return result


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def tokenizer_alone(data_dir: Path, prefix: str, src: str, tgt: str, limit: int) -> dict[str, float]:
    """Pairs/s of the prepared vocabulary encoding both sides of the first ``limit`` pairs (encode calls only)."""
    from attnlab.data.prepared import PreparedData

    data = PreparedData.open(data_dir)
    fast = hasattr(data.src_vocab, "tokenizer")  # Hugging Face tokenizers (not SentencePiece)
    timings = {"encode_batch": 0.0, "encode_batch_fast": 0.0} if fast else {"encode_batch": 0.0}
    cpu = dict.fromkeys(timings, 0.0)
    pairs = 0
    with open(f"{prefix}.{src}", encoding="utf-8") as fs, open(f"{prefix}.{tgt}", encoding="utf-8") as ft:
        while pairs < limit:
            src_lines = [line.strip() for _, line in zip(range(CHUNK), fs)]
            tgt_lines = [line.strip() for _, line in zip(range(CHUNK), ft)]
            if not src_lines:
                break
            pairs += len(src_lines)
            for vocab, lines in ((data.src_vocab, src_lines), (data.tgt_vocab, tgt_lines)):
                tick, cpu_tick = time.perf_counter(), time.process_time()
                vocab.encode_batch(lines)
                timings["encode_batch"] += time.perf_counter() - tick
                cpu["encode_batch"] += time.process_time() - cpu_tick
                if not fast:
                    continue
                tick, cpu_tick = time.perf_counter(), time.process_time()
                [e.ids for e in vocab.tokenizer.encode_batch_fast(lines, add_special_tokens=False)]
                timings["encode_batch_fast"] += time.perf_counter() - tick
                cpu["encode_batch_fast"] += time.process_time() - cpu_tick
    return {**{name: pairs / seconds for name, seconds in timings.items()},
            **{f"{name}_cpu": pairs / seconds for name, seconds in cpu.items()}}


def bench_training(prepared: dict[str, Path], args: argparse.Namespace) -> list[dict]:
    """The training half: ``--train-steps`` steps of the tiny preset from each prepared folder.

    ``prepared`` maps a label ("2M", "29k") to a DATA_DIR. Each run is its own process (so its peak
    resident memory is its own), started ``--train-rounds`` times, the labels alternating; reported
    per run and as medians: seconds from the process's start to its first step (imports, opening
    the data, the length arrays, the first epoch's batches), steps/s and tokens/s over the steps
    after the first 10, and the process's peak resident memory. Goals: peak memory on 2M at most
    1.2x that on 29k, steps/s on 2M at least 0.95x, first step on 2M under 30 s.
    """
    runs: list[dict] = []
    for round_ in range(args.train_rounds):
        for label, data in prepared.items():
            out = args.workdir / f"train-{label}-{round_}"
            for stale in sorted(out.rglob("*"), reverse=True) if out.exists() else ():
                stale.rmdir() if stale.is_dir() else stale.unlink()
            spawned = time.time()
            done = subprocess.run([sys.executable, __file__, "--train-child", str(data), "--train-steps",
                                   str(args.train_steps), "--workdir", str(out)],
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"training on {data} failed:\n{done.stderr[-3000:]}")
            row = {"label": label, **json.loads(done.stdout.strip().splitlines()[-1])}
            row["first_step_s"] = row.pop("first_step_at") - spawned
            runs.append(row)
            print(f"train {label} (round {round_ + 1}): first step after {row['first_step_s']:.1f} s, "
                  f"{row['steps_per_s']:.2f} steps/s, {row['tokens_per_s']:,.0f} tokens/s, "
                  f"peak RSS {row['peak_rss_mb']:.0f} MB ({row['pairs']:,} pairs)")
    medians = {label: {key: float(np.median([r[key] for r in runs if r["label"] == label]))
                       for key in ("first_step_s", "steps_per_s", "tokens_per_s", "peak_rss_mb")}
               for label in prepared}
    big, small = medians["2M"], medians["29k"]
    print(f"training, medians of {args.train_rounds} round(s): 2M/29k peak memory "
          f"{big['peak_rss_mb'] / small['peak_rss_mb']:.2f}x (goal <= 1.2), steps/s "
          f"{big['steps_per_s'] / small['steps_per_s']:.2f}x (goal >= 0.95), tokens/s "
          f"{big['tokens_per_s'] / small['tokens_per_s']:.2f}x; first step on 2M after "
          f"{big['first_step_s']:.1f} s (goal < 30), on 29k {small['first_step_s']:.1f} s")
    return [*runs, {"medians": medians}]


def train_child(data: str, steps: int, out: Path) -> None:
    """One training process (``--train-child``): the tiny preset on ``data``; prints one JSON line."""
    from attnlab.train.presets import get_preset
    from attnlab.train.trainer import Trainer

    config = get_preset("tiny").override(data=data, time_limit=0.0, max_steps=steps)
    trainer = Trainer.start(config, out, progress=False, echo=lambda _message: None)
    batches = trainer.task.batches(0)
    first_step_at = time.time()
    warm = 10
    for i, batch in enumerate(batches[:steps]):
        if i == warm:
            tick, tokens = time.perf_counter(), 0
        stats = trainer.step(batch)
        if i >= warm:
            tokens += stats.tokens_read
    seconds = time.perf_counter() - tick
    trainer.lock.release() if trainer.lock is not None else None
    print(json.dumps({"first_step_at": first_step_at, "steps_per_s": (min(steps, len(batches)) - warm) / seconds,
                      "tokens_per_s": tokens / seconds, "pairs": len(trainer.task.train_index),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=2_000_000)
    parser.add_argument("--workers", default="1", help="comma-separated --workers settings to compare (e.g. 1,2)")
    parser.add_argument("--tokenizer-pairs", type=int, default=500_000,
                        help="measure the tokenizer alone on the first N pairs of the corpus (0: all)")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--tokenizer", default="bpe", choices=("bpe", "sentencepiece"))
    parser.add_argument("--vocab-sample", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/attnlab-bench-data"))
    parser.add_argument("--train-steps", type=int, default=0, help="steps for bench_training (0: skip)")
    parser.add_argument("--train-rounds", type=int, default=2, help="training runs per corpus, alternating")
    parser.add_argument("--train-only", action="store_true",
                        help="skip preparing: train from the folders an earlier run prepared in --workdir")
    parser.add_argument("--train-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.train_child:
        train_child(args.train_child, args.train_steps, args.workdir)
        return
    if args.train_only:
        workers = args.workers.split(",")[0]
        big = args.workdir / f"prepared{args.pairs}-{args.tokenizer}-w{workers}"
        training = bench_training({"2M": big, "29k": args.workdir / "prepared-multi30k"}, args)
        if args.json:
            args.json.write_text(json.dumps({"training": training}, indent=1))
        return

    tick = time.perf_counter()
    prefix = make_corpus(args.workdir, args.pairs)
    size = sum(Path(f"{prefix}.{lang}").stat().st_size for lang in ("de", "en"))
    print(f"corpus: {args.pairs:,} pairs, {size / 1e6:.0f} MB plain text ({prefix}.de/.en; "
          f"made in {time.perf_counter() - tick:.1f} s)")
    results: dict = {"pairs": args.pairs, "corpus_bytes": size, "prepare": {}}
    out = None
    for workers in (int(w) for w in args.workers.split(",")):
        out = args.workdir / f"prepared{args.pairs}-{args.tokenizer}-w{workers}"
        for stale in out.glob("*") if out.exists() else ():
            stale.unlink()
        kwargs = dict(train=prefix, valid=str(MULTI30K / "val"), out=str(out), src_lang="de", tgt_lang="en",
                      tokenizer=args.tokenizer, vocab_size=args.vocab_size, vocab_sample=args.vocab_sample,
                      workers=workers, progress=False)
        first = run_prepare(kwargs)
        again = run_prepare(kwargs)
        report = first["report"]
        assert again["report"]["up_to_date"], "the second run should have found the data up to date"
        row = {"wall_s": first["wall_s"], "seconds": report["seconds"], "pairs_per_s": report["pairs_per_s"],
               "cpu_s": first["cpu_s"], "pairs_per_cpu_s": report["splits"]["train"]["read"] / first["cpu_s"],
               "encode_pairs_per_s": report["splits"]["train"]["read"] / report["stage_seconds"]["encode"],
               "stages_s": report["stage_seconds"], "bytes_on_disk": folder_bytes(out),
               "peak_rss_mb": first["self_maxrss_kb"] / 1024, "worker_peak_rss_mb": first["workers_maxrss_kb"] / 1024,
               "up_to_date_wall_s": again["wall_s"], "kept": report["splits"]["train"]["kept"],
               "dropped": report["splits"]["train"]["dropped"]}
        results["prepare"][f"workers={workers}"] = row
        stages = ", ".join(f"{k} {v:.1f}" for k, v in row["stages_s"].items())
        print(f"prepare --workers {workers}: {row['seconds']:.1f} s ({row['pairs_per_s']:,.0f} pairs/s; {stages} s; "
              f"{row['cpu_s']:.0f} CPU-s, {row['pairs_per_cpu_s']:,.0f} pairs per CPU-s), "
              f"{row['bytes_on_disk'] / 1e6:.0f} MB on disk, peak RSS {row['peak_rss_mb']:.0f} MB "
              f"(largest worker {row['worker_peak_rss_mb']:.0f} MB); up to date in {row['up_to_date_wall_s']:.1f} s "
              f"(process start included); train kept {row['kept']:,} {row['dropped']}")
    rates = tokenizer_alone(out, prefix, "de", "en", args.tokenizer_pairs or args.pairs)
    results["tokenizer_alone_pairs_per_s"] = rates
    print("tokenizer alone: " + ", ".join(f"{k} {v:,.0f} pairs/s ({rates[k + '_cpu']:,.0f} per CPU-s)"
                                          for k, v in rates.items() if not k.endswith("_cpu")))
    for name, row in results["prepare"].items():
        print(f"  prepare {name}, end to end: {row['pairs_per_s'] / rates['encode_batch']:.2f}x encode_batch "
              f"(wall), {row['pairs_per_cpu_s'] / rates['encode_batch_cpu']:.2f}x (CPU time); encode stage "
              f"alone {row['encode_pairs_per_s'] / rates['encode_batch']:.2f}x (wall)")
    if args.train_steps:
        small = args.workdir / "prepared-multi30k"
        run_prepare(dict(train=str(MULTI30K / "train"), valid=str(MULTI30K / "val"), out=str(small), src_lang="de",
                         tgt_lang="en", vocab_size=args.vocab_size, progress=False))
        results["training"] = bench_training({"2M": out, "29k": small}, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
