"""The beam's n best hypotheses: hand-computed on a table, the default unchanged, and the best of
``translate_n_best`` equal to the translation ``Translator.translate_ids`` gives."""

import math

import pytest
import torch
from helpers import tiny_transformer
from test_decoding import BOS, EOS, PAD, TABLE, A, B, Stateless, table_step

from attnlab.data.vocab import CharVocab
from attnlab.decode.nbest import translate_n_best
from attnlab.decode.search import Hypothesis, beam_search
from attnlab.decode.translate import DecodeConfig, Translator


def test_n_best_keeps_the_finished_hypotheses_best_first():
    # Beam 2, alpha 0 (as test_decoding works out by hand): b+eos finishes with 0.36, then a,a+eos
    # with 0.5 * 0.4 * 0.9 = 0.18. Both are kept, best first.
    hyps = beam_search(table_step(TABLE), Stateless(), 1, BOS, EOS, max_len=5, beam_size=2, alpha=0.0,
                       pad_id=PAD, n_best=2)
    assert hyps == [Hypothesis([B], pytest.approx(math.log(0.36)),
                               (Hypothesis([A, A], pytest.approx(math.log(0.18))),))]
    # The default is the best hypothesis alone, with no alternatives: exactly as before.
    default = beam_search(table_step(TABLE), Stateless(), 1, BOS, EOS, max_len=5, beam_size=2, alpha=0.0, pad_id=PAD)
    assert default == [Hypothesis([B], pytest.approx(math.log(0.36)))]
    assert default[0].alternatives == ()
    tokens, score, _ = default[0]
    assert (tokens, score) == ([B], pytest.approx(math.log(0.36)))


@pytest.mark.parametrize("n_best", [0, 3])
def test_n_best_must_fit_the_beam(n_best):
    with pytest.raises(ValueError, match=r"n_best must be in 1\.\.beam_size \(2\)"):
        beam_search(table_step(TABLE), Stateless(), 1, BOS, EOS, max_len=5, beam_size=2, pad_id=PAD, n_best=n_best)


SENTENCES = ["ein Hund läuft.", "zwei Kinder", "a", "ein großer Hund läuft über die Brücke."]


@pytest.fixture(scope="module")
def translator() -> Translator:
    vocab = CharVocab.build("".join(SENTENCES) + "abcdefghijklmnopqrstuvwxyz")
    return Translator(tiny_transformer(5, vocab=len(vocab), max_len=40), vocab, vocab)


@pytest.mark.parametrize("beam", [1, 2, 4])
def test_the_best_of_n_best_is_the_translation(translator, beam):
    config = DecodeConfig(beam_size=beam, alpha=0.6, extra_len=12)
    sources = translator.encode_source(SENTENCES)
    ranked = translate_n_best(translator, sources, config, n_best=beam)
    assert [hyps[0].tokens for hyps in ranked] == translator.translate_ids(sources, config)
    for hyps in ranked:
        assert len(hyps) == beam
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert all(math.isfinite(s) for s in scores)
        assert len({tuple(h.tokens) for h in hyps}) == beam  # distinct hypotheses
    # Each sentence alone gives the same n best as in the batch (up to float rounding of the scores).
    alone = translate_n_best(translator, sources[1:2], config, n_best=beam)[0]
    assert [h.tokens for h in alone] == [h.tokens for h in ranked[1]]
    assert [h.score for h in alone] == pytest.approx([h.score for h in ranked[1]], abs=1e-4)


def test_translate_n_best_checks_n_and_gives_the_model_back_as_it_was(translator):
    with pytest.raises(ValueError, match=r"n_best must be in 1\.\.beam size \(2\)"):
        translate_n_best(translator, [[5, 2]], DecodeConfig(beam_size=2), n_best=3)
    assert translate_n_best(translator, [], DecodeConfig(beam_size=2), n_best=2) == []
    translator.model.train()
    try:
        translate_n_best(translator, translator.encode_source(["a"]), DecodeConfig(beam_size=2, extra_len=3), 2)
        assert translator.model.training
    finally:
        translator.model.eval()
    assert torch.is_grad_enabled()  # no_grad inside, and the caller's mode back afterwards
