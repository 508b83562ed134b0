"""Scoring a translation checkpoint on a Multi30k split with sacreBLEU."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..data.corpus import load_multi30k
from ..decode.load import load_checkpoint
from ..decode.translate import DecodeConfig, Translator, bleu_scores
from ..errors import ConfigError

__all__ = ["evaluate_checkpoint"]


def evaluate_checkpoint(
    checkpoint: str | Path, split: str = "test_2016_flickr", decode: DecodeConfig = DecodeConfig(),
    *, device: str = "cpu", data_dir: str | None = None, limit: int = 0, output: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Translate a split with the checkpoint's languages and return sacreBLEU (cased and -lc)."""
    if limit < 0:
        raise ConfigError(f"limit must be >= 0 (0: every sentence), got {limit}")
    loaded = load_checkpoint(checkpoint, "translation", device=device)
    pairs = load_multi30k(split, *loaded.languages, data_dir)
    if limit:
        pairs = pairs[:limit]
    translator = Translator(loaded.model, loaded.src_vocab, loaded.tgt_vocab)
    started = time.perf_counter()
    hypotheses = translator.translate([s for s, _ in pairs], decode, progress=progress)
    seconds = time.perf_counter() - started
    if output:
        Path(output).write_text("".join(h + "\n" for h in hypotheses), encoding="utf-8")
    scores = bleu_scores(hypotheses, [t for _, t in pairs])
    return {**scores, "sentences": len(pairs), "seconds": seconds,
            "sentences_per_s": len(pairs) / max(seconds, 1e-9), "hypotheses": hypotheses}
