"""attnlab.nn.model: configuration checks, padding invariance, decode(encode) == forward, cached
decoding == full decoding, input checks at the entry points, tied embeddings, and a tiny Transformer
that learns to reverse digit strings end to end."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_language_model, tiny_transformer

from attnlab import DecoderState, Transformer, TransformerConfig, padding_mask
from attnlab.nn import attention, layers
from attnlab.nn import model as model_module
from attnlab.nn.model import Decoded, DecodeStep, Encoded, LMOutput

PAD, BOS, EOS = 0, 1, 2  # the reversal task's special ids; its digits are tokens 3..12
VOCAB = 13


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    """The tests' shared tiny Transformer, with the reversal task's vocabulary and 32 positions."""
    return tiny_transformer(seed, vocab=VOCAB, **{"max_len": 32, **overrides})


def tiny_config(**overrides) -> TransformerConfig:
    return TransformerConfig(**{**tiny_model().config.to_dict(), **overrides})


SRC = torch.tensor([[3, 4, 5, 6, 7, 8], [9, 10, 11, 0, 0, 0], [12, 3, 4, 5, 6, 0]])  # (B, S), padded
TGT = torch.tensor([[1, 8, 7, 6, 7], [1, 11, 10, 9, 2], [1, 6, 5, 4, 3]])  # (B, T), no padding
TGT_PADDED = torch.tensor([[1, 8, 7, 6, 7], [1, 11, 2, 0, 0], [1, 6, 5, 4, 0]])  # (B, T), padded


# -- configuration and input checks ------------------------------------------------------------------
def test_config_rejects_d_model_not_divisible_by_heads():
    with pytest.raises(ValueError, match=r"d_model \(30\) must be divisible by num_heads \(4\)"):
        tiny_config(d_model=30)


def test_config_rejects_shared_embeddings_with_two_vocabularies():
    with pytest.raises(ValueError, match="share_embeddings.*src_vocab_size=13.*tgt_vocab_size=20"):
        tiny_config(tgt_vocab_size=20, share_embeddings=True)


def test_config_round_trips_through_a_dict():
    config = tiny_config(norm_first=True)
    assert TransformerConfig.from_dict(config.to_dict()) == config


def test_floating_point_token_ids_are_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="src must hold integer token ids, got dtype torch.float32"):
        model(SRC.float(), TGT)
    with pytest.raises(ValueError, match="tgt must hold integer token ids, got dtype torch.float32"):
        model(SRC, TGT.float())


@torch.no_grad()
def test_out_of_range_ids_are_named_at_every_entry_point():
    model = tiny_model()
    bad_src = SRC.clone()
    bad_src[1, 0] = VOCAB  # one past the vocabulary
    bad_tgt = TGT.clone()
    bad_tgt[2, 3] = -1
    src_message, tgt_message = r"src: token ids must be in 0\.\.12 .*got ids 0\.\.13", r"tgt: .*got ids -1\.\.11"
    with pytest.raises(ValueError, match=src_message):
        model(bad_src, TGT)
    with pytest.raises(ValueError, match=src_message):
        model.encode(bad_src)
    with pytest.raises(ValueError, match=tgt_message):
        model(SRC, bad_tgt)
    encoded = model.encode(SRC)
    with pytest.raises(ValueError, match=tgt_message):
        model.decode(bad_tgt, encoded)
    with pytest.raises(ValueError, match=r"tgt: .*got ids 1\.\.13"):
        model.decode_step(torch.tensor([[1], [13], [4]]), model.start_decoding(encoded))
    lm = tiny_language_model()  # vocabulary 30
    for entry in (lm, lm.forward_with_weights, lambda t: lm.step(t, lm.start())):
        with pytest.raises(ValueError, match=r"tokens: token ids must be in 0\.\.29 .*got ids 2\.\.30"):
            entry(torch.tensor([[2, 30]]))


def test_sequence_longer_than_max_len_is_refused():
    model = tiny_model(max_len=8)
    with pytest.raises(ValueError, match="length 9.*max_len=8"):
        model(torch.full((1, 9), 3), TGT[:1])
    with pytest.raises(ValueError, match="length 9.*max_len=8"):
        model(SRC[:1], torch.full((1, 9), 3))


@torch.no_grad()
def test_masks_are_checked_at_the_entry_points():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"src_mask of shape \(3, 1, 6, 6\) does not broadcast"):
        model.encode(SRC, torch.ones(3, 1, 6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="src_mask must be boolean"):
        model.encode(SRC, torch.ones(3, 1, 1, 6))
    with pytest.raises(ValueError, match=r"tgt_mask of shape \(4, 4\) does not broadcast"):
        model.decode(TGT, model.encode(SRC), tgt_mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="tgt has batch 2 but the encoded source has batch 3"):
        model.decode(TGT[:2], model.encode(SRC))


@torch.no_grad()
def test_the_decoder_takes_the_encoded_source_not_a_bare_memory():
    model = tiny_model()
    encoded = model.encode(SRC)
    for entry in (lambda e: model.decode(TGT, e), model.start_decoding):
        with pytest.raises(TypeError, match="the Encoded that encode\\(\\) returns"):
            entry(encoded.memory)


def test_forward_checks_its_inputs_once_and_the_layers_trust_them(monkeypatch):
    calls = {"tokens": 0, "mask": 0}

    def counting(real, key):
        def check(*args, **kwargs):
            calls[key] += 1
            return real(*args, **kwargs)
        return check

    monkeypatch.setattr(model_module, "_check_tokens", counting(model_module._check_tokens, "tokens"))
    for module in (attention, layers, model_module):
        monkeypatch.setattr(module, "_check_mask", counting(attention._check_mask, "mask"))
    model = tiny_model()
    model(SRC, TGT)
    assert calls == {"tokens": 2, "mask": 0}  # src and tgt once each; the masks it builds itself


def test_forward_gives_logits_per_target_position():
    model = tiny_model(tgt_vocab_size=17)
    assert model(SRC, TGT).shape == (3, 5, 17)


@pytest.mark.parametrize("norm_first", [False, True])
def test_features_only_gives_the_hidden_states_under_the_output_layer(norm_first):
    """What the training loss takes: the logits are the output layer applied to these states."""
    model = tiny_model(norm_first=norm_first)
    hidden = model(SRC, TGT_PADDED, features_only=True)
    assert hidden.shape == (3, 5, model.config.d_model)
    assert torch.equal(model.output(hidden), model(SRC, TGT_PADDED))
    lm = tiny_language_model(norm_first=norm_first)
    tokens = torch.randint(0, 30, (2, 7), generator=torch.Generator().manual_seed(0))
    hidden = lm(tokens, features_only=True)
    assert hidden.shape == (2, 7, lm.config.d_model)
    assert torch.equal(lm.output(hidden), lm(tokens))


# -- padding changes nothing it should not -------------------------------------------------------------
@torch.no_grad()
def test_source_padding_changes_no_logits():
    model = tiny_model()
    batch = model(SRC, TGT)  # (B, T, V)
    for row, length in enumerate([6, 3, 5]):
        alone = model(SRC[row : row + 1, :length], TGT[row : row + 1])  # the same sentence, unpadded
        torch.testing.assert_close(batch[row : row + 1], alone, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_masked_source_tokens_have_no_influence():
    model = tiny_model()
    logits = model.decode(TGT, model.encode(SRC)).logits
    other = SRC.masked_fill(SRC == PAD, 7)  # change every padded position's token id ...
    mask = padding_mask(SRC, PAD)  # ... but keep masking those positions
    other_logits = model.decode(TGT, model.encode(other, mask)).logits
    torch.testing.assert_close(logits, other_logits, rtol=0, atol=0)
    torch.testing.assert_close(logits, model(SRC, TGT), rtol=0, atol=0)


@pytest.mark.parametrize("norm_first", [False, True])
@torch.no_grad()
def test_decode_of_encode_equals_forward_and_incremental_decoding_on_padded_input(norm_first):
    model = tiny_model(norm_first=norm_first)
    encoded = model.encode(SRC)
    assert torch.equal(encoded.src_mask, padding_mask(SRC, PAD))  # the mask travels with the memory
    for tgt in (TGT, TGT_PADDED):
        torch.testing.assert_close(model.decode(tgt, model.encode(SRC)).logits, model(SRC, tgt), rtol=0, atol=0)
    full = model(SRC, TGT)
    stepped, _, _, _ = _decode_one_at_a_time(model, TGT, encoded)
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-5)
    # The input is one where forgetting the source mask would show: attending to padding differs.
    unmasked = Encoded(encoded.memory, torch.ones_like(encoded.src_mask), None)
    assert not torch.allclose(model.decode(TGT, unmasked).logits, full, atol=1e-3)


@torch.no_grad()
def test_weights_are_none_unless_asked_for():
    model = tiny_model()
    encoded = model.encode(SRC)
    decoded = model.decode(TGT, encoded)
    step = model.decode_step(TGT[:, :1], model.start_decoding(encoded))
    assert isinstance(encoded, Encoded) and encoded.weights is None
    assert isinstance(decoded, Decoded) and decoded.self_weights is None and decoded.cross_weights is None
    assert isinstance(step, DecodeStep) and step.self_weights is None and step.cross_weights is None
    encoded = model.encode(SRC, need_weights=True)
    assert [tuple(w.shape) for w in encoded.weights] == [(3, 4, 6, 6)] * 2
    torch.testing.assert_close(model.decode(TGT, encoded, need_weights=True).logits, decoded.logits)


# -- incremental decoding with a cache == decoding the whole prefix ------------------------------------
def _decode_one_at_a_time(model, tgt, encoded, need_weights=False):
    state = model.start_decoding(encoded)
    logits, self_w, cross_w = [], [], []
    for t in range(tgt.size(1)):
        step = model.decode_step(tgt[:, t : t + 1], state, need_weights=need_weights)
        state = step.state
        logits.append(step.logits)
        self_w.append(step.self_weights)
        cross_w.append(step.cross_weights)
    assert state.length == tgt.size(1)
    return torch.cat(logits, dim=1), state, self_w, cross_w


@pytest.mark.parametrize("norm_first", [False, True])
@torch.no_grad()
def test_cached_decoding_equals_full_decoding(norm_first):
    model = tiny_model(norm_first=norm_first)
    encoded = model.encode(SRC)
    full = model.decode(TGT, encoded).logits  # (B, T, V)
    stepped, state, _, _ = _decode_one_at_a_time(model, TGT, encoded)
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-5)
    assert state.self_kv[0].k.shape == (3, 4, 5, 4)  # (B, H, T, D)


@torch.no_grad()
def test_cached_decoding_without_source_padding():
    model = tiny_model()
    encoded = model.encode(SRC[:1])
    full = model.decode(TGT[:1], encoded).logits
    stepped, _, _, _ = _decode_one_at_a_time(model, TGT[:1], encoded)
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_cached_decoding_weights_equal_full_decoding_weights():
    model = tiny_model()
    mask = padding_mask(SRC, PAD)
    encoded = model.encode(SRC)
    T = TGT.size(1)
    full = model.decode(TGT, encoded, need_weights=True)
    stepped, _, self_w, cross_w = _decode_one_at_a_time(model, TGT, encoded, need_weights=True)
    torch.testing.assert_close(stepped, full.logits, rtol=1e-5, atol=1e-5)
    for layer in range(2):
        assert full.self_weights[layer].shape == (3, 4, T, T)
        assert full.cross_weights[layer].shape == (3, 4, T, SRC.size(1))
        for t in range(T):
            full_self = full.self_weights[layer][:, :, t : t + 1]  # (B, H, 1, T)
            torch.testing.assert_close(self_w[t][layer], full_self[..., : t + 1], rtol=1e-5, atol=1e-5)
            assert (full_self[..., t + 1 :] == 0).all()  # the future is masked
            torch.testing.assert_close(cross_w[t][layer], full.cross_weights[layer][:, :, t : t + 1],
                                       rtol=1e-5, atol=1e-5)
        # No attention lands on source padding.
        assert (full.cross_weights[layer] * ~mask).abs().sum() == 0


@torch.no_grad()
def test_decoder_state_select_reorders_rows():
    model = tiny_model()
    state = model.start_decoding(model.encode(SRC))
    state = model.decode_step(TGT[:, :2], state).state
    index = torch.tensor([2, 0, 0])
    chosen = state.select(index)
    assert isinstance(chosen, DecoderState) and chosen.length == state.length == 2
    assert torch.equal(chosen.src_mask, state.src_mask[index])
    for new, old in zip(chosen.memory_kv + chosen.self_kv, state.memory_kv + state.self_kv):
        assert torch.equal(new.k, old.k[index]) and torch.equal(new.v, old.v[index])
    # Decoding on from the reordered state is decoding on from the original rows.
    next_logits = model.decode_step(TGT[index, 2:3], chosen).logits
    expected = model.decode_step(TGT[:, 2:3], state).logits
    torch.testing.assert_close(next_logits, expected[index])


@torch.no_grad()
def test_encoded_select_reorders_rows():
    model = tiny_model()
    encoded = model.encode(SRC, need_weights=True)
    index = torch.tensor([1, 1, 0])
    chosen = encoded.select(index)
    assert torch.equal(chosen.memory, encoded.memory[index]) and torch.equal(chosen.src_mask, encoded.src_mask[index])
    assert all(torch.equal(a, b[index]) for a, b in zip(chosen.weights, encoded.weights))
    torch.testing.assert_close(model.decode(TGT[index], chosen).logits, model(SRC[index], TGT[index]))


# -- the decoder-only model ----------------------------------------------------------------------------
@torch.no_grad()
def test_language_model_gives_logits_and_weights_on_request():
    lm = tiny_language_model()
    tokens = torch.randint(0, 30, (2, 7), generator=torch.Generator().manual_seed(0))
    logits = lm(tokens)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 7, 30)
    inspected = lm.forward_with_weights(tokens)
    assert isinstance(inspected, LMOutput)
    torch.testing.assert_close(inspected.logits, logits)
    for w in inspected.weights:  # one (B, H, T, T) map per layer: causal rows that sum to 1
        assert w.shape == (2, 4, 7, 7)
        assert (w.triu(diagonal=1) == 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 7))


# -- shared embeddings ---------------------------------------------------------------------------------
def test_share_embeddings_ties_source_target_and_output_weights():
    model = tiny_model(share_embeddings=True)
    weight = model.src_embed.embedding.weight
    assert model.tgt_embed.embedding.weight is weight
    assert model.output.weight is weight
    assert sum(p is weight for p in model.parameters()) == 1  # one Parameter, counted once
    untied = tiny_model()
    assert untied.src_embed.embedding.weight is not untied.tgt_embed.embedding.weight
    assert untied.output.weight is not untied.tgt_embed.embedding.weight


# -- end to end: a tiny Transformer learns to reverse digit strings --------------------------------------
def reversal_batch(n: int, generator: torch.Generator, min_len: int = 5, max_len: int = 10):
    """Random digit strings (tokens 3..12) and their reversals.

    Returns src (n, max_len), padded with PAD, and tgt (n, max_len + 2) = BOS, reversed digits, EOS, PAD...
    """
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=generator)  # (n,)
    digits = torch.randint(3, VOCAB, (n, max_len), generator=generator)  # (n, L)
    positions = torch.arange(max_len)
    real = positions[None, :] < lengths[:, None]  # (n, L)
    src = digits.masked_fill(~real, PAD)
    backwards = (lengths[:, None] - 1 - positions[None, :]).clamp(min=0)  # (n, L)
    reversed_digits = digits.gather(1, backwards).masked_fill(~real, PAD)
    tgt = torch.full((n, max_len + 2), PAD)
    tgt[:, 0] = BOS
    tgt[:, 1:-1] = reversed_digits
    tgt[torch.arange(n), lengths + 1] = EOS
    return src, tgt


def greedy_decode(model: Transformer, src: torch.Tensor, max_steps: int) -> torch.Tensor:
    """Most likely next token, one step at a time, with the cache. Returns (B, max_steps), PAD after EOS."""
    state = model.start_decoding(model.encode(src))
    token = torch.full((src.size(0), 1), BOS)
    finished = torch.zeros(src.size(0), dtype=torch.bool)
    out = torch.full((src.size(0), max_steps), PAD)
    for t in range(max_steps):
        logits, state, _, _ = model.decode_step(token, state)  # (B, 1, V)
        token = logits[:, -1].argmax(dim=-1, keepdim=True).masked_fill(finished[:, None], PAD)
        out[:, t] = token[:, 0]
        finished |= token[:, 0] == EOS
        if finished.all():
            break
    return out


def test_reversal_batch_is_right():
    src, tgt = reversal_batch(4, torch.Generator().manual_seed(0))
    for s, t in zip(src.tolist(), tgt.tolist()):
        digits = [x for x in s if x != PAD]
        assert t[: len(digits) + 2] == [BOS] + digits[::-1] + [EOS]
        assert set(t[len(digits) + 2 :]) <= {PAD}


def test_tiny_transformer_learns_to_reverse_digit_strings():
    start = time.perf_counter()
    steps, batch_size, peak_lr, warmup = 300, 128, 3e-3, 30
    model = tiny_model(d_model=64, num_heads=4, d_ff=128, train=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=peak_lr, betas=(0.9, 0.98))
    # Linear warm-up, then linear decay to 5% of the peak.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.05, (steps - s) / (steps - warmup)))
    )
    data = torch.Generator().manual_seed(0)
    for _ in range(steps):
        src, tgt = reversal_batch(batch_size, data)
        logits = model(src, tgt[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tgt[:, 1:].reshape(-1), ignore_index=PAD)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()

    model.eval()
    src, tgt = reversal_batch(500, torch.Generator().manual_seed(12345))  # fresh sequences
    reference = tgt[:, 1:]  # reversed digits, EOS, PAD...
    with torch.no_grad():
        predicted = greedy_decode(model, src, max_steps=reference.size(1))
    scored = reference != PAD  # every digit and the EOS
    accuracy = ((predicted == reference) & scored).sum().item() / scored.sum().item()
    elapsed = time.perf_counter() - start
    assert accuracy >= 0.99, f"token accuracy {accuracy:.4f} after {steps} steps ({elapsed:.1f} s)"
