"""Translating sentences with a trained Transformer, and scoring translations with sacreBLEU.

``Translator`` turns text into token ids, runs greedy or beam search (``attnlab.decode.search``) in
length-sorted batches, and returns the translations in input order. Decoding runs the lean decoder
step of ``attnlab.nn.fast_decode`` with its KV cache, tested equal to the modules; ``use_cache=False``
is the modules' reference path, which re-runs the decoder over the whole prefix at every step.
``int8=True`` runs the lean step's matrix products and the encoder's feed-forward and Q/K/V ones on
int8 weights, with activations quantized as they run (CPU only): in attnlab's int8 kernel
(``fast_decode.Int8Linear``), or where its kernels are not built in PyTorch's, with the products too
small for that to pay on float32 copies (``fast_decode.int8_from_rows``); greedy search then
chooses from the output layer's int8 logits as the kernel forms them (``fast_decode.int8_pick``).

A source longer than the model's positions is cut, with a warning, in one place:
``Translator.encode_source``, which every decoding path (``translate``, ``explain``) goes through.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import sacrebleu
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.batching import pad_sequences
from ..data.vocab import BaseVocab
from ..errors import ConfigError
from ..nn import fast_decode, native
from ..nn.model import Encoded, Transformer
from .load import load_checkpoint
from .search import StepFn, beam_search, greedy_search

__all__ = ["DecodeConfig", "SearchStart", "Translator", "load_translator", "bleu_scores"]


# A decoding batch's default size, in source tokens times beams: length-sorted sentences join a batch
# while (sentences x beam) x (its longest source) stays within this budget, so that a batch of short
# sentences holds more of them. Measured on test_2016_flickr, one thread, against the earlier default
# of 256 decoder rows (64 sentences at beam 4, 256 greedy): beam 4 on runs/tiny 3.00 s against 3.34 s,
# runs/de-en 8.75 s against 9.65 s; greedy 0.98 s against 1.05 s (tiny), 3.21 s against 3.31 s (de-en).
# A budget of 32768 was no faster on runs/tiny and slower on runs/de-en (9.28 s beam, 3.49 s greedy).
DECODE_TOKENS = 16384
# ... and never more than this many decoder rows (sentences x beam): a batch of one-word sentences would
# otherwise hold thousands, each step's (rows, vocabulary) scores several hundred megabytes.
DECODE_ROWS = 1024
# Source tokens (padding included) encoded together: a decoding batch of 256 short sentences is encoded
# in pieces of about this many tokens, each padded to its own longest source, not to the batch's.
# Measured on test_2016_flickr in greedy batches of 256 sentences, one thread: runs/de-en encoded them in
# 1.08 s in pieces of 1024 tokens against 1.52 s whole (1.14 s at 256 tokens, 1.14 s at 2048), runs/tiny
# in 0.20 s against 0.30 s.
ENCODE_TOKENS = 1024


@dataclass(frozen=True)
class DecodeConfig:
    """How to search: beam size (1 = greedy), GNMT length penalty α, extra length past the source.

    ``extra_len`` is additive, as in the paper ("maximum output length to input length + 50"): a
    translation has at most source length + ``extra_len`` tokens (and never more than the model's
    positions allow). It is not fairseq's ``max_len_a``, which multiplies the source length.
    """

    beam_size: int = 4
    alpha: float = 0.6
    extra_len: int = 50  # maximum output length = source length + extra_len
    batch_size: int = 0  # sentences decoded together; 0: by tokens (DECODE_TOKENS and DECODE_ROWS, see batches)
    use_cache: bool = True

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        if self.batch_size < 0:
            raise ValueError(f"batch_size must be >= 1 (or 0: sized by tokens, see DecodeConfig.batches), got {self.batch_size}")
        if self.extra_len < 0:
            raise ValueError(f"extra_len must be >= 0, got {self.extra_len}")
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"alpha (the length penalty) must be a finite number >= 0, got {self.alpha}")


    def batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Indices of sentences of these (source) lengths, sorted by length and cut into batches:
        ``batch_size`` sentences each, or by default as many as keep sentences x beam x the batch's
        longest source within ``DECODE_TOKENS`` and sentences x beam within ``DECODE_ROWS`` (one
        sentence at least)."""
        order = sorted(range(len(lengths)), key=lambda j: lengths[j])
        if self.batch_size:
            return [order[k : k + self.batch_size] for k in range(0, len(order), self.batch_size)]
        sizes = [max(1, lengths[j]) for j in order]
        return [order[a:b] for a, b in _runs(sizes, DECODE_TOKENS, self.beam_size, DECODE_ROWS)]


