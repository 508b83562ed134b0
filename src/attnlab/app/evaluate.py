"""Scoring a translation checkpoint with sacreBLEU and chrF++: on any pair of files, or a named test set.

The test set is either two files given by the user (``src``/``ref``, plain or gzipped, one sentence
per line) or a split by name: a test set that ``attnlab prepare`` registered in the run's prepared
data (or in ``data``, a prepared-data folder given explicitly), or one of the bundled Multi30k splits.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import sacrebleu

from ..data.corpus import MULTI30K_SPLITS, load_multi30k, read_parallel
from ..data.prepared import MANIFEST, PreparedData
from ..decode.load import LoadedModel, load_checkpoint
from ..decode.translate import DecodeConfig, Translator, bleu_scores
from ..errors import ConfigError, DataError

__all__ = ["evaluate_checkpoint", "translation_scores", "test_pairs"]


def translation_scores(hypotheses: list[str], references: list[str]) -> dict[str, Any]:
    """sacreBLEU cased and ``-lc`` (``bleu_scores``) and chrF2++ (character 6-grams, word bigrams)."""
    chrf = sacrebleu.metrics.CHRF(word_order=2)
    score = chrf.corpus_score(list(hypotheses), [list(references)])
    return {**bleu_scores(hypotheses, references), "chrf": round(score.score, 2),
            "signature_chrf": str(chrf.get_signature())}


def test_pairs(
    loaded: LoadedModel, split: str | None = None, *, src: str | None = None, ref: str | None = None,
    data: str | None = None, data_dir: str | None = None,
) -> tuple[str, list[tuple[str, str]]]:
    """The (source, reference) pairs to score, and a name for them.

    ``src`` and ``ref`` (files) go together and exclude ``split``. A ``split`` is looked up in the
    prepared data (``data``, else the folder the checkpoint was trained from, if it still exists),
    then among the bundled Multi30k splits (in the checkpoint's languages).
    """
    if (src is None) != (ref is None):
        raise ConfigError("--src and --ref go together: give the source file and its reference translations")
    if src is not None:
        if split is not None:
            raise ConfigError("give either --split or --src/--ref, not both")
        return str(src), read_parallel(src, ref)

    split = split or "test_2016_flickr"
    prepared = _prepared_data(loaded, data)
    scored = [n for n in prepared.split_names if n != "train"] if prepared is not None else []  # train keeps no text
    if split in scored:
        if (prepared.src_vocab, prepared.tgt_vocab) != (loaded.src_vocab, loaded.tgt_vocab):
            raise DataError(f"{prepared.path}: prepared with another vocabulary than the model in {loaded.directory}; "
                            "its test sets can still be scored from their text files with --src/--ref")
        return f"{prepared.path}:{split}", prepared.split(split).texts()
    if split in MULTI30K_SPLITS:
        return f"Multi30k {split}", load_multi30k(split, *loaded.languages, data_dir)
    known = sorted({*scored, *MULTI30K_SPLITS})
    raise ConfigError(f"unknown test set {split!r}; known here: {', '.join(known)} (or score files with --src/--ref)")


def _prepared_data(loaded: LoadedModel, data: str | None) -> PreparedData | None:
    if data:
        return PreparedData.open(data)
    recorded = loaded.config.get("data")
    path = recorded.get("path") if isinstance(recorded, dict) else None
    if isinstance(path, str) and (Path(path) / MANIFEST).is_file():
        return PreparedData.open(path)
    return None


def evaluate_checkpoint(
    checkpoint: str | Path, split: str | None = None, decode: DecodeConfig = DecodeConfig(),
    *, src: str | None = None, ref: str | None = None, data: str | None = None,
    device: str = "cpu", data_dir: str | None = None, limit: int = 0, output: str | None = None,
    progress: bool = True, int8: bool = False,
) -> dict[str, Any]:
    """Translate a test set (files or a named split) and score it: sacreBLEU cased and -lc, chrF2++.

    ``output`` receives the translations, one per line, in the input's order; ``int8`` decodes on
    int8 weights (``Translator``).
    """
    if limit < 0:
        raise ConfigError(f"limit must be >= 0 (0: every sentence), got {limit}")
    loaded = load_checkpoint(checkpoint, "translation", device=device)
    name, pairs = test_pairs(loaded, split, src=src, ref=ref, data=data, data_dir=data_dir)
    if limit:
        pairs = pairs[:limit]
    translator = Translator(loaded.model, loaded.src_vocab, loaded.tgt_vocab, int8=int8)
    started = time.perf_counter()
    hypotheses = translator.translate([s for s, _ in pairs], decode, progress=progress)
    seconds = time.perf_counter() - started
    if output:
        Path(output).write_text("".join(h + "\n" for h in hypotheses), encoding="utf-8")
    scores = translation_scores(hypotheses, [t for _, t in pairs])
    return {**scores, "test_set": name, "sentences": len(pairs), "seconds": seconds,
            "sentences_per_s": len(pairs) / max(seconds, 1e-9), "hypotheses": hypotheses}
