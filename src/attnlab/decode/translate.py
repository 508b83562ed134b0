"""Translating sentences with a trained Transformer, and scoring translations with sacreBLEU.

``Translator`` turns text into token ids, runs greedy or beam search (``attnlab.decode.search``) in
length-sorted batches, and returns the translations in input order. Decoding uses the KV cache
unless ``use_cache=False``, which re-runs the decoder over the whole prefix at every step.

A source longer than the model's positions is cut, with a warning, in one place:
``Translator.encode_source``, which every decoding path (``translate``, ``explain``) goes through.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import sacrebleu
import torch
from torch import Tensor

from ..data.batching import pad_sequences
from ..data.vocab import BaseVocab
from ..nn.model import DecoderState, Encoded, Transformer
from .load import load_checkpoint
from .search import beam_search, greedy_search

__all__ = ["DecodeConfig", "Translator", "load_translator", "bleu_scores"]


@dataclass(frozen=True)
class DecodeConfig:
    """How to search: beam size (1 = greedy), GNMT length penalty α, extra length past the source.

    ``extra_len`` is additive, as in the paper ("maximum output length to input length + 50"): a
    translation has at most source length + ``extra_len`` tokens (and never more than the model's
    positions allow). It is not fairseq's ``max_len_a``, which multiplies the source length.
    """

    beam_size: int = 4
    alpha: float = 0.6
    extra_len: int = 50  # maximum output length = source length + extra_len
    batch_size: int = 64
    use_cache: bool = True

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.extra_len < 0:
            raise ValueError(f"extra_len must be >= 0, got {self.extra_len}")
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"alpha (the length penalty) must be a finite number >= 0, got {self.alpha}")


class Translator:
    """A model with its vocabularies, ready to translate text.

    Translating runs the model in evaluation mode and gives it back in the mode it came in.
    """

    def __init__(self, model: Transformer, src_vocab: BaseVocab, tgt_vocab: BaseVocab) -> None:
        self.model = model
        self.src_vocab = src_vocab
        self.tgt_vocab = tgt_vocab

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode_source(self, sentences: Sequence[str]) -> list[list[int]]:
        """Source token ids with EOS, cut to fit the model's positions (with a warning).

        attnlab's one policy for an over-long source at decoding time: ``translate`` and
        ``attnlab.inspect.explain`` both encode through here. (Training drops such pairs instead.)
        """
        _require_list(sentences)
        limit = self.model.config.max_len
        encoded = self.src_vocab.encode_batch(list(sentences))
        too_long = [i for i, ids in enumerate(encoded) if len(ids) > limit - 1]
        if too_long:
            warnings.warn(
                f"{len(too_long)} source sentence(s) (the first is number {too_long[0] + 1}) are longer than "
                f"the model's {limit - 1} subwords and were cut; their translations cover the start only",
                stacklevel=2,
            )
        return [ids[: limit - 1] + [self.src_vocab.eos_id] for ids in encoded]

    @torch.no_grad()
    def translate_ids(self, sources: list[list[int]], config: DecodeConfig = DecodeConfig()) -> list[list[int]]:
        """Target ids (no BOS/EOS) for a batch of source id lists; none for an empty batch."""
        if not sources:
            return []
        was_training = self.model.training
        self.model.eval()
        try:
            return self._search(sources, config)
        finally:
            self.model.train(was_training)

    def _search(self, sources: list[list[int]], config: DecodeConfig) -> list[list[int]]:
        src = pad_sequences(sources, self.model.config.pad_id).to(self.device)  # (B, S)
        encoded = self.model.encode(src)  # the memory with its source padding mask
        lengths = torch.tensor([len(s) for s in sources], device=self.device)
        max_len = torch.clamp(lengths + config.extra_len, max=self.model.config.max_len - 1)
        if config.use_cache:
            state, step = self.model.start_decoding(encoded), self._cached_step
        else:
            state, step = encoded, self._uncached_step
        search = dict(
            step=step, state=state, batch_size=len(sources), bos_id=self.tgt_vocab.bos_id,
            eos_id=self.tgt_vocab.eos_id, max_len=max_len, pad_id=self.tgt_vocab.pad_id, device=self.device,
        )
        if config.beam_size == 1:
            return greedy_search(**search)
        return [h.tokens for h in beam_search(**search, beam_size=config.beam_size, alpha=config.alpha)]

    def _cached_step(self, prefix: Tensor, state: DecoderState) -> tuple[Tensor, DecoderState]:
        logits, state, _, _ = self.model.decode_step(prefix[:, state.length :], state)  # (N, t_new, V)
        return logits[:, -1].float().log_softmax(dim=-1), state

    def _uncached_step(self, prefix: Tensor, encoded: Encoded) -> tuple[Tensor, Encoded]:
        logits = self.model.decode(prefix, encoded).logits  # (N, t, V)
        return logits[:, -1].float().log_softmax(dim=-1), encoded

    def translate(
        self, sentences: Sequence[str], config: DecodeConfig = DecodeConfig(), progress: bool = False
    ) -> list[str]:
        """Translate a list of sentences in length-sorted batches; results come back in input order.

        An empty (or blank) sentence gives an empty translation. A single string is refused (it
        would be read as a list of one-character sentences): pass ``[sentence]``.
        """
        _require_list(sentences)
        results = [""] * len(sentences)
        todo = [i for i, s in enumerate(sentences) if s.strip()]
        sources = self.encode_source([sentences[i] for i in todo])
        order = sorted(range(len(todo)), key=lambda j: len(sources[j]))
        batches = [order[k : k + config.batch_size] for k in range(0, len(order), config.batch_size)]
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc="translating", unit="batch")
        for batch in batches:
            outputs = self.translate_ids([sources[j] for j in batch], config)
            for j, ids in zip(batch, outputs):
                results[todo[j]] = self.tgt_vocab.decode(ids)
        return results


def _require_list(sentences: Sequence[str]) -> None:
    if isinstance(sentences, str):
        raise ValueError(
            f"pass a list of sentences, e.g. [{sentences[:40]!r}], not a single string "
            "(a string would be translated character by character)"
        )


def load_translator(path: str | Path, device: str = "cpu", which: str = "model") -> Translator:
    """Load a translation checkpoint (or a run directory's final/best/last one) for inference."""
    loaded = load_checkpoint(path, "translation", device=device, which=which)
    return Translator(loaded.model, loaded.src_vocab, loaded.tgt_vocab)


def bleu_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, object]:
    """Corpus sacreBLEU, cased and lowercased (``-lc``), with the signatures that pin their settings."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} translations but {len(references)} references")
    cased = sacrebleu.metrics.BLEU()
    lower = sacrebleu.metrics.BLEU(lowercase=True)
    cased_score = cased.corpus_score(list(hypotheses), [list(references)])
    lower_score = lower.corpus_score(list(hypotheses), [list(references)])
    return {
        "bleu": round(cased_score.score, 2),
        "bleu_lc": round(lower_score.score, 2),
        "signature": str(cased.get_signature()),
        "signature_lc": str(lower.get_signature()),
    }
