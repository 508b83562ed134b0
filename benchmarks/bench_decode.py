"""Cached against uncached decoding, measured in one run on the same machine.

1. Translating the test_2016_flickr sentences with beam 4: the lean cached step (attnlab.nn.fast_decode)
   vs re-running the modules over the whole prefix at every step (goal: cached >= 3x faster); both
   must give the same output. The lean step on int8 weights runs too, its output counted against
   the float32 one's.
2. Generating tokens from the character language model, cached vs uncached (goal: >= 5x): the
   cached generator (KV cache + the lean step of attnlab.nn.fast_decode) against re-reading each
   window through the model's forward; a third run, the lean step without its cache, splits the
   speed-up into the cache's share and the lean step's. All three must give the same text.

Usage (after training the two models, see README):
    python benchmarks/bench_decode.py --translation runs/de-en --lm runs/shakespeare
"""

from __future__ import annotations

import argparse
import os
import time

from attnlab.app.process import set_process_defaults  # no torch inside

set_process_defaults()  # as the attnlab command sets them, before torch loads

import torch  # noqa: E402

from attnlab.data.corpus import load_multi30k  # noqa: E402
from attnlab.decode.generate import (  # noqa: E402
    _Window,
    _window_start,
    generate,
    load_language_model,
)
from attnlab.decode.load import load_checkpoint  # noqa: E402
from attnlab.decode.search import sample  # noqa: E402
from attnlab.decode.translate import DecodeConfig, load_translator  # noqa: E402
from attnlab.nn import fast_decode  # noqa: E402


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def bench_translation(checkpoint: str, sentences: int, beam: int, batch_size: int) -> None:
    translator = load_translator(checkpoint)
    src_lang, tgt_lang = load_checkpoint(checkpoint, "translation").languages
    pairs = load_multi30k("test_2016_flickr", src_lang, tgt_lang)[:sentences]
    source = [s for s, _ in pairs]
    print(f"translation: {len(source)} test_2016_flickr sentences {src_lang}->{tgt_lang}, "
          f"beam {beam}, batch {batch_size}")
    runs = {
        "cached (lean step)": (translator, True),
        "cached, int8": (translator.quantized(), True),
        "uncached (modules)": (translator, False),
    }
    results = {}
    for name, (runner, use_cache) in runs.items():
        config = DecodeConfig(beam_size=beam, batch_size=batch_size, use_cache=use_cache)
        results[name] = timed(lambda: runner.translate(source, config))
        out, seconds = results[name]
        print(f"  {name:20s} {seconds:8.1f} s  {len(source) / seconds:7.2f} sentences/s")
    reference = results["uncached (modules)"][0]
    for name in ("cached (lean step)", "cached, int8"):
        same = sum(a == b for a, b in zip(results[name][0], reference))
        print(f"  identical to uncached, {name}: {same}/{len(source)}")
    speed_up = results["uncached (modules)"][1] / results["cached (lean step)"][1]
    print(f"  speed-up cached/uncached: {speed_up:.2f}x (goal >= 3x)")


def _lean_uncached_generate(model, ids, tokens):
    """The lean step of attnlab.nn.fast_decode re-reading each whole window with no cache: the cached
    generator's own code minus the cache, to show how much of the speed-up the cache alone gives."""
    packed = fast_decode.pack(model)
    keep, context = model.config.max_len // 2, model.config.max_len

    def step(prefix, window):
        start = _window_start(prefix.size(1), window.start, context, keep)
        logits, _ = fast_decode.step(packed, prefix[:, start:], model.start())
        return logits.log_softmax(-1), _Window(start, None)

    return sample(step, _Window(0, None), ids, tokens, generator=torch.Generator().manual_seed(0))


def bench_lm(checkpoint: str, tokens: int, prompt: str, batch: int, repeats: int) -> None:
    model, vocab = load_language_model(checkpoint)
    ids = torch.tensor([vocab.encode(prompt)] * batch)
    print(f"language model: {tokens} new tokens after {prompt!r}, {batch} sample(s) at once, "
          f"context {model.config.max_len}; median of {repeats} runs")
    runs = {
        "cached": lambda n: generate(model, ids, n, seed=0, use_cache=True),
        "uncached": lambda n: generate(model, ids, n, seed=0, use_cache=False),
        "lean-uncached": lambda n: _lean_uncached_generate(model, ids, n),
    }
    labels = {"cached": "cached (lean one-token step)", "uncached": "uncached (model forward)",
              "lean-uncached": "uncached, lean step"}
    outputs = {}
    for name, run in runs.items():
        run(20)  # warm-up
        trials = sorted((timed(lambda: run(tokens)) for _ in range(repeats)), key=lambda trial: trial[1])
        outputs[name] = trials[len(trials) // 2]
        out, seconds = outputs[name]
        print(f"  {labels[name]:30s} {seconds:8.2f} s  {batch * tokens / seconds:8.1f} tokens/s")
    same = all(torch.equal(outputs["cached"][0], outputs[name][0]) for name in runs)
    print(f"  identical text: {same}")
    print(f"  speed-up cached/uncached: {outputs['uncached'][1] / outputs['cached'][1]:.2f}x (goal >= 5x)")
    print(f"    of which the cache alone (lean step with/without it): "
          f"{outputs['lean-uncached'][1] / outputs['cached'][1]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--translation", default="runs/de-en", help="translation run or checkpoint")
    parser.add_argument("--lm", default="runs/shakespeare", help="language-model run or checkpoint")
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--prompt", default="ROMEO:")
    parser.add_argument("--lm-batch", type=int, action="append",
                        help="samples generated at once (repeatable; default: 1)")
    parser.add_argument("--repeats", type=int, default=3, help="language-model runs per setting (median)")
    parser.add_argument("--threads", type=int, default=0, help="0: all cores")
    parser.add_argument("--skip", choices=["translation", "lm"], action="append", default=[])
    args = parser.parse_args()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with torch.inference_mode():
        if "translation" not in args.skip:
            bench_translation(args.translation, args.sentences, args.beam, args.batch_size)
        if "lm" not in args.skip:
            for batch in args.lm_batch or [1]:
                bench_lm(args.lm, args.tokens, args.prompt, batch, args.repeats)


if __name__ == "__main__":
    main()
