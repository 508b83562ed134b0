"""Step-by-step walk-throughs of the tutorials' worked examples, and of one real translation.

``walkthrough("simple" | "trainable" | "tutorial")`` recomputes one of the tutorials' worked
examples with attnlab's own functions and returns its intermediate tensors as ``Step`` values; ``format_walkthrough``
prints them to the digits the tutorials print. ``explain_translation`` collects every attention map
of a Transformer translating one sentence and writes them out as PNGs and one HTML report.

The example data are module constants (``JOURNEY_INPUTS``, ``COFFEE_X``, ``TUTORIAL_X`` ...) so that
tests and documentation use the very numbers printed here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..data.vocab import BaseVocab
from ..decode.translate import Translator
from ..nn.attention import (
    SelfAttention,
    scaled_dot_product_attention,
    simple_self_attention,
)
from ..nn.model import Transformer

__all__ = [
    "AttentionMaps",
    "attention_maps",
    "Step",
    "EXAMPLES",
    "EXAMPLE_DIGITS",
    "JOURNEY_TOKENS",
    "JOURNEY_INPUTS",
    "COFFEE_TOKENS",
    "COFFEE_X",
    "COFFEE_W_Q",
    "COFFEE_W_K",
    "COFFEE_W_V",
    "TUTORIAL_X",
    "TUTORIAL_W_Q",
    "TUTORIAL_W_K",
    "TUTORIAL_W_V",
    "walkthrough",
    "format_walkthrough",
    "format_tensor",
    "explain_example",
    "TranslationExplanation",
    "explain_translation",
]

# -- the worked examples ---------------------------------------------------------------------
# "simple": the tutorials' first worked example, six 3-d token embeddings ("Your journey starts
# with one step") attending to each other with no weights. "trainable": example A, "she likes
# coffee", three 4-d tokens with fixed W_q = W_k (0.9 on the diagonal, 0.1 elsewhere) and W_v.
# "tutorial": example B, the tutorial's three 4-d inputs with integer W_q, W_k, W_v (3 columns).

JOURNEY_TOKENS = ("Your", "journey", "starts", "with", "one", "step")
JOURNEY_INPUTS = torch.tensor(
    [
        [0.43, 0.15, 0.89],  # Your
        [0.55, 0.87, 0.66],  # journey
        [0.57, 0.85, 0.64],  # starts
        [0.22, 0.58, 0.33],  # with
        [0.77, 0.25, 0.10],  # one
        [0.05, 0.80, 0.55],  # step
    ]
)  # (T=6, E=3)

COFFEE_TOKENS = ("she", "likes", "coffee")
COFFEE_X = torch.tensor(
    [[0.2, 0.9, 0.1, 0.5], [0.8, 0.3, 0.7, 0.2], [0.4, 0.6, 0.3, 0.9]], dtype=torch.float64
)  # (T=3, E=4)
COFFEE_W_Q = torch.full((4, 4), 0.1, dtype=torch.float64).fill_diagonal_(0.9)  # (4, 4)
COFFEE_W_K = COFFEE_W_Q.clone()
COFFEE_W_V = torch.tensor(
    [[0.8, 0.2, 0.1, 0.1], [0.2, 0.8, 0.2, 0.1], [0.1, 0.2, 0.8, 0.1], [0.1, 0.1, 0.1, 0.9]],
    dtype=torch.float64,
)

TUTORIAL_X = torch.tensor(
    [[1, 0, 1, 0], [0, 2, 0, 2], [1, 1, 1, 1]], dtype=torch.float64
)  # (T=3, E=4)
TUTORIAL_W_Q = torch.tensor([[1, 0, 1], [1, 0, 0], [0, 0, 1], [0, 1, 1]], dtype=torch.float64)
TUTORIAL_W_K = torch.tensor([[0, 0, 1], [1, 1, 0], [0, 1, 0], [1, 1, 0]], dtype=torch.float64)
TUTORIAL_W_V = torch.tensor([[0, 2, 0], [0, 3, 0], [1, 0, 3], [1, 1, 0]], dtype=torch.float64)

EXAMPLES = ("simple", "trainable", "tutorial")
EXAMPLE_DIGITS = {"simple": 4, "trainable": 6, "tutorial": 6}
"""Decimals each example is printed with: those of the tutorial that printed it."""


@dataclass(frozen=True)
class Step:
    """One step of a walk-through: a title, the tensor it produced (if any) and a note on it."""

    title: str
    tensor: Tensor | None = None
    note: str = ""
    digits: int | None = None  # decimals for this tensor; None: those of the whole walk-through


def walkthrough(example: str, scale: float | None = None) -> list[Step]:
    """Recompute a worked example step by step with attnlab's functions.

    Args:
        example: "simple" (six 3-d token embeddings, no weights), "trainable" (example A, "she
            likes coffee", with fixed projections) or "tutorial" (example B, the tutorial's
            integer matrices).
        scale: multiplies the raw scores of the trainable examples; ``None`` means 1/sqrt(d_k).
            ``scale=1.0`` reproduces the tutorial of example B, which divides by 1.
    """
    if example not in EXAMPLES:
        raise ValueError(f"unknown example {example!r}; valid examples: {', '.join(EXAMPLES)}")
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale}")
    if example == "simple":
        if scale is not None:
            raise ValueError(
                "the 'simple' example has no scaling (its scores are plain dot products); "
                "--scale applies to 'trainable' and 'tutorial'"
            )
        return _simple_steps()
    if example == "trainable":
        return _trainable_steps(
            "Example A (she likes coffee)", COFFEE_TOKENS, COFFEE_X,
            COFFEE_W_Q, COFFEE_W_K, COFFEE_W_V, scale, tutorial_scale_note=False,
        )
    return _trainable_steps(
        "Example B (the tutorial's x)", ("word 1", "word 2", "word 3"), TUTORIAL_X,
        TUTORIAL_W_Q, TUTORIAL_W_K, TUTORIAL_W_V, scale, tutorial_scale_note=True,
    )


def _simple_steps() -> list[Step]:
    x = JOURNEY_INPUTS  # (T, E)
    scores = x @ x.T  # (T, T)
    loop = torch.tensor([[float(torch.dot(a, b)) for b in x] for a in x])
    context, weights = simple_self_attention(x)  # (T, E), (T, T)
    # The second token alone: its query against every key, no scaling (scale 1).
    z2 = scaled_dot_product_attention(x[1:2], x, x, scale=1.0).output  # (1, E)
    return [
        Step(
            "Inputs: 6 tokens embedded in 3 dimensions",
            x,
            "rows: " + " ".join(JOURNEY_TOKENS),
        ),
        Step(
            "Attention scores = inputs @ inputs.T",
            scores,
            "score[i, j] is the dot product of token i with token j; a double loop of dot "
            f"products gives the same (max difference {float((loop - scores).abs().max()):.1e}).",
        ),
        Step(
            "Attention weights = softmax(scores) over each row",
            weights,
            "softmax turns each row of scores into positive weights that sum to 1.",
        ),
        Step("Row sums of the weights", weights.sum(dim=-1), "each row sums to 1."),
        Step(
            "Context vectors = weights @ inputs",
            context,
            "row i blends every input vector, weighted by how much token i attends to it.",
        ),
        Step(
            "Context vector z(2) of the second token ('journey') alone",
            z2[0],
            "its query attends to all six keys; it equals row 2 of the context vectors: "
            f"{bool(torch.allclose(z2[0], context[1]))}.",
        ),
    ]


def _trainable_steps(
    name: str,
    tokens: Sequence[str],
    x: Tensor,
    w_q: Tensor,
    w_k: Tensor,
    w_v: Tensor,
    scale: float | None,
    tutorial_scale_note: bool,
) -> list[Step]:
    d_in, d_k = w_q.shape
    attn = SelfAttention(d_in, d_k).to(x.dtype)
    with torch.no_grad():  # nn.Linear computes x @ weight.T, so weight = W.T gives x @ W
        attn.w_q.weight.copy_(w_q.T)
        attn.w_k.weight.copy_(w_k.T)
        attn.w_v.weight.copy_(w_v.T)
        q, k, v = attn.w_q(x), attn.w_k(x), attn.w_v(x)  # (T, d_k) each
        out, weights = attn(x, scale=scale, need_weights=True)  # (T, d_k), (T, T)
    raw = q @ k.T  # (T, T)
    used = 1.0 / math.sqrt(d_k) if scale is None else scale
    scaled = raw * used

    def whole(t: Tensor) -> int | None:
        """Print whole-number tensors (the tutorial's integer matrices) without decimals."""
        return 0 if bool(torch.all(t == t.round())) else None

    return [
        Step(f"{name}: inputs X", x, "rows: " + ", ".join(tokens), whole(x)),
        Step("W_q", w_q, digits=whole(w_q)),
        Step("W_k", w_k, digits=whole(w_k)),
        Step(
            "W_v", w_v, "W_q, W_k and W_v are learned in a real model; here they are fixed.", whole(w_v)
        ),
        Step("Queries Q = X @ W_q", q, "the query decides what each token looks for.", whole(q)),
        Step("Keys K = X @ W_k", k, "keys are what the queries are matched against.", whole(k)),
        Step("Values V = X @ W_v", v, "values are what gets blended into the answer.", whole(v)),
        Step("Raw scores Q @ K.T", raw, digits=whole(raw)),
        Step(
            f"Scaled scores (Q @ K.T) * {used:.4f}",
            scaled,
            _scale_note(d_k, scale, tutorial_scale_note),
            whole(scaled),
        ),
        Step(
            "Attention weights = softmax(scaled scores)",
            weights,
            "row i says how much of each value vector goes into token i's output.",
        ),
        Step("Row sums of the weights", weights.sum(dim=-1), "each row sums to 1."),
        Step("Outputs = weights @ V", out, "each output is a weighted blend of the value vectors."),
    ]


def _scale_note(d_k: int, scale: float | None, tutorial: bool) -> str:
    correct = 1.0 / math.sqrt(d_k)
    if scale is None or math.isclose(scale, correct):
        note = (
            f"scale = 1/sqrt(d_k) = 1/sqrt({d_k}) = {correct:.4f}, where d_k = {d_k} is the key "
            "dimension; scaling keeps large dot products out of softmax's flat, saturated region."
        )
        if tutorial:
            note += (
                " The tutorial divides by 1 instead (it rounds sqrt(3) down and wrongly calls d_k "
                "the number of words); pass scale=1.0 to reproduce its numbers."
            )
        return note
    note = (
        f"scale = {scale:g} on purpose: this differs from 1/sqrt(d_k) = 1/sqrt({d_k}) = "
        f"{correct:.4f}, the scale of the paper (d_k = {d_k} is the key dimension)."
    )
    if tutorial and scale == 1.0:
        note += (
            " It reproduces the tutorial, which divides by 1: it rounds sqrt(3) down and wrongly "
            "calls d_k the number of words."
        )
    return note


# -- printing ---------------------------------------------------------------------------------


def format_tensor(t: Tensor, digits: int = 4) -> str:
    """Print a 0-, 1- or 2-D tensor as nested lists with ``digits`` decimals, columns aligned."""
    if digits < 0:
        raise ValueError(f"digits must be >= 0, got {digits}")
    t = t.detach().cpu().double()
    if t.dim() > 2:
        raise ValueError(f"format_tensor prints 0-, 1- or 2-D tensors, got shape {tuple(t.shape)}")
    if t.dim() == 0:
        return f"{float(t):.{digits}f}"
    rows = [[f"{a:.{digits}f}" for a in row] for row in (t.tolist() if t.dim() == 2 else [t.tolist()])]
    width = max(len(cell) for row in rows for cell in row) if rows and rows[0] else 0
    lines = ["[" + ", ".join(cell.rjust(width) for cell in row) + "]" for row in rows]
    if t.dim() == 1:
        return lines[0]
    return "[" + ",\n ".join(lines) + "]"


def format_walkthrough(steps: Sequence[Step], digits: int = 4) -> str:
    """Render steps as numbered text blocks: title, tensor, note.

    Tensors print with ``digits`` decimals unless their step sets its own ``digits``.
    """
    blocks = []
    for number, step in enumerate(steps, start=1):
        lines = [f"Step {number}. {step.title}"]
        if step.tensor is not None:
            step_digits = digits if step.digits is None else step.digits
            lines.append(_indent(format_tensor(step.tensor, step_digits)))
        if step.note:
            lines.append(_indent(step.note))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def explain_example(example: str, scale: float | None = None) -> str:
    """The printed walk-through of one example, with the decimals its tutorial prints."""
    steps = walkthrough(example, scale)
    return format_walkthrough(steps, EXAMPLE_DIGITS[example])


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


# -- one real translation ---------------------------------------------------------------------


@dataclass(frozen=True)
class TranslationExplanation:
    """What ``explain_translation`` wrote and found."""

    translation_ids: list[int]  # without <bos>/<eos>
    translation: str
    src_tokens: list[str]  # the source as the encoder reads it, <eos> included
    tgt_tokens: list[str]  # the decoder's input: <bos> and the translation
    output_tokens: list[str]  # the token each decoder position produced: the translation, <eos>
    maps: dict[str, list[Tensor]]  # kind -> one (H, T, S) tensor per layer
    pngs: list[Path]  # one per (kind, layer)
    report: Path  # the HTML report
    top_attended: str  # per output token, the source tokens it attends to most

    @property
    def paths(self) -> list[Path]:
        """Every file written: the PNGs, then the report."""
        return [*self.pngs, self.report]


def explain_translation(
    model: Transformer,
    src_vocab: BaseVocab,
    tgt_vocab: BaseVocab,
    sentence: str,
    out_dir: str | os.PathLike[str],
    translate_fn: Callable[[str], Sequence[int]],
    *,
    top_k: int = 3,
) -> TranslationExplanation:
    """Collect every attention map of ``model`` translating ``sentence`` and write them to ``out_dir``.

    ``translate_fn(sentence)`` returns the target ids (a leading <bos> and a trailing <eos> may be
    there or not). The source is encoded by ``Translator.encode_source`` (ids + <eos>, an over-long
    source cut with a warning, as translation does); the
    decoder then runs once over <bos> + translation, so decoder position i is the one that
    produced output token i (the last one is labelled <eos>, which ends the translation). Writes one PNG per (kind, layer) and
    ``report.html``; returns the paths, the maps and the top-attended source tokens per output
    token (heads of the last layer averaged, see ``report.top_attended``).
    """
    from .plots import plot_attention_maps
    from .report import format_top_attended, top_attended, write_report

    ids = [int(i) for i in translate_fn(sentence)]
    if ids and ids[0] == tgt_vocab.bos_id:
        ids = ids[1:]
    if ids and ids[-1] == tgt_vocab.eos_id:
        ids = ids[:-1]
    if tgt_vocab.eos_id in ids or tgt_vocab.bos_id in ids:
        raise ValueError(f"translate_fn returned <bos>/<eos> inside the translation: {ids}")
    collected = attention_maps(model, src_vocab, tgt_vocab, sentence, ids)
    maps, src_tokens, tgt_tokens = collected.maps, collected.src_tokens, collected.tgt_tokens
    output_tokens = collected.output_tokens
    translation = tgt_vocab.decode(ids)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = plot_attention_maps(maps, src_tokens, tgt_tokens, out)
    top = top_attended(maps["cross"], src_tokens, output_tokens, k=top_k)
    report = write_report(
        maps,
        src_tokens,
        tgt_tokens,
        out / "report.html",
        title="attnlab: attention maps of one translation",
        source_text=sentence,
        translation=translation,
        output_tokens=output_tokens,
    )
    return TranslationExplanation(
        translation_ids=ids,
        translation=translation,
        src_tokens=src_tokens,
        tgt_tokens=tgt_tokens,
        output_tokens=output_tokens,
        maps=maps,
        pngs=pngs,
        report=report,
        top_attended=format_top_attended(top),
    )


# -- the maps of one translation, as data ------------------------------------------------------
@dataclass(frozen=True)
class AttentionMaps:
    """Every attention map of one translation, with the tokens that label their rows and columns."""

    src_tokens: list[str]  # the source as the encoder reads it, <eos> included (S)
    tgt_tokens: list[str]  # the decoder's input: <bos> and the translation (T)
    output_tokens: list[str]  # the token each decoder position produced: the translation, <eos> (T)
    maps: dict[str, list[Tensor]]  # "encoder" (H, S, S), "decoder" (H, T, T), "cross" (H, T, S) per layer


@torch.no_grad()
def attention_maps(
    model: Transformer, src_vocab: BaseVocab, tgt_vocab: BaseVocab, sentence: str, target_ids: Sequence[int]
) -> AttentionMaps:
    """The attention maps of ``model`` reading ``sentence`` and its translation ``target_ids``
    (without <bos>/<eos>), as ``explain_translation`` collects them, returned as data: nothing is
    written. The source is encoded by ``Translator.encode_source``; the decoder runs once over
    <bos> + translation, in evaluation mode (the model is given back in the mode it came in)."""
    src_ids = Translator(model, src_vocab, tgt_vocab).encode_source([sentence])[0]
    ids = [int(i) for i in target_ids]
    if tgt_vocab.eos_id in ids or tgt_vocab.bos_id in ids:
        raise ValueError(f"target_ids must hold the translation without <bos>/<eos>, got {ids}")
    decoder_input = [tgt_vocab.bos_id, *ids][: model.config.max_len]  # (T,)
    outputs = [*ids, tgt_vocab.eos_id][: len(decoder_input)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        encoded = model.encode(torch.tensor([src_ids], device=device), need_weights=True)  # (1, S)
        decoded = model.decode(torch.tensor([decoder_input], device=device), encoded, need_weights=True)
    finally:
        model.train(was_training)
    maps = {
        "encoder": [w[0].float().cpu() for w in encoded.weights],  # (H, S, S) per layer
        "decoder": [w[0].float().cpu() for w in decoded.self_weights],  # (H, T, T)
        "cross": [w[0].float().cpu() for w in decoded.cross_weights],  # (H, T, S)
    }
    return AttentionMaps(
        src_tokens=[src_vocab.id_to_token(i) for i in src_ids],
        tgt_tokens=[tgt_vocab.id_to_token(i) for i in decoder_input],
        output_tokens=[tgt_vocab.id_to_token(i) for i in outputs],
        maps=maps,
    )

