"""Decoding as pure functions over a step callable: greedy search, beam search and sampling.

A step function ``step(prefix, state) -> (log_probs, state)`` takes the tokens generated so far,
``prefix`` (N, t), and a decoding state; it returns log-probabilities of the next token (N, V) and
the new state. The state may be anything with ``select(index)`` that keeps/reorders batch rows
(``attnlab.model.DecoderState`` does); a cached step uses only ``prefix[:, -1:]``, an uncached one
re-reads the whole prefix. Nothing here knows which: that is how cached and uncached decoding are
compared. Decoding never needs gradients: these functions run under ``torch.no_grad()``.

Greedy and beam search shrink their batch: a finished row (greedy) or sentence (beam) leaves the
prefix and the state (``select``), so each step computes only rows still being decoded. The rules
never depend on the other rows of the batch (tests/test_decoding.py holds a batch equal to each
sentence decoded alone; only floating-point rounding of different batch shapes could split a tie).

Greedy and beam search never emit BOS or PAD (``pad_id`` is required): those tokens are given
log-probability −inf before each choice, so that beam size 1 and greedy search pick alike (but for
exact ties between two tokens' scores, which each may break its own way).

Shape legend: B sentences, K beams, N rows (B or B·K), t tokens so far, V vocab size.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from attnlab.nn import native

__all__ = ["StepFn", "Hypothesis", "greedy_search", "beam_search", "sample", "length_penalty"]

StepFn = Callable[[Tensor, Any], tuple[Tensor, Any]]


class Hypothesis(NamedTuple):
    """A finished beam: its tokens (no BOS/EOS) and score = log-probability / length penalty.

    ``alternatives``: the next best finished hypotheses of the same sentence, best first, when
    ``beam_search`` was asked for ``n_best`` > 1; empty otherwise.
    """

    tokens: list[int]
    score: float
    alternatives: tuple[Hypothesis, ...] = ()


def _as_lengths(max_len: int | Tensor, batch: int, device: torch.device) -> Tensor:
    lengths = torch.as_tensor(max_len, device=device).expand(batch).clone()
    if (lengths < 1).any():
        raise ValueError("max_len must be at least 1 token")
    return lengths


def _never_emitted(bos_id: int, eos_id: int, pad_id: int, device: torch.device) -> Tensor:
    """The ids search must never choose: BOS and PAD (EOS always stays choosable)."""
    ids = sorted({i for i in (bos_id, pad_id) if i != eos_id})
    return torch.tensor(ids, dtype=torch.long, device=device)


@torch.no_grad()
def greedy_search(
    step: StepFn, state: Any, batch_size: int, bos_id: int, eos_id: int, max_len: int | Tensor,
    *, pad_id: int, device: torch.device | str = "cpu", pick: Callable[[Any, Tensor], Tensor] | None = None,
) -> list[list[int]]:
    """Pick the most likely token at every step until EOS or ``max_len`` tokens (per row).

    Only the order of the step's scores matters here, so ``step`` may return logits instead of
    log-probabilities (``Translator`` does: it saves a softmax over the vocabulary per step).
    BOS and ``pad_id`` (the vocabulary's padding) are never picked. A row that ends leaves the batch
    (its prefix and its rows of the state, by ``state.select``), so the step runs on the rows still
    being decoded only. Returns one token list per row, without BOS and EOS.

    ``pick(output, banned)``, where given, makes the choice from what ``step`` returned and the ids
    never picked (an int64 tensor), (N,) int64, the best allowed token of each row: for a step that
    returns something other than scores (``Translator``'s float32 steps on the CPU return the decoder's
    hidden states, which ``attnlab.nn.fast_decode.screened_pick`` chooses from).
    """
    device = torch.device(device)
    limits = _as_lengths(max_len, batch_size, device)  # (N,) for the N rows still decoding
    banned = _never_emitted(bos_id, eos_id, pad_id, device)
    prefix = torch.full((batch_size, 1), bos_id, dtype=torch.long, device=device)  # (N, 1)
    live = list(range(batch_size))  # the input row of each row still decoding
    results: list[list[int]] = [[] for _ in range(batch_size)]
    kernel = native.greedy_pick_kernel() if device.type == "cpu" else None
    for t in range(int(limits.max())):
        scores, state = step(prefix, state)  # (N, V)
        if pick is not None:
            next_token = pick(scores, banned)
        elif kernel is not None:  # the same choice in one compiled pass
            next_token = kernel.pick(scores.float(), banned)
        else:
            scores = scores.float()  # (N, V)
            next_token = _argmax(scores)  # (N,) the best token, banned or not; the rows whose best is banned
            blocked = torch.isin(next_token, banned).nonzero()[:, 0]  # are searched again without them
            if len(blocked):
                next_token[blocked] = _argmax(scores[blocked].index_fill_(-1, banned, float("-inf")))
        next_token = torch.where(t + 1 >= limits, torch.full_like(next_token, eos_id), next_token)
        prefix = torch.cat([prefix, next_token[:, None]], dim=1)  # (N, t + 2)
        ended = next_token == eos_id
        if not ended.any():
            continue
        for row in ended.nonzero()[:, 0].tolist():
            results[live[row]] = prefix[row, 1:-1].tolist()
        going = (~ended).nonzero()[:, 0]  # (N',)
        if going.numel() == 0:
            break
        live = [live[row] for row in going.tolist()]
        prefix, limits, state = prefix.index_select(0, going), limits.index_select(0, going), state.select(going)
    return results


# -- fast selection over a large vocabulary -------------------------------------------------------------
#
# On the CPU, ``topk`` and ``argmax`` over a row of L scores cost about 2 ns a score (they compare one
# score at a time), while ``amax`` across rows of a (rows, 16, L / 16) view is vectorized and ten times
# cheaper. So both first take the maxima of L / 16 interleaved groups of 16 scores (group j holds
# positions j, j + L/16, j + 2L/16, ...), keep the k groups with the largest maxima, and select among
# their 16k scores only. The k largest scores lie in those groups: a group holding one of them has a
# maximum at least as large, and fewer than k groups have a larger maximum (each would hold a larger
# score). The values returned are exactly ``topk``'s; only where two scores are exactly equal may
# another of them be named. On a GPU ``topk`` and ``argmax`` are fast already and run as they are.

_GROUPS = 16
_PRUNE_FROM = 1024  # scores per row from which selecting by groups pays


def _top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``scores.topk(k, dim=-1)`` for (rows, L) scores: values and positions, best first."""
    rows, L = scores.shape
    width = L // _GROUPS  # positions per group, in the first _GROUPS * width positions
    if L < _PRUNE_FROM or k * _GROUPS * 4 > L or scores.device.type != "cpu":
        return scores.topk(k, dim=-1)
    body = scores[:, : _GROUPS * width].view(rows, _GROUPS, width)
    groups = body.amax(dim=1).topk(k, dim=-1).indices  # (rows, k) the groups with the k largest maxima
    members = groups[:, :, None] + width * torch.arange(_GROUPS, device=scores.device)  # (rows, k, 16)
    members = members.view(rows, k * _GROUPS)
    if L > _GROUPS * width:  # the last L mod 16 positions are candidates too
        tail = torch.arange(_GROUPS * width, L, device=scores.device).expand(rows, -1)
        members = torch.cat([members, tail], dim=1)
    values, chosen = scores.gather(1, members).topk(k, dim=-1)
    return values, members.gather(1, chosen)


def _argmax(scores: Tensor) -> Tensor:
    """``scores.argmax(dim=-1)`` for (rows, V) scores, selecting by groups (above) on a large vocabulary."""
    rows, V = scores.shape
    width = V // _GROUPS
    if V < _PRUNE_FROM or V % _GROUPS or scores.device.type != "cpu":
        return scores.argmax(dim=-1)
    grouped = scores.view(rows, _GROUPS, width)
    group = grouped.amax(dim=1).argmax(dim=-1)  # (rows,) a group holding the row's maximum
    members = grouped.gather(2, group[:, None, None].expand(rows, _GROUPS, 1))[:, :, 0]  # (rows, 16)
    return members.argmax(dim=-1) * width + group


def length_penalty(length: Tensor | int, alpha: float) -> Tensor:
    """GNMT's length penalty ((5 + length) / 6) ** alpha; scores are log-probability / penalty."""
    return ((5.0 + torch.as_tensor(length, dtype=torch.float32)) / 6.0) ** alpha


def _beam_kernel(
    scores: Tensor, alive: Tensor, logits: bool, one_row_per_beam: bool, n_top: int
) -> native.BeamScoresKernel | None:
    """attnlab's compiled scoring step, where it applies: logits and beam scores on the CPU in
    float32, each beam with its own row, at most ``native.MAX_BEAM_CANDIDATES`` extensions kept per
    sentence."""
    on_cpu_in_float32 = all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (scores, alive))
    if not (logits and one_row_per_beam and on_cpu_in_float32 and n_top <= native.MAX_BEAM_CANDIDATES):
        return None
    return native.beam_scores_kernel()


