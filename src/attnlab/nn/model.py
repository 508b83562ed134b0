"""The encoder-decoder Transformer of "Attention Is All You Need", and its configuration.

The encoder reads the source sentence; the decoder writes the target one token at a time, attending
to its own earlier tokens (masked self-attention) and to the encoder output (cross-attention).
Masks follow attnlab's one rule: boolean, True = may attend.

Incremental decoding keeps no state on the modules: ``start_decoding`` returns a ``DecoderState``
(the cross-attention keys/values, computed once, and an empty self-attention cache) and
``decode_step`` takes a state and returns logits with the grown state.

Shape legend: B batch, S source length, T target length, H heads, E model dim, V vocab size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .attention import KV, _check_token_ids, causal_mask, padding_mask
from .layers import DecoderLayer, EncoderLayer, PositionalEncoding

__all__ = [
    "TransformerConfig", "Transformer", "DecoderState", "TokenEmbedding",
    "LanguageModelConfig", "DecoderOnlyTransformer", "LMState",
]


class _ModelConfig:
    """What both model configs share: checks of their sizes, and conversion to and from JSON dicts."""

    def _check(self, positive: tuple[str, ...]) -> None:
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.num_heads != 0:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return cls(**data)


@dataclass(frozen=True)
class TransformerConfig(_ModelConfig):
    """Sizes and switches of an encoder-decoder Transformer. Defaults are the paper's base model."""

    src_vocab_size: int
    tgt_vocab_size: int
    d_model: int = 512
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    d_ff: int = 2048
    dropout: float = 0.1
    max_len: int = 1000
    norm_first: bool = False
    share_embeddings: bool = False
    pad_id: int = 0

    def __post_init__(self) -> None:
        self._check(("src_vocab_size", "tgt_vocab_size", "d_model", "num_heads", "d_ff", "max_len"))
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError(
                "share_embeddings needs one shared vocabulary, but src_vocab_size="
                f"{self.src_vocab_size} differs from tgt_vocab_size={self.tgt_vocab_size}"
            )
        if not 0 <= self.pad_id < min(self.src_vocab_size, self.tgt_vocab_size):
            raise ValueError(f"pad_id {self.pad_id} is outside the vocabulary")


def _init_weights(model: nn.Module) -> None:
    """Xavier-uniform matrices and zero biases; embeddings keep TokenEmbedding's own N(0, 1/d)."""
    for name, p in model.named_parameters():
        if p.dim() > 1 and "embed" not in name:
            nn.init.xavier_uniform_(p)
        elif name.endswith("bias"):
            nn.init.zeros_(p)


