"""The lean decoding step reproduces the decoder-only model's modules, cache included."""

import pytest
import torch
from helpers import randomize_norms_

from attnlab.decode.generate import generate
from attnlab.nn import fast_decode
from attnlab.nn.model import DecoderOnlyTransformer, LanguageModelConfig


def _model(norm_first: bool) -> DecoderOnlyTransformer:
    torch.manual_seed(0)
    config = LanguageModelConfig(vocab_size=30, d_model=32, num_heads=4, num_layers=2, d_ff=64, max_len=16,
                                 norm_first=norm_first)
    model = DecoderOnlyTransformer(config)
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
