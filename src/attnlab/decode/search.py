"""Decoding as pure functions over a step callable: greedy search, beam search and sampling.

A step function ``step(prefix, state) -> (log_probs, state)`` takes the tokens generated so far,
``prefix`` (N, t), and a decoding state; it returns log-probabilities of the next token (N, V) and
the new state. The state may be anything with ``select(index)`` that keeps/reorders batch rows
(``attnlab.model.DecoderState`` does); a cached step uses only ``prefix[:, -1:]``, an uncached one
re-reads the whole prefix. Nothing here knows which: that is how cached and uncached decoding are
compared. Decoding never needs gradients: these functions run under ``torch.no_grad()``.

Greedy and beam search never emit BOS or PAD (``pad_id`` is required): those tokens are given
log-probability −inf before each choice, so that beam size 1 and greedy search pick alike.

Shape legend: B sentences, K beams, N rows (B or B·K), t tokens so far, V vocab size.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

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
    *, pad_id: int, device: torch.device | str = "cpu",
) -> list[list[int]]:
    """Pick the most likely token at every step until EOS or ``max_len`` tokens (per row).

    BOS and ``pad_id`` (the vocabulary's padding) are never picked. Returns one token
    list per row, without BOS and EOS.
    """
    device = torch.device(device)
    limits = _as_lengths(max_len, batch_size, device)  # (B,)
    banned = _never_emitted(bos_id, eos_id, pad_id, device)
    prefix = torch.full((batch_size, 1), bos_id, dtype=torch.long, device=device)  # (B, 1)
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)
    for t in range(int(limits.max())):
        log_probs, state = step(prefix, state)  # (B, V)
        log_probs = log_probs.float().index_fill(-1, banned, float("-inf"))
        next_token = log_probs.argmax(dim=-1)  # (B,)
        next_token = torch.where(t + 1 >= limits, torch.full_like(next_token, eos_id), next_token)
        next_token = next_token.masked_fill(done, eos_id)  # finished rows repeat EOS
        prefix = torch.cat([prefix, next_token[:, None]], dim=1)  # (B, t + 2)
        done |= next_token == eos_id
        if done.all():
            break
    return [_until_eos(row, eos_id) for row in prefix[:, 1:].tolist()]


def _until_eos(tokens: list[int], eos_id: int) -> list[int]:
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens


def length_penalty(length: Tensor | int, alpha: float) -> Tensor:
    """GNMT's length penalty ((5 + length) / 6) ** alpha; scores are log-probability / penalty."""
    return ((5.0 + torch.as_tensor(length, dtype=torch.float32)) / 6.0) ** alpha


@torch.no_grad()
def beam_search(
    step: StepFn, state: Any, batch_size: int, bos_id: int, eos_id: int, max_len: int | Tensor,
    *, pad_id: int, beam_size: int = 4, alpha: float = 0.6, device: torch.device | str = "cpu",
    n_best: int = 1,
) -> list[Hypothesis]:
    """Batched beam search with GNMT length penalty, as in the paper (beam 4, alpha 0.6).

    All sentences and beams advance together as B·K rows. At each step the 2K best extensions of
    each sentence are ranked by summed log-probability; an EOS among the top K finishes a
    hypothesis with score logp / length_penalty, the best K non-EOS extensions stay alive and the
    state is reordered by their parent beams. A sentence is done once it has K finished hypotheses
    (so beam size 1 is exactly greedy search); the best finished hypothesis is returned.
    A hypothesis's length, for the penalty, counts its tokens and the EOS. One cut at the length
    limit ends there (as in greedy search), its EOS costing nothing. BOS and ``pad_id`` (the
    vocabulary's padding) are never chosen, exactly as in greedy search.

    ``state`` must describe B rows; it is expanded to B·K here. Returns one ``Hypothesis`` per row;
    with ``n_best`` > 1 (at most ``beam_size``) it also carries the next ``n_best`` − 1 finished
    hypotheses of its row as ``alternatives``, best first.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best must be in 1..beam_size ({beam_size}), got {n_best}")
    device = torch.device(device)
    B, K = batch_size, beam_size
    limits = _as_lengths(max_len, B, device)  # (B,)
    banned = _never_emitted(bos_id, eos_id, pad_id, device)
    state = state.select(torch.arange(B, device=device).repeat_interleave(K))  # B -> B·K rows
    prefix = torch.full((B * K, 1), bos_id, dtype=torch.long, device=device)  # (B·K, 1)
    alive_logp = torch.full((B, K), float("-inf"), device=device)
    alive_logp[:, 0] = 0.0  # all beams start identical: expand only the first
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    offsets = (torch.arange(B, device=device) * K)[:, None]  # (B, 1)

    for t in range(int(limits.max())):
        log_probs, state = step(prefix, state)  # (B·K, V)
        V = log_probs.size(-1)
        log_probs = log_probs.float().index_fill(-1, banned, float("-inf")).view(B, K, V)
        # At a row's length limit every hypothesis is cut: it ends there with EOS, at no cost.
        at_limit = (t + 1 >= limits)[:, None, None]  # (B, 1, 1)
        eos_only = torch.full_like(log_probs, float("-inf"))
        eos_only[..., eos_id] = 0.0
        log_probs = torch.where(at_limit, eos_only, log_probs)
        candidates = (alive_logp[:, :, None] + log_probs).view(B, K * V)  # (B, K·V)
        n_top = min(2 * K, K * V)
        top_logp, top_index = candidates.topk(n_top, dim=-1)  # (B, 2K)
        top_beam, top_token = top_index // V, top_index % V  # (B, 2K)

        is_eos = top_token == eos_id
        finishes = is_eos & (torch.arange(n_top, device=device) < K) & torch.isfinite(top_logp)
        if finishes.any():
            penalty = float(length_penalty(t + 1, alpha))
            history = prefix.view(B, K, -1)
            for b, j in finishes.nonzero().tolist():
                if done[b] or len(finished[b]) >= K:
                    continue
                tokens = history[b, top_beam[b, j], 1:].tolist()
                finished[b].append((float(top_logp[b, j]) / penalty, tokens))
        done |= torch.tensor([len(f) >= K for f in finished], device=device) | (t + 1 >= limits)
        if done.all():
            break

        # The K best extensions that do not end in EOS stay alive.
        keep_logp = top_logp.masked_fill(is_eos, float("-inf"))
        keep_logp, order = keep_logp.topk(K, dim=-1)  # (B, K)
        parent = top_beam.gather(1, order)  # (B, K)
        token = top_token.gather(1, order)  # (B, K)
        alive_logp = keep_logp.masked_fill(done[:, None], float("-inf"))
        rows = (offsets + parent).view(-1)  # (B·K,) rows of the previous step to continue
        prefix = torch.cat([prefix.index_select(0, rows), token.view(-1, 1)], dim=1)  # (B·K, t + 2)
        state = state.select(rows)

    # Every row is done here: the last position forces EOS, so K hypotheses always finish.
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
