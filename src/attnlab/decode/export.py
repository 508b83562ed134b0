"""Export a trained translation model to CTranslate2, the C++ inference engine of OpenNMT.

``export_ctranslate2`` reads a checkpoint through ``load_checkpoint`` and fills CTranslate2's own
model description (``ctranslate2.specs.TransformerSpec``) with its weights, so that CTranslate2
computes what attnlab computes. The facts that decide it:

- **Positions.** attnlab's table interleaves sin and cos on even and odd features from position 0;
  CTranslate2's built-in table is [sin | cos] from position 1, with another frequency scale. The
  export stores attnlab's table itself (``position_encodings.encodings``), which CTranslate2 then
  reads from position 0.
- **Embeddings** are scaled by √d_model on both sides (``scale_embeddings``).
- **Post-LN or pre-LN** maps onto ``pre_norm``; a pre-LN stack's final LayerNorm comes along.
- **Special tokens.** The source ends with ``<eos>`` (``add_source_eos``); the decoder starts from
  ``<bos>``; LayerNorm's epsilon is PyTorch's 1e-5, not CTranslate2's default.

CTranslate2 decodes tokens, not text: the export also writes the model's tokenizers
(``source_tokenizer.json``, ``target_tokenizer.json``, Hugging Face ``tokenizers`` files, read back
by ``exported_vocabs``) and ``attnlab_export.json`` (where it came from, its languages and
positions, the decoding options below). ``search_like_attnlab`` runs attnlab's search on a
CTranslate2 ``Translator``: its length limit per sentence, and in beam search its length penalty;
tests/test_export.py and benchmarks/bench_translate.py hold its output equal to attnlab's own.
ctranslate2 is an optional dependency (``pip install 'attnlab[ctranslate2]'``), imported only when
a model is exported; ``search_like_attnlab`` takes a Translator made by the caller.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.vocab import BaseVocab, Vocab
from ..errors import ConfigError
from ..nn.attention import MultiHeadAttention
from ..nn.layers import DecoderLayer, EncoderLayer, PositionwiseFeedForward
from ..nn.model import Transformer
from ..store.files import replace_directory, write_text_atomic
from .load import load_checkpoint

__all__ = ["export_ctranslate2", "exported_vocabs", "search_like_attnlab", "DECODING_OPTIONS", "EXPORT_INFO"]

EXPORT_INFO = "attnlab_export.json"

# The ``translate_batch`` options under which CTranslate2 searches as attnlab does, besides
# ``max_decoding_length`` = the source's tokens (before CTranslate2 adds its EOS) + 50, at most the
# model's positions - 2: attnlab's limit, source with EOS + ``extra_len`` (50), counts the EOS.
# Length penalty: CTranslate2 divides a hypothesis's log-probability by n^length_penalty (n its
# tokens, EOS included), attnlab by ((5 + n) / 6)^alpha (GNMT's): to pick attnlab's hypothesis, ask
# for the beam's hypotheses with their scores and rerank them (``search_like_attnlab`` does).
DECODING_OPTIONS: dict[str, Any] = {
    "min_decoding_length": 0,  # CTranslate2 forbids EOS at the first step unless 0
    "suppress_sequences": [["<bos>"], ["<pad>"]],  # attnlab never emits these two
}


def export_ctranslate2(
    checkpoint: str | Path, out_dir: str | Path, *, quantization: str | None = None, force: bool = False
) -> Path:
    """Write the translation model at ``checkpoint`` (a run or a checkpoint) as a CTranslate2 model.

    ``quantization`` stores the weights as CTranslate2's int8, int16, float16, ... (None: float32;
    CTranslate2 can also quantize a float32 model when it loads it, ``compute_type="int8"``).
    ``force`` replaces an existing ``out_dir`` that is an earlier export (or empty). The directory is built under a temporary name and
    renamed into place. Returns ``out_dir``.
    """
    ctranslate2 = _import_ctranslate2()
    from ctranslate2.specs.model_spec import ACCEPTED_MODEL_TYPES

    out = Path(out_dir)
    if out.exists() and not force:
        raise ConfigError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not (out.is_dir() and ((out / EXPORT_INFO).is_file() or not any(out.iterdir()))):
        raise ConfigError(f"{out} is not an earlier export (no {EXPORT_INFO}): --force replaces only those; "
                          "pick another --out")
    if quantization is not None and quantization not in ACCEPTED_MODEL_TYPES:
        raise ConfigError(f"--quantization {quantization!r} is not one of CTranslate2's: "
                          f"{', '.join(ACCEPTED_MODEL_TYPES)}")
    loaded = load_checkpoint(checkpoint)
    if loaded.kind != "translation":
        raise ConfigError(f"{loaded.directory} holds a language model; only a translation model "
                          "(encoder-decoder) exports to a CTranslate2 Translator")
    model: Transformer = loaded.model
    for side, vocab in (("source", loaded.src_vocab), ("target", loaded.tgt_vocab)):
        if not isinstance(vocab, Vocab):
            raise ConfigError(f"{loaded.directory}/vocab.json: the {side} vocabulary is {vocab.kind!r}; "
                              "only a BPE vocabulary exports (its tokenizer goes with the model)")
    eps = _check_exportable(model, loaded.directory)

    spec = _transformer_spec(ctranslate2.specs, model)
    spec.config.layer_norm_epsilon = eps
    spec.config.unk_token, spec.config.bos_token, spec.config.eos_token = "<unk>", "<bos>", "<eos>"
    spec.config.decoder_start_token = "<bos>"
    spec.config.add_source_eos = True
    spec.register_source_vocabulary(_tokens(loaded.src_vocab))
    spec.register_target_vocabulary(_tokens(loaded.tgt_vocab))
    spec.validate()
    spec.optimize(quantization=quantization)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        spec.save(str(tmp))
        write_text_atomic(tmp / "source_tokenizer.json", loaded.src_vocab.tokenizer.to_str())
        write_text_atomic(tmp / "target_tokenizer.json", loaded.tgt_vocab.tokenizer.to_str())
        src_lang, tgt_lang = _languages(loaded)
        info = {
            "exported_from": str(loaded.directory), "format": "ctranslate2", "ctranslate2": ctranslate2.__version__,
            "quantization": quantization or "float32", "source_language": src_lang, "target_language": tgt_lang,
            "max_positions": model.config.max_len, "decoding_options": DECODING_OPTIONS,
            "max_decoding_length": "source tokens (without <eos>) + 50, at most max_positions - 2",
            "length_penalty": "attnlab: logp / ((5 + n) / 6) ** alpha, n tokens with the <eos>; CTranslate2: "
                              "logp / n ** length_penalty; attnlab.decode.export.search_like_attnlab reranks "
                              "CTranslate2's hypotheses with attnlab's penalty",
        }
        write_text_atomic(tmp / EXPORT_INFO, json.dumps(info, indent=2, ensure_ascii=False))
        replace_directory(tmp, out)  # with --force, the old export goes only once the new one is in place
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _import_ctranslate2():
    try:
        import ctranslate2
        import ctranslate2.specs  # the spec API, a submodule ctranslate2 does not import itself
    except ImportError:
        raise ConfigError("--format ctranslate2 needs the ctranslate2 package: "
                          "pip install 'attnlab[ctranslate2]'") from None
    return ctranslate2


def _languages(loaded) -> tuple[str | None, str | None]:
    try:
        return loaded.languages
    except ValueError:
        return None, None


def _check_exportable(model: Transformer, directory: Path) -> float:
    """Refuse a model whose maths CTranslate2's Transformer does not have; return LayerNorm's eps."""
    if PositionwiseFeedForward.activation is not F.relu:
        raise ConfigError(f"{directory}: the feed-forward activation is not ReLU; CTranslate2's export "
                          "here assumes it")
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    eps = {m.eps for m in norms}
    if len(eps) > 1 or any(not m.elementwise_affine for m in norms):
        raise ConfigError(f"{directory}: LayerNorms with different epsilons or without γ/β do not export")
    return eps.pop() if eps else 1e-5


def _array(t: Tensor):
    return t.detach().to("cpu", torch.float32).contiguous().numpy().copy()


def _tokens(vocab: BaseVocab) -> list[str]:
    return [vocab.id_to_token(i) for i in range(len(vocab))]


def _set_linear(spec, weight: Tensor, bias: Tensor | None) -> None:
    spec.weight = _array(weight)  # (out, in), as nn.Linear stores it
    if bias is not None:
        spec.bias = _array(bias)


def _set_norm(spec, norm: nn.LayerNorm) -> None:
    spec.gamma, spec.beta = _array(norm.weight), _array(norm.bias)


def _set_self_attention(spec, attn: MultiHeadAttention, norm: nn.LayerNorm) -> None:
    """Self-attention: the fused [W_q; W_k; W_v] (3E, E) is CTranslate2's ``linear[0]`` as it is."""
    _set_linear(spec.linear[0], attn.in_proj_weight, attn.in_proj_bias)
    _set_linear(spec.linear[1], attn.w_o.weight, attn.w_o.bias)
    _set_norm(spec.layer_norm, norm)


