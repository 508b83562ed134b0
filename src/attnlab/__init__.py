"""attnlab: the Transformer of "Attention Is All You Need", every building block readable and proven.

Masks everywhere in attnlab are boolean with True = may attend (see ``attnlab.nn.attention``).

The package is layered (see ``pyproject.toml``'s import contract): ``nn`` (attention, layers,
models), ``store`` (atomic files, checkpoints), ``data`` (corpora, vocabularies, batches),
``decode`` (search, translation, generation), ``inspect`` (worked examples, plots, report),
``train`` (settings, tasks, the Trainer) and ``app`` (the command line). The building blocks are
re-exported here and loaded on first use, so ``import attnlab`` has no side effects and does not
start PyTorch until a name is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_EXPORTS = {
    "AttentionOutput": "nn.attention",
    "KV": "nn.attention",
    "MultiHeadAttention": "nn.attention",
    "SelfAttention": "nn.attention",
    "causal_mask": "nn.attention",
    "padding_mask": "nn.attention",
    "scaled_dot_product_attention": "nn.attention",
    "simple_self_attention": "nn.attention",
    "AddNorm": "nn.layers",
    "DecoderLayer": "nn.layers",
    "EncoderLayer": "nn.layers",
    "PositionalEncoding": "nn.layers",
    "PositionwiseFeedForward": "nn.layers",
    "DecoderState": "nn.model",
    "Encoded": "nn.model",
    "Transformer": "nn.model",
    "TransformerConfig": "nn.model",
    "DecoderOnlyTransformer": "nn.model",
    "LanguageModelConfig": "nn.model",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'attnlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .nn.attention import (  # noqa: F401
        KV,
        AttentionOutput,
        MultiHeadAttention,
        SelfAttention,
        causal_mask,
        padding_mask,
        scaled_dot_product_attention,
        simple_self_attention,
    )
    from .nn.layers import (  # noqa: F401
        AddNorm,
        DecoderLayer,
        EncoderLayer,
        PositionalEncoding,
        PositionwiseFeedForward,
    )
    from .nn.model import (  # noqa: F401
        DecoderOnlyTransformer,
        DecoderState,
        Encoded,
        LanguageModelConfig,
        Transformer,
        TransformerConfig,
    )
