"""What a training run trains on: the data, the vocabulary, the model, the loss and the metrics.

The training loop (``attnlab.train.trainer``) is the same for every task. A task supplies
``batches(epoch)`` (deterministic from the seed and epoch, so a resumed run sees the same data),
``loss(model, batch)`` as a ``LossStats`` and ``evaluate(model)``, and says which metric picks the
best checkpoint and which metrics its loss plot shows. The two tasks live side by side here:
``TranslationTask`` (an encoder-decoder on a parallel corpus) and ``LanguageModelTask`` (a
decoder-only model on a text).
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from ..data.batching import collate, make_batches, padding_fraction
from ..data.cache import prepared_multi30k
from ..data.corpus import default_data_dir
from ..data.prepared import PreparedData, PreparedSplit
from ..data.vocab import BaseVocab, CharVocab, vocabs_from_dict, vocabs_to_dict
from ..decode.translate import DecodeConfig, Translator, bleu_scores
from ..errors import DataError
from ..nn.model import (
    DecoderOnlyTransformer,
    LanguageModelConfig,
    Transformer,
    TransformerConfig,
)
from .config import LanguageModelSettings, TrainConfig, TranslationSettings
from .losses import label_smoothed_loss, linear_cross_entropy

__all__ = ["LossStats", "Task", "TranslationTask", "LanguageModelTask", "build_task", "shakespeare_text"]


class LossStats(NamedTuple):
    """One batch's loss, as a task reports it to the training loop."""

    loss_sum: Tensor  # summed loss over the predicted tokens (differentiable), a scalar
    tokens: Tensor  # tokens predicted, the loss's normaliser: a scalar count
    tokens_read: int  # every token the model read for this batch (throughput), padding excluded


class Task(Protocol):
    """What the training loop needs from a task; the loop knows nothing else about it."""

    kind: str  # "translation" or "lm", stored in every checkpoint's config.json
    best_metric: str  # key of evaluate()'s result that selects the best checkpoint
    higher_is_better: bool
    plot_metrics: tuple[str, ...]  # keys of the log's evaluation rows drawn in loss.png

    def vocab_json(self) -> dict[str, Any]: ...
    def model_config(self) -> Any: ...
    def build_model(self) -> nn.Module: ...
    def batches(self, epoch: int) -> list[Any]: ...
    def to_tensors(self, batch: Any, device: torch.device) -> tuple[Tensor, ...]: ...
    def loss(self, model: nn.Module, tensors: tuple[Tensor, ...]) -> LossStats: ...
    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]: ...
    def describe(self) -> str: ...

    def describe_epoch(self, batches: list[Any]) -> str:
        """An optional note for the start of an epoch (e.g. the batches' padding)."""
        return ""

    def data_info(self) -> dict[str, Any]:
        """Which prepared data the run reads (path, fingerprint), if any; kept in config.json."""
        return {}


@contextmanager
def _evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Run a block in evaluation mode without gradients, then give the model back its mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