def _runs(lengths: Sequence[int], budget: int, per_item: int = 1, most: int | None = None) -> list[tuple[int, int]]:
    """``lengths`` cut into consecutive runs [start, end), each growing while items x ``per_item`` x the
    run's longest length stays within ``budget`` and items x ``per_item`` within ``most`` (one item at
    least): decoding batches (``DecodeConfig.batches``) and encoding pieces (``Translator.run_encoder``)."""
    runs: list[tuple[int, int]] = []
    start = 0
    while start < len(lengths):
        end, longest = start + 1, lengths[start]
        while end < len(lengths):
            count, grown = (end + 1 - start) * per_item, max(longest, lengths[end])
            if (most is not None and count > most) or count * grown > budget:
                break
            end, longest = end + 1, grown
        runs.append((start, end))
        start = end
    return runs


class SearchStart(NamedTuple):
    """What a search over one encoded batch starts from (``Translator.start_search``)."""

    step: StepFn  # (prefix (N, t), state) -> (log-probabilities, or logits when asked, (N, V), state)
    state: Any  # the state of the batch's B rows


class Translator:
    """A model with its vocabularies, ready to translate text.

    Translating runs the model in evaluation mode and gives it back in the mode it came in.
    With ``int8=True`` the decoder's matrix products and the encoder's feed-forward and Q/K/V ones run
    on int8 copies of their weights (``fast_decode.Int8Linear``), taken when the translator is made
    (so later changes to the model's weights are not seen); ``use_cache=False`` stays the float32
    modules. int8 runs on the CPU only. Its greedy search chooses from the output layer's int8 logits
    as they are formed (``fast_decode.int8_pick``).

    In float32 on the CPU, greedy search chooses each token through an int8 screen of the output
    layer (``fast_decode.screened_pick``): the tokens the float32 logits choose, with most of the
    output layer's arithmetic done in int8.
    """

    def __init__(self, model: Transformer, src_vocab: BaseVocab, tgt_vocab: BaseVocab, int8: bool = False) -> None:
        self.model = model
        self.src_vocab = src_vocab
        self.tgt_vocab = tgt_vocab
        self.int8 = int8
        self._int8_decoder: fast_decode.PackedDecoder | None = None
        self._int8_encoder: fast_decode.PackedEncoder | None = None
        self._screen: fast_decode.OutputScreen | None = None  # the last one made (see _output_screen)
        if int8 and self.device.type != "cpu":
            raise ConfigError(f"int8 decoding runs on the CPU only (PyTorch's int8 kernels), but the model is on "
                              f"{self.device}: load it with device='cpu', or leave int8 off")
        if int8 and next(model.parameters()).dtype != torch.float32:
            raise ConfigError(f"int8 decoding quantizes a float32 model, but this one is "
                              f"{next(model.parameters()).dtype}: call model.float() first, or leave int8 off")
        if int8:  # quantize now, once: a server's first request is then no slower than the rest
            was_training = model.training
            model.eval()
            try:
                self._int8_decoder = fast_decode.pack_decoder(model, int8=True)
                self._int8_encoder = fast_decode.pack_encoder(model, int8=True)
            finally:
                model.train(was_training)

    def quantized(self) -> "Translator":
        """This translator with int8 decoding (see the class docstring); the model is shared."""
        return Translator(self.model, self.src_vocab, self.tgt_vocab, int8=True)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode_source(self, sentences: Sequence[str]) -> list[list[int]]:
        """Source token ids with EOS, cut to fit the model's positions (with a warning).

        attnlab's one policy for an over-long source at decoding time: ``translate`` and
        ``attnlab.inspect.explain`` both encode through here. (Training drops such pairs instead.)
        """
        _require_list(sentences)
        limit = self.model.config.max_len
        encoded = self.src_vocab.encode_batch(list(sentences))
        too_long = [i for i, ids in enumerate(encoded) if len(ids) > limit - 1]
        if too_long:
            warnings.warn(
                f"{len(too_long)} source sentence(s) (the first is number {too_long[0] + 1}) are longer than "
                f"the model's {limit - 1} subwords and were cut; their translations cover the start only",
                stacklevel=2,
            )
        return [ids[: limit - 1] + [self.src_vocab.eos_id] for ids in encoded]

    @torch.no_grad()
    def translate_ids(self, sources: list[list[int]], config: DecodeConfig = DecodeConfig()) -> list[list[int]]:
        """Target ids (no BOS/EOS) for a batch of source id lists; none for an empty batch."""
        if not sources:
            return []
        was_training = self.model.training
        self.model.eval()
        try:
            return self._search(sources, config)
        finally:
            self.model.train(was_training)

    def _search(self, sources: list[list[int]], config: DecodeConfig) -> list[list[int]]:
        greedy = config.beam_size == 1  # greedy search compares scores only: logits do, unnormalised;
        # beam search normalizes them itself, with its scoring (in one pass where it can)
        pick = self._greedy_pick() if greedy and config.use_cache else None
        # with a pick of its own the steps stop at the hidden states, and the choice is made from them
        step, state = self.start_search(self.run_encoder(sources, config.use_cache), config.use_cache,
                                        log_probs=False, project=pick is None)
        search = dict(
            step=step, state=state, batch_size=len(sources), bos_id=self.tgt_vocab.bos_id,
            eos_id=self.tgt_vocab.eos_id, max_len=self.max_lengths(sources, config), pad_id=self.tgt_vocab.pad_id,
            device=self.device,
        )
        if greedy:
            return greedy_search(**search, pick=pick)
        return [h.tokens for h in beam_search(**search, beam_size=config.beam_size, alpha=config.alpha, logits=True)]

    def _greedy_pick(self) -> Callable[[Tensor, Tensor], Tensor] | None:
        """How greedy search chooses from the decoder's hidden states, where it does not take the logits:
        in int8, from the output layer's int8 logits (``fast_decode.int8_pick``); in float32 on the
        CPU, through the output layer's int8 screen (``fast_decode.screened_pick``)."""
        if self._int8_decoder is not None:  # attnlab's int8 weights, where its kernels are built
            output = self._int8_decoder.output
            if output.kernel is None or native.int8_output_kernel() is None:
                return None
            return functools.partial(fast_decode.int8_pick, output)
        screen = self._output_screen()
        return None if screen is None else functools.partial(fast_decode.screened_pick, screen)

    def _output_screen(self) -> fast_decode.OutputScreen | None:
        """The int8 screen of the float32 output layer (``fast_decode.screened_pick``), through which
        greedy search chooses on the CPU; made again whenever the output layer's weights have changed
        (training between translations: the screen's copy is compared with the weights, one pass over
        them), None where it does not apply (``fast_decode.output_screen``)."""
        if self.int8 or self.device.type != "cpu":
            return None
        weight, bias = self.model.output.weight, self.model.output.bias
        screen = self._screen
        if (screen is not None and weight.dtype == bias.dtype == torch.float32  # torch.equal compares values only
                and torch.equal(screen.rows, weight) and torch.equal(screen.bias, bias)):
            return screen
        try:
            screen = fast_decode.output_screen(self._decoder())
        except ValueError:  # a model the lean step does not take: the modules' logits
            return None
        self._screen = screen
        return screen

    def run_encoder(self, sources: list[list[int]], lean: bool = True) -> Encoded:
        """The source id lists encoded (the model in evaluation mode) in consecutive pieces of at most
        ``ENCODE_TOKENS`` padded tokens (at least one sentence each), their memories then padded to the
        longest source (and masked there): what every search of this translator starts from.

        On the CPU the layers run as ``fast_decode.encode`` (the same products on packed weights, with
        fewer calls: the 1000 sentences of test_2016_flickr encoded in 0.176 s instead of 0.210 on the
        tiny model, one thread), which gives the modules' memory to the bit on both trained models;
        ``lean=False`` runs the modules (the reference of ``use_cache=False``). With int8 the lean
        encoder's feed-forward and Q/K/V products run on int8 weights."""
        pad_id = self.model.config.pad_id
        packed = self._int8_encoder
        if packed is None and lean and self.device.type == "cpu" and not self.model.training:
            try:
                packed = fast_decode.pack_encoder(self.model)  # views of the weights, taken for this call
            except ValueError:  # a model whose layers differ from what the lean encoder computes: the modules
                packed = None
        if packed is None:
            encode = self.model.encode
        else:
            def encode(src: Tensor) -> Encoded:
                return fast_decode.encode(packed, src, (src != pad_id)[:, None, None, :])
        pieces = [encode(pad_sequences(sources[a:b], pad_id).to(self.device))
                  for a, b in _runs([len(source) for source in sources], ENCODE_TOKENS)]
        if len(pieces) == 1:
            return pieces[0]
        S = max(piece.memory.size(1) for piece in pieces)
        memory = torch.cat([F.pad(p.memory, (0, 0, 0, S - p.memory.size(1))) for p in pieces])  # (B, S, E)
        src_mask = torch.cat([F.pad(p.src_mask, (0, S - p.src_mask.size(-1))) for p in pieces])  # (B, 1, 1, S)
        return Encoded(memory, src_mask, None)

    def max_lengths(self, sources: list[list[int]], config: DecodeConfig) -> Tensor:
        """Each translation's length limit: its source's length + ``extra_len``, within the model's positions."""
        lengths = torch.tensor([len(s) for s in sources], device=self.device)  # (B,)
        return torch.clamp(lengths + config.extra_len, max=self.model.config.max_len - 1)

    def start_search(self, encoded: Encoded, use_cache: bool = True, log_probs: bool = True,
                     project: bool = True) -> SearchStart:
        """The step function and first state of a search from the encoded sources (the model in
        evaluation mode): the lean step with its cache, or with ``use_cache=False`` the modules
        re-reading the whole prefix at every step (the reference the lean step is tested against).
        The step returns log-probabilities, or with ``log_probs=False`` the logits (which greedy
        search, comparing a row's scores only, can use as they are), or with ``project=False`` (the
        lean step only) the decoder's last hidden states, for ``fast_decode.screened_pick``."""
        if not use_cache:
            if self.int8:
                raise ConfigError("int8 decoding runs through the cached lean step: use_cache=False is the "
                                  "float32 reference path")
            return SearchStart(functools.partial(self._uncached_step, log_probs=log_probs), encoded)
        packed = self._decoder()

        def step(prefix: Tensor, state: fast_decode.LeanDecoderState) -> tuple[Tensor, fast_decode.LeanDecoderState]:
            out, state = fast_decode.decoder_step(packed, prefix[:, state.length :], state, project)  # (N, V) or (N, E)
            return (out.log_softmax(dim=-1) if log_probs and project else out), state

        return SearchStart(step, fast_decode.start_decoding(packed, encoded))

    def _decoder(self) -> fast_decode.PackedDecoder:
        """The decoder's packed weights: views of the parameters, or the int8 copy taken at ``__init__``."""
        return self._int8_decoder if self._int8_decoder is not None else fast_decode.pack_decoder(self.model)

    def _uncached_step(self, prefix: Tensor, encoded: Encoded, log_probs: bool = True) -> tuple[Tensor, Encoded]:
        logits = self.model.decode(prefix, encoded).logits[:, -1].float()  # (N, V)
        return (logits.log_softmax(dim=-1) if log_probs else logits), encoded

    def translate(
        self, sentences: Sequence[str], config: DecodeConfig = DecodeConfig(), progress: bool = False
    ) -> list[str]:
        """Translate a list of sentences in length-sorted batches; results come back in input order.

        An empty (or blank) sentence gives an empty translation. A single string is refused (it
        would be read as a list of one-character sentences): pass ``[sentence]``.
        """
        _require_list(sentences)
        results = [""] * len(sentences)
        todo = [i for i, s in enumerate(sentences) if s.strip()]
        sources = self.encode_source([sentences[i] for i in todo])
        batches = config.batches([len(source) for source in sources])
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc="translating", unit="batch")
        for batch in batches:
            outputs = self.tgt_vocab.decode_batch(self.translate_ids([sources[j] for j in batch], config))
            for j, text in zip(batch, outputs):
                results[todo[j]] = text
        return results