class TokenEmbedding(nn.Module):
    """Token ids to vectors, scaled by √d_model as in the paper. Shape: (B, T) -> (B, T, E)."""

    def __init__(self, vocab_size: int, d_model: int, pad_id: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.scale = math.sqrt(d_model)
        nn.init.normal_(self.embedding.weight, std=d_model**-0.5)
        with torch.no_grad():
            self.embedding.weight[pad_id].zero_()

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.numel() and int(tokens.max()) >= self.embedding.num_embeddings:
            raise ValueError(
                f"token id {int(tokens.max())} is outside the vocabulary of "
                f"{self.embedding.num_embeddings} tokens"
            )
        return self.embedding(tokens) * self.scale


def _step_mask(T_new: int, cached: int, device: torch.device) -> Tensor | None:
    """Causal mask of T_new new positions after ``cached`` ones; one new position sees them all."""
    if T_new == 1:
        return None
    return causal_mask(T_new, cached + T_new, device=device)  # (T_new, cached + T_new)


class DecoderState(NamedTuple):
    """What incremental decoding carries from step to step, as a value (never stored on modules)."""

    memory_kv: tuple[KV, ...]  # per decoder layer: cross-attention keys/values, (B, H, S, D)
    self_kv: tuple[KV, ...] | None  # per decoder layer: self-attention cache, (B, H, t, D)
    src_mask: Tensor  # (B, 1, 1, S)
    length: int  # target positions decoded so far

    def select(self, index: Tensor) -> "DecoderState":
        """Keep (or repeat, or reorder) batch rows: beam search follows each beam's parent this way."""
        self_kv = None if self.self_kv is None else tuple(kv.select(index) for kv in self.self_kv)
        return DecoderState(
            tuple(kv.select(index) for kv in self.memory_kv),
            self_kv,
            self.src_mask.index_select(0, index),
            self.length,
        )


class Transformer(nn.Module):
    """The encoder-decoder Transformer.

    Example:
        >>> cfg = TransformerConfig(src_vocab_size=100, tgt_vocab_size=100, d_model=32,
        ...                         num_heads=4, num_encoder_layers=2, num_decoder_layers=2, d_ff=64)
        >>> model = Transformer(cfg)
        >>> src = torch.randint(1, 100, (2, 7)); tgt = torch.randint(1, 100, (2, 5))
        >>> model(src, tgt).shape
        torch.Size([2, 5, 100])
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.src_embed = TokenEmbedding(c.src_vocab_size, c.d_model, c.pad_id)
        self.tgt_embed = self.src_embed if c.share_embeddings else TokenEmbedding(
            c.tgt_vocab_size, c.d_model, c.pad_id
        )
        self.positional = PositionalEncoding(c.d_model, c.dropout, c.max_len)
        self.encoder_layers = nn.ModuleList(
            EncoderLayer(c.d_model, c.num_heads, c.d_ff, c.dropout, c.norm_first)
            for _ in range(c.num_encoder_layers)
        )
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(c.d_model, c.num_heads, c.d_ff, c.dropout, c.norm_first)
            for _ in range(c.num_decoder_layers)
        )
        # Pre-LN stacks end with a LayerNorm of their own; post-LN layers already end normalised.
        self.encoder_norm = nn.LayerNorm(c.d_model) if c.norm_first else nn.Identity()
        self.decoder_norm = nn.LayerNorm(c.d_model) if c.norm_first else nn.Identity()
        self.output = nn.Linear(c.d_model, c.tgt_vocab_size)
        _init_weights(self)
        if c.share_embeddings:
            self.output.weight = self.tgt_embed.embedding.weight

    # -- encoder ---------------------------------------------------------------------------
    def encode(
        self, src: Tensor, src_mask: Tensor | None = None, need_weights: bool = False
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Source ids (B, S) -> memory (B, S, E); with ``need_weights`` also a list of (B, H, S, S)."""
        _check_token_ids(src, "src")
        src_mask = padding_mask(src, self.config.pad_id) if src_mask is None else src_mask
        x = self.positional(self.src_embed(src))  # (B, S, E)
        weights = []
        for layer in self.encoder_layers:
            x, _, w = layer.run(x, src_mask, need_weights=need_weights)
            weights.append(w)
        memory = self.encoder_norm(x)
        return (memory, weights) if need_weights else memory

    # -- decoder ---------------------------------------------------------------------------
    def decode(
        self,
        tgt: Tensor,
        memory: Tensor,
        src_mask: Tensor | None = None,
        tgt_mask: Tensor | None = None,
        need_weights: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, list[Tensor]]]:
        """Target ids (B, T) and memory (B, S, E) -> logits (B, T, V).

        ``src_mask`` defaults to attending every memory position; ``tgt_mask`` defaults to causal
        plus target padding. With ``need_weights`` also returns {"self": [(B, H, T, T)],
        "cross": [(B, H, T, S)]}, one entry per layer.
        """
        _check_token_ids(tgt, "tgt")
        if memory.size(0) != tgt.size(0):
            raise ValueError(f"tgt has batch {tgt.size(0)} but memory has batch {memory.size(0)}")
        if tgt_mask is None:
            T = tgt.size(1)
            tgt_mask = causal_mask(T, device=tgt.device) & padding_mask(tgt, self.config.pad_id)
        state = self.start_decoding(memory, src_mask)
        logits, _, weights = self._decode_layers(tgt, state, tgt_mask, need_weights, keep_cache=False)
        return (logits, weights) if need_weights else logits

    def start_decoding(self, memory: Tensor, src_mask: Tensor | None = None) -> DecoderState:
        """Project every decoder layer's cross-attention keys/values once, for a whole decode."""
        if src_mask is None:
            src_mask = torch.ones(memory.size(0), 1, 1, memory.size(1), dtype=torch.bool, device=memory.device)
        memory_kv = tuple(layer.cross_attn.project_kv(memory, memory) for layer in self.decoder_layers)
        return DecoderState(memory_kv, None, src_mask, 0)

    def decode_step(
        self, tgt: Tensor, state: DecoderState, need_weights: bool = False
    ) -> tuple[Tensor, DecoderState] | tuple[Tensor, DecoderState, dict[str, list[Tensor]]]:
        """Decode the next positions ``tgt`` (B, T_new) given earlier ones cached in ``state``.

        Returns logits (B, T_new, V) and the state grown by T_new positions (and the weights when
        asked). Equal to ``decode`` over the whole prefix, at a fraction of the cost.
        """
        _check_token_ids(tgt, "tgt")
        self_mask = _step_mask(tgt.size(1), state.length, tgt.device)
        logits, new_state, weights = self._decode_layers(tgt, state, self_mask, need_weights, keep_cache=True)
        return (logits, new_state, weights) if need_weights else (logits, new_state)

    def _decode_layers(
        self, tgt: Tensor, state: DecoderState, self_mask: Tensor, need_weights: bool, keep_cache: bool
    ) -> tuple[Tensor, DecoderState, dict[str, list[Tensor]]]:
        x = self.positional(self.tgt_embed(tgt), start=state.length)  # (B, T, E)
        pasts = state.self_kv or (None,) * len(self.decoder_layers)
        new_kv, self_w, cross_w = [], [], []
        for layer, memory_kv, past in zip(self.decoder_layers, state.memory_kv, pasts):
            x, kv, sw, cw = layer.run(x, memory_kv, self_mask, state.src_mask, past, need_weights)
            new_kv.append(kv)
            self_w.append(sw)
            cross_w.append(cw)
        logits = self.output(self.decoder_norm(x))  # (B, T, V)
        new_state = state._replace(
            self_kv=tuple(new_kv) if keep_cache else None, length=state.length + tgt.size(1)
        )
        return logits, new_state, {"self": self_w, "cross": cross_w}

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        """Teacher forcing: source ids (B, S) and target input ids (B, T) -> logits (B, T, V)."""
        _check_token_ids(src, "src")
        src_mask = padding_mask(src, self.config.pad_id)  # (B, 1, 1, S)
        memory = self.encode(src, src_mask)
        return self.decode(tgt, memory, src_mask)


