"""Decoding: beam search against hand-computed scores, beam 1 == greedy, cached == uncached, sampling."""

import math
from typing import NamedTuple

import pytest
import torch
from helpers import tiny_transformer

from attnlab.data.batching import pad_sequences
from attnlab.decode.search import (
    Hypothesis,
    beam_search,
    greedy_search,
    length_penalty,
    sample,
)
from attnlab.decode.translate import DecodeConfig, Translator

PAD, BOS, EOS, A, B = 0, 1, 2, 3, 4


class Stateless:
    """A decoding state for step functions that need none."""

    def select(self, index):
        return self


def table_step(table):
    """A step function whose next-token distribution depends only on the prefix after BOS.

    Prefixes missing from the table (those of beams already at -inf) get a uniform distribution.
    """

    def step(prefix, state):
        rows = []
        for row in prefix.tolist():
            probs = table.get(tuple(row[1:]), [0.2] * 5)
            rows.append([math.log(p) if p > 0 else float("-inf") for p in probs])
        return torch.tensor(rows), state

    return step


# Probabilities over (pad, bos, eos, a, b) after each prefix.
TABLE = {
    (): [0, 0, 0.1, 0.5, 0.4],
    (A,): [0, 0, 0.3, 0.4, 0.3],
    (B,): [0, 0, 0.9, 0.05, 0.05],
    (A, A): [0, 0, 0.9, 0.05, 0.05],
    (A, B): [0, 0, 0.9, 0.05, 0.05],
    (B, A): [0, 0, 0.9, 0.05, 0.05],
    (B, B): [0, 0, 0.9, 0.05, 0.05],
}


def test_greedy_follows_the_most_likely_token():
    out = greedy_search(table_step(TABLE), Stateless(), 1, BOS, EOS, max_len=5, pad_id=PAD)
    assert out == [[A, A]]  # 0.5 * 0.4 * 0.9 = 0.18


def test_beam_search_matches_hand_computed_scores():
    # Beam 2. Step 1 keeps a (0.5) and b (0.4); eos (0.1) ranks third, outside the top 2.
    # Step 2: b+eos = 0.4*0.9 = 0.36 ranks first -> finished, length 2 (b, eos).
    #         a+a = 0.2 and a+b = 0.15 stay alive (a+eos = 0.15 ranks 4th).
    # Step 3: a,a+eos = 0.18 ranks first -> finished: two hypotheses, done.
    hyps = beam_search(table_step(TABLE), Stateless(), 1, BOS, EOS, max_len=5, beam_size=2, alpha=0.6, pad_id=PAD)
    expected_b = math.log(0.36) / ((5 + 2) / 6) ** 0.6
    assert hyps[0].tokens == [B]
    assert hyps[0].score == pytest.approx(expected_b, abs=1e-6)
    # With alpha = 0 the score is the plain log-probability.
    hyps = beam_search(table_step(TABLE), Stateless(), 1, BOS, EOS, max_len=5, beam_size=2, alpha=0.0, pad_id=PAD)
    assert hyps == [Hypothesis([B], pytest.approx(math.log(0.36), abs=1e-6))]


def test_length_penalty_favours_longer_hypotheses_as_alpha_grows():
    # Beam 2. Step 1: eos (0.45, length 1) finishes at once; a (0.55) stays alive.
    # Step 2: a,eos (0.55 * 0.8 = 0.44, length 2) finishes: two hypotheses, done.
    # The shorter one is the more likely, so alpha = 0 picks it; alpha = 0.6 divides the longer
    # one's log-probability by (7/6)^0.6 against (6/6)^0.6 = 1 and it wins.
    table = {(): [0, 0, 0.45, 0.55, 0], (A,): [0, 0, 0.8, 0.2, 0]}
    plain = beam_search(table_step(table), Stateless(), 1, BOS, EOS, max_len=5, beam_size=2, alpha=0.0, pad_id=PAD)
    assert plain == [Hypothesis([], pytest.approx(math.log(0.45), abs=1e-6))]
    penalised = beam_search(table_step(table), Stateless(), 1, BOS, EOS, max_len=5, beam_size=2, alpha=0.6, pad_id=PAD)
    expected = math.log(0.44) / float(length_penalty(2, 0.6))
    assert expected > math.log(0.45)  # the flip, by hand
    assert penalised == [Hypothesis([A], pytest.approx(expected, abs=1e-6))]
    assert float(length_penalty(2, 0.6)) == pytest.approx((7 / 6) ** 0.6)
    assert float(length_penalty(3, 0.0)) == 1.0


