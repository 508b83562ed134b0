"""The beam's n best translations of a batch of sources, with their scores.

``Translator.translate_ids`` returns the tokens of the best hypothesis only. ``translate_n_best``
runs the very same search (the translator's ``run_encoder`` and ``start_search``, the same length
limit: ``Translator.max_lengths``) and keeps the ``n_best`` best finished hypotheses of
each sentence with their scores (log-probability / GNMT length penalty), best first. Its best
hypothesis is the translation ``translate_ids`` gives; a test holds the two equal.
"""

from __future__ import annotations

import torch

from .search import Hypothesis, beam_search
from .translate import DecodeConfig, Translator

__all__ = ["translate_n_best"]


@torch.no_grad()
def translate_n_best(
    translator: Translator, sources: list[list[int]], config: DecodeConfig, n_best: int
) -> list[list[Hypothesis]]:
    """For each source id list (with EOS, as ``Translator.encode_source`` gives), its best
    ``n_best`` hypotheses (at most ``config.beam_size``), best first. Always a beam search: with
    beam size 1 it picks what greedy search picks (but for exact ties between two tokens' scores), and
    gives the score as well."""
    if not 1 <= n_best <= config.beam_size:
        raise ValueError(f"n_best must be in 1..beam size ({config.beam_size}), got {n_best}")
    if not sources:
        return []
    model = translator.model
    was_training = model.training
    model.eval()
    try:
        encoded = translator.run_encoder(sources, config.use_cache)
        step, state = translator.start_search(encoded, config.use_cache, log_probs=False)
        vocab = translator.tgt_vocab
        best = beam_search(
            step, state, len(sources), vocab.bos_id, vocab.eos_id, translator.max_lengths(sources, config),
            pad_id=vocab.pad_id, beam_size=config.beam_size, alpha=config.alpha, device=translator.device,
            n_best=n_best, logits=True,  # as Translator searches, so that its best is translate_ids' result
        )
    finally:
        model.train(was_training)
    return [[Hypothesis(h.tokens, h.score), *h.alternatives] for h in best]
