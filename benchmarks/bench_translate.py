"""attnlab against CTranslate2 on the same weights: test_2016_flickr, text in, text out.

Four systems translate the same sentences with the same tokenizer, in one run:

- attnlab float32: ``load_translator(run).translate(sentences, DecodeConfig(...))``;
- attnlab int8: ``load_translator(run, int8=True)`` ("not available" where this attnlab lacks it);
- CTranslate2 float32: the run exported by ``attnlab.decode.export.export_ctranslate2``;
- CTranslate2 int8: the same export, quantized by CTranslate2 when it loads it (``compute_type``),
  which the export tests hold equal to an export with ``--quantization int8``.

CTranslate2 gets its best settings: one translator, ``inter_threads=1, intra_threads=--threads``,
length-sorted batches of ``--ct2-batch-size`` (``--ct2-batch-type``), and attnlab's search through
``search_like_attnlab``: the same length limit per sentence (source + 50), EOS allowed at the first
step, <bos>/<pad> never emitted, and in beam search attnlab's length penalty applied to the beam's
hypotheses. Its time includes tokenizing and detokenizing, as attnlab's does.

For each search (beam 4, greedy) the systems run ``--rounds`` times, taking turns (the first of a
round moves along each round), after one untimed warm-up each; the figures are the median round
(each round's seconds are listed too, in the order they ran).
Each timed run starts after ``--pause`` seconds of rest: CTranslate2's OpenMP threads keep spinning
for 200 ms after a call returns (Intel OpenMP's default KMP_BLOCKTIME), and with two threads that
took a core from whichever system ran next in the same process (attnlab beam 4 on the tiny model:
4.43 s right after CTranslate2, 3.34 s with KMP_BLOCKTIME=0, which in turn slowed CTranslate2
from 2.18 s to 2.63 s; the pause leaves both their defaults).
It prints sentences/s, target tokens/s (the outputs' subwords, EOS not counted), sacreBLEU (cased
and lowercased), the share of outputs identical to attnlab float32's, and attnlab's speed over
CTranslate2's.

Usage:
    python benchmarks/bench_translate.py --checkpoint runs/tiny --threads 1 --rounds 3
    python benchmarks/bench_translate.py --checkpoint runs/de-en --threads 1 --limit 300
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

from attnlab.app.process import set_process_defaults  # no torch inside


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="translation run or checkpoint directory")
    parser.add_argument("--threads", type=int, default=1, choices=[1, 2], help="threads of every system")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per system and search (median)")
    parser.add_argument("--limit", type=int, default=0, help="translate only the first N test sentences")
    parser.add_argument("--beam", type=int, default=4, help="beam size of the beam search (greedy always runs)")
    parser.add_argument("--alpha", type=float, default=0.6, help="length penalty")
    parser.add_argument("--batch-size", type=int, default=0, help="attnlab's batch size (default: its own)")
    parser.add_argument("--ct2-batch-size", type=int, default=1024)
    parser.add_argument("--ct2-batch-type", default="tokens", choices=["tokens", "examples"])
    parser.add_argument("--export", default=None, help="folder for the CTranslate2 model (default: temporary)")
    parser.add_argument("--pause", type=float, default=0.5,
                        help="seconds of rest before each timed run, so that it starts on a quiet machine")
    return parser.parse_args()


ARGS = parse_args()
# Process settings of this program, made before the libraries load: one or two threads for every
# system, the tokenizers' Rust thread pool included (attnlab and CTranslate2 tokenize alike).
set_process_defaults()  # as the attnlab command sets them (OMP_WAIT_POLICY, freed memory kept)
os.environ.setdefault("RAYON_NUM_THREADS", str(ARGS.threads))

import ctranslate2  # noqa: E402
import torch  # noqa: E402

from attnlab.data.corpus import load_multi30k  # noqa: E402
from attnlab.decode.export import (  # noqa: E402
    export_ctranslate2,
    exported_vocabs,
    search_like_attnlab,
)
from attnlab.decode.load import load_checkpoint  # noqa: E402
from attnlab.decode.translate import DecodeConfig, bleu_scores, load_translator  # noqa: E402


class System(NamedTuple):
    name: str
    translate: Callable[[list[str], int], list[str]] | None  # (sentences, beam) -> translations
    why_not: str = ""  # when translate is None


def attnlab_system(name: str, checkpoint: str, int8: bool) -> System:
    if int8 and "int8" not in inspect.signature(load_translator).parameters:
        return System(name, None, "not available (load_translator has no int8 yet)")
    try:
        translator = load_translator(checkpoint, int8=True) if int8 else load_translator(checkpoint)
    except Exception as error:  # an int8 path still being built: report it, measure the rest
        return System(name, None, f"not available ({type(error).__name__}: {error})")

    def translate(sentences: list[str], beam: int) -> list[str]:
        settings = dict(beam_size=beam, alpha=ARGS.alpha)
        if ARGS.batch_size:
            settings["batch_size"] = ARGS.batch_size
        return translator.translate(sentences, DecodeConfig(**settings))

    return System(name, translate)


def ctranslate2_system(name: str, model_dir: Path, compute_type: str, max_positions: int) -> System:
    translator = ctranslate2.Translator(str(model_dir), device="cpu", compute_type=compute_type,
                                       inter_threads=1, intra_threads=ARGS.threads)
    src_vocab, tgt_vocab = exported_vocabs(model_dir)

    def translate(sentences: list[str], beam: int) -> list[str]:
        tokens = [e.tokens for e in src_vocab.tokenizer.encode_batch(sentences, add_special_tokens=False)]
        outputs = search_like_attnlab(translator, tokens, max_positions=max_positions, beam_size=beam,
                                      alpha=ARGS.alpha, max_batch_size=ARGS.ct2_batch_size,
                                      batch_type=ARGS.ct2_batch_type)
        return tgt_vocab.decode_batch([[tgt_vocab.token_to_id(t) for t in out] for out in outputs])

    return System(name, translate)


def timed(translate: Callable[[list[str], int], list[str]], sentences: list[str], beam: int) -> tuple[list[str], float]:
    started = time.perf_counter()
    result = translate(sentences, beam)
    return result, time.perf_counter() - started


def main() -> None:
    torch.set_num_threads(ARGS.threads)
    loaded = load_checkpoint(ARGS.checkpoint, "translation")
    src_lang, tgt_lang = loaded.languages
    pairs = load_multi30k("test_2016_flickr", src_lang, tgt_lang)
    pairs = pairs[: ARGS.limit] if ARGS.limit else pairs
    sources, references = [s for s, _ in pairs], [t for _, t in pairs]

    with tempfile.TemporaryDirectory(prefix="attnlab-ct2-") as scratch:
        folder = Path(ARGS.export) if ARGS.export else Path(scratch)
        model_dir = export_ctranslate2(ARGS.checkpoint, folder / "model", force=True)
        run(loaded, model_dir, sources, references)


def run(loaded, model_dir: Path, sources: list[str], references: list[str]) -> None:
    src_lang, tgt_lang = loaded.languages
    params = sum(p.numel() for p in loaded.model.parameters())
    max_positions = loaded.model.config.max_len
    systems = [
        attnlab_system("attnlab float32", ARGS.checkpoint, int8=False),
        attnlab_system("attnlab int8", ARGS.checkpoint, int8=True),
        ctranslate2_system("CTranslate2 float32", model_dir, "float32", max_positions),
        ctranslate2_system("CTranslate2 int8", model_dir, "int8", max_positions),
    ]
    tgt_vocab = loaded.tgt_vocab

    print(f"{loaded.directory} ({params / 1e6:.2f}M parameters), test_2016_flickr {src_lang}->{tgt_lang}, "
          f"{len(sources)} sentences; {ARGS.threads} thread(s) each, {ARGS.rounds} rounds, median")
    machine = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, ctranslate2 {ctranslate2.__version__}, {machine}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f} at the start; "
          f"CTranslate2 batches: {ARGS.ct2_batch_size} {ARGS.ct2_batch_type}")
    for beam, label in ((ARGS.beam, f"beam {ARGS.beam}"), (1, "greedy")):
        live = [s for s in systems if s.translate is not None]
        for system in live:  # warm-up: first-call costs (allocations, thread pools) stay out of the times
            system.translate(sources[:16], beam)
        seconds: dict[str, list[float]] = {s.name: [] for s in live}
        outputs: dict[str, list[str]] = {}
        for r in range(ARGS.rounds):
            for system in live[r % len(live):] + live[: r % len(live)]:
                time.sleep(ARGS.pause)  # the previous system's spinning threads (see the docstring) fall asleep
                out, took = timed(system.translate, sources, beam)
                seconds[system.name].append(took)
                if outputs.setdefault(system.name, out) != out:
                    raise SystemExit(f"{system.name} gave other translations in round {r + 1}")
        report(label, systems, seconds, outputs, references, tgt_vocab)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


def report(label: str, systems: list[System], seconds: dict[str, list[float]], outputs: dict[str, list[str]],
           references: list[str], tgt_vocab) -> None:
    baseline = outputs.get("attnlab float32")
    speed = {name: len(references) / statistics.median(times) for name, times in seconds.items()}
    print(f"\n{label}")
    print("| system | sentences/s | target tokens/s | BLEU | BLEU -lc | identical to attnlab float32 | median s | rounds s |")
    print("|---|---|---|---|---|---|---|---|")
    for system in systems:
        if system.translate is None:
            print(f"| {system.name} | {system.why_not} | | | | | | |")
            continue
        out, median = outputs[system.name], statistics.median(seconds[system.name])
        tokens = sum(len(ids) for ids in tgt_vocab.encode_batch(out))
        bleu = bleu_scores(out, references)
        same = sum(a == b for a, b in zip(out, baseline)) if baseline is not None else 0
        print(f"| {system.name} | {speed[system.name]:.1f} | {tokens / median:.0f} | {bleu['bleu']:.2f} | "
              f"{bleu['bleu_lc']:.2f} | {same}/{len(out)} | {median:.2f} | "
              f"{' '.join(f'{s:.2f}' for s in seconds[system.name])} |")
    for ours, theirs in (("attnlab float32", "CTranslate2 float32"), ("attnlab int8", "CTranslate2 int8"),
                         ("attnlab int8", "CTranslate2 float32")):
        if ours in speed and theirs in speed:
            print(f"{ours} / {theirs}: {speed[ours] / speed[theirs]:.2f}x the sentences/s")


if __name__ == "__main__":
    main()
