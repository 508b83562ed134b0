"""The search as it was before batches shrank: every sentence and beam stepped until all were done.

Kept only as the oracle of tests/test_decoding.py: the shrinking, early-stopping search of
``attnlab.decode.search`` must return exactly what this returns (the first K finished hypotheses
of each sentence, ranked by GNMT's penalty; greedy rows repeating EOS once done).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnlab.decode.search import (
    Hypothesis,
    _as_lengths,
    _never_emitted,
    length_penalty,
)


@torch.no_grad()
def reference_greedy_search(
    step: Any, state: Any, batch_size: int, bos_id: int, eos_id: int, max_len: int | Tensor,
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


@torch.no_grad()
def reference_beam_search(
    step: Any, state: Any, batch_size: int, bos_id: int, eos_id: int, max_len: int | Tensor,
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


