"""``make demo`` / ``attnlab demo``: the guided tour on the bundled data, in about ten minutes.

1. The tutorials' first worked example, step by step (SPEC section 1).
2. Trains the ``tiny`` preset (a small German -> English model, 6 minutes) on this machine.
3. Translates a few test sentences beside their references, and scores the whole test set.
4. Writes the attention heatmaps and the HTML report for one test sentence.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from ..data.corpus import load_multi30k
from ..decode.translate import DecodeConfig, load_translator
from ..inspect.explain import explain_example, explain_translation
from ..train.presets import get_preset
from ..train.trainer import train
from .evaluate import evaluate_checkpoint

__all__ = ["run_demo"]


def _banner(text: str) -> None:
    print(f"\n{'=' * 78}\n{text}\n{'=' * 78}", flush=True)


def run_demo(out: Path, shown: int = 5) -> dict[str, object]:
    """Run the tour, writing into ``out`` (a previous demo run there is replaced)."""
    started = time.perf_counter()
    _banner("1. Simple self-attention, step by step (the tutorials' first worked example)")
    print(explain_example("simple"))

    config = get_preset("tiny")
    _banner(f"2. Training the 'tiny' preset: German -> English, at most {config.time_limit:g} minutes")
    if out.exists():
        print(f"replacing the previous demo run in {out}")
        shutil.rmtree(out)
    summary = train(config, out)

    _banner("3. Translating test sentences (beam search, beam 4)")
    result = evaluate_checkpoint(out, "test_2016_flickr", DecodeConfig(beam_size=4), progress=True)
    pairs = load_multi30k("test_2016_flickr", config.src_lang, config.tgt_lang)
    for (source, reference), hypothesis in list(zip(pairs, result["hypotheses"]))[:shown]:
        print(f"source:      {source}\nmodel:       {hypothesis}\nreference:   {reference}\n")
    print(f"test_2016_flickr BLEU: {result['bleu']:.2f} cased, {result['bleu_lc']:.2f} lowercased "
          f"({result['sentences']} sentences, {result['sentences_per_s']:.1f} sentences/s)")
    print(f"  {result['signature']}")

    _banner("4. Inside the model: attention maps of one translation")
    translator = load_translator(out)
    sentence = pairs[0][0]
    explanation = explain_translation(
        translator.model, translator.src_vocab, translator.tgt_vocab, sentence, out / "explain",
        lambda s: translator.translate_ids(translator.encode_source([s]), DecodeConfig(beam_size=4))[0],
    )
    print(f"source:      {sentence}\ntranslation: {explanation.translation}")
    print("most attended source tokens (last layer, heads averaged):")
    print(explanation.top_attended)
    print(f"\nheatmaps: {len(explanation.pngs)} PNGs in {out / 'explain'}")
    print(f"report:   {explanation.report.resolve()}  (open it in a browser)")
    print(f"\ndemo finished in {(time.perf_counter() - started) / 60:.1f} minutes")
    return {"summary": summary, "bleu": result["bleu"], "bleu_lc": result["bleu_lc"],
            "report": explanation.report}
