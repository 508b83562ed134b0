"""Character-level language modelling on tiny Shakespeare: the task, and text generation.

A decoder-only model trained on windows of ``context`` characters has seen positions 0 ..
context − 1 only, so generation keeps a window: once the window is full it restarts from its last
half (``keep`` tokens), which are read again as a fresh prefix. The cached generator grows a KV
cache inside each window and re-fills it at a restart, with the lean step of
``attnlab.fast_decode``; the uncached one re-reads the whole window through the model's modules
at every step. Both see exactly the same windows, so they give the same logits.

Shape legend: B batch, T context length, V vocab size.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import fast_decode
from .attention import _check_token_ids
from .checkpoint import load_model_state, read_checkpoint_json, resolve_checkpoint
from .config import TrainConfig
from .corpus import default_data_dir
from .decoding import sample
from .losses import label_smoothed_loss
from .model import DecoderOnlyTransformer, LanguageModelConfig, LMState
from .vocab import BaseVocab, CharVocab, vocabs_from_dict, vocabs_to_dict

__all__ = ["LanguageModelTask", "load_language_model", "generate", "shakespeare_text"]


def shakespeare_text(data_dir: str | None = None) -> str:
    path = Path(data_dir or default_data_dir()) / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        raise FileNotFoundError(f"tiny Shakespeare not found at {path}; set ATTNLAB_DATA or --data-dir")
    return path.read_text(encoding="utf-8")


class LanguageModelTask:
    """Next-character prediction on tiny Shakespeare, split 90/10 into training and validation."""

    kind = "lm"
    best_metric = "val_loss"
    higher_is_better = False

    def __init__(self, config: TrainConfig, vocab: dict[str, Any] | None = None) -> None:
        self.config = config
        text = shakespeare_text(config.data_dir or None)
        self.vocab: BaseVocab = CharVocab.build(text) if vocab is None else vocabs_from_dict(vocab)[0]
        ids = torch.tensor(self.vocab.encode(text), dtype=torch.long)
        split = int(0.9 * len(ids))
        self.train_ids, self.val_ids = ids[:split], ids[split:]
        if len(self.train_ids) <= config.context + 1:
            raise ValueError(f"the training text is shorter than one context of {config.context} tokens")

    def vocab_json(self) -> dict[str, Any]:
        return vocabs_to_dict(self.vocab, self.vocab)

    def model_config(self) -> LanguageModelConfig:
        c = self.config
        return LanguageModelConfig(
            vocab_size=len(self.vocab), d_model=c.d_model, num_heads=c.num_heads,
            num_layers=c.num_encoder_layers, d_ff=c.d_ff, dropout=c.dropout, max_len=c.context,
            norm_first=c.norm_first, tie_embeddings=c.share_embeddings, pad_id=self.vocab.pad_id,
        )

    def build_model(self) -> DecoderOnlyTransformer:
        return DecoderOnlyTransformer(self.model_config())

    def batches(self, epoch: int) -> list[list[int]]:
        """Random window starts, ``batch_size`` per batch, repeatable from (seed, epoch)."""
        c = self.config
        per_epoch = max(1, len(self.train_ids) // (c.batch_size * c.context))
        rng = random.Random(c.seed * 1000003 + epoch)
        high = len(self.train_ids) - c.context - 1
        return [[rng.randint(0, high) for _ in range(c.batch_size)] for _ in range(per_epoch)]

    def to_tensors(self, batch: list[int], device: torch.device) -> tuple[Tensor, Tensor]:
        T = self.config.context
        x = torch.stack([self.train_ids[s : s + T] for s in batch])  # (B, T)
        y = torch.stack([self.train_ids[s + 1 : s + T + 1] for s in batch])  # (B, T)
        return x.to(device), y.to(device)

    def loss(self, model: nn.Module, tensors: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, int]:
        x, y = tensors
        loss_sum, n = label_smoothed_loss(model(x), y, self.vocab.pad_id, self.config.label_smoothing)
        return loss_sum, n, 0

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Mean next-character loss over the validation text in consecutive windows."""
        was_training = model.training
        model.eval()
        T = self.config.context
        n = (len(self.val_ids) - 1) // T
        x = self.val_ids[: n * T].view(n, T)
        y = self.val_ids[1 : n * T + 1].view(n, T)
        total = 0.0
        for k in range(0, n, 64):
            loss_sum, _ = label_smoothed_loss(model(x[k : k + 64].to(device)), y[k : k + 64].to(device), -100, 0.0)
            total += float(loss_sum)
        model.train(was_training)
        return {"val_loss": round(total / (n * T), 4)}

    def describe(self) -> str:
        return (f"tiny Shakespeare, characters: {len(self.train_ids):,} training, "
                f"{len(self.val_ids):,} validation; vocabulary {len(self.vocab)}")


def load_language_model(path: str | Path, device: str = "cpu") -> tuple[DecoderOnlyTransformer, BaseVocab]:
    directory = resolve_checkpoint(Path(path))
    config = read_checkpoint_json(directory, "config.json")
    if config.get("kind") != "lm":
        raise ValueError(f"{directory} holds a {config.get('kind')!r} model, not a language model")
    model = DecoderOnlyTransformer(LanguageModelConfig.from_dict(config["model"]))
    load_model_state(model, directory)
    vocab = vocabs_from_dict(read_checkpoint_json(directory, "vocab.json"))[0]
    return model.to(device).eval(), vocab


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
    """
    _check_token_ids(prompt, "prompt")
    if prompt.numel() == 0:
        raise ValueError(f"prompt must hold at least one token id, got shape {tuple(prompt.shape)}")
    vocab_size = model.config.vocab_size
    if int(prompt.min()) < 0 or int(prompt.max()) >= vocab_size:
        raise ValueError(f"prompt ids must be in 0..{vocab_size - 1} (the model's vocabulary), "
                         f"got {int(prompt.min())}..{int(prompt.max())}")
    model.eval()
    context = model.config.max_len
    keep = keep or max(1, context // 2)
    if not 1 <= keep <= context:
        raise ValueError(f"keep must be in 1..{context}, got {keep}")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=prompt.device).manual_seed(seed)
    step = _cached_step(model, keep) if use_cache else _uncached_step(model, keep)
    start = max(0, prompt.size(1) - keep) if prompt.size(1) > context else 0
    return sample(step, _Window(start, None), prompt, max_new_tokens, temperature=temperature,
                  top_k=top_k, top_p=top_p, generator=generator)
