"""attnlab: the Transformer of "Attention Is All You Need", every building block readable and proven.

Masks everywhere in attnlab are boolean with True = may attend (see ``attnlab.attention``).
"""

from .attention import (
    KV,
    MultiHeadAttention,
    SelfAttention,
    causal_mask,
    padding_mask,
    scaled_dot_product_attention,
    simple_self_attention,
)
from .layers import (
    AddNorm,
    DecoderLayer,
    EncoderLayer,
    PositionalEncoding,
    PositionwiseFeedForward,
)
from .model import DecoderState, Transformer, TransformerConfig

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
