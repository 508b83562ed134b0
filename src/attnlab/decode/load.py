"""Loading a trained model for inference: the one sequence every command and API goes through.

A checkpoint (or a run directory, resolved through its ``checkpoints.json``) holds
``config.json`` (its kind and model sizes), ``vocab.json`` and ``model.safetensors``.
``load_checkpoint`` reads them in that order, builds the model its kind names, loads the weights
and returns everything in evaluation mode; ``load_translator`` and ``load_language_model`` are
thin views of it for the two kinds.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, NamedTuple, get_type_hints

import torch
from torch import nn

from ..data.vocab import BaseVocab, vocabs_from_dict
from ..nn.model import (
    DecoderOnlyTransformer,
    LanguageModelConfig,
    Transformer,
    TransformerConfig,
)
from ..store.checkpoint import (
    CheckpointError,
    load_model_state,
    read_checkpoint_json,
    resolve_checkpoint,
)
from ..store.fields import fits

__all__ = ["KINDS", "LoadedModel", "load_checkpoint"]

# kind in config.json -> (model class, its config class, what a user calls it)
KINDS: dict[str, tuple[type[nn.Module], Any, str]] = {
    "translation": (Transformer, TransformerConfig, "translation model"),
    "lm": (DecoderOnlyTransformer, LanguageModelConfig, "language model"),
}


class LoadedModel(NamedTuple):
    """A model ready for inference, with what came with it."""

    directory: Path  # the checkpoint directory it came from
    kind: str  # "translation" or "lm"
    model: nn.Module  # in evaluation mode, on the asked device
    src_vocab: BaseVocab
    tgt_vocab: BaseVocab  # the same object as src_vocab when shared (and for language models)
    config: dict[str, Any]  # the checkpoint's config.json

    @property
    def languages(self) -> tuple[str, str]:
        """(source, target) language codes a translation model was trained on."""
        train = self.config.get("train") or {}
        section = train.get("task") if isinstance(train.get("task"), dict) else train  # flat before 0.2
        try:
            return section["src_lang"], section["tgt_lang"]
        except (KeyError, TypeError):
            raise CheckpointError(f"{self.directory}/config.json names no source and target language") from None


def load_checkpoint(
    path: str | Path, kind: str | None = None, *, device: str | torch.device = "cpu", which: str = "model"
) -> LoadedModel:
    """Load the checkpoint at ``path`` (a checkpoint or a run directory; ``which``: model, best, last).

    ``kind`` ("translation" or "lm"), when given, must match the checkpoint's: a clear error says
    what the checkpoint holds instead.
    """
    directory = resolve_checkpoint(Path(path), which)
    config = read_checkpoint_json(directory, "config.json")
    found = config.get("kind") if isinstance(config, dict) else None
    if found not in KINDS:
        raise CheckpointError(f"{directory}/config.json: 'kind' must be one of {sorted(KINDS)}, got {found!r}")
    if kind is not None and found != kind:
        raise CheckpointError(f"{directory} holds a {KINDS[found][2]}, not a {KINDS[kind][2]}")
    model_class, config_class, _ = KINDS[found]
    model = model_class(_model_config(config_class, config.get("model"), directory / "config.json"))
    src_vocab, tgt_vocab = _vocabularies(read_checkpoint_json(directory, "vocab.json"), directory / "vocab.json")
    _check_sizes(model, src_vocab, tgt_vocab, directory)
    load_model_state(model, directory)
    return LoadedModel(directory, found, model.to(device).eval(), src_vocab, tgt_vocab, config)


def _model_config(config_class: Any, data: Any, source: Path) -> Any:
    """The model's config from ``config.json``'s "model" object, every field's type checked."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{source}: 'model' must be an object of model sizes, got {type(data).__name__}")
    hints = get_type_hints(config_class)
    names = {f.name for f in fields(config_class)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise CheckpointError(f"{source}: model: unknown fields {unknown}")
    for name, value in data.items():
        if not fits(hints[name], value):
            raise CheckpointError(f"{source}: model: field {name!r} must be {hints[name].__name__}, got {value!r}")
    try:
        return config_class.from_dict(data)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: model: {e}") from None


def _vocabularies(data: Any, source: Path) -> tuple[BaseVocab, BaseVocab]:
    if not isinstance(data, dict) or "src" not in data:
        raise CheckpointError(f"{source}: expected an object with a 'src' vocabulary (and 'tgt' when not shared)")
    try:
        return vocabs_from_dict(data)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: not a vocabulary attnlab can read ({e})") from None


def _check_sizes(model: nn.Module, src_vocab: BaseVocab, tgt_vocab: BaseVocab, directory: Path) -> None:
    """The vocabularies must be the ones the model was built for."""
    c = model.config
    sizes = ({"vocab_size": (len(src_vocab), c.vocab_size)} if hasattr(c, "vocab_size")
             else {"src_vocab_size": (len(src_vocab), c.src_vocab_size), "tgt_vocab_size": (len(tgt_vocab), c.tgt_vocab_size)})
    for name, (vocab, model_size) in sizes.items():
        if vocab != model_size:
            raise CheckpointError(f"{directory}: vocab.json has {vocab} tokens but config.json's {name} is "
                                  f"{model_size}: the files come from different models")