def _set_cross_attention(spec, attn: MultiHeadAttention, norm: nn.LayerNorm) -> None:
    """Cross-attention: W_q is ``linear[0]``, [W_k; W_v] (2E, E) ``linear[1]``, W_o ``linear[2]``."""
    E = attn.d_model
    bias = attn.in_proj_bias
    _set_linear(spec.linear[0], attn.in_proj_weight[:E], None if bias is None else bias[:E])
    _set_linear(spec.linear[1], attn.in_proj_weight[E:], None if bias is None else bias[E:])
    _set_linear(spec.linear[2], attn.w_o.weight, attn.w_o.bias)
    _set_norm(spec.layer_norm, norm)


def _set_ffn(spec, ff: PositionwiseFeedForward, norm: nn.LayerNorm) -> None:
    _set_linear(spec.linear_0, ff.w_1.weight, ff.w_1.bias)
    _set_linear(spec.linear_1, ff.w_2.weight, ff.w_2.bias)
    _set_norm(spec.layer_norm, norm)


def _transformer_spec(specs, model: Transformer):
    """CTranslate2's ``TransformerSpec`` holding ``model``'s weights (before validation)."""
    c = model.config
    encoder = specs.TransformerEncoderSpec(c.num_encoder_layers, c.num_heads, pre_norm=c.norm_first)
    decoder = specs.TransformerDecoderSpec(c.num_decoder_layers, c.num_heads, pre_norm=c.norm_first)
    positions = _array(model.positional.P[0])  # (max_len, E): attnlab's table, position 0 first

    encoder.embeddings[0].weight = _array(model.src_embed.embedding.weight)  # (V_src, E)
    encoder.scale_embeddings = True  # x √E, as TokenEmbedding does
    encoder.position_encodings.encodings = positions
    layer: EncoderLayer
    for layer_spec, layer in zip(encoder.layer, model.encoder_layers):
        _set_self_attention(layer_spec.self_attention, layer.self_attn, layer.norm1)
        _set_ffn(layer_spec.ffn, layer.feed_forward, layer.norm2)

    decoder.embeddings.weight = _array(model.tgt_embed.embedding.weight)  # (V_tgt, E)
    decoder.scale_embeddings = True
    decoder.position_encodings.encodings = positions
    layer: DecoderLayer
    for layer_spec, layer in zip(decoder.layer, model.decoder_layers):
        _set_self_attention(layer_spec.self_attention, layer.self_attn, layer.norm1)
        _set_cross_attention(layer_spec.attention, layer.cross_attn, layer.norm2)
        _set_ffn(layer_spec.ffn, layer.feed_forward, layer.norm3)
    _set_linear(decoder.projection, model.output.weight, model.output.bias)  # (V_tgt, E)

    if c.norm_first:  # pre-LN stacks end with a LayerNorm of their own
        _set_norm(encoder.layer_norm, model.encoder_norm)
        _set_norm(decoder.layer_norm, model.decoder_norm)
    return specs.TransformerSpec(encoder, decoder)


