"""Token-based batches of similar-length sentence pairs, as in "Attention Is All You Need".

The paper batches "by approximate sequence length", each batch holding about 25000 source and
25000 target tokens. ``make_batches`` does the same with a hard budget: it sorts examples by
length, so that a batch holds sentences of nearly equal length and padding stays small, and
cuts the sorted run into batches whose padded size ``len(batch) * longest`` stays within
``max_tokens`` on both sides. Shuffling reorders equal-length examples and the batches
themselves, deterministically from (seed, epoch), without touching any global random state.

Shape legend: B batch, S source length, T target length.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["make_batches", "collate", "padding_fraction", "shard", "pad_sequences"]


def _rng(seed: int, epoch: int) -> random.Random:
    """A private generator for one (seed, epoch): the same pair always gives the same batches."""
    return random.Random(seed * 1_000_003 + epoch)


def make_batches(
    src_lengths: Sequence[int],
    tgt_lengths: Sequence[int],
    max_tokens: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
) -> list[list[int]]:
    """Group example indices into batches of similar length within a padded-token budget.

    Every batch satisfies ``len(batch) * max(src_lengths[i] for i in batch) <= max_tokens``, and
    the same for targets; lengths are taken as given (include ``<bos>``/``<eos>`` if the model
    sees them). Each index appears in exactly one batch. Examples are sorted by (target, source)
    length; with ``shuffle`` the order among equal lengths and the order of the batches are
    random but fixed by (seed, epoch), and without it both are sorted.
    Raises ValueError if an example alone exceeds ``max_tokens``.
    """
    if len(src_lengths) != len(tgt_lengths):
        raise ValueError(
            f"src_lengths has {len(src_lengths)} entries but tgt_lengths has {len(tgt_lengths)}"
        )
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    for side, lengths in (("source", src_lengths), ("target", tgt_lengths)):
        for i, n in enumerate(lengths):
            if n < 0:
                raise ValueError(f"example {i} has negative {side} length {n}")
            if n > max_tokens:
                raise ValueError(
                    f"example {i} has {side} length {n}, longer than max_tokens={max_tokens}"
                )

    rng = _rng(seed, epoch)
    order = list(range(len(src_lengths)))
    if shuffle:
        rng.shuffle(order)  # the stable sort below keeps this order among equal lengths
    order.sort(key=lambda i: (tgt_lengths[i], src_lengths[i]))

    batches: list[list[int]] = []
    batch: list[int] = []
    longest_src = longest_tgt = 0
    for i in order:
        new_src = max(longest_src, src_lengths[i])
        new_tgt = max(longest_tgt, tgt_lengths[i])
        size = len(batch) + 1
        if batch and (size * new_src > max_tokens or size * new_tgt > max_tokens):
            batches.append(batch)
            batch = []
            new_src, new_tgt = src_lengths[i], tgt_lengths[i]
        batch.append(i)
        longest_src, longest_tgt = new_src, new_tgt
    if batch:
        batches.append(batch)

    if shuffle:
        rng.shuffle(batches)
    return batches


def collate(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int
) -> tuple[Tensor, Tensor]:
    """Right-pad (source ids, target ids) pairs into two int64 tensors, (B, S) and (B, T)."""
    if not pairs:
        raise ValueError("cannot collate an empty batch")
    src_len = max(len(src) for src, _ in pairs)
    tgt_len = max(len(tgt) for _, tgt in pairs)
    src = torch.full((len(pairs), src_len), pad_id, dtype=torch.long)  # (B, S)
    tgt = torch.full((len(pairs), tgt_len), pad_id, dtype=torch.long)  # (B, T)
    for row, (src_ids, tgt_ids) in enumerate(pairs):
        src[row, : len(src_ids)] = torch.as_tensor(src_ids, dtype=torch.long)
        tgt[row, : len(tgt_ids)] = torch.as_tensor(tgt_ids, dtype=torch.long)
    return src, tgt


def padding_fraction(
    batches: Sequence[Sequence[int]], src_lengths: Sequence[int], tgt_lengths: Sequence[int]
) -> float:
    """Fraction of padded positions among all positions of the padded batches, both sides."""
    padded = total = 0
    for batch in batches:
        if not batch:
            continue
        for lengths in (src_lengths, tgt_lengths):
            sizes = [lengths[i] for i in batch]
            slots = len(batch) * max(sizes)
            total += slots
            padded += slots - sum(sizes)
    return padded / total if total else 0.0


def shard(batches: Sequence[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """The batches of one data-parallel rank: every ``world_size``-th, starting at ``rank``.

    The last ``len(batches) % world_size`` batches are dropped so that every rank runs the
    same number of steps (a rank with one extra step would wait forever in an all-reduce).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    usable = len(batches) - len(batches) % world_size
    return list(batches[rank:usable:world_size])


def pad_sequences(sequences: Sequence[Sequence[int]], pad_id: int) -> Tensor:
    """Right-pad lists of token ids into one int64 tensor (B, L), L the longest length."""
    if not sequences:
        raise ValueError("cannot pad an empty list of sequences")
    padded = torch.full((len(sequences), max(len(ids) for ids in sequences)), pad_id, dtype=torch.long)
    for row, ids in enumerate(sequences):
        padded[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    return padded  # (B, L)
