"""The worked examples print the tutorials' digits, and explain_translation collects every map."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from helpers import tiny_transformer

from attnlab.data.vocab import CharVocab, Vocab
from attnlab.decode.translate import DecodeConfig, Translator
from attnlab.inspect.explain import (
    COFFEE_W_K,
    COFFEE_W_Q,
    COFFEE_W_V,
    COFFEE_X,
    JOURNEY_INPUTS,
    TUTORIAL_X,
    Step,
    explain_example,
    explain_translation,
    format_tensor,
    format_walkthrough,
    walkthrough,
)
from attnlab.nn.model import Transformer


def squash(text: str) -> str:
    """Drop all whitespace, so that column alignment does not matter."""
    return re.sub(r"\s+", "", text)


def step(steps: list[Step], title_start: str) -> Step:
    matches = [s for s in steps if s.title.startswith(title_start)]
    assert len(matches) == 1, [s.title for s in steps]
    return matches[0]


# -- the tutorials' first worked example: six 3-d token embeddings, no weights ----------------


def test_simple_prints_the_tutorials_digits():
    text = explain_example("simple")
    assert "[0.9544, 1.4950, 1.4754, 0.8434, 0.7070, 1.0865]" in text  # scores, row 2
    assert "[[0.9995," in text  # scores[0, 0]
    assert "[0.1385, 0.2379, 0.2333, 0.1240, 0.1082, 0.1581]" in text  # weights, row 2
    context = [
        "[0.4421, 0.5931, 0.5790]",
        "[0.4419, 0.6515, 0.5683]",
        "[0.4431, 0.6496, 0.5671]",
        "[0.4304, 0.6298, 0.5510]",
        "[0.4671, 0.5910, 0.5266]",
        "[0.4177, 0.6503, 0.5645]",
    ]
    block = text.split("Context vectors = weights @ inputs")[1].split("Step")[0]
    assert [line.strip(" [],") for line in block.splitlines()[1:7]] == [c.strip("[]") for c in context]
    assert "[1.0000, 1.0000, 1.0000, 1.0000, 1.0000, 1.0000]" in text  # row sums


def test_simple_context_of_token_two_alone_equals_row_two():
    steps = walkthrough("simple")
    context = step(steps, "Context vectors").tensor
    z2 = step(steps, "Context vector z(2)")
    torch.testing.assert_close(z2.tensor, context[1])
    assert z2.note.endswith("True.")
    assert format_tensor(z2.tensor) == "[0.4419, 0.6515, 0.5683]"


def test_simple_steps_hold_the_computed_tensors():
    steps = walkthrough("simple")
    scores = step(steps, "Attention scores").tensor
    torch.testing.assert_close(scores, JOURNEY_INPUTS @ JOURNEY_INPUTS.T)
    weights = step(steps, "Attention weights").tensor
    torch.testing.assert_close(weights.sum(-1), torch.ones(6))
    with pytest.raises(dataclasses.FrozenInstanceError):
        steps[0].title = "changed"


# -- example A: "she likes coffee", three 4-d tokens, fixed W_q = W_k and W_v ---------------


def test_trainable_output_to_six_decimals():
    text = explain_example("trainable")
    block = text.split("Outputs = weights @ V")[1]
    assert squash(block).startswith(
        squash(
            "[[0.575303, 0.705274, 0.505303, 0.641775],"
            " [0.600195, 0.688227, 0.530195, 0.619162],"
            " [0.581550, 0.700783, 0.511550, 0.646592]]"
        )
    )
    assert "1/sqrt(d_k) = 1/sqrt(4) = 0.5000" in text


def test_trainable_uses_float64_and_the_examples_weights():
    steps = walkthrough("trainable")
    assert step(steps, "Example A").tensor.dtype == torch.float64
    assert step(steps, "Outputs").tensor.dtype == torch.float64
    # The walk-through shows the example's matrices and computes Q, K and V with exactly them.
    for name, weight, product in (("W_q", COFFEE_W_Q, "Queries"), ("W_k", COFFEE_W_K, "Keys"),
                                  ("W_v", COFFEE_W_V, "Values")):
        assert torch.equal(step(steps, name).tensor, weight)
        torch.testing.assert_close(step(steps, product).tensor, COFFEE_X @ weight, rtol=0, atol=1e-15)
    # ... and its outputs are softmax(Q Kᵀ / 2) V of those products (d_k = 4).
    q, k, v = COFFEE_X @ COFFEE_W_Q, COFFEE_X @ COFFEE_W_K, COFFEE_X @ COFFEE_W_V
    torch.testing.assert_close(step(steps, "Outputs").tensor, (q @ k.T / 2).softmax(-1) @ v)


# -- example B: the tutorial's three 4-d inputs and integer W_q, W_k, W_v ---------------------


def test_tutorial_prints_q_k_v_and_raw_scores():
    text = squash(explain_example("tutorial"))
    assert "QueriesQ=X@W_q[[1,0,2],[2,2,2],[2,1,3]]" in text
    assert "KeysK=X@W_k[[0,1,1],[4,4,0],[2,3,1]]" in text
    assert "ValuesV=X@W_v[[1,2,3],[2,8,0],[2,6,3]]" in text
    assert "RawscoresQ@K.T[[2,4,4],[4,16,12],[4,12,10]]" in text


def test_tutorial_default_scale_is_one_over_sqrt_dk():
    text = explain_example("tutorial")
    block = text.split("Outputs = weights @ V")[1]
    assert block.splitlines()[1].strip() == "[[1.863874, 6.319371, 1.704189],"
    assert "1/sqrt(d_k) = 1/sqrt(3) = 0.5774" in text
    assert "pass scale=1.0 to reproduce" in text


def test_tutorial_scale_one_reproduces_and_says_it_differs():
    text = explain_example("tutorial", scale=1.0)
    block = text.split("Outputs = weights @ V")[1]
    assert block.splitlines()[1].strip() == "[[1.936621, 6.683105, 1.595068],"
    assert "differs from 1/sqrt(d_k) = 1/sqrt(3) = 0.5774" in text
    assert "wrongly calls d_k the number of words" in text
    assert "d_k = 3 is the key dimension" in text


def test_tutorial_weights_rows_sum_to_one_and_match_the_reference_path():
    steps = walkthrough("tutorial")
    weights = step(steps, "Attention weights").tensor
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, dtype=torch.float64))
    raw = step(steps, "Raw scores").tensor
    torch.testing.assert_close(weights, (raw / math.sqrt(3)).softmax(-1))
    assert step(steps, "Example B").tensor is not None
    torch.testing.assert_close(step(steps, "Example B").tensor, TUTORIAL_X)


# -- arguments and printing -------------------------------------------------------------------


def test_unknown_example_lists_the_valid_names():
    with pytest.raises(ValueError, match="simple, trainable, tutorial"):
        walkthrough("fancy")
    with pytest.raises(ValueError, match="valid examples"):
        explain_example("")


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_scale_is_refused(scale):
    with pytest.raises(ValueError, match="scale must be a positive number"):
        walkthrough("tutorial", scale)


def test_simple_example_takes_no_scale():
    with pytest.raises(ValueError, match="no scaling"):
        walkthrough("simple", scale=0.5)


def test_format_tensor_and_walkthrough():
    assert format_tensor(torch.tensor([[1.0, 22.5], [3.25, 4.0]]), 2) == "[[ 1.00, 22.50],\n [ 3.25,  4.00]]"
    assert format_tensor(torch.tensor(0.5), 3) == "0.500"
    with pytest.raises(ValueError, match="0-, 1- or 2-D"):
        format_tensor(torch.zeros(1, 1, 1))
    text = format_walkthrough(
        [Step("first", torch.tensor([1.0, 2.0]), "a note"), Step("second", torch.tensor([3.0]), digits=0)],
        digits=1,
    )
    assert text == "Step 1. first\n    [1.0, 2.0]\n    a note\n\nStep 2. second\n    [3]"


# -- explain_translation on a tiny random Transformer -----------------------------------------


@pytest.fixture
def char_vocabs() -> tuple[CharVocab, CharVocab]:
    return CharVocab.build("ein Mann fährt Rad."), CharVocab.build("a man rides a bike.")


def translation_model(
    src_vocab_size: int, tgt_vocab_size: int, layers: tuple[int, int] = (2, 3), **overrides
) -> Transformer:
    """The shared tiny Transformer, with these vocabularies and layer counts and some dropout."""
    return tiny_transformer(0, src_vocab_size=src_vocab_size, tgt_vocab_size=tgt_vocab_size,
                            num_encoder_layers=layers[0], num_decoder_layers=layers[1], dropout=0.1,
                            **overrides)


def test_explain_translation_writes_every_map(char_vocabs, tmp_path):
    src_vocab, tgt_vocab = char_vocabs
    model = translation_model(len(src_vocab), len(tgt_vocab))
    ids = tgt_vocab.encode("a bike")
    calls = []

    def translate_fn(sentence: str) -> list[int]:
        calls.append(sentence)
        return [tgt_vocab.bos_id, *ids, tgt_vocab.eos_id]  # <bos>/<eos> are dropped if present

    model.train()
    result = explain_translation(model, src_vocab, tgt_vocab, "ein Rad", tmp_path, translate_fn)
    assert model.training  # the mode is restored
    assert calls == ["ein Rad"]
    assert result.translation_ids == ids and result.translation == "a bike"

    S, T, H = 8, 7, 4  # "ein Rad" + <eos>; <bos> + "a bike"
    assert result.src_tokens == [*"ein Rad", "<eos>"]
    assert result.tgt_tokens == ["<bos>", *"a bike"]
    assert result.output_tokens == [*"a bike", "<eos>"]
    assert [tuple(w.shape) for w in result.maps["encoder"]] == [(H, S, S)] * 2
    assert [tuple(w.shape) for w in result.maps["decoder"]] == [(H, T, T)] * 3
    assert [tuple(w.shape) for w in result.maps["cross"]] == [(H, T, S)] * 3
    for w in result.maps["decoder"]:  # causal: no position attends to a later one
        assert torch.all(w.triu(diagonal=1) == 0)
    for layers in result.maps.values():
        for w in layers:
            torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))

    names = sorted(p.name for p in result.pngs)
    assert names == sorted(
        [f"encoder_layer{i}.png" for i in (1, 2)]
        + [f"{kind}_layer{i}.png" for kind in ("decoder", "cross") for i in (1, 2, 3)]
    )
    for path in result.paths:
        assert path.is_file() and path.parent == tmp_path
    assert result.report == tmp_path / "report.html"
    assert '"translation":"a bike"' in result.report.read_text(encoding="utf-8")

    lines = result.top_attended.splitlines()
    assert len(lines) == T
    assert lines[0].startswith("'a'") and lines[-1].startswith("'<eos>'")
    assert all(line.count("(") == 3 for line in lines)


def test_explain_translation_of_an_empty_translation(char_vocabs, tmp_path):
    src_vocab, tgt_vocab = char_vocabs
    model = translation_model(len(src_vocab), len(tgt_vocab), layers=(1, 1))
    result = explain_translation(model, src_vocab, tgt_vocab, "ein", tmp_path, lambda s: [])
    assert result.tgt_tokens == ["<bos>"] and result.output_tokens == ["<eos>"]
    assert tuple(result.maps["cross"][0].shape) == (4, 1, 4)
    with pytest.raises(ValueError, match="inside the translation"):
        explain_translation(model, src_vocab, tgt_vocab, "ein", tmp_path, lambda s: [5, tgt_vocab.eos_id, 6])


def test_explain_translation_cuts_an_over_long_source_as_translation_does(char_vocabs, tmp_path):
    """One policy for a source longer than the model's positions: warn, then cut (Translator.encode_source)."""
    src_vocab, tgt_vocab = char_vocabs
    model = translation_model(len(src_vocab), len(tgt_vocab), layers=(1, 1), max_len=8)
    sentence = "ein Mann fährt Rad."
    with pytest.warns(UserWarning, match="longer than the model's 7 subwords and were cut") as explained:
        result = explain_translation(model, src_vocab, tgt_vocab, sentence, tmp_path, lambda s: [])
    with pytest.warns(UserWarning, match="were cut") as translated:
        expected = Translator(model, src_vocab, tgt_vocab).encode_source([sentence])[0]
    assert str(explained[0].message) == str(translated[0].message)
    assert result.src_tokens == [*sentence[:7], "<eos>"]
    assert result.src_tokens == [src_vocab.id_to_token(i) for i in expected]


