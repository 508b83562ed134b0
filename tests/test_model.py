"""attnlab.nn.model: configuration checks, padding invariance, cached decoding == full decoding, tied
embeddings, and a tiny Transformer that learns to reverse digit strings end to end."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from attnlab import DecoderState, Transformer, TransformerConfig, padding_mask

PAD, BOS, EOS = 0, 1, 2  # the reversal task's special ids; its digits are tokens 3..12
VOCAB = 13


def tiny_config(**overrides) -> TransformerConfig:
    settings = dict(src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, d_model=16, num_heads=4,
                    num_encoder_layers=2, num_decoder_layers=2, d_ff=32, dropout=0.0, max_len=32)
    settings.update(overrides)
    return TransformerConfig(**settings)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_config(**overrides)).eval()


SRC = torch.tensor([[3, 4, 5, 6, 7, 8], [9, 10, 11, 0, 0, 0], [12, 3, 4, 5, 6, 0]])  # (B, S), padded
TGT = torch.tensor([[1, 8, 7, 6, 7], [1, 11, 10, 9, 2], [1, 6, 5, 4, 3]])  # (B, T), no padding


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


def test_sequence_longer_than_max_len_is_refused():
    model = tiny_model(max_len=8)
    with pytest.raises(ValueError, match="length 9.*max_len=8"):
        model(torch.full((1, 9), 3), TGT[:1])
    with pytest.raises(ValueError, match="length 9.*max_len=8"):
        model(SRC[:1], torch.full((1, 9), 3))


def test_forward_gives_logits_per_target_position():
    model = tiny_model(tgt_vocab_size=17)
    assert model(SRC, TGT).shape == (3, 5, 17)


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
    mask = padding_mask(SRC, PAD)  # (B, 1, 1, S)
    logits = model.decode(TGT, model.encode(SRC, mask), mask)
    other = SRC.masked_fill(~mask[:, 0, 0], 7)  # change every padded position's token id
    other_logits = model.decode(TGT, model.encode(other, mask), mask)
    torch.testing.assert_close(logits, other_logits, rtol=0, atol=0)
    torch.testing.assert_close(logits, model(SRC, TGT), rtol=0, atol=0)


# -- incremental decoding with a cache == decoding the whole prefix ------------------------------------
def _decode_one_at_a_time(model, tgt, memory, mask, need_weights=False):
    state = model.start_decoding(memory, mask)
    logits, self_w, cross_w = [], [], []
    for t in range(tgt.size(1)):
        result = model.decode_step(tgt[:, t : t + 1], state, need_weights=need_weights)
        step_logits, state = result[:2]
        logits.append(step_logits)
        if need_weights:
            self_w.append(result[2]["self"])
            cross_w.append(result[2]["cross"])
    assert state.length == tgt.size(1)
    return torch.cat(logits, dim=1), state, self_w, cross_w


@pytest.mark.parametrize("norm_first", [False, True])
@torch.no_grad()
def test_cached_decoding_equals_full_decoding(norm_first):
    model = tiny_model(norm_first=norm_first)
    mask = padding_mask(SRC, PAD)
    memory = model.encode(SRC, mask)
    full = model.decode(TGT, memory, mask)  # (B, T, V)
    stepped, state, _, _ = _decode_one_at_a_time(model, TGT, memory, mask)
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-5)
    assert state.self_kv[0].k.shape == (3, 4, 5, 4)  # (B, H, T, D)


@torch.no_grad()
def test_cached_decoding_without_source_padding():
    model = tiny_model()
    src = SRC[:1]
    memory = model.encode(src)
    full = model.decode(TGT[:1], memory)
    stepped, _, _, _ = _decode_one_at_a_time(model, TGT[:1], memory, None)
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_cached_decoding_weights_equal_full_decoding_weights():
    model = tiny_model()
    mask = padding_mask(SRC, PAD)
    memory = model.encode(SRC, mask)
    T = TGT.size(1)
    full, weights = model.decode(TGT, memory, mask, need_weights=True)
    stepped, _, self_w, cross_w = _decode_one_at_a_time(model, TGT, memory, mask, need_weights=True)
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-5)
    for layer in range(2):
        assert weights["self"][layer].shape == (3, 4, T, T)
        assert weights["cross"][layer].shape == (3, 4, T, SRC.size(1))
        for t in range(T):
            full_self = weights["self"][layer][:, :, t : t + 1]  # (B, H, 1, T)
            torch.testing.assert_close(self_w[t][layer], full_self[..., : t + 1], rtol=1e-5, atol=1e-5)
            assert (full_self[..., t + 1 :] == 0).all()  # the future is masked
            torch.testing.assert_close(cross_w[t][layer], weights["cross"][layer][:, :, t : t + 1],
                                       rtol=1e-5, atol=1e-5)
        # No attention lands on source padding.
        assert (weights["cross"][layer] * ~mask).abs().sum() == 0


@torch.no_grad()
def test_decoder_state_select_reorders_rows():
    model = tiny_model()
    mask = padding_mask(SRC, PAD)
    state = model.start_decoding(model.encode(SRC, mask), mask)
    _, state = model.decode_step(TGT[:, :2], state)
    index = torch.tensor([2, 0, 0])
    chosen = state.select(index)
    assert isinstance(chosen, DecoderState) and chosen.length == state.length == 2
    assert torch.equal(chosen.src_mask, state.src_mask[index])
    for new, old in zip(chosen.memory_kv + chosen.self_kv, state.memory_kv + state.self_kv):
        assert torch.equal(new.k, old.k[index]) and torch.equal(new.v, old.v[index])
    # Decoding on from the reordered state is decoding on from the original rows.
    next_logits, _ = model.decode_step(TGT[index, 2:3], chosen)
    expected, _ = model.decode_step(TGT[:, 2:3], state)
    torch.testing.assert_close(next_logits, expected[index])


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
    mask = padding_mask(src, PAD)
    state = model.start_decoding(model.encode(src, mask), mask)
    token = torch.full((src.size(0), 1), BOS)
    finished = torch.zeros(src.size(0), dtype=torch.bool)
    out = torch.full((src.size(0), max_steps), PAD)
    for t in range(max_steps):
        logits, state = model.decode_step(token, state)  # (B, 1, V)
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
    model = tiny_model(d_model=64, num_heads=4, d_ff=128).train()
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