# The most likely token is a special one that must never be emitted; without it the best path is
# a (0.3), then b (0.2), then eos (0.35).
def special_first(special: int) -> dict[tuple[int, ...], list[float]]:
    rows = {(): [0.0, 0.0, 0.1, 0.3, 0.1], (A,): [0.0, 0.0, 0.1, 0.1, 0.2], (A, B): [0.0, 0.0, 0.35, 0.15, 0.1]}
    for probs in rows.values():
        probs[special] = 1.0 - sum(probs)
    return rows


@pytest.mark.parametrize("special", [PAD, BOS])
def test_search_never_emits_pad_or_bos_and_beam_one_stays_greedy(special):
    table = special_first(special)
    assert all(max(range(5), key=row.__getitem__) == special for row in table.values())
    greedy = greedy_search(table_step(table), Stateless(), 1, BOS, EOS, max_len=6, pad_id=PAD)
    beam_one = beam_search(table_step(table), Stateless(), 1, BOS, EOS, max_len=6, beam_size=1, pad_id=PAD)
    assert greedy == [[A, B]]
    assert [h.tokens for h in beam_one] == greedy
    assert beam_one[0].score == pytest.approx(math.log(0.3 * 0.2 * 0.35) / float(length_penalty(3, 0.6)))
    wide = beam_search(table_step(table), Stateless(), 1, BOS, EOS, max_len=6, beam_size=3, pad_id=PAD)
    assert not {PAD, BOS} & set(wide[0].tokens)


def test_beam_one_is_greedy_on_the_table():
    hyps = beam_search(table_step(TABLE), Stateless(), 1, BOS, EOS, max_len=5, beam_size=1, pad_id=PAD)
    assert [h.tokens for h in hyps] == greedy_search(table_step(TABLE), Stateless(), 1, BOS, EOS, max_len=5, pad_id=PAD)


def test_max_len_forces_the_end():
    looping = {(): [0, 0, 0.0, 1.0, 0.0]}
    looping.update({(A,) * n: [0, 0, 0.0, 1.0, 0.0] for n in range(1, 6)})
    assert greedy_search(table_step(looping), Stateless(), 1, BOS, EOS, max_len=3, pad_id=PAD) == [[A, A]]
    hyps = beam_search(table_step(looping), Stateless(), 1, BOS, EOS, max_len=3, beam_size=2, pad_id=PAD)
    assert hyps[0].tokens == [A, A]


class Counted:
    """A step function that records how many rows it was asked for at each call."""

    def __init__(self, step):
        self.step, self.rows = step, []

    def __call__(self, prefix, state):
        self.rows.append(prefix.size(0))
        return self.step(prefix, state)


