"""The encoder-decoder Transformer of "Attention Is All You Need", and its configuration.

The encoder reads the source sentence; the decoder writes the target one token at a time, attending
to its own earlier tokens (masked self-attention) and to the encoder output (cross-attention).
Masks follow attnlab's one rule: boolean, True = may attend.

``encode`` returns an ``Encoded``: the memory together with the source mask it was made under,
which ``decode`` and ``start_decoding`` take, so that the decoder always masks the source padding.
Every method returns one type whatever its flags (``Encoded``, ``Decoded``, ``DecodeStep``), with
the attention weights None unless ``need_weights=True`` asked for them.

Incremental decoding keeps no state on the modules: ``start_decoding`` returns a ``DecoderState``
(the cross-attention keys/values, computed once, and an empty self-attention cache) and
``decode_step`` takes a state and returns logits with the grown state.

The models check their inputs (token ids, masks) once, at their public methods; the layers and
attention modules they call trust them.

Shape legend: B batch, S source length, T target length, H heads, E model dim, V vocab size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .attention import KV, _check_mask, _check_token_ids, causal_mask
from .layers import DecoderLayer, EncoderLayer, PositionalEncoding

__all__ = [
    "TransformerConfig", "Transformer", "Encoded", "Decoded", "DecoderState", "DecodeStep",
    "TokenEmbedding", "LanguageModelConfig", "DecoderOnlyTransformer", "LMState", "LMOutput",
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
    """Xavier-uniform matrices and zero biases; embeddings keep TokenEmbedding's own N(0, 1/d).

    A fused Q/K/V projection is initialised as the three (E, E) matrices it holds, each by its own
    fan-in and fan-out, as separate W_q, W_k and W_v would be.
    """
    for name, p in model.named_parameters():
        if p.dim() > 1 and "embed" not in name:
            for matrix in p.chunk(3) if name.endswith("in_proj_weight") else (p,):
                nn.init.xavier_uniform_(matrix)
        elif name.endswith("bias"):
            nn.init.zeros_(p)


def _check_tokens(tokens: Tensor, name: str, vocab_size: int) -> None:
    """The models' one check of token ids, made at their entry points: integers, (B, L), in range."""
    _check_token_ids(tokens, name)
    if tokens.numel():
        low, high = torch.stack(torch.aminmax(tokens)).tolist()  # one trip to the host
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"{name}: token ids must be in 0..{vocab_size - 1} (the model's vocabulary), "
                f"got ids {low}..{high}"
            )


