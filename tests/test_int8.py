"""int8 decoding: the lean step on dynamically quantized weights stays close to float32, runs on the
CPU only, and (slow) keeps a trained model's BLEU within 0.3 of float32."""

import pytest
import torch
from helpers import quiet, small_config
from test_fast_decode import LAYOUT_IDS, LAYOUTS, PAD, SOURCES, _Ids, _transformer

from attnlab.data.batching import pad_sequences
from attnlab.decode.translate import (
    DecodeConfig,
    Translator,
    bleu_scores,
    load_translator,
)
from attnlab.errors import ConfigError
from attnlab.nn import fast_decode


@pytest.fixture
def every_product_in_int8(monkeypatch):
    """The tests' model is far too small for int8 to pay (``fast_decode.int8_from_rows``): every product
    runs in int8 here all the same, whatever its rows, so that the int8 path is what is tested."""
    monkeypatch.setattr(fast_decode, "int8_from_rows", lambda fan_in, fan_out: 1)


@pytest.mark.parametrize("norm_first, share", LAYOUTS, ids=LAYOUT_IDS)
def test_int8_logits_stay_close_to_float32(norm_first, share, every_product_in_int8):
    model = _transformer(norm_first, share)
    exact, int8 = fast_decode.pack_decoder(model), fast_decode.pack_decoder(model, int8=True)
    assert int8.int8 and not exact.int8
    encoded = model.encode(pad_sequences(SOURCES, PAD))
    tokens = torch.randint(3, 40, (3, 8), generator=torch.Generator().manual_seed(7))
    exact_state, int8_state = fast_decode.start_decoding(exact, encoded), fast_decode.start_decoding(int8, encoded)
    agree = []
    for i in range(8):
        expected, exact_state = fast_decode.decoder_step(exact, tokens[:, i : i + 1], exact_state)
        logits, int8_state = fast_decode.decoder_step(int8, tokens[:, i : i + 1], int8_state)
        # 8-bit weights (a scale per output row) and 8-bit activations: errors of a few percent of
        # the logits' spread, far from the float32 step's 1e-5, and far below the spread itself.
        error = float((logits - expected).abs().max())
        assert 1e-4 < error < 0.1 * float(expected.std())
        agree += (logits.argmax(-1) == expected.argmax(-1)).tolist()
    assert sum(agree) >= 0.9 * len(agree)


def test_an_int8_translator_translates_close_to_float32(every_product_in_int8):
    translator = Translator(_transformer(False, False), _Ids(), _Ids())
    int8 = translator.quantized()
    assert int8.int8 and not translator.int8 and int8.model is translator.model
    config = DecodeConfig(beam_size=3, extra_len=10)
    exact, quantized = translator.translate_ids(SOURCES, config), int8.translate_ids(SOURCES, config)
    assert len(quantized) == len(exact) and all(ids for ids in quantized)
    # Every translation starts as the float32 one does (a small model drifts apart late, on near-ties).
    assert [ids[:4] for ids in quantized] == [ids[:4] for ids in exact]
    with pytest.raises(ConfigError, match="use_cache=False is the float32 reference"):
        int8.translate_ids(SOURCES, DecodeConfig(use_cache=False))


def test_int8_runs_the_products_too_small_to_pay_in_float32_on_a_copy():
    """Below its ``from_rows`` a product runs on a float32 copy of the weights, equal to the float32
    product to the bit; from it, in int8. The copy is taken when packing, as the int8 weights are."""
    linear = torch.nn.Linear(128, 256)
    weights = fast_decode._quantized((linear.weight.t(), linear.bias))
    assert weights.from_rows == fast_decode.int8_from_rows(128, 256) == 2**22 // (128 * 256)
    x = torch.randn(weights.from_rows, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = linear(x)
        small, large = fast_decode._apply(x[:-1], weights), fast_decode._apply(x, weights)
        assert torch.equal(small, torch.addmm(linear.bias, x[:-1], linear.weight.t()))
        error = large - expected  # int8 (7-bit activations, x86's reduce_range): close, not equal
        assert float(error.abs().max()) > 1e-4 and float(error.pow(2).mean().sqrt()) < 0.04 * float(expected.std())
        linear.weight.add_(1.0)  # a later change to the model is not seen
        assert torch.equal(fast_decode._apply(x[:-1], weights), small)
    # Large weights pay from 4 rows, small ones from rows x in x out = 2^22.
    assert [fast_decode.int8_from_rows(*shape) for shape in [(128, 4000), (1024, 256), (128, 128), (256, 768)]] == \
        [4, 4, 256, 22]


def test_int8_is_refused_off_the_cpu_in_one_line():
    with pytest.raises(ConfigError, match="CPU only .* device='cpu'") as error:
        load_translator("no-such-run", device="cuda", int8=True)  # refused before anything is read
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_int8_keeps_bleu_within_a_budget_on_a_trained_model(tmp_path):
    """A small model trained for a minute or two: int8 BLEU within 0.3 of float32 on the 1014 validation
    sentences. (On the first 200 only, sampling noise alone moved the difference to +0.50 for one trained
    model whose difference over all 1014 was +0.13.)"""
    from attnlab.data.corpus import load_multi30k
    from attnlab.train.trainer import train

    config = small_config(train_fraction=0.2, vocab_size=1000, d_model=64, num_heads=4, max_steps=1500,
                          max_len=128, eval_every=0, dropout=0.1)
    train(config, tmp_path / "run", progress=False, echo=quiet)
    pairs = load_multi30k("val", "de", "en")
    sources, references = [s for s, _ in pairs], [t for _, t in pairs]
    exact = load_translator(tmp_path / "run").translate(sources, DecodeConfig(beam_size=4))
    int8 = load_translator(tmp_path / "run", int8=True).translate(sources, DecodeConfig(beam_size=4))
    exact_bleu, int8_bleu = bleu_scores(exact, references)["bleu"], bleu_scores(int8, references)["bleu"]
    assert exact_bleu > 3  # a model that translates something (5.36 and 5.46 in trial runs), so the budget means something
    print(f"BLEU float32 {exact_bleu}, int8 {int8_bleu}")
    assert abs(int8_bleu - exact_bleu) <= 0.3, (exact_bleu, int8_bleu)