def test_beam_search_stops_once_no_live_beam_can_change_the_result():
    # Beam 2, alpha 0, TABLE: after step 2, b+eos has finished with log(0.36); the live beams a,a
    # (0.2) and a,b (0.15) can only fall from there, so nothing later can beat it: the search stops
    # after two steps where waiting for a second finisher took three, with the same result. (The
    # first step runs one row per sentence: all beams start from BOS alone.)
    step = Counted(table_step(TABLE))
    hyps = beam_search(step, Stateless(), 1, BOS, EOS, max_len=5, beam_size=2, alpha=0.0, pad_id=PAD)
    assert hyps == [Hypothesis([B], pytest.approx(math.log(0.36), abs=1e-6))]
    assert step.rows == [1, 2]
    # The two best are asked for: the second is not settled until a,a+eos (0.18) finishes at step 3.
    step = Counted(table_step(TABLE))
    hyps = beam_search(step, Stateless(), 1, BOS, EOS, max_len=5, beam_size=2, alpha=0.0, pad_id=PAD, n_best=2)
    assert [h.tokens for h in [hyps[0], *hyps[0].alternatives]] == [[B], [A, A]]
    assert step.rows == [1, 2, 2]
    # With alpha 0.6 the bound divides the best live log-probability by the largest penalty within
    # the limit of 5 tokens: log(0.2) / (10/6)^0.6 = -1.18, below b's log(0.36) / (7/6)^0.6 = -0.93,
    # so the result is settled after two steps here as well.
    step = Counted(table_step(TABLE))
    hyps = beam_search(step, Stateless(), 1, BOS, EOS, max_len=5, beam_size=2, alpha=0.6, pad_id=PAD)
    assert hyps[0].tokens == [B] and step.rows == [1, 2]


def test_beam_search_goes_on_while_a_live_beam_can_still_win():
    # b+eos finishes first with 0.4 * 0.5 = 0.2; a (0.6) lives on and a,a+eos reaches 0.6 * 0.9 * 0.9
    # = 0.486: the bound (log 0.54 at step 2) is above log 0.2, so the search must not stop early.
    table = {(): [0, 0, 0.0, 0.6, 0.4], (A,): [0, 0, 0.1, 0.9, 0.0], (B,): [0, 0, 0.5, 0.5, 0.0],
             (A, A): [0, 0, 0.9, 0.1, 0.0], (B, A): [0, 0, 0.1, 0.9, 0.0]}
    hyps = beam_search(table_step(table), Stateless(), 1, BOS, EOS, max_len=6, beam_size=2, alpha=0.0, pad_id=PAD)
    assert hyps == [Hypothesis([A, A], pytest.approx(math.log(0.6 * 0.9 * 0.9), abs=1e-6))]


@pytest.mark.parametrize("beam", [1, 3])
def test_finished_sentences_leave_the_batch_and_each_sentence_decodes_as_alone(translator, beam):
    config = DecodeConfig(beam_size=beam, extra_len=8)
    step, state = translator.start_search(translator.model.encode(pad_sequences(SOURCES, PAD)))
    counted = Counted(step)
    search = dict(batch_size=len(SOURCES), bos_id=BOS, eos_id=EOS, pad_id=PAD,
                  max_len=translator.max_lengths(SOURCES, config))
    if beam == 1:
        together = greedy_search(counted, state, **search)
    else:
        together = [h.tokens for h in beam_search(counted, state, **search, beam_size=beam)]
    assert together == translator.translate_ids(SOURCES, config)
    assert together == [translator.translate_ids([source], config)[0] for source in SOURCES]
    # One row per sentence at the first step, then one per beam, fewer as sentences finish.
    assert counted.rows[:2] == [len(SOURCES), beam * len(SOURCES)] and counted.rows[-1] < counted.rows[1]
    assert counted.rows[1:] == sorted(counted.rows[1:], reverse=True)


def test_bad_beam_size():
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(table_step(TABLE), Stateless(), 1, BOS, EOS, max_len=3, beam_size=0, pad_id=PAD)


@pytest.fixture(scope="module")
def translator():
    model = tiny_transformer(0, d_model=32, d_ff=64)  # vocabulary 40, evaluation mode

    class Ids:  # a vocabulary stand-in: only the special ids matter here
        pad_id, bos_id, eos_id = PAD, BOS, EOS

    return Translator(model, Ids(), Ids())


SOURCES = [[5, 6, 7, 8, EOS], [9, 10, EOS], [11, 12, 13, 14, 15, 16, EOS]]


@pytest.mark.parametrize("beam", [1, 3])
def test_cached_decoding_gives_the_same_tokens(translator, beam):
    cached = translator.translate_ids(SOURCES, DecodeConfig(beam_size=beam, extra_len=8))
    uncached = translator.translate_ids(SOURCES, DecodeConfig(beam_size=beam, extra_len=8, use_cache=False))
    assert cached == uncached
    assert any(len(ids) > 2 for ids in cached)  # the comparison covered real multi-step decodes