def _cut_top(alive: Tensor, beams: int, V: int, eos_id: int, n_top: int) -> tuple[Tensor, Tensor]:
    """The best extensions of sentences at their length limit: EOS alone, at each beam's score."""
    ended = torch.full((len(alive), beams, V), float("-inf"), dtype=alive.dtype, device=alive.device)
    ended[:, :, eos_id] = alive[:, :beams]
    return ended.view(len(alive), beams * V).topk(n_top, dim=-1)


@torch.no_grad()
def beam_search(
    step: StepFn, state: Any, batch_size: int, bos_id: int, eos_id: int, max_len: int | Tensor,
    *, pad_id: int, beam_size: int = 4, alpha: float = 0.6, device: torch.device | str = "cpu",
    n_best: int = 1, logits: bool = False,
) -> list[Hypothesis]:
    """Batched beam search with GNMT length penalty, as in the paper (beam 4, alpha 0.6).

    The beams of all sentences still being searched advance together as B·K rows. At each step the
    2K best extensions of each sentence are ranked by summed log-probability; an EOS among the top K
    finishes a hypothesis with score logp / length_penalty, the best K non-EOS extensions stay alive
    and the state is reordered by their parent beams. A sentence is done once it has K finished
    hypotheses (so beam size 1 is exactly greedy search); the best finished hypothesis is returned.
    A hypothesis's length, for the penalty, counts its tokens and the EOS. One cut at the length
    limit ends there (as in greedy search), its EOS costing nothing. BOS and ``pad_id`` (the
    vocabulary's padding) are never chosen, exactly as in greedy search.

    A done sentence leaves the batch (its rows of the prefix and of the state). A sentence also
    stops as soon as no live beam can still change its result (with ``alpha`` >= 0): log-probabilities
    only fall as a hypothesis grows, and the penalty only grows, so no hypothesis finished later can
    score above (best live log-probability) / (the largest penalty within its length limit), as in
    Flax's WMT decoder. Once its ``n_best``-th best finished score reaches that bound, what the
    search returns for the sentence is settled (a later equal score ranks after it), and stopping
    there returns exactly what searching on to K finishers would.

    ``step`` returns log-probabilities, or with ``logits=True`` logits, which the search normalizes
    itself: on the CPU, in float32, where attnlab's compiled kernels are available
    (``attnlab.nn.native``), in one pass with the beam scores and the selection; else with
    ``log_softmax``. Both give the same log-probabilities to the last bit or so of float32; where two
    candidates score exactly the same, the kernel keeps the one with the smaller index.

    ``state`` must describe B rows; it is expanded to B·K here (after the first step, which all
    beams share). Returns one ``Hypothesis`` per row;
    with ``n_best`` > 1 (at most ``beam_size``) it also carries the next ``n_best`` − 1 finished
    hypotheses of its row as ``alternatives``, best first.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best must be in 1..beam_size ({beam_size}), got {n_best}")
    device = torch.device(device)
    B, K = batch_size, beam_size
    limits = _as_lengths(max_len, B, device)  # (Bl,) for the Bl sentences still searched
    longest = int(limits.max())
    banned = _never_emitted(bos_id, eos_id, pad_id, device)
    # The penalty of each length, computed as the scores are, and the largest one up to each length.
    penalties = [float(length_penalty(n, alpha)) for n in range(1, longest + 1)]
    most_penalty = list(itertools.accumulate(penalties, max))
    # All beams start identical, so the first step runs on one row per sentence (R = 1 row per
    # sentence); its log-probabilities stand for every beam, and the rows become K after it (R = K).
    R = 1
    prefix = torch.full((B, 1), bos_id, dtype=torch.long, device=device)  # (Bl·R, 1)
    alive_logp = torch.full((B, K), float("-inf"), dtype=torch.float32, device=device)
    alive_logp[:, 0] = 0.0  # all beams start identical: expand only the first
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    live = list(range(B))  # the input sentence of each sentence still searched
    bound_penalty = torch.tensor([most_penalty[n - 1] for n in limits.tolist()], dtype=torch.float64, device=device)

    for t in range(longest):
        scores, state = step(prefix, state)  # (Bl·R, V) log-probabilities, or logits
        Bl, V = len(live), scores.size(-1)
        n_top = min(2 * K, K * V)
        at_limit = t + 1 >= limits  # (Bl,) at its length limit a hypothesis is cut: it ends with EOS, at no cost
        cut = at_limit.nonzero()[:, 0] if at_limit.any() else None
        # The extensions of each sentence's first ``beams`` beams, (Bl, beams, V): while R = 1 only
        # beam 0 is alive (the others are at -inf, and so are their extensions), so one row stands
        # for all K unless it holds fewer than 2K extensions.
        beams = R if R * V >= n_top else K
        kernel = _beam_kernel(scores, alive_logp, logits, beams == R, n_top)
        if kernel is not None:  # log-softmax, scores and selection in one pass (attnlab.nn.native)
            top_logp, top_index = kernel.top(scores, alive_logp, n_top, banned)
        else:
            log_probs = scores.float().log_softmax(dim=-1) if logits else scores.float()
            candidates = alive_logp[:, :beams, None] + log_probs.view(Bl, R, V).expand(Bl, beams, V)
            candidates.index_fill_(-1, banned, float("-inf"))  # a tensor of our own, filled in place
            top_logp, top_index = _top_k(candidates.view(Bl, beams * V), n_top)  # (Bl, 2K), best first
        if cut is not None:  # sentences at their length limit: EOS alone, whatever the step scored
            top_logp[cut], top_index[cut] = _cut_top(alive_logp[cut], beams, V, eos_id, n_top)
        top_beam, top_token = top_index // V, top_index % V  # (Bl, 2K)

        is_eos = top_token == eos_id
        finishes = is_eos & (torch.arange(n_top, device=device) < K) & torch.isfinite(top_logp)
        if finishes.any():
            history = prefix.view(Bl, R, -1)
            for b, j in finishes.nonzero().tolist():
                if len(finished[live[b]]) < K:
                    tokens = history[b, top_beam[b, j] % R, 1:].tolist()
                    finished[live[b]].append((float(top_logp[b, j]) / penalties[t], tokens))

        # The K best extensions that do not end in EOS stay alive.
        keep_logp, order = top_logp.masked_fill(is_eos, float("-inf")).topk(K, dim=-1)  # (Bl, K), best first
        bound = (keep_logp[:, 0].double() / bound_penalty).tolist()  # (Bl,) the best any later finisher scores
        done = at_limit.tolist()
        for b, sentence in enumerate(live):
            ended = finished[sentence]
            settled = alpha >= 0 and len(ended) >= n_best and sorted(s for s, _ in ended)[-n_best] >= bound[b]
            done[b] = done[b] or len(ended) >= K or settled
        if all(done):
            break
        going = [b for b, ended in enumerate(done) if not ended]
        index = torch.tensor(going, device=device)  # (Bl',)
        parent = top_beam.gather(1, order).index_select(0, index)  # (Bl', K)
        token = top_token.gather(1, order).index_select(0, index)  # (Bl', K)
        rows = (index[:, None] * R + parent % R).view(-1)  # (Bl'·K,) rows of this step to continue
        prefix = torch.cat([prefix.index_select(0, rows), token.view(-1, 1)], dim=1)  # (Bl'·K, t + 2)
        alive_logp = keep_logp.index_select(0, index)
        limits, bound_penalty = limits.index_select(0, index), bound_penalty.index_select(0, index)
        live = [live[b] for b in going]
        state, R = state.select(rows), K

    # Every sentence is done here: the last position forces EOS, so its hypotheses finish.
    # A stable sort keeps the first of equal scores first, as max() picks it.
    ranked = [sorted(finished[b], key=lambda item: -item[0])[:n_best] for b in range(B)]
    return [
        Hypothesis(tokens, score, tuple(Hypothesis(t, s) for s, t in rest))
        for (score, tokens), *rest in ranked
    ]


def _draw(logits: Tensor, generator: torch.Generator | None) -> Tensor:
    """One token per row from softmax(logits) (N, V) -> (N, 1), by the Gumbel-max trick.

    argmax(logits + G) with G = −log(−log U), U ~ Uniform(0, 1), is an exact draw from the softmax;
    it takes six small operations, where ``torch.multinomial`` spends more time checking its input
    than drawing one token (which matters when a small model generates one token at a time).
    """
    u = torch.rand(logits.shape, generator=generator, device=logits.device)  # (N, V)
    return (logits - u.log_().neg_().log_()).argmax(dim=-1, keepdim=True)


@torch.no_grad()
def sample(
    step: StepFn, state: Any, prefix: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
    top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
    eos_id: int | None = None,
) -> Tensor:
    """Draw ``max_new_tokens`` tokens after ``prefix`` (N, t) from the model's distribution.

    ``temperature`` < 1 sharpens, > 1 flattens; ``top_k`` keeps the k likeliest tokens; ``top_p``
    keeps the smallest set whose probability reaches p (nucleus sampling). A seeded ``generator``
    makes the draw repeatable. Returns the prefix with the new tokens, (N, t + new).
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    done = torch.zeros(prefix.size(0), dtype=torch.bool, device=prefix.device)
    for _ in range(max_new_tokens):
        log_probs, state = step(prefix, state)  # (N, V)
        logits = log_probs.float() if temperature == 1.0 else log_probs.float() / temperature
        if top_k is not None and top_k < logits.size(-1):
            kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (N, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None and top_p < 1.0:
            sorted_logits, sorted_index = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            # Drop a token when the tokens before it already reach top_p (the first always stays).
            drop = probs.cumsum(dim=-1) - probs >= top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(1, sorted_index, sorted_logits)
        token = _draw(logits, generator)  # (N, 1)
        if eos_id is not None:
            token = token.masked_fill(done[:, None], eos_id)
            done |= token[:, 0] == eos_id
        prefix = torch.cat([prefix, token], dim=1)
        if eos_id is not None and done.all():
            break
    return prefix