@dataclass(frozen=True)
class LanguageModelConfig(_ModelConfig):
    """Sizes of a decoder-only (GPT-style) language model. ``max_len`` is its context window."""

    vocab_size: int
    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 4
    d_ff: int = 512
    dropout: float = 0.0
    max_len: int = 64
    norm_first: bool = True
    tie_embeddings: bool = True
    pad_id: int = 0

    def __post_init__(self) -> None:
        self._check(("vocab_size", "d_model", "num_heads", "num_layers", "d_ff", "max_len"))


class LMState(NamedTuple):
    """The KV cache of a decoder-only model: one self-attention entry per layer, as a value."""

    self_kv: tuple[KV, ...] | None  # per layer, (B, H, t, D)
    length: int  # positions cached so far

    def select(self, index: Tensor) -> "LMState":
        self_kv = None if self.self_kv is None else tuple(kv.select(index) for kv in self.self_kv)
        return LMState(self_kv, self.length)


class DecoderOnlyTransformer(nn.Module):
    """A GPT-style language model: the encoder layer's blocks under a causal mask, no cross-attention.

    Shape: tokens (B, T) -> logits (B, T, V). ``step`` decodes new positions with a KV cache.

    Example:
        >>> lm = DecoderOnlyTransformer(LanguageModelConfig(vocab_size=65))
        >>> lm(torch.randint(0, 65, (2, 16))).shape
        torch.Size([2, 16, 65])
    """

    def __init__(self, config: LanguageModelConfig) -> None:
        super().__init__()
        self.config = c = config
        self.embed = TokenEmbedding(c.vocab_size, c.d_model, c.pad_id)
        self.positional = PositionalEncoding(c.d_model, c.dropout, c.max_len)
        self.layers = nn.ModuleList(
            EncoderLayer(c.d_model, c.num_heads, c.d_ff, c.dropout, c.norm_first) for _ in range(c.num_layers)
        )
        self.norm = nn.LayerNorm(c.d_model) if c.norm_first else nn.Identity()
        self.output = nn.Linear(c.d_model, c.vocab_size, bias=False)
        _init_weights(self)
        if c.tie_embeddings:
            self.output.weight = self.embed.embedding.weight

    def forward(self, tokens: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Logits for every position (B, T, V); with ``need_weights`` also (B, H, T, T) per layer."""
        logits, _, weights = self._run(tokens, LMState(None, 0), need_weights, keep_cache=False)
        return (logits, weights) if need_weights else logits

    def start(self) -> LMState:
        """An empty cache."""
        return LMState(None, 0)

    def step(self, tokens: Tensor, state: LMState) -> tuple[Tensor, LMState]:
        """Logits (B, T_new, V) of new positions ``tokens`` (B, T_new) after the cached ones."""
        logits, state, _ = self._run(tokens, state, False, keep_cache=True)
        return logits, state

    def _run(
        self, tokens: Tensor, state: LMState, need_weights: bool, keep_cache: bool
    ) -> tuple[Tensor, LMState, list[Tensor]]:
        _check_token_ids(tokens, "tokens")
        T = tokens.size(1)
        mask = _step_mask(T, state.length, tokens.device)
        x = self.positional(self.embed(tokens), start=state.length)  # (B, T, E)
        pasts = state.self_kv or (None,) * len(self.layers)
        new_kv, weights = [], []
        for layer, past in zip(self.layers, pasts):
            x, kv, w = layer.run(x, mask, past, need_weights)
            new_kv.append(kv)
            weights.append(w)
        logits = self.output(self.norm(x))  # (B, T, V)
        new_state = LMState(tuple(new_kv) if keep_cache else None, state.length + T)
        return logits, new_state, weights
