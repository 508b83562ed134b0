"""``make demo`` / ``attnlab demo``: the guided tour on the bundled data, in about ten minutes.

1. The tutorials' first worked example (self-attention of six 3-d token embeddings), step by step.
2. Trains the ``tiny`` preset (a small German -> English model, 6 minutes) on this machine.
3. Translates a few test sentences beside their references, and scores the whole test set.
4. Writes the attention heatmaps and the HTML report for one test sentence.

``run_demo(out, minutes=..., train_fraction=..., test_sentences=...)`` is the same tour made
shorter (``attnlab demo --minutes 0.1 --train-fraction 0.01 --test-sentences 5`` takes well under a
minute): fewer minutes of training, on a prefix of the training data, scored on the first test
sentences. ``demo_config`` is the one place where the demo changes the preset.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from ..data.corpus import load_multi30k
from ..decode.translate import DecodeConfig, load_translator
from ..errors import RunDirectoryError
from ..inspect.explain import explain_example, explain_translation
from ..store.runlock import RunLock
from ..train.config import TrainConfig
from ..train.presets import get_preset
from ..train.trainer import train
from .evaluate import evaluate_checkpoint

__all__ = ["demo_config", "run_demo"]

TEST_SPLIT = "test_2016_flickr"


def _banner(text: str) -> None:
    print(f"\n{'=' * 78}\n{text}\n{'=' * 78}", flush=True)


MARKER = ".attnlab-demo"  # written into every demo run: the only kind of folder the demo replaces


def _clear_previous_demo(out: Path) -> None:
    """Make room for the demo in ``out``: remove it only if it is an earlier demo run (it holds the
    demo's marker file); an empty folder is used as it is; anything else is refused, untouched."""
    if out.exists() and not out.is_dir():
        raise RunDirectoryError(f"--out {out} is a file, not a folder; pick another --out")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise RunDirectoryError(f"--out {out} already holds files that are not an attnlab demo run; the demo "
                                    "replaces only its own runs: pick another --out or empty the folder yourself")
        with RunLock(out):  # not while a training is writing there
            pass
        print(f"replacing the previous demo run in {out}")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by `attnlab demo`; the next demo into this folder replaces it\n")


def demo_config(minutes: float | None = None, train_fraction: float | None = None) -> TrainConfig:
    """The ``tiny`` preset, with the training time (minutes) and the share of the training data
    changed where given: the demo's only changes to a preset."""
    changes: dict[str, float] = {}
    if minutes is not None:
        changes["time_limit"] = minutes
    if train_fraction is not None:
        changes["train_fraction"] = train_fraction
    return get_preset("tiny").override(**changes)


def run_demo(
    out: Path, shown: int = 5, *, minutes: float | None = None, train_fraction: float | None = None,
    test_sentences: int | None = None,
) -> dict[str, object]:
    """Run the tour, writing into ``out`` (a previous demo run there is replaced).

    ``shown`` translations are printed; ``minutes`` and ``train_fraction`` shorten the training
    (see ``demo_config``) and ``test_sentences`` scores only the first sentences of the test set.
    Returns the training summary, the test BLEU (cased and lowercased) and the report's path.
    """
    if minutes is not None and not minutes > 0:
        raise ValueError(f"minutes must be positive, got {minutes}")
    if test_sentences is not None and test_sentences < 1:
        raise ValueError(f"test_sentences must be at least 1, got {test_sentences}")
    config = demo_config(minutes, train_fraction)
    started = time.perf_counter()
    _banner("1. Simple self-attention, step by step (the tutorials' first worked example)")
    print(explain_example("simple"))

    data = "" if config.task.train_fraction == 1.0 else f", on {config.task.train_fraction:.0%} of the data"
    _banner(f"2. Training the 'tiny' preset: German -> English, at most {config.time_limit:g} minutes{data}")
    _clear_previous_demo(out)
    summary = train(config, out)

    _banner("3. Translating test sentences (beam search, beam 4)")
    result = evaluate_checkpoint(out, TEST_SPLIT, DecodeConfig(beam_size=4), limit=test_sentences or 0,
                                 progress=True)
    pairs = load_multi30k(TEST_SPLIT, config.task.src_lang, config.task.tgt_lang)
    for (source, reference), hypothesis in list(zip(pairs, result["hypotheses"]))[:shown]:
        print(f"source:      {source}\nmodel:       {hypothesis}\nreference:   {reference}\n")
    print(f"{TEST_SPLIT} BLEU: {result['bleu']:.2f} cased, {result['bleu_lc']:.2f} lowercased "
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