class TokenEmbedding(nn.Module):
    """Token ids to vectors, scaled by √d_model as in the paper. Shape: (B, T) -> (B, T, E).

    The ids are not checked here (that would cost a trip to the host per call): the models check
    them once, at their entry points.
    """

    def __init__(self, vocab_size: int, d_model: int, pad_id: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.scale = math.sqrt(d_model)
        nn.init.normal_(self.embedding.weight, std=d_model**-0.5)
        with torch.no_grad():
            self.embedding.weight[pad_id].zero_()

    def forward(self, tokens: Tensor) -> Tensor:
        return self.embedding(tokens) * self.scale


def _step_mask(T_new: int, cached: int, device: torch.device) -> Tensor | None:
    """Causal mask of T_new new positions after ``cached`` ones; one new position sees them all."""
    if T_new == 1:
        return None
    return causal_mask(T_new, cached + T_new, device=device)  # (T_new, cached + T_new)


class Encoded(NamedTuple):
    """The encoder's output together with the source mask it was made under.

    The decoder reads the mask from here (``decode``, ``start_decoding``), so no path can forget
    the source padding: ``decode(tgt, encode(src))`` is exactly ``forward(src, tgt)``.
    """

    memory: Tensor  # (B, S, E)
    src_mask: Tensor  # (B, 1, 1, S), True = a source position the decoder may attend to
    weights: list[Tensor] | None  # per encoder layer (B, H, S, S) with need_weights=True, else None

    def select(self, index: Tensor) -> "Encoded":
        """Keep (or repeat, or reorder) batch rows, as ``DecoderState.select`` does."""
        weights = None if self.weights is None else [w.index_select(0, index) for w in self.weights]
        return Encoded(self.memory.index_select(0, index), self.src_mask.index_select(0, index), weights)


class Decoded(NamedTuple):
    """What ``decode`` returns: logits, and every layer's attention weights when asked for."""

    logits: Tensor  # (B, T, V)
    self_weights: list[Tensor] | None  # per decoder layer (B, H, T, T), or None
    cross_weights: list[Tensor] | None  # per decoder layer (B, H, T, S), or None


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


class DecodeStep(NamedTuple):
    """What ``decode_step`` returns: the new positions' logits, the grown state, weights if asked."""

    logits: Tensor  # (B, T_new, V)
    state: DecoderState  # grown by T_new positions
    self_weights: list[Tensor] | None  # per decoder layer (B, H, T_new, t + T_new), or None
    cross_weights: list[Tensor] | None  # per decoder layer (B, H, T_new, S), or None


class Transformer(nn.Module):
    """The encoder-decoder Transformer.

    Entry points (each checks its inputs once; the layers below trust them): ``forward`` for
    teacher forcing; ``encode`` then ``decode`` for the two halves; ``encode``, ``start_decoding``
    and ``decode_step`` for incremental decoding with a cache.

    Example:
        >>> cfg = TransformerConfig(src_vocab_size=100, tgt_vocab_size=100, d_model=32,
        ...                         num_heads=4, num_encoder_layers=2, num_decoder_layers=2, d_ff=64)
        >>> model = Transformer(cfg)
        >>> src = torch.randint(1, 100, (2, 7)); tgt = torch.randint(1, 100, (2, 5))
        >>> model(src, tgt).shape
        torch.Size([2, 5, 100])
        >>> model.decode(tgt, model.encode(src)).logits.shape
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

    # -- the checks of the entry points ----------------------------------------------------
    def _src_mask(self, src: Tensor) -> Tensor:
        return (src != self.config.pad_id)[:, None, None, :]  # (B, 1, 1, S)

    def _tgt_mask(self, tgt: Tensor) -> Tensor:
        T = tgt.size(1)
        return causal_mask(T, device=tgt.device) & (tgt != self.config.pad_id)[:, None, None, :]  # (B, 1, T, T)

    def _check_encoded(self, encoded: Encoded, batch: int | None = None) -> None:
        if not isinstance(encoded, Encoded):
            raise TypeError(
                "expected the Encoded that encode() returns (the memory with its source mask), "
                f"got {type(encoded).__name__}"
            )
        memory, src_mask = encoded.memory, encoded.src_mask
        if memory.dim() != 3 or memory.size(-1) != self.config.d_model:
            raise ValueError(f"memory must have shape (batch, length, {self.config.d_model}), got {tuple(memory.shape)}")
        if src_mask.dtype != torch.bool or src_mask.shape != (memory.size(0), 1, 1, memory.size(1)):
            raise ValueError(
                f"src_mask must be boolean of shape {(memory.size(0), 1, 1, memory.size(1))}, "
                f"got {src_mask.dtype} {tuple(src_mask.shape)}"
            )
        if batch is not None and batch != memory.size(0):
            raise ValueError(f"tgt has batch {batch} but the encoded source has batch {memory.size(0)}")

    # -- encoder ---------------------------------------------------------------------------
    def encode(self, src: Tensor, src_mask: Tensor | None = None, need_weights: bool = False) -> Encoded:
        """Source ids (B, S) -> ``Encoded(memory (B, S, E), src_mask (B, 1, 1, S), weights)``.

        ``src_mask`` defaults to the source's padding mask; one given must broadcast to
        (B, 1, 1, S). With ``need_weights`` the weights are a list of (B, H, S, S), one per layer.
        """
        _check_tokens(src, "src", self.config.src_vocab_size)
        B, S = src.shape
        if src_mask is None:
            src_mask = self._src_mask(src)
        else:
            _check_mask(src_mask, (B, 1, 1, S), "src_mask")
            src_mask = src_mask.expand(B, 1, 1, S)
        return self._encode(src, src_mask, need_weights)

    def _encode(self, src: Tensor, src_mask: Tensor, need_weights: bool) -> Encoded:
        x = self.positional(self.src_embed(src))  # (B, S, E)
        weights = []
        for layer in self.encoder_layers:
            x, _, w = layer.run(x, src_mask, need_weights=need_weights)
            weights.append(w)
        return Encoded(self.encoder_norm(x), src_mask, weights if need_weights else None)

    # -- decoder ---------------------------------------------------------------------------
    def decode(
        self, tgt: Tensor, encoded: Encoded, tgt_mask: Tensor | None = None, need_weights: bool = False
    ) -> Decoded:
        """Target ids (B, T) and the encoded source -> ``Decoded(logits (B, T, V), weights...)``.

        The source mask comes with ``encoded``; ``tgt_mask`` defaults to causal plus target padding.
        With ``need_weights`` the self- and cross-attention weights of every layer come back too,
        (B, H, T, T) and (B, H, T, S).
        """
        _check_tokens(tgt, "tgt", self.config.tgt_vocab_size)
        self._check_encoded(encoded, tgt.size(0))
        if tgt_mask is None:
            tgt_mask = self._tgt_mask(tgt)
        else:
            _check_mask(tgt_mask, (tgt.size(0), self.config.num_heads, tgt.size(1), tgt.size(1)), "tgt_mask")
        return self._decode(tgt, encoded, tgt_mask, need_weights)

    def _decode(self, tgt: Tensor, encoded: Encoded, tgt_mask: Tensor, need_weights: bool) -> Decoded:
        state = self._start_decoding(encoded)
        logits, _, self_weights, cross_weights = self._decode_layers(
            tgt, state, tgt_mask, need_weights, keep_cache=False
        )
        return Decoded(logits, self_weights, cross_weights)

    def start_decoding(self, encoded: Encoded) -> DecoderState:
        """Project every decoder layer's cross-attention keys/values once, for a whole decode."""
        self._check_encoded(encoded)
        return self._start_decoding(encoded)

    def _start_decoding(self, encoded: Encoded) -> DecoderState:
        memory = encoded.memory
        memory_kv = tuple(layer.cross_attn._project_kv(memory, memory) for layer in self.decoder_layers)
        return DecoderState(memory_kv, None, encoded.src_mask, 0)

    def decode_step(self, tgt: Tensor, state: DecoderState, need_weights: bool = False) -> DecodeStep:
        """Decode the next positions ``tgt`` (B, T_new) given earlier ones cached in ``state``.

        Returns ``DecodeStep(logits (B, T_new, V), state grown by T_new, weights...)``. Equal to
        ``decode`` over the whole prefix, at a fraction of the cost.
        """
        _check_tokens(tgt, "tgt", self.config.tgt_vocab_size)
        if tgt.size(0) != state.src_mask.size(0):
            raise ValueError(f"tgt has batch {tgt.size(0)} but the state has batch {state.src_mask.size(0)}")
        self_mask = _step_mask(tgt.size(1), state.length, tgt.device)
        return DecodeStep(*self._decode_layers(tgt, state, self_mask, need_weights, keep_cache=True))

    def _decode_layers(
        self, tgt: Tensor, state: DecoderState, self_mask: Tensor | None, need_weights: bool, keep_cache: bool
    ) -> tuple[Tensor, DecoderState, list[Tensor] | None, list[Tensor] | None]:
        hidden, new_state, self_w, cross_w = self._decoder_stack(tgt, state, self_mask, need_weights, keep_cache)
        return self.output(hidden), new_state, self_w, cross_w  # logits (B, T, V)

    def _decoder_stack(
        self, tgt: Tensor, state: DecoderState, self_mask: Tensor | None, need_weights: bool, keep_cache: bool
    ) -> tuple[Tensor, DecoderState, list[Tensor] | None, list[Tensor] | None]:
        """The decoder layers, up to the final hidden states (B, T, E) that the output layer reads."""
        x = self.positional(self.tgt_embed(tgt), start=state.length)  # (B, T, E)
        pasts = state.self_kv or (None,) * len(self.decoder_layers)
        new_kv, self_w, cross_w = [], [], []
        for layer, memory_kv, past in zip(self.decoder_layers, state.memory_kv, pasts):
            x, kv, sw, cw = layer.run(x, memory_kv, self_mask, state.src_mask, past, need_weights)
            new_kv.append(kv)
            self_w.append(sw)
            cross_w.append(cw)
        hidden = self.decoder_norm(x)  # (B, T, E)
        new_state = state._replace(
            self_kv=tuple(new_kv) if keep_cache else None, length=state.length + tgt.size(1)
        )
        if not need_weights:
            return hidden, new_state, None, None
        return hidden, new_state, self_w, cross_w

    def forward(self, src: Tensor, tgt: Tensor, *, features_only: bool = False) -> Tensor:
        """Teacher forcing: source ids (B, S) and target input ids (B, T) -> logits (B, T, V).

        With ``features_only=True`` it returns the decoder's final hidden states (B, T, E) instead,
        the input of the output layer (the logits are ``model.output(hidden)``), from which
        ``attnlab.train.losses.linear_cross_entropy`` computes the training loss without the
        logits. It is a switch of ``forward`` rather than a method of its own because
        DistributedDataParallel synchronises gradients only for what runs through ``forward``.
        """
        _check_tokens(src, "src", self.config.src_vocab_size)
        _check_tokens(tgt, "tgt", self.config.tgt_vocab_size)
        if src.size(0) != tgt.size(0):
            raise ValueError(f"src has batch {src.size(0)} but tgt has batch {tgt.size(0)}")
        encoded = self._encode(src, self._src_mask(src), need_weights=False)
        state = self._start_decoding(encoded)
        hidden, _, _, _ = self._decoder_stack(tgt, state, self._tgt_mask(tgt), need_weights=False, keep_cache=False)
        return hidden if features_only else self.output(hidden)  # (B, T, E) or (B, T, V)


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


class LMOutput(NamedTuple):
    """``DecoderOnlyTransformer.forward_with_weights``'s result."""

    logits: Tensor  # (B, T, V)
    weights: list[Tensor]  # per layer (B, H, T, T)


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

    def forward(self, tokens: Tensor, *, features_only: bool = False) -> Tensor:
        """Logits for every position: tokens (B, T) -> (B, T, V).

        With ``features_only=True``, the final hidden states (B, T, E) under the output layer
        instead, as ``Transformer.forward`` gives them (for the training loss).
        """
        _check_tokens(tokens, "tokens", self.config.vocab_size)
        hidden, _, _ = self._stack(tokens, LMState(None, 0), need_weights=False, keep_cache=False)
        return hidden if features_only else self.output(hidden)  # (B, T, E) or (B, T, V)

    def forward_with_weights(self, tokens: Tensor) -> LMOutput:
        """``forward``'s logits and every layer's attention weights (B, H, T, T), for inspection."""
        _check_tokens(tokens, "tokens", self.config.vocab_size)
        hidden, _, weights = self._stack(tokens, LMState(None, 0), need_weights=True, keep_cache=False)
        return LMOutput(self.output(hidden), weights)

    def start(self) -> LMState:
        """An empty cache."""
        return LMState(None, 0)

    def step(self, tokens: Tensor, state: LMState) -> tuple[Tensor, LMState]:
        """Logits (B, T_new, V) of new positions ``tokens`` (B, T_new) after the cached ones."""
        _check_tokens(tokens, "tokens", self.config.vocab_size)
        hidden, state, _ = self._stack(tokens, state, need_weights=False, keep_cache=True)
        return self.output(hidden), state

    def _stack(
        self, tokens: Tensor, state: LMState, need_weights: bool, keep_cache: bool
    ) -> tuple[Tensor, LMState, list[Tensor]]:
        """The layers, up to the final hidden states (B, T, E) that the output layer reads."""
        T = tokens.size(1)
        mask = _step_mask(T, state.length, tokens.device)
        x = self.positional(self.embed(tokens), start=state.length)  # (B, T, E)
        pasts = state.self_kv or (None,) * len(self.layers)
        new_kv, weights = [], []
        for layer, past in zip(self.layers, pasts):
            x, kv, w = layer.run(x, mask, past, need_weights)
            new_kv.append(kv)
            weights.append(w)
        new_state = LMState(tuple(new_kv) if keep_cache else None, state.length + T)
        return self.norm(x), new_state, weights  # (B, T, E)
