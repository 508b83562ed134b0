"""The decoder-only language model: cache equality, windowed generation, the Shakespeare task."""

import pytest
import torch
from helpers import tiny_language_model

from attnlab.decode.generate import (
    _cached_step,
    _uncached_step,
    _Window,
    generate,
)
from attnlab.nn.model import LanguageModelConfig
from attnlab.train.config import TrainConfig
from attnlab.train.presets import get_preset
from attnlab.train.tasks import LanguageModelTask


@pytest.fixture(scope="module")
def lm():
    return tiny_language_model(0)  # vocabulary 30, context 16, evaluation mode


def random_tokens(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 30, shape, generator=torch.Generator().manual_seed(seed))


def test_step_by_step_cache_equals_full_forward(lm):
    tokens = random_tokens(3, 16)
    full = lm(tokens)  # (3, 16, 30)
    state, pieces = lm.start(), []
    for chunk in (tokens[:, :5], tokens[:, 5:6], tokens[:, 6:16]):  # a prefill, then steps of any size
        logits, state = lm.step(chunk, state)
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)
    assert state.length == 16


def test_windowed_generation_cached_equals_uncached(lm):
    # 40 new tokens with a 16-token context: the window restarts several times.
    prompt = random_tokens(2, 3, seed=1)
    cached_step, plain_step = _cached_step(lm, keep=8), _uncached_step(lm, keep=8)
    prefix, cached_state, plain_state = prompt, _Window(0, None), _Window(0, None)
    restarts = 0
    for _ in range(40):
        a, cached_state = cached_step(prefix, cached_state)
        b, plain_state = plain_step(prefix, plain_state)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        restarts += cached_state.cache.length <= 8 and prefix.size(1) > 16
        prefix = torch.cat([prefix, b.argmax(-1, keepdim=True)], dim=1)
    assert restarts >= 2
    greedy_cached = generate(lm, prompt, 40, top_k=1, use_cache=True, keep=8)
    greedy_plain = generate(lm, prompt, 40, top_k=1, use_cache=False, keep=8)
    assert torch.equal(greedy_cached, greedy_plain)


def test_generation_repeats_with_a_seed(lm):
    prompt = torch.tensor([[1, 2, 3]])
    one = generate(lm, prompt, 30, seed=7, temperature=1.0)
    two = generate(lm, prompt, 30, seed=7, temperature=1.0)
    other = generate(lm, prompt, 30, seed=8, temperature=1.0)
    assert torch.equal(one, two) and not torch.equal(one, other)
    assert one.shape == (1, 33) and torch.equal(one[:, :3], prompt)


@pytest.mark.parametrize("training", [True, False])
def test_generate_samples_in_eval_mode_and_gives_the_mode_back(training):
    model = tiny_language_model(3, train=training, dropout=0.5)
    prompt = torch.tensor([[1, 2, 3]])
    for use_cache in (True, False):
        out = generate(model, prompt, 12, seed=5, use_cache=use_cache)
        assert model.training is training
        assert all(m.training is training for m in model.modules())
        # Dropout 0.5 would change the draw: the output is the evaluation-mode model's.
        reference = tiny_language_model(3, dropout=0.5)
        assert torch.equal(out, generate(reference, prompt, 12, seed=5, use_cache=use_cache))


def test_generate_rejects_an_empty_prompt(lm):
    with pytest.raises(ValueError, match="prompt"):
        generate(lm, torch.zeros(1, 0, dtype=torch.long), 5)


def test_shakespeare_task_splits_90_10_and_batches_repeat():
    config = get_preset("shakespeare-char").override(threads=1)
    task = LanguageModelTask(config)
    total = len(task.train_ids) + len(task.val_ids)
    assert len(task.train_ids) == int(0.9 * total)
    assert len(task.vocab) == 65 + 4  # the 65 characters of tiny Shakespeare and 4 specials
    first, again = task.batches(0)[:3], task.batches(0)[:3]
    assert first == again and first != task.batches(1)[:3]
    x, y = task.to_tensors(first[0], torch.device("cpu"))
    assert x.shape == (12, 64) and torch.equal(x[:, 1:], y[:, :-1])
    model = task.build_model()
    assert model.config.max_len == 64 and model.config.num_layers == 4
    metrics = task.evaluate(model, torch.device("cpu"))
    n = (len(task.val_ids) - 1) // 64  # evaluate scores every consecutive 64-character window
    x, y = task.val_ids[: n * 64].view(n, 64), task.val_ids[1 : n * 64 + 1].view(n, 64)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model.eval()(x).flatten(0, 1), y.flatten())
    assert metrics["val_loss"] == pytest.approx(float(expected), abs=1e-4)


def test_language_model_config_errors():
    with pytest.raises(ValueError, match="divisible"):
        LanguageModelConfig(vocab_size=10, d_model=30, num_heads=4)
    with pytest.raises(ValueError, match="task"):
        TrainConfig(task="poetry")


def test_beam_search_over_the_language_model_is_the_same_cached_or_not(lm):
    from attnlab.decode.search import beam_search

    # Beam search over a language model: continue a prompt; token 2 plays EOS.
    prompt = torch.tensor([[5, 6, 7]])

    def prompted(step):
        def run(prefix, window):  # the search's prefix starts with its BOS: swap in the prompt
            return step(torch.cat([prompt.expand(prefix.size(0), -1), prefix[:, 1:]], dim=1), window)
        return run

    kwargs = dict(batch_size=1, bos_id=7, eos_id=2, max_len=30, beam_size=3, pad_id=0)
    cached = beam_search(prompted(_cached_step(lm, keep=8)), _Window(0, None), **kwargs)
    plain = beam_search(prompted(_uncached_step(lm, keep=8)), _Window(0, None), **kwargs)
    assert [h.tokens for h in cached] == [h.tokens for h in plain]
    assert cached[0].score == pytest.approx(plain[0].score, abs=1e-5)
