"""The lean decoding step reproduces the decoder-only model's modules, cache included, and refuses a
model that differs from what it computes."""

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_norms_, tiny_language_model
from torch import nn

from attnlab.decode.generate import generate
from attnlab.nn import fast_decode
from attnlab.nn.model import DecoderOnlyTransformer


def _model(norm_first: bool, **overrides) -> DecoderOnlyTransformer:
    """The shared tiny language model (vocabulary 30, context 16), biases and norms made non-trivial."""
    model = tiny_language_model(0, norm_first=norm_first, **overrides)
    with torch.no_grad():  # non-zero biases, so a bias left out or misplaced shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return randomize_norms_(model, torch.Generator().manual_seed(1)).eval()


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-LN", "post-LN"])
def test_step_equals_the_modules_for_a_prefix_then_single_tokens_then_a_chunk(norm_first):
    model = _model(norm_first)
    packed = fast_decode.pack(model)
    tokens = torch.randint(0, 30, (3, 16), generator=torch.Generator().manual_seed(2))
    full = model(tokens)  # (3, 16, 30)
    state, module_state = model.start(), model.start()
    for a, b in [(0, 5), (5, 6), (6, 7), (7, 8), (8, 12), (12, 13)]:  # prefix, tokens, a chunk, a token
        logits, state = fast_decode.step(packed, tokens[:, a:b], state)
        torch.testing.assert_close(logits, full[:, b - 1], atol=1e-5, rtol=0)
        _, module_state = model.step(tokens[:, a:b], module_state)
        assert state.length == module_state.length == b
        for ours, theirs in zip(state.self_kv, module_state.self_kv):
            torch.testing.assert_close(ours.k, theirs.k, atol=1e-5, rtol=0)
            torch.testing.assert_close(ours.v, theirs.v, atol=1e-5, rtol=0)


def test_cached_generation_equals_the_modules_read_uncached():
    model = _model(norm_first=False)
    prompt = torch.randint(0, 30, (2, 4), generator=torch.Generator().manual_seed(3))
    cached = generate(model, prompt, 40, seed=5, keep=8)
    plain = generate(model, prompt, 40, seed=5, keep=8, use_cache=False)
    assert torch.equal(cached, plain)


def test_pack_and_step_refuse_what_they_cannot_do():
    model = _model(norm_first=True)
    with pytest.raises(ValueError, match="eval"):
        fast_decode.pack(model.train())
    packed = fast_decode.pack(model.eval())
    _, state = fast_decode.step(packed, torch.ones(1, 16, dtype=torch.long), model.start())
    with pytest.raises(ValueError, match="17 positions"):
        fast_decode.step(packed, torch.ones(1, 1, dtype=torch.long), state)


@pytest.mark.parametrize("prompt, message", [
    (torch.tensor([[1, 30]]), r"0\.\.29"), (torch.tensor([[-1]]), r"0\.\.29"),
    (torch.zeros(0, 3, dtype=torch.long), "at least one token"), (torch.ones(1, 2), "integer token ids"),
    (torch.ones(2, dtype=torch.long), r"shape \(batch, length\)"),
])
def test_generate_names_a_bad_prompt(prompt, message):
    with pytest.raises(ValueError, match=message):
        generate(_model(norm_first=True), prompt, 3)


# -- pack checks every assumption the lean step makes ---------------------------------------------------
def _gelu_feed_forward(model):
    model.layers[1].feed_forward.activation = F.gelu


def _eps(model):
    model.layers[0].norm2.eps = 1e-6


def _norm_placement(model):
    model.layers[0].norm_first = not model.layers[0].norm_first


def _untied_output(model):
    model.output.weight = nn.Parameter(model.output.weight.detach().clone())


def _output_bias(model):
    model.output.bias = nn.Parameter(torch.zeros(model.config.vocab_size))


def _dropout_in_training(model):
    model.layers[1].dropout1.train()


def _extra_module(model):
    model.layers[0].scale = nn.Linear(32, 32).eval()


def _heads(model):
    model.layers[0].self_attn.num_heads = 8


@pytest.mark.parametrize("change, message", [
    (_gelu_feed_forward, "ReLU"), (_eps, "eps 1e-05"), (_norm_placement, "norm_first=True"),
    (_untied_output, "tied to the embeddings"), (_output_bias, "without bias"), (_dropout_in_training, "eval"),
    (_extra_module, r"exactly the modules .*'scale'"), (_heads, "num_heads=4"),
])
def test_pack_refuses_a_model_that_differs_from_what_step_computes(change, message):
    model = _model(norm_first=True)
    fast_decode.pack(model)  # the model as it is: accepted
    change(model)
    with pytest.raises(ValueError, match=message):
        fast_decode.pack(model)


def test_pack_follows_the_config_for_tying_and_norms():
    model = _model(norm_first=False, tie_embeddings=False)
    packed = fast_decode.pack(model)
    assert packed.final_norm is None and packed.output.data_ptr() == model.output.weight.data_ptr()
    model.output.weight = model.embed.embedding.weight  # tied, although the config says untied
    with pytest.raises(ValueError, match="separate from the embeddings"):
        fast_decode.pack(model)