def test_cached_step_logits_equal_uncached(translator):
    model = translator.model
    encoded = model.encode(torch.tensor([[5, 6, 7, 8, EOS], [9, 10, EOS, PAD, PAD]]))
    cached_step, cached_state = translator.start_search(encoded)
    plain_step, plain_state = translator.start_search(encoded, use_cache=False)
    prefix = torch.full((2, 1), BOS)
    for _ in range(6):
        cached, cached_state = cached_step(prefix, cached_state)
        plain, plain_state = plain_step(prefix, plain_state)
        torch.testing.assert_close(cached, plain, atol=1e-5, rtol=0)
        prefix = torch.cat([prefix, plain.argmax(-1, keepdim=True)], dim=1)


def test_a_source_too_long_for_the_model_is_cut_with_a_warning(translator):
    class Words:  # one id per word
        pad_id, bos_id, eos_id = PAD, BOS, EOS

        def encode_batch(self, sentences):
            return [[5] * len(s.split()) for s in sentences]

    words = Translator(translator.model, Words(), Words())
    limit = translator.model.config.max_len
    with pytest.warns(UserWarning, match=rf"number 2\).* {limit - 1} subwords"):
        ids = words.encode_source(["a b", "w " * (limit + 5)])
    assert ids[0] == [5, 5, EOS] and len(ids[1]) == limit and ids[1][-1] == EOS


def test_beam_one_equals_greedy_on_a_model(translator):
    greedy = translator.translate_ids(SOURCES, DecodeConfig(beam_size=1, extra_len=8))
    step, state = translator.start_search(translator.model.encode(pad_sequences(SOURCES, PAD)))
    hyps = beam_search(step, state, len(SOURCES), BOS, EOS, torch.tensor([len(s) + 8 for s in SOURCES]),
                       beam_size=1, pad_id=PAD)
    assert [h.tokens for h in hyps] == greedy


def test_sampling_repeats_with_a_seed_and_respects_top_k():
    def step(prefix, state):
        return torch.log_softmax(torch.tensor([[0.0, 0.0, 1.0, 2.0, 3.0]] * prefix.size(0)), -1), state

    prefix = torch.full((4, 1), BOS)
    one = sample(step, Stateless(), prefix, 20, generator=torch.Generator().manual_seed(3))
    two = sample(step, Stateless(), prefix, 20, generator=torch.Generator().manual_seed(3))
    other = sample(step, Stateless(), prefix, 20, generator=torch.Generator().manual_seed(4))
    assert torch.equal(one, two) and not torch.equal(one, other)
    top1 = sample(step, Stateless(), prefix, 10, top_k=1, generator=torch.Generator().manual_seed(0))
    assert (top1[:, 1:] == 4).all()
    # top_p = 0.5: token 4 alone holds ~0.64 of the mass, so it is the only one left.
    nucleus = sample(step, Stateless(), prefix, 10, top_p=0.5, generator=torch.Generator().manual_seed(0))
    assert (nucleus[:, 1:] == 4).all()
    # A low temperature concentrates on the mode; a high one spreads out.
    cold = sample(step, Stateless(), prefix, 50, temperature=0.05, generator=torch.Generator().manual_seed(1))
    assert (cold[:, 1:] == 4).float().mean() > 0.99
    hot = sample(step, Stateless(), prefix, 50, temperature=5.0, generator=torch.Generator().manual_seed(1))
    assert (hot[:, 1:] == 4).float().mean() < 0.6


