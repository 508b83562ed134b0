"""Text generation with a decoder-only language model, in a window of its context.

A decoder-only model trained on windows of ``context`` tokens has seen positions 0 .. context − 1
only, so generation keeps a window: once the window is full it restarts from its last half
(``keep`` tokens), which are read again as a fresh prefix. The cached generator grows a KV cache
inside each window and re-fills it at a restart, with the lean step of ``attnlab.nn.fast_decode``;
the uncached one re-reads the whole window through the model's modules at every step. Both see
exactly the same windows, so they give the same logits.

Shape legend: B batch, T context length, V vocab size.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from ..data.vocab import BaseVocab, CharVocab
from ..errors import ConfigError
from ..nn import fast_decode
from ..nn.attention import _check_token_ids
from ..nn.model import DecoderOnlyTransformer, LMState
from .load import load_checkpoint
from .search import sample

__all__ = ["load_language_model", "encode_prompt", "generate"]


def encode_prompt(vocab: BaseVocab, text: str) -> list[int]:
    """The ids of a prompt. Characters a character vocabulary lacks become ``<unk>``, which the model
    never saw in training and which decoding leaves out of the text: they are named in a warning,
    never dropped in silence. An empty prompt is an error."""
    if not text:
        raise ConfigError("the prompt is empty; give at least one character")
    if isinstance(vocab, CharVocab):
        unknown = sorted({c for c in text if vocab.token_to_id(c) is None})
        if unknown:
            warnings.warn(f"the prompt's characters {''.join(unknown)!r} are not in the model's vocabulary: "
                          "they are read as <unk> and left out of the printed text", stacklevel=2)
    return vocab.encode(text)


def load_language_model(path: str | Path, device: str = "cpu") -> tuple[DecoderOnlyTransformer, BaseVocab]:
    """A trained language model (in evaluation mode) and its vocabulary."""
    loaded = load_checkpoint(path, "lm", device=device)
    return loaded.model, loaded.src_vocab


class _Window(NamedTuple):
    """Generation state: where the current window starts in the sequence, and its cache."""

    start: int
    cache: LMState | None  # None when generating without a cache

    def select(self, index: Tensor) -> "_Window":
        return _Window(self.start, None if self.cache is None else self.cache.select(index))


def _window_start(length: int, start: int, context: int, keep: int) -> int:
    """Restart the window at the last ``keep`` tokens once it would exceed ``context``."""
    return length - keep if length - start > context else start


def _cached_step(model: DecoderOnlyTransformer, keep: int):
    packed = fast_decode.pack(model)

    def step(prefix: Tensor, window: _Window) -> tuple[Tensor, _Window]:
        start = _window_start(prefix.size(1), window.start, model.config.max_len, keep)
        cache = model.start() if start != window.start or window.cache is None else window.cache
        new = prefix[:, start + cache.length :]  # (B, T_new): the prefix of a fresh window, or one token
        logits, cache = fast_decode.step(packed, new, cache)  # (B, V)
        return logits.float().log_softmax(-1), _Window(start, cache)

    return step


def _uncached_step(model: DecoderOnlyTransformer, keep: int):
    def step(prefix: Tensor, window: _Window) -> tuple[Tensor, _Window]:
        start = _window_start(prefix.size(1), window.start, model.config.max_len, keep)
        logits = model(prefix[:, start:])  # (B, T_window, V)
        return logits[:, -1].float().log_softmax(-1), _Window(start, None)

    return step


@torch.no_grad()
def generate(
    model: DecoderOnlyTransformer, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
    use_cache: bool = True, keep: int | None = None,
) -> Tensor:
    """Sample ``max_new_tokens`` after ``prompt`` (B, t) and return prompt + new tokens (B, t + new).

    ``seed`` makes the output repeatable. With the cache (the default) each step runs
    ``attnlab.fast_decode.step`` on one new token; ``use_cache=False`` re-reads the whole window
    through the model's ``forward`` at every step, the reference the cached path is tested against.
    The model samples in evaluation mode and is given back in the mode it came in.
    """
    _check_token_ids(prompt, "prompt")
    if prompt.numel() == 0:
        raise ValueError(f"prompt must hold at least one token id, got shape {tuple(prompt.shape)}")
    vocab_size = model.config.vocab_size
    if int(prompt.min()) < 0 or int(prompt.max()) >= vocab_size:
        raise ValueError(f"prompt ids must be in 0..{vocab_size - 1} (the model's vocabulary), "
                         f"got {int(prompt.min())}..{int(prompt.max())}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
    if seed is not None and not 0 <= seed < 2**63:
        raise ConfigError(f"seed must be in [0, 2**63), got {seed}")
    context = model.config.max_len
    keep = keep or max(1, context // 2)
    if not 1 <= keep <= context:
        raise ValueError(f"keep must be in 1..{context}, got {keep}")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=prompt.device).manual_seed(seed)
    start = max(0, prompt.size(1) - keep) if prompt.size(1) > context else 0
    was_training = model.training
    model.eval()
    try:
        step = _cached_step(model, keep) if use_cache else _uncached_step(model, keep)
        return sample(step, _Window(start, None), prompt, max_new_tokens, temperature=temperature,
                      top_k=top_k, top_p=top_p, generator=generator)
    finally:
        model.train(was_training)