def test_explain_translation_with_a_greedy_translator_and_bpe(tmp_path):
    """Decoder position i is the one that produced output token i, and the maps equal cached decoding."""
    src_vocab = Vocab.train(["ein Mann fährt ein Rad .", "eine Frau liest ."] * 3, vocab_size=300, min_frequency=1)
    tgt_vocab = Vocab.train(["a man rides a bike .", "a woman reads ."] * 3, vocab_size=300, min_frequency=1)
    model = translation_model(len(src_vocab), len(tgt_vocab), layers=(1, 2))
    translator = Translator(model, src_vocab, tgt_vocab)
    greedy = DecodeConfig(beam_size=1, extra_len=4)
    sentence = "ein Mann fährt"

    def translate_fn(s: str) -> list[int]:
        return translator.translate_ids(translator.encode_source([s]), greedy)[0]

    result = explain_translation(model, src_vocab, tgt_vocab, sentence, tmp_path, translate_fn)
    assert result.translation == translator.translate([sentence], greedy)[0]
    assert result.src_tokens == [*src_vocab.tokens(sentence), "<eos>"]

    with torch.no_grad():
        src = torch.tensor(translator.encode_source([sentence]))  # (1, S)
        encoded = model.encode(src)
        tgt = torch.tensor([[tgt_vocab.bos_id, *result.translation_ids]])  # (1, T)
        predicted = model.decode(tgt, encoded).logits.argmax(-1)[0].tolist()
        assert predicted[:-1] == result.translation_ids  # row i produced output token i

        state = model.start_decoding(encoded)
        for t, token in enumerate(tgt[0].tolist()):
            step = model.decode_step(torch.tensor([[token]]), state, need_weights=True)
            state = step.state
            for layer, w in enumerate(step.cross_weights):
                torch.testing.assert_close(w[0, :, 0], result.maps["cross"][layer][:, t])
