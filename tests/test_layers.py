"""attnlab.nn.layers: positional encoding, feed-forward and Add & Norm against their formulas; encoder and
decoder layers against torch.nn.TransformerEncoderLayer / TransformerDecoderLayer with copied weights."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    assert_grads_match,
    backward_both,
    clones,
    copy_to_torch,
    leaves,
    randomize_norms_,
    torch_attn_mask,
    torch_key_padding_mask,
)
from torch import nn

from attnlab import (
    AddNorm,
    DecoderLayer,
    EncoderLayer,
    PositionalEncoding,
    PositionwiseFeedForward,
    causal_mask,
    padding_mask,
)
from attnlab.nn.attention import dropout
from attnlab.nn.layers import Dropout

F64 = torch.float64


# -- positional encoding ------------------------------------------------------------------------------
def test_positional_table_has_max_len_rows_by_default():
    assert PositionalEncoding(d_model=16).P.shape == (1, 1000, 16)
    assert PositionalEncoding(d_model=16, max_len=50).P.shape == (1, 50, 16)


def test_tutorial_example_d32_60_positions():
    pe = PositionalEncoding(d_model=32, dropout=0.0)
    x = torch.randn(1, 60, 32, generator=torch.Generator().manual_seed(0))
    out = pe(x)
    assert out.shape == (1, 60, 32)
    torch.testing.assert_close(out, x + pe.P[:, :60], rtol=0, atol=0)


@pytest.mark.parametrize("i,j", [(0, 0), (1, 0), (1, 1), (7, 3), (59, 15), (999, 8)])
def test_positional_values_follow_the_formula(i, j):
    d = 32
    P = PositionalEncoding(d_model=d).P[0]
    angle = i / 10000 ** (2 * j / d)
    assert P[i, 2 * j].item() == pytest.approx(math.sin(angle), abs=1e-6)
    assert P[i, 2 * j + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_positional_encoding_with_a_start_offset():
    pe = PositionalEncoding(d_model=8, dropout=0.0, max_len=20)
    x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pe(x, start=5), x + pe.P[:, 5:9], rtol=0, atol=0)
    # Position t alone, offset by t, is the t-th row of the whole sequence's encoding.
    torch.testing.assert_close(pe(x[:, 2:3], start=2), pe(x)[:, 2:3], rtol=0, atol=0)


def test_positional_encoding_longer_than_max_len_raises():
    pe = PositionalEncoding(d_model=8, max_len=10)
    pe(torch.zeros(1, 10, 8))  # exactly max_len is fine
    with pytest.raises(ValueError, match="length 11.*max_len=10"):
        pe(torch.zeros(1, 11, 8))
    with pytest.raises(ValueError, match="length 12.*max_len=10"):
        pe(torch.zeros(1, 2, 8), start=10)


def test_positional_encoding_needs_an_even_d_model():
    with pytest.raises(ValueError, match="even"):
        PositionalEncoding(d_model=7)


# -- feed-forward and Add & Norm -------------------------------------------------------------------------
def test_every_dropout_of_the_layers_is_attnlabs_dropout():
    layer = DecoderLayer(8, 2, 16, dropout=0.25).train()
    modules = [layer.dropout1, layer.dropout2, layer.dropout3, layer.feed_forward.dropout,
               PositionalEncoding(8, 0.25).dropout, AddNorm(8, 0.25).dropout]
    x = torch.randn(2, 3, 8)
    for module in modules:
        assert type(module) is Dropout and module.p == 0.25
        torch.manual_seed(4)
        dropped = module(x)
        torch.manual_seed(4)
        assert torch.equal(dropped, dropout(x, 0.25)) and not torch.equal(dropped, x)
        assert torch.equal(module.eval()(x), x)


def test_feed_forward_is_the_formula():
    torch.manual_seed(0)
    ffn = PositionwiseFeedForward(d_model=6, d_ff=10, dropout=0.0).double()
    x = torch.randn(2, 3, 6, dtype=F64)
    W1, b1, W2, b2 = ffn.w_1.weight.T, ffn.w_1.bias, ffn.w_2.weight.T, ffn.w_2.bias
    expected = torch.clamp(x @ W1 + b1, min=0) @ W2 + b2  # max(0, x W1 + b1) W2 + b2
    torch.testing.assert_close(ffn(x), expected)
    # Position-wise: each position alone gives the same answer.
    torch.testing.assert_close(ffn(x[:, 1:2]), expected[:, 1:2])


def test_add_norm_is_layernorm_of_the_residual_sum():
    torch.manual_seed(0)
    add_norm = randomize_norms_(AddNorm(d_model=6, dropout=0.0).double())
    x, sub = torch.randn(2, 3, 6, dtype=F64), torch.randn(2, 3, 6, dtype=F64)
    v = x + sub
    mu = v.mean(-1, keepdim=True)
    sigma = torch.sqrt(v.var(-1, unbiased=False, keepdim=True) + add_norm.norm.eps)
    gamma, beta = add_norm.norm.weight, add_norm.norm.bias
    torch.testing.assert_close(add_norm(x, sub), gamma * (v - mu) / sigma + beta)


# -- encoder / decoder layers == PyTorch's, with copied weights ---------------------------------------------
E, HEADS, D_FF = 12, 3, 20


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_matches_torch(norm_first):
    torch.manual_seed(0)
    ours = randomize_norms_(EncoderLayer(E, HEADS, D_FF, dropout=0.0, norm_first=norm_first).double())
    theirs = nn.TransformerEncoderLayer(E, HEADS, D_FF, dropout=0.0, batch_first=True,
                                        norm_first=norm_first, dtype=F64)
    copy_to_torch(ours, theirs)
    (x,) = leaves((2, 6, E))
    (x2,) = clones(x)
    mask = padding_mask(torch.tensor([[4, 5, 6, 7, 8, 9], [4, 5, 6, 7, 0, 0]]), pad_id=0)  # (B, 1, 1, S)

    out = ours(x, mask)
    their_out = theirs(x2, src_key_padding_mask=torch_key_padding_mask(mask))
    torch.testing.assert_close(out, their_out)
    backward_both(out, their_out)
    torch.testing.assert_close(x.grad, x2.grad)
    assert_grads_match(ours, theirs)


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_matches_torch(norm_first):
    torch.manual_seed(0)
    ours = randomize_norms_(DecoderLayer(E, HEADS, D_FF, dropout=0.0, norm_first=norm_first).double())
    theirs = nn.TransformerDecoderLayer(E, HEADS, D_FF, dropout=0.0, batch_first=True,
                                        norm_first=norm_first, dtype=F64)
    copy_to_torch(ours, theirs)
    x, memory = leaves((2, 5, E), (2, 7, E))
    x2, memory2 = clones(x, memory)
    self_mask = causal_mask(5)  # (T, T)
    cross_mask = padding_mask(torch.tensor([[4, 5, 6, 7, 8, 9, 3], [4, 5, 6, 0, 0, 0, 0]]), pad_id=0)

    out = ours(x, memory, self_mask, cross_mask)
    their_out = theirs(x2, memory2, tgt_mask=torch_attn_mask(self_mask),
                       memory_key_padding_mask=torch_key_padding_mask(cross_mask))
    torch.testing.assert_close(out, their_out)
    backward_both(out, their_out)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(memory.grad, memory2.grad)
    assert_grads_match(ours, theirs)


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_run_with_a_cache_equals_forward(norm_first):
    torch.manual_seed(0)
    layer = DecoderLayer(E, HEADS, D_FF, dropout=0.0, norm_first=norm_first).double().eval()
    x, memory = leaves((2, 5, E), (2, 7, E))
    full = layer(x, memory, causal_mask(5))
    memory_kv = layer.cross_attn.project_kv(memory, memory)
    past, steps = None, []
    for t in range(5):
        result = layer.run(x[:, t : t + 1], memory_kv, causal_mask(1, t + 1), past=past, need_weights=True)
        past = result.kv
        steps.append(result.x)
        assert result.self_weights.shape == (2, HEADS, 1, t + 1)
        assert result.cross_weights.shape == (2, HEADS, 1, 7)
    torch.testing.assert_close(torch.cat(steps, dim=1), full)


# -- one implementation of the blocks, the checkpoint keys unchanged ------------------------------------
def test_layer_state_dict_keys_are_the_checkpoint_keys():
    attention = ["in_proj_weight", "in_proj_bias", "w_o.weight", "w_o.bias"]
    feed_forward = ["feed_forward.w_1.weight", "feed_forward.w_1.bias", "feed_forward.w_2.weight",
                    "feed_forward.w_2.bias"]

    def norms(*names: str) -> list[str]:
        return [f"{n}.{kind}" for n in names for kind in ("weight", "bias")]

    encoder = EncoderLayer(E, HEADS, D_FF).state_dict()
    assert sorted(encoder) == sorted([f"self_attn.{k}" for k in attention] + feed_forward + norms("norm1", "norm2"))
    decoder = DecoderLayer(E, HEADS, D_FF).state_dict()
    assert sorted(decoder) == sorted([f"{a}.{k}" for a in ("self_attn", "cross_attn") for k in attention]
                                     + feed_forward + norms("norm1", "norm2", "norm3"))


def test_layers_check_their_inputs_at_forward():
    layer = DecoderLayer(E, HEADS, D_FF)
    x, memory = leaves((2, 5, E), (2, 4, E), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"self_mask of shape \(4, 4\) does not broadcast"):
        layer(x, memory, causal_mask(4))
    with pytest.raises(ValueError, match="cross_mask.*does not broadcast"):
        layer(x, memory, causal_mask(5), torch.ones(2, 1, 1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="memory has 6 features"):
        layer(x, memory[..., :6])
    with pytest.raises(ValueError, match=r"mask of shape \(2, 1, 1, 4\) does not broadcast"):
        EncoderLayer(E, HEADS, D_FF)(x, torch.ones(2, 1, 1, 4, dtype=torch.bool))