def test_sampling_draws_from_the_softmax():
    # 40,000 independent draws of one token: each frequency within 4 standard errors of its probability.
    probs = torch.tensor([0.05, 0.15, 0.0, 0.3, 0.5])

    def step(prefix, state):
        return probs.log().expand(prefix.size(0), -1), state

    drawn = sample(step, Stateless(), torch.full((40_000, 1), BOS), 1, generator=torch.Generator().manual_seed(0))
    frequency = torch.bincount(drawn[:, 1], minlength=5).double() / 40_000
    tolerance = 4 * (probs.double() * (1 - probs.double()) / 40_000).sqrt()
    assert ((frequency - probs.double()).abs() <= tolerance).all(), frequency
    assert frequency[2] == 0  # a token of probability 0 (log-probability -inf) is never drawn


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": 0.0}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 1.5}, "top_p"),
])
def test_sampling_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample(lambda p, s: (torch.zeros(1, 5), s), Stateless(), torch.ones(1, 1, dtype=torch.long), 1, **kwargs)


def test_batches_are_sorted_by_length_and_sized_by_tokens_unless_given():
    from attnlab.decode import translate
    from attnlab.decode.translate import DecodeConfig

    lengths = [30, 5, 12, 5, 40, 7]
    by_length = [1, 3, 5, 2, 0, 4]  # a stable sort: equal lengths keep their order
    assert DecodeConfig(beam_size=1, batch_size=4).batches(lengths) == [[1, 3, 5, 2], [0, 4]]
    assert DecodeConfig(batch_size=1).batches(lengths) == [[j] for j in by_length]
    budget, most_rows = translate.DECODE_TOKENS, translate.DECODE_ROWS
    for beam in (1, 4):
        for sizes in (lengths, [1, 2, 3] * 900):
            batches = DecodeConfig(beam_size=beam).batches(sizes)
            assert sorted(j for batch in batches for j in batch) == list(range(len(sizes)))
            if sizes is lengths:
                assert [j for batch in batches for j in batch] == by_length
            for batch in batches:  # within both budgets, unless one sentence alone is over them
                rows = len(batch) * beam
                assert len(batch) == 1 or (rows <= most_rows and rows * max(sizes[j] for j in batch) <= budget)
            for batch, following in zip(batches, batches[1:]):  # and no batch could have taken one more
                rows = (len(batch) + 1) * beam
                assert rows > most_rows or rows * sizes[following[0]] > budget
    # With the default budget, many short sentences share a batch; long ones are spread out.
    assert DecodeConfig(beam_size=4).batches([16] * 600) == [list(range(256)), list(range(256, 512)),
                                                            list(range(512, 600))]
    assert len(DecodeConfig(beam_size=4).batches([budget // 4 + 1] * 3)) == 3  # each alone over it
    assert DecodeConfig().batches([]) == []
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        DecodeConfig(batch_size=-1)


# -- the shrinking, early-stopping search == the search that stepped every row to the end -----------
class _Rows(NamedTuple):
    """A decoding state that only knows which sentence each row belongs to."""

    sentence: torch.Tensor  # (N,)

    def select(self, index: torch.Tensor) -> "_Rows":
        return _Rows(self.sentence.index_select(0, index))


def _table_step(seed: int, vocab: int = 8, eos_boost: float = 1.0):
    """Log-probabilities drawn from a generator seeded by (seed, sentence, prefix): exact numbers that
    depend on nothing but the row's own history, so any batch composition gives the same values."""

    def step(prefix: torch.Tensor, state: _Rows):
        rows = []
        for sentence, tokens in zip(state.sentence.tolist(), prefix.tolist()):
            g = torch.Generator().manual_seed(hash((seed, sentence, *tokens)) % 2**31)
            logits = 2.0 * torch.randn(vocab, generator=g)
            logits[2] += eos_boost  # EOS (id 2) often enough that beams finish at different steps
            rows.append(logits)
        return torch.stack(rows).log_softmax(dim=-1), state

    return step


@pytest.mark.parametrize("seed", range(4))
def test_greedy_search_skips_pad_and_bos_where_they_score_best_on_a_large_vocabulary(seed):
    """Greedy search takes each row's best token and searches again, without PAD and BOS, only the
    rows whose best is one of them; over a vocabulary large enough for selection by groups, that
    equals the reference's argmax over scores with PAD and BOS at -inf."""
    from reference_search import reference_greedy_search

    def step(prefix, state):
        scores, _ = base(prefix, state)
        boost = (prefix.sum(dim=1) % 3 == 0).float()[:, None] * 40.0  # PAD or BOS on top in about a third of rows
        return scores.index_add(1, torch.tensor([seed % 2]), boost), state

    base = _table_step(seed, vocab=2048, eos_boost=2.0)
    common = dict(batch_size=6, bos_id=1, eos_id=2, max_len=torch.tensor([4, 9, 6, 12, 7, 10]), pad_id=0)
    start = _Rows(torch.arange(6))
    found = greedy_search(step, start, **common)
    assert found == reference_greedy_search(step, start, **common)
    assert not {0, 1} & {token for tokens in found for token in tokens}


@pytest.mark.parametrize("seed", range(12))
def test_shrinking_search_equals_the_search_that_stepped_every_row(seed):
    from reference_search import reference_beam_search, reference_greedy_search

    B = 4
    limits = torch.tensor([3, 9, 6, 12])
    common = dict(batch_size=B, bos_id=1, eos_id=2, max_len=limits, pad_id=0)
    step = _table_step(seed, eos_boost=0.5 + 0.25 * (seed % 4))
    start = _Rows(torch.arange(B))
    assert greedy_search(step, start, **common) == reference_greedy_search(step, start, **common)
    beam = 2 + seed % 4
    for alpha in (0.0, 0.6, 1.0):
        for n_best in sorted({1, beam}):
            got = beam_search(step, start, **common, beam_size=beam, alpha=alpha, n_best=n_best)
            want = reference_beam_search(step, start, **common, beam_size=beam, alpha=alpha, n_best=n_best)
            assert got == want, (alpha, n_best)


@pytest.mark.parametrize("seed, vocab", [(0, 2048), (1, 2007), (2, 4096)])
def test_search_over_a_large_vocabulary_equals_the_reference(seed, vocab):
    # From 1024 scores a row, search selects by group maxima (search._top_k, search._argmax): the same
    # hypotheses as the reference's plain topk/argmax, a vocabulary size that 16 does not divide included.
    from reference_search import reference_beam_search, reference_greedy_search

    limits = torch.tensor([4, 7, 5])
    common = dict(batch_size=3, bos_id=1, eos_id=2, max_len=limits, pad_id=0)
    step = _table_step(seed, vocab=vocab, eos_boost=7.0)
    start = _Rows(torch.arange(3))
    assert greedy_search(step, start, **common) == reference_greedy_search(step, start, **common)
    for beam in (2, 4):
        got = beam_search(step, start, **common, beam_size=beam, alpha=0.6, n_best=2)
        assert got == reference_beam_search(step, start, **common, beam_size=beam, alpha=0.6, n_best=2)


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("seed, vocab", [(0, 8), (1, 2007), (2, 4096)])
def test_beam_search_from_logits_finds_what_the_search_from_log_probs_finds(monkeypatch, use_kernel, seed, vocab):
    """With ``logits=True`` the search normalizes the step's scores itself: in attnlab's compiled
    scoring kernel (one pass: log-softmax, beam scores, selection) where it is available, else with
    log_softmax. Either way the reference's hypotheses, their scores equal to float32 rounding."""
    from reference_search import reference_beam_search

    from attnlab.nn import native

    table = _table_step(seed, vocab=vocab, eos_boost=1.5)

    def logits_step(prefix, state):  # the same softmax, each row shifted by its own constant
        log_probs, state = table(prefix, state)
        return log_probs + 3.7 * (prefix.sum(dim=1, keepdim=True) % 5).float(), state

    calls = []
    kernel = native.beam_scores_kernel()
    if use_kernel:
        if kernel is None:
            pytest.skip("no compiled kernels on this machine (no C compiler)")
        monkeypatch.setattr(native, "beam_scores_kernel", lambda: calls.append(1) or kernel)
    else:
        monkeypatch.setattr(native, "beam_scores_kernel", lambda: None)
    common = dict(batch_size=4, bos_id=1, eos_id=2, max_len=torch.tensor([3, 8, 6, 11]), pad_id=0)
    start = _Rows(torch.arange(4))
    for beam in (1, 2, 4):
        got = beam_search(logits_step, start, **common, beam_size=beam, alpha=0.6, n_best=beam, logits=True)
        want = reference_beam_search(table, start, **common, beam_size=beam, alpha=0.6, n_best=beam)
        for a, b in zip(got, want):
            assert [a.tokens, *(h.tokens for h in a.alternatives)] == [b.tokens, *(h.tokens for h in b.alternatives)]
            assert a.score == pytest.approx(b.score, abs=1e-5)
    assert bool(calls) == use_kernel


def test_beam_search_from_float32_logits_under_a_float64_default_dtype():
    """The beam scores are float32 whatever the default dtype, so the float32 logits of a float32
    model still take the compiled kernel, and sentences cut at their length limit still finish."""
    from reference_search import reference_beam_search

    table = _table_step(0, vocab=50, eos_boost=0.0)
    common = dict(batch_size=3, bos_id=1, eos_id=2, max_len=torch.tensor([2, 5, 3]), pad_id=0)
    start = _Rows(torch.arange(3))
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        def step32(prefix, state):  # float32 log-probabilities, which also serve as logits
            return table(prefix, state)[0].float(), state

        want = reference_beam_search(step32, start, **common, beam_size=3, alpha=0.6)
        got = beam_search(step32, start, **common, beam_size=3, alpha=0.6, logits=True)
    finally:
        torch.set_default_dtype(before)
    assert [h.tokens for h in got] == [h.tokens for h in want]


@pytest.mark.parametrize("width", [1000, 1024, 4000, 4003, 16000])
def test_selection_by_group_maxima_equals_topk_and_argmax(width):
    from attnlab.decode.search import _argmax, _top_k

    g = torch.Generator().manual_seed(width)
    scores = torch.randn(6, width, generator=g)
    scores[0, :] = float("-inf")  # a row with nothing finite but one score
    scores[0, width // 2] = 0.0
    scores[1, torch.randperm(width, generator=g)[: width // 2]] = float("-inf")
    scores[2, -1] = 10.0  # the best in the last positions (outside the 16 groups when 16 does not divide)
    for k in (1, 8, 10):
        values, positions = _top_k(scores, k)
        want_values, want_positions = scores.topk(k, dim=-1)
        assert torch.equal(values[1:], want_values[1:]) and torch.equal(positions[1:], want_positions[1:])
        assert torch.equal(values[0], want_values[0])  # row 0: one finite score, then -inf ties
        assert positions[0, 0] == width // 2
    assert torch.equal(_argmax(scores), scores.argmax(dim=-1))


@pytest.mark.parametrize("beam, use_cache", [(1, True), (3, True), (3, False)])
def test_sources_encoded_in_pieces_translate_as_encoded_whole(translator, monkeypatch, beam, use_cache):
    import attnlab.decode.translate as translate_module

    sources = [[5, 6, 7, 8, EOS], [9, 10, EOS], [11, 12, 13, 14, 15, 16, EOS], [17, EOS], [18, 19, 20, EOS]]
    config = DecodeConfig(beam_size=beam, extra_len=8, use_cache=use_cache)
    whole = translator.translate_ids(sources, config)
    encoded_whole = translator.run_encoder(sources)
    monkeypatch.setattr(translate_module, "ENCODE_TOKENS", 10)  # pieces of two, one and two sentences
    pieces = translator.run_encoder(sources)
    # The memory is padded to the longest source and masked there; real positions equal the whole batch's.
    assert torch.equal(pieces.src_mask, encoded_whole.src_mask)
    real = pieces.src_mask[:, 0, 0, :, None].expand_as(pieces.memory)
    torch.testing.assert_close(pieces.memory[real], encoded_whole.memory[real], atol=1e-5, rtol=0)
    assert translator.translate_ids(sources, config) == whole
