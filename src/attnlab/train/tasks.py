"""What a training run trains on: the data, the vocabulary, the model, the loss and the metrics.

The training loop (``attnlab.training``) is the same for every task; a task supplies
``batches(epoch)`` (deterministic from the seed and epoch, so a resumed run sees the same data),
``loss(model, batch)`` and ``evaluate(model)``, and says which metric picks the best checkpoint.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..data.batching import collate, make_batches, padding_fraction
from ..data.corpus import default_data_dir, load_multi30k
from ..data.vocab import BaseVocab, CharVocab, Vocab, vocabs_from_dict, vocabs_to_dict
from ..decode.translate import DecodeConfig, Translator, bleu_scores
from ..nn.model import (
    DecoderOnlyTransformer,
    LanguageModelConfig,
    Transformer,
    TransformerConfig,
)
from .config import TrainConfig
from .losses import label_smoothed_loss

__all__ = ["Task", "TranslationTask", "LanguageModelTask", "build_task", "shakespeare_text"]


class Task(Protocol):
    kind: str
    best_metric: str  # key of evaluate()'s result that selects the best checkpoint
    higher_is_better: bool

    def vocab_json(self) -> dict[str, Any]: ...
    def model_config(self) -> Any: ...
    def build_model(self) -> nn.Module: ...
    def batches(self, epoch: int) -> list[Any]: ...
    def to_tensors(self, batch: Any, device: torch.device) -> tuple[Tensor, ...]: ...
    def loss(self, model: nn.Module, tensors: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, int]: ...
    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]: ...
    def describe(self) -> str: ...


class TranslationTask:
    """Multi30k translation with a subword vocabulary and token-based, length-sorted batches."""

    kind = "translation"
    best_metric = "val_bleu"
    higher_is_better = True

    def __init__(self, config: TrainConfig, vocab: dict[str, Any] | None = None) -> None:
        self.config = c = config
        data_dir = c.data_dir or None
        train = load_multi30k("train", c.src_lang, c.tgt_lang, data_dir)
        train = train[: max(1, int(len(train) * c.train_fraction))]
        self.val = load_multi30k("val", c.src_lang, c.tgt_lang, data_dir)
        if vocab is None:
            started = time.perf_counter()
            self.src_vocab, self.tgt_vocab = self._train_vocab(train)
            self.vocab_seconds = time.perf_counter() - started
        else:
            self.src_vocab, self.tgt_vocab = vocabs_from_dict(vocab)
            self.vocab_seconds = 0.0
        self.pad_id = self.src_vocab.pad_id
        self.train_src, self.train_tgt = self._encode_pairs(train)
        self.val_src, self.val_tgt = self._encode_pairs(self.val)

    def _train_vocab(self, train: list[tuple[str, str]]) -> tuple[BaseVocab, BaseVocab]:
        c = self.config
        src_text = [s for s, _ in train]
        tgt_text = [t for _, t in train]
        if c.shared_vocab:
            shared = Vocab.train(src_text + tgt_text, c.vocab_size)
            return shared, shared
        return Vocab.train(src_text, c.vocab_size), Vocab.train(tgt_text, c.vocab_size)

    def _encode_pairs(self, pairs: list[tuple[str, str]]) -> tuple[list[list[int]], list[list[int]]]:
        """Source ids + EOS and target ids as BOS ... EOS, dropping pairs beyond ``max_len``."""
        limit = self.config.max_len
        src = self.src_vocab.encode_batch([s for s, _ in pairs])
        tgt = self.tgt_vocab.encode_batch([t for _, t in pairs])
        bos, eos = self.tgt_vocab.bos_id, self.tgt_vocab.eos_id
        kept_src, kept_tgt = [], []
        for s, t in zip(src, tgt):
            if len(s) + 1 <= limit and len(t) + 2 <= limit:
                kept_src.append(s + [self.src_vocab.eos_id])
                kept_tgt.append([bos] + t + [eos])
        return kept_src, kept_tgt

    def vocab_json(self) -> dict[str, Any]:
        return vocabs_to_dict(self.src_vocab, self.tgt_vocab)

    def model_config(self) -> TransformerConfig:
        c = self.config
        return TransformerConfig(
            src_vocab_size=len(self.src_vocab), tgt_vocab_size=len(self.tgt_vocab),
            d_model=c.d_model, num_heads=c.num_heads, num_encoder_layers=c.num_encoder_layers,
            num_decoder_layers=c.num_decoder_layers, d_ff=c.d_ff, dropout=c.dropout,
            max_len=c.max_len, norm_first=c.norm_first,
            share_embeddings=c.share_embeddings and c.shared_vocab, pad_id=self.pad_id,
        )

    def build_model(self) -> Transformer:
        return Transformer(self.model_config())

    def batches(self, epoch: int) -> list[list[int]]:
        return make_batches(
            [len(s) for s in self.train_src], [len(t) - 1 for t in self.train_tgt],
            self.config.max_tokens, shuffle=True, seed=self.config.seed, epoch=epoch,
        )

    def padding(self, batches: list[list[int]]) -> float:
        return padding_fraction(
            batches, [len(s) for s in self.train_src], [len(t) - 1 for t in self.train_tgt]
        )

    def to_tensors(self, batch: list[int], device: torch.device) -> tuple[Tensor, Tensor]:
        src, tgt = collate([(self.train_src[i], self.train_tgt[i]) for i in batch], self.pad_id)
        return src.to(device), tgt.to(device)  # (B, S), (B, T + 1)

    def loss(self, model: nn.Module, tensors: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, int]:
        """(summed label-smoothed loss, target tokens, source tokens) of one batch."""
        src, tgt = tensors
        logits = model(src, tgt[:, :-1])  # (B, T, V): predict each next target token
        loss_sum, n_tokens = label_smoothed_loss(logits, tgt[:, 1:], self.pad_id, self.config.label_smoothing)
        return loss_sum, n_tokens, int(src.ne(self.pad_id).sum())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Validation loss and perplexity (teacher forcing) and greedy BLEU on validation sentences."""
        was_training = model.training
        model.eval()
        total, tokens = 0.0, 0
        for k in range(0, len(self.val_src), 128):
            src, tgt = collate(list(zip(self.val_src[k : k + 128], self.val_tgt[k : k + 128])), self.pad_id)
            src, tgt = src.to(device), tgt.to(device)
            loss_sum, n = label_smoothed_loss(model(src, tgt[:, :-1]), tgt[:, 1:], self.pad_id, 0.0)
            total, tokens = total + float(loss_sum), tokens + int(n)
        n_bleu = self.config.eval_sentences or len(self.val)
        translator = Translator(model, self.src_vocab, self.tgt_vocab)
        hypotheses = translator.translate([s for s, _ in self.val[:n_bleu]], DecodeConfig(beam_size=1))
        scores = bleu_scores(hypotheses, [t for _, t in self.val[:n_bleu]])
        model.train(was_training)
        val_loss = total / max(1, tokens)
        return {
            "val_loss": round(val_loss, 4),
            "val_ppl": round(float(torch.tensor(val_loss).exp()), 2),
            "val_bleu": scores["bleu"],
            "val_bleu_lc": scores["bleu_lc"],
        }

    def describe(self) -> str:
        c = self.config
        return (
            f"Multi30k {c.src_lang}->{c.tgt_lang}: {len(self.train_src)} training pairs, "
            f"{len(self.val)} validation; vocabulary {len(self.src_vocab)}"
            + ("" if self.tgt_vocab is self.src_vocab else f"/{len(self.tgt_vocab)}")
            + (" shared" if self.tgt_vocab is self.src_vocab else "")
        )


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


def build_task(config: TrainConfig, vocab: dict[str, Any] | None = None) -> Task:
    """The task a config asks for; ``vocab`` (from a checkpoint) replaces training a vocabulary."""
    if config.task == "translation":
        return TranslationTask(config, vocab)
    if config.task == "lm":
        return LanguageModelTask(config, vocab)
    raise ValueError(f"unknown task {config.task!r}")
