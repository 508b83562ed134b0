"""What a training run trains on: the data, the vocabulary, the model, the loss and the metrics.

The training loop (``attnlab.training``) is the same for every task; a task supplies
``batches(epoch)`` (deterministic from the seed and epoch, so a resumed run sees the same data),
``loss(model, batch)`` and ``evaluate(model)``, and says which metric picks the best checkpoint.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .batching import collate, make_batches, padding_fraction
from .config import TrainConfig
from .corpus import load_multi30k
from .losses import label_smoothed_loss
from .model import Transformer, TransformerConfig
from .translate import DecodeConfig, Translator, bleu_scores
from .vocab import BaseVocab, Vocab, vocabs_from_dict, vocabs_to_dict

__all__ = ["Task", "TranslationTask", "build_task"]


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


def build_task(config: TrainConfig, vocab: dict[str, Any] | None = None) -> Task:
    """The task a config asks for; ``vocab`` (from a checkpoint) replaces training a vocabulary."""
    if config.task == "translation":
        return TranslationTask(config, vocab)
    if config.task == "lm":
        from .lm import LanguageModelTask

        return LanguageModelTask(config, vocab)
    raise ValueError(f"unknown task {config.task!r}")