def exported_vocabs(model_dir: str | Path) -> tuple[Vocab, Vocab]:
    """The (source, target) vocabularies of an exported model, from its tokenizer files.

    ``Vocab.tokens(text)`` gives the tokens CTranslate2 takes; ``Vocab.decode`` turns the target
    tokens' ids (``token_to_id``) back into text, exactly as attnlab decodes its own output.
    """
    from tokenizers import Tokenizer

    directory = Path(model_dir)
    vocabs = []
    for name in ("source_tokenizer.json", "target_tokenizer.json"):
        path = directory / name
        if not path.is_file():
            raise ConfigError(f"{path} is missing: {directory} is not a model written by attnlab export")
        vocabs.append(Vocab(Tokenizer.from_file(str(path))))
    return vocabs[0], vocabs[1]


def search_like_attnlab(
    translator: Any, sources: list[list[str]], *, max_positions: int, beam_size: int = 4, alpha: float = 0.6,
    extra_len: int = 50, max_batch_size: int = 1024, batch_type: str = "tokens",
) -> list[list[str]]:
    """attnlab's search run by a CTranslate2 ``Translator``: the target tokens (no EOS) of each source.

    ``sources`` are token lists without EOS (the exported model adds it). attnlab's rules, with
    CTranslate2 doing the work: a source longer than ``max_positions`` - 1 tokens is cut, and each
    sentence may run to its own source length + ``extra_len`` - 1 tokens. CTranslate2 takes one
    limit per call: greedy search needs no more (a row's output is cut at its own limit); in beam
    search a sentence whose search reached its own limit is searched again alone under it.

    attnlab's beam search returns what stopping once ``beam_size`` hypotheses have finished gives
    (it may stop earlier, when no live beam can change that result); attnlab keeps those
    first ``beam_size`` (by step, then log-probability) and picks the best by its length penalty,
    ``logp / ((5 + n) / 6) ** alpha`` over n tokens and the EOS. CTranslate2 returns the
    ``beam_size`` best of all that finished by its own score, ``logp / n ** length_penalty``: with a
    strongly negative ``length_penalty`` its best are the shortest, i.e. the first to finish, so
    this asks for them with their scores, recovers each log-probability and picks by attnlab's rule.
    """
    sources = [tokens[: max_positions - 1] for tokens in sources]
    if not sources:
        return []
    limits = [min(len(tokens) + extra_len, max_positions - 2) for tokens in sources]
    options = dict(DECODING_OPTIONS, beam_size=beam_size, max_batch_size=max_batch_size, batch_type=batch_type,
                   max_input_length=0)
    if beam_size == 1:
        results = translator.translate_batch(sources, max_decoding_length=max(limits), **options)
        return [result.hypotheses[0][:limit] for result, limit in zip(results, limits)]
    # As strong as float32 allows: n ** -power stays a normal float32 (n ** power <= e^69 = 1e30).
    power = max(1.0, 69.0 / math.log(max(limits) + 1))
    options.update(num_hypotheses=beam_size, return_scores=True, return_end_token=True, length_penalty=-power)
    results = translator.translate_batch(sources, max_decoding_length=max(limits), **options)
    outputs: list[list[str] | None] = []
    again: dict[int, list[int]] = {}  # limit -> the sentences to search again under it
    for i, (result, limit) in enumerate(zip(results, limits)):
        last_step = max(len(h) for h in result.hypotheses) - 1  # the step its search ended on
        if last_step >= limit - 1 and limit < max(limits):
            again.setdefault(limit, []).append(i)
            outputs.append(None)
        else:
            outputs.append(_attnlab_choice(result, power, beam_size, alpha))
    for limit, indices in again.items():
        redone = translator.translate_batch([sources[i] for i in indices], max_decoding_length=limit, **options)
        for i, result in zip(indices, redone):
            outputs[i] = _attnlab_choice(result, power, beam_size, alpha)
    return outputs


def _attnlab_choice(result: Any, power: float, beam_size: int, alpha: float) -> list[str]:
    """The hypothesis attnlab's beam search returns, from CTranslate2's n-best with EOS and scores.

    CTranslate2's score is logp * n ** power (its length penalty -power; n tokens, EOS included).
    A hypothesis that ends without EOS was cut at the length limit: attnlab ends it with a free EOS
    one step later, after those that ended with EOS on that step. attnlab keeps the first
    ``beam_size`` to finish (by step, then log-probability) and returns the best by its penalty,
    the first of equals.
    """
    finished = []
    for tokens, score in zip(result.hypotheses, result.scores):
        ended = bool(tokens) and tokens[-1] == "<eos>"
        logp = score / len(tokens) ** power
        finished.append(((len(tokens), not ended, -logp), logp, tokens[:-1] if ended else tokens))
    finished.sort(key=lambda item: item[0])
    best, best_score = [], float("-inf")
    for _, logp, content in finished[:beam_size]:
        score = logp / ((5.0 + len(content) + 1) / 6.0) ** alpha
        if score > best_score:
            best, best_score = content, score
    return best