def _require_list(sentences: Sequence[str]) -> None:
    if isinstance(sentences, str):
        raise ValueError(
            f"pass a list of sentences, e.g. [{sentences[:40]!r}], not a single string "
            "(a string would be translated character by character)"
        )


def load_translator(path: str | Path, device: str = "cpu", which: str = "model", int8: bool = False) -> Translator:
    """Load a translation checkpoint (or a run directory's final/best/last one) for inference;
    ``int8`` decodes with int8 weights (CPU only, see ``Translator``)."""
    if int8 and torch.device(device).type != "cpu":
        raise ConfigError(f"int8 decoding runs on the CPU only (PyTorch's int8 kernels), not on {device}: "
                          "use device='cpu', or leave int8 off")
    loaded = load_checkpoint(path, "translation", device=device, which=which)
    return Translator(loaded.model, loaded.src_vocab, loaded.tgt_vocab, int8=int8)


def bleu_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, object]:
    """Corpus sacreBLEU, cased and lowercased (``-lc``), with the signatures that pin their settings."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} translations but {len(references)} references")
    cased = sacrebleu.metrics.BLEU()
    lower = sacrebleu.metrics.BLEU(lowercase=True)
    cased_score = cased.corpus_score(list(hypotheses), [list(references)])
    lower_score = lower.corpus_score(list(hypotheses), [list(references)])
    return {
        "bleu": round(cased_score.score, 2),
        "bleu_lc": round(lower_score.score, 2),
        "signature": str(cased.get_signature()),
        "signature_lc": str(lower.get_signature()),
    }