class TranslationTask(Task):
    """Translation from a prepared dataset: token-based, length-sorted batches read through a memory map.

    The data is a folder made by ``attnlab prepare`` (the ``data`` setting) or, when that is empty,
    the bundled Multi30k of ``src_lang``->``tgt_lang``, prepared on first use into the cache folder
    (``attnlab.data.cache``): one path for every corpus. The corpus never has to fit in memory:
    batches are built from its length arrays, and a batch's token ids are copied out of the
    memory-mapped arrays when the batch is trained on. With a prepared dataset, the languages and the
    vocabulary are the dataset's; the run's settings are completed from it (``self.config``).
    """

    kind = "translation"
    best_metric = "val_bleu"
    higher_is_better = True
    plot_metrics = ("train_loss", "val_loss", "val_bleu")

    def __init__(self, config: TrainConfig, vocab: dict[str, Any] | None = None, *, progress: bool = False) -> None:
        if not isinstance(config.task, TranslationSettings):
            raise ValueError(f"TranslationTask needs translation settings, got {config.kind!r}")
        s = config.task
        if s.data:
            self.data = PreparedData.open(s.data, full_check=True)  # every file's hash: no edited array trains
            config = config.override(
                data=str(self.data.path.resolve()),  # found again from any working directory
                src_lang=self.data.src_lang, tgt_lang=self.data.tgt_lang,
                vocab_size=int(self.data.manifest["settings"]["vocab_size"]),
                shared_vocab=self.data.src_vocab is self.data.tgt_vocab,
            )
            self.name = f"{self.data.path}"
        else:
            self.data = prepared_multi30k(s.src_lang, s.tgt_lang, vocab_size=s.vocab_size,
                                          shared_vocab=s.shared_vocab, data_dir=s.data_dir or None, progress=progress)
            self.name = "Multi30k"
        self.config, self.settings = config, s = config, config.task
        self.src_vocab, self.tgt_vocab = self.data.src_vocab, self.data.tgt_vocab
        if vocab is not None and vocabs_from_dict(vocab) != (self.src_vocab, self.tgt_vocab):
            raise DataError(f"{self.data.path}: the prepared data's vocabulary is not the one this run was trained "
                            "with (was the data prepared again with other settings?)")
        self.pad_id = self.src_vocab.pad_id

        self.train_split = self.data.split("train")
        n = max(1, int(len(self.train_split) * s.train_fraction))
        self.train_index = self._fitting(self.train_split, n)  # the split's pairs that fit
        self.train_src_len = self.train_split.src_lengths[self.train_index] + 1  # + <eos>: what the encoder reads
        self.train_tgt_len = self.train_split.tgt_lengths[self.train_index] + 1  # + <bos> (input) or <eos> (output)
        self.dropped = n - len(self.train_index)
        if not len(self.train_index):
            raise DataError(f"{self.data.path}: no training pair fits max_len={s.max_len} subwords (with <bos>/<eos>): "
                            f"all {n} were left out; raise --max-len")

        valid = self.data.split("valid")
        self.val = valid.texts()
        kept = self._fitting(valid, len(valid))
        if not len(kept):  # never a validation loss of 0 over no pairs
            raise DataError(f"{self.data.path}: no validation pair fits max_len={s.max_len} subwords (with "
                            f"<bos>/<eos>): all {len(valid)} were left out; raise --max-len")
        self.val_pairs = self._with_specials(valid.read_pairs(kept.tolist()))

    def _fitting(self, split: PreparedSplit, n: int) -> np.ndarray:
        """Positions (int32) among the first ``n`` pairs of those that fit the model's positions.

        Training leaves such pairs out rather than cutting them: a cut target teaches the model to
        stop mid-sentence. ``describe`` reports how many were left out.
        """
        fits = (split.src_lengths[:n] < self.settings.max_len) & (split.tgt_lengths[:n] < self.settings.max_len - 1)
        return np.flatnonzero(fits).astype(np.int32)  # source + <eos>; <bos> + target + <eos>

    def _with_specials(self, pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[list[int], list[int]]]:
        """(source ids + <eos>, <bos> + target ids + <eos>): what the model reads and predicts."""
        eos, bos, tgt_eos = self.src_vocab.eos_id, self.tgt_vocab.bos_id, self.tgt_vocab.eos_id
        return [([*src.tolist(), eos], [bos, *tgt.tolist(), tgt_eos]) for src, tgt in pairs]

    def data_info(self) -> dict[str, Any]:
        """Which prepared data the run trains on; stored in every checkpoint's config.json."""
        return {"path": str(self.data.path.resolve()), "fingerprint": self.data.fingerprint}

    def vocab_json(self) -> dict[str, Any]:
        return vocabs_to_dict(self.src_vocab, self.tgt_vocab)

    def model_config(self) -> TransformerConfig:
        c, s = self.config, self.settings
        return TransformerConfig(
            src_vocab_size=len(self.src_vocab), tgt_vocab_size=len(self.tgt_vocab),
            d_model=c.d_model, num_heads=c.num_heads, num_encoder_layers=s.num_encoder_layers,
            num_decoder_layers=s.num_decoder_layers, d_ff=c.d_ff, dropout=c.dropout,
            max_len=s.max_len, norm_first=c.norm_first,
            share_embeddings=c.share_embeddings and s.shared_vocab, pad_id=self.pad_id,
        )

    def build_model(self) -> Transformer:
        return Transformer(self.model_config())

    def batches(self, epoch: int) -> list[np.ndarray]:
        """Batches of positions into ``train_index``, built from the length arrays alone."""
        return make_batches(self.train_src_len, self.train_tgt_len, self.settings.max_tokens,
                            shuffle=True, seed=self.config.seed, epoch=epoch)

    def describe_epoch(self, batches: list[np.ndarray]) -> str:
        return f"padding {padding_fraction(batches, self.train_src_len, self.train_tgt_len):.1%}"

    def to_tensors(self, batch: np.ndarray, device: torch.device) -> tuple[Tensor, Tensor]:
        """The batch's token ids, read from the prepared files into padded tensors."""
        pairs = self.train_split.read_pairs(self.train_index[batch].tolist())
        src, tgt = collate(self._with_specials(pairs), self.pad_id)
        return src.to(device), tgt.to(device)  # (B, S), (B, T + 1)

    def loss(self, model: nn.Module, tensors: tuple[Tensor, Tensor]) -> LossStats:
        src, tgt = tensors
        # The decoder's hidden states under the output layer, through forward (which
        # DistributedDataParallel wraps); the loss applies the output layer block by block.
        hidden = model(src, tgt[:, :-1], features_only=True)  # (B, T, E): predict each next target token
        output = getattr(model, "module", model).output  # a wrapped model's own layer
        loss_sum, n_tokens = linear_cross_entropy(
            hidden, output.weight, output.bias, tgt[:, 1:], self.pad_id, self.config.label_smoothing
        )
        return LossStats(loss_sum, n_tokens, int(src.ne(self.pad_id).sum()) + int(n_tokens))

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Validation loss and perplexity (teacher forcing) and greedy BLEU on validation sentences."""
        total, tokens = 0.0, 0
        with _evaluation_mode(model):
            for k in range(0, len(self.val_pairs), 128):
                src, tgt = collate(self.val_pairs[k : k + 128], self.pad_id)
                src, tgt = src.to(device), tgt.to(device)
                loss_sum, n = label_smoothed_loss(model(src, tgt[:, :-1]), tgt[:, 1:], self.pad_id, 0.0)
                total, tokens = total + float(loss_sum), tokens + int(n)
            n_bleu = self.settings.eval_sentences or len(self.val)
            translator = Translator(model, self.src_vocab, self.tgt_vocab)
            hypotheses = translator.translate([s for s, _ in self.val[:n_bleu]], DecodeConfig(beam_size=1))
        scores = bleu_scores(hypotheses, [t for _, t in self.val[:n_bleu]])
        val_loss = total / max(1, tokens)
        return {
            "val_loss": round(val_loss, 4),
            "val_ppl": round(float(torch.tensor(val_loss).exp()), 2),
            "val_bleu": scores["bleu"],
            "val_bleu_lc": scores["bleu_lc"],
        }

    def describe(self) -> str:
        s = self.settings
        shared = self.tgt_vocab is self.src_vocab
        return (
            f"{self.name} {s.src_lang}->{s.tgt_lang}: {len(self.train_index)} training pairs"
            + (f" ({self.dropped} longer than max_len={s.max_len} left out)" if self.dropped else "")
            + f", {len(self.val)} validation; vocabulary {len(self.src_vocab)}"
            + (" shared" if shared else f"/{len(self.tgt_vocab)}")
        )


def shakespeare_text(data_dir: str | None = None) -> str:
    path = Path(data_dir or default_data_dir()) / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        raise FileNotFoundError(f"tiny Shakespeare not found at {path}; set ATTNLAB_DATA or --data-dir")
    return path.read_text(encoding="utf-8")


class LanguageModelTask(Task):
    """Next-character prediction on tiny Shakespeare, split 90/10 into training and validation."""

    kind = "lm"
    best_metric = "val_loss"
    higher_is_better = False
    plot_metrics = ("train_loss", "val_loss")

    def __init__(self, config: TrainConfig, vocab: dict[str, Any] | None = None, *, progress: bool = False) -> None:
        if not isinstance(config.task, LanguageModelSettings):
            raise ValueError(f"LanguageModelTask needs language-model settings, got {config.kind!r}")
        self.config, self.settings = config, config.task
        text = shakespeare_text(self.settings.data_dir or None)
        self.vocab: BaseVocab = CharVocab.build(text) if vocab is None else vocabs_from_dict(vocab)[0]
        ids = torch.tensor(self.vocab.encode(text), dtype=torch.long)
        split = int(0.9 * len(ids))
        self.train_ids, self.val_ids = ids[:split], ids[split:]
        context = self.settings.context
        for name, part in (("training", self.train_ids), ("validation", self.val_ids)):
            if len(part) <= context + 1:
                raise ValueError(f"the {name} text ({len(part)} tokens) is shorter than one context of {context}")

    def vocab_json(self) -> dict[str, Any]:
        return vocabs_to_dict(self.vocab, self.vocab)

    def model_config(self) -> LanguageModelConfig:
        c, s = self.config, self.settings
        return LanguageModelConfig(
            vocab_size=len(self.vocab), d_model=c.d_model, num_heads=c.num_heads, num_layers=s.num_layers,
            d_ff=c.d_ff, dropout=c.dropout, max_len=s.context, norm_first=c.norm_first,
            tie_embeddings=c.share_embeddings, pad_id=self.vocab.pad_id,
        )

    def build_model(self) -> DecoderOnlyTransformer:
        return DecoderOnlyTransformer(self.model_config())

    def batches(self, epoch: int) -> list[list[int]]:
        """Random window starts, ``batch_size`` per batch, repeatable from (seed, epoch)."""
        s = self.settings
        per_epoch = max(1, len(self.train_ids) // (s.batch_size * s.context))
        rng = random.Random(self.config.seed * 1000003 + epoch)
        high = len(self.train_ids) - s.context - 1
        return [[rng.randint(0, high) for _ in range(s.batch_size)] for _ in range(per_epoch)]

    def to_tensors(self, batch: list[int], device: torch.device) -> tuple[Tensor, Tensor]:
        T = self.settings.context
        x = torch.stack([self.train_ids[s : s + T] for s in batch])  # (B, T)
        y = torch.stack([self.train_ids[s + 1 : s + T + 1] for s in batch])  # (B, T)
        return x.to(device), y.to(device)

    def loss(self, model: nn.Module, tensors: tuple[Tensor, Tensor]) -> LossStats:
        x, y = tensors
        hidden = model(x, features_only=True)  # (B, T, E), as in TranslationTask.loss
        output = getattr(model, "module", model).output
        loss_sum, n = linear_cross_entropy(
            hidden, output.weight, output.bias, y, self.vocab.pad_id, self.config.label_smoothing
        )
        return LossStats(loss_sum, n, x.numel())

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Mean next-character loss over the validation text in consecutive windows."""
        T = self.settings.context
        n = (len(self.val_ids) - 1) // T
        x = self.val_ids[: n * T].view(n, T)
        y = self.val_ids[1 : n * T + 1].view(n, T)
        total = 0.0
        with _evaluation_mode(model):
            for k in range(0, n, 64):
                logits = model(x[k : k + 64].to(device))
                loss_sum, _ = label_smoothed_loss(logits, y[k : k + 64].to(device), -100, 0.0)
                total += float(loss_sum)
        return {"val_loss": round(total / (n * T), 4)}

    def describe(self) -> str:
        return (f"tiny Shakespeare, characters: {len(self.train_ids):,} training, "
                f"{len(self.val_ids):,} validation; vocabulary {len(self.vocab)}")


TASKS: dict[str, type[TranslationTask] | type[LanguageModelTask]] = {
    TranslationTask.kind: TranslationTask,
    LanguageModelTask.kind: LanguageModelTask,
}


def build_task(config: TrainConfig, vocab: dict[str, Any] | None = None, *, progress: bool = False) -> Task:
    """The task a config asks for; ``vocab`` (from a checkpoint) must match the data's vocabulary.

    The task's ``config`` is the run's, completed from its data (a prepared dataset's languages).
    ``progress`` shows a bar while Multi30k is prepared on first use.
    """
    return TASKS[config.kind](config, vocab, progress=progress)
