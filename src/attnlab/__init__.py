"""attnlab: the Transformer of "Attention Is All You Need", every building block readable and proven.

Masks everywhere in attnlab are boolean with True = may attend (see ``attnlab.attention``).

attnlab sets ``OMP_WAIT_POLICY=PASSIVE`` before PyTorch starts, unless it is already set: on a
machine whose cores are busy with other work, spinning OpenMP threads made a training step 3.3x
slower (12.2 s against 3.7 s, measured on this project's 2-core machine).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .nn.attention import (
    KV,
    MultiHeadAttention,
    SelfAttention,
    causal_mask,
    padding_mask,
    scaled_dot_product_attention,
    simple_self_attention,
)
from .nn.layers import (
    AddNorm,
    DecoderLayer,
    EncoderLayer,
    PositionalEncoding,
    PositionwiseFeedForward,
)
from .nn.model import DecoderState, Transformer, TransformerConfig

__version__ = "0.1.0"

__all__ = [
    "KV",
    "MultiHeadAttention",
    "SelfAttention",
    "causal_mask",
    "padding_mask",
    "scaled_dot_product_attention",
    "simple_self_attention",
    "AddNorm",
    "DecoderLayer",
    "EncoderLayer",
    "PositionalEncoding",
    "PositionwiseFeedForward",
    "DecoderState",
    "Transformer",
    "TransformerConfig",
]
