"""attnlab.nn.attention: the tutorials' printed numbers, the two attention paths, masks, and
MultiHeadAttention against torch.nn.MultiheadAttention."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    assert_digits,
    assert_grads_match,
    backward_both,
    clones,
    copy_to_torch,
    leaves,
    torch_attn_mask,
    torch_key_padding_mask,
)
from torch import nn

from attnlab import (
    MultiHeadAttention,
    SelfAttention,
    causal_mask,
    padding_mask,
    scaled_dot_product_attention,
    simple_self_attention,
)
from attnlab.nn import attention as attention_module
from attnlab.nn.attention import dropout

F64 = torch.float64

# -- the tutorials' first worked example: six 3-d token embeddings, no trainable weights -------------
INPUTS = [
    [0.43, 0.15, 0.89],  # Your
    [0.55, 0.87, 0.66],  # journey
    [0.57, 0.85, 0.64],  # starts
    [0.22, 0.58, 0.33],  # with
    [0.77, 0.25, 0.10],  # one
    [0.05, 0.80, 0.55],  # step
]
CONTEXT = [
    [0.4421, 0.5931, 0.5790],
    [0.4419, 0.6515, 0.5683],
    [0.4431, 0.6496, 0.5671],
    [0.4304, 0.6298, 0.5510],
    [0.4671, 0.5910, 0.5266],
    [0.4177, 0.6503, 0.5645],
]


def test_simple_attention_scores_match_the_printed_digits():
    x = torch.tensor(INPUTS, dtype=F64)
    scores = x @ x.T
    assert_digits(scores[1], [0.9544, 1.4950, 1.4754, 0.8434, 0.7070, 1.0865], 4)
    assert_digits(scores[0, 0], 0.9995, 4)
    loop = torch.tensor([[float(torch.dot(a, b)) for b in x] for a in x], dtype=F64)
    torch.testing.assert_close(scores, loop)


def test_simple_attention_weights_and_context_match_the_printed_digits():
    x = torch.tensor(INPUTS, dtype=F64)
    context, weights = simple_self_attention(x)
    assert_digits(weights[1], [0.1385, 0.2379, 0.2333, 0.1240, 0.1082, 0.1581], 4)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(6, dtype=F64))
    assert_digits(context, CONTEXT, 4)


def test_simple_attention_for_one_query_equals_its_row():
    x = torch.tensor(INPUTS, dtype=F64)
    query = x[1]  # "journey"
    weights = (x @ query).softmax(dim=0)  # (T,)
    z2 = weights @ x  # (E,)
    context, _ = simple_self_attention(x)
    torch.testing.assert_close(z2, context[1])
    assert_digits(z2, CONTEXT[1], 4)


def test_simple_attention_is_batched():
    x = torch.tensor(INPUTS)
    batch = torch.stack([x, x.flip(0)])  # (2, T, E)
    context, weights = simple_self_attention(batch)
    assert weights.shape == (2, 6, 6)
    torch.testing.assert_close(context[0], simple_self_attention(x)[0])
    torch.testing.assert_close(context[1], simple_self_attention(x.flip(0))[0])


# -- examples A ("she likes coffee") and B (the tutorial's integer matrices): trainable projections ---
def _self_attention(w_q, w_k, w_v) -> SelfAttention:
    """A float64 SelfAttention computing X·W (the tutorials' convention; nn.Linear holds Wᵀ)."""
    w_q, w_k, w_v = (torch.tensor(w, dtype=F64) for w in (w_q, w_k, w_v))
    attn = SelfAttention(w_q.size(0), w_q.size(1)).double()
    with torch.no_grad():
        attn.w_q.weight.copy_(w_q.T)
        attn.w_k.weight.copy_(w_k.T)
        attn.w_v.weight.copy_(w_v.T)
    return attn


def test_example_a_she_likes_coffee():
    x = torch.tensor([[0.2, 0.9, 0.1, 0.5], [0.8, 0.3, 0.7, 0.2], [0.4, 0.6, 0.3, 0.9]], dtype=F64)
    w_qk = [[0.9 if i == j else 0.1 for j in range(4)] for i in range(4)]
    w_v = [[0.8, 0.2, 0.1, 0.1], [0.2, 0.8, 0.2, 0.1], [0.1, 0.2, 0.8, 0.1], [0.1, 0.1, 0.1, 0.9]]
    out = _self_attention(w_qk, w_qk, w_v)(x).output
    expected = [
        [0.575303, 0.705274, 0.505303, 0.641775],
        [0.600195, 0.688227, 0.530195, 0.619162],
        [0.581550, 0.700783, 0.511550, 0.646592],
    ]
    assert_digits(out, expected, 6)


EXAMPLE_B_X = [[1, 0, 1, 0], [0, 2, 0, 2], [1, 1, 1, 1]]
EXAMPLE_B_W = dict(
    w_q=[[1, 0, 1], [1, 0, 0], [0, 0, 1], [0, 1, 1]],
    w_k=[[0, 0, 1], [1, 1, 0], [0, 1, 0], [1, 1, 0]],
    w_v=[[0, 2, 0], [0, 3, 0], [1, 0, 3], [1, 1, 0]],
)


def test_example_b_projections_and_raw_scores_are_exact():
    attn = _self_attention(**EXAMPLE_B_W)
    x = torch.tensor(EXAMPLE_B_X, dtype=F64)
    q, k, v = attn.w_q(x), attn.w_k(x), attn.w_v(x)
    assert torch.equal(q, torch.tensor([[1, 0, 2], [2, 2, 2], [2, 1, 3]], dtype=F64))
    assert torch.equal(k, torch.tensor([[0, 1, 1], [4, 4, 0], [2, 3, 1]], dtype=F64))
    assert torch.equal(v, torch.tensor([[1, 2, 3], [2, 8, 0], [2, 6, 3]], dtype=F64))
    assert torch.equal(q @ k.T, torch.tensor([[2, 4, 4], [4, 16, 12], [4, 12, 10]], dtype=F64))


def test_example_b_first_word_with_the_tutorials_scale_and_the_correct_one():
    attn = _self_attention(**EXAMPLE_B_W)
    x = torch.tensor(EXAMPLE_B_X, dtype=F64)
    assert_digits(attn(x, scale=1.0).output[0], [1.936621, 6.683105, 1.595068], 6)
    assert_digits(attn(x).output[0], [1.863874, 6.319371, 1.704189], 6)  # scale 1/√3
    # The weights come back on request, from the reference path, and give the same output;
    # unasked for, they are None (one return type either way).
    out, weights = attn(x, need_weights=True)
    fused = attn(x)
    assert fused.weights is None
    torch.testing.assert_close(out, fused.output)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, dtype=F64))


def test_self_attention_rejects_the_wrong_input_size():
    with pytest.raises(ValueError, match="d_in=4"):
        SelfAttention(4, 3)(torch.rand(2, 3, 5, generator=torch.Generator().manual_seed(0)))


# -- the fused path equals the reference path, masks and all ---------------------------------------
B, H, D = 2, 3, 4


def _masks(T: int, S: int) -> dict[str, torch.Tensor | None]:
    lengths = torch.tensor([S, S - 2])
    pad = (torch.arange(S)[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, S)
    causal = causal_mask(T, S)
    empty = torch.ones(B, 1, T, S, dtype=torch.bool)
    empty[0, :, 1] = False  # query 1 of batch row 0 may attend to nothing
    empty[1, :, :, :] = torch.arange(S) >= S - 1  # batch row 1 sees only the last key ...
    empty[1, :, 0] = False  # ... and its first query nothing at all
    no_keys = torch.zeros(B, 1, 1, S, dtype=torch.bool)
    no_keys[0] = True  # batch row 1: every query fully masked (all keys padding)
    return {"none": None, "padding": pad, "causal": causal, "padding+causal": pad & causal,
            "fully_masked_rows": empty, "fully_masked_batch_row": no_keys}


def _paths(q, k, v, mask):
    """Output and q/k/v gradients (for a fixed upstream gradient) of the fused and reference paths."""
    results = []
    g = torch.randn(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, generator=torch.Generator().manual_seed(1))
    for need_weights in (False, True):
        qq, kk, vv = clones(q, k, v)
        out, weights = scaled_dot_product_attention(qq, kk, vv, mask, need_weights=need_weights)
        assert (weights is None) != need_weights
        (out * g).sum().backward()
        results.append((out.detach(), qq.grad, kk.grad, vv.grad))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T,S", [(5, 5), (4, 7)])
@pytest.mark.parametrize("mask_name", ["none", "padding", "causal", "padding+causal",
                                       "fully_masked_rows", "fully_masked_batch_row"])
def test_fused_path_equals_reference_path(dtype, T, S, mask_name):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=gen, dtype=dtype) for n in (T, S, S))
    mask = _masks(T, S)[mask_name]
    fused, reference = _paths(q, k, v, mask)
    for name, a, b in zip(("output", "dq", "dk", "dv"), fused, reference):
        assert torch.isfinite(a).all() and torch.isfinite(b).all(), f"{name} not finite"
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")
    if mask is not None:
        blind = ~mask.expand(B, H, T, S).any(dim=-1)  # (B, H, T): queries with no key to see
        for out, dq, _, _ in (fused, reference):
            assert (out[blind] == 0).all() and (dq[blind] == 0).all()
        if mask_name.startswith("fully"):
            assert blind.any()


def test_reference_path_passes_gradcheck_with_a_mask():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 3, generator=gen, dtype=F64, requires_grad=True) for n in (3, 4, 4))
    mask = causal_mask(3, 4) & torch.tensor([True, True, False, True])
    mask = mask.expand(2, 1, 3, 4).clone()
    mask[1, 0, 0] = False  # one fully masked query

    def reference(q, k, v):
        return scaled_dot_product_attention(q, k, v, mask, need_weights=True)

    assert torch.autograd.gradcheck(reference, (q, k, v))


def test_weights_are_zero_where_masked_and_rows_sum_to_one():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, 5, D, generator=gen) for _ in range(3))
    mask = _masks(5, 5)["padding+causal"]
    _, weights = scaled_dot_product_attention(q, k, v, mask, need_weights=True)
    assert (weights[~mask.expand_as(weights)] == 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, H, 5))


def test_attention_dropout_drops_the_softmax_weights():
    """On the CPU the weights are dropped by ``dropout`` itself: the same seed gives the same draw."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, 5, D, generator=gen) for _ in range(3))
    mask = _masks(5, 5)["padding+causal"]
    _, weights = scaled_dot_product_attention(q, k, v, mask, need_weights=True)
    torch.manual_seed(7)
    out, none = scaled_dot_product_attention(q, k, v, mask, dropout_p=0.4)
    torch.manual_seed(7)
    expected = dropout(weights, 0.4) @ v
    assert none is None
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, weights @ v)  # some weights were dropped


# -- dropout --------------------------------------------------------------------------------------------
def test_dropout_keeps_each_element_with_probability_one_minus_p_and_scales_it():
    x = torch.rand(200_000) + 0.5
    out = dropout(x, 0.3)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.005  # 5 standard deviations of the mean
    torch.testing.assert_close(out[kept], x[kept] / 0.7)


def test_dropout_draws_from_torchs_generator_and_backpropagates_through_its_mask():
    x = torch.randn(4, 50, dtype=F64, requires_grad=True)
    torch.manual_seed(3)
    first, second = dropout(x, 0.5), dropout(x, 0.5)
    torch.manual_seed(3)
    again = dropout(x, 0.5)
    assert torch.equal(first, again) and not torch.equal(first, second)
    g = torch.randn(4, 50, dtype=F64)
    first.backward(g)
    torch.testing.assert_close(x.grad, g * (first / x).detach())  # ∂out/∂x: the mask, scaled by 2


def test_dropout_in_evaluation_or_with_p_zero_is_the_identity():
    x = torch.randn(3, 4)
    assert dropout(x, 0.5, training=False) is x and dropout(x, 0.0) is x
    for p in (-0.1, 1.0):
        with pytest.raises(ValueError, match="dropout probability"):
            dropout(x, p)


# -- mask builders ------------------------------------------------------------------------------------
def test_causal_mask_values():
    assert torch.equal(causal_mask(3), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    # T < S: the queries are the last T of S positions (a cache holds the first S - T).
    assert torch.equal(causal_mask(2, 4), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool))
    assert torch.equal(causal_mask(1, 5), torch.ones(1, 5, dtype=torch.bool))
    assert causal_mask(3).dtype == torch.bool
    with pytest.raises(ValueError, match="T <= S"):
        causal_mask(3, 2)


def test_padding_mask_shape_and_values():
    tokens = torch.tensor([[5, 6, 7, 0], [8, 0, 0, 0]])
    mask = padding_mask(tokens, pad_id=0)
    assert mask.shape == (2, 1, 1, 4) and mask.dtype == torch.bool
    assert torch.equal(mask[:, 0, 0], torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool))
    with pytest.raises(ValueError, match="dtype"):
        padding_mask(tokens.float(), pad_id=0)


# -- MultiHeadAttention == torch.nn.MultiheadAttention with copied weights ------------------------------
E, HEADS = 12, 3


def _mha_pair(seed: int = 0) -> tuple[MultiHeadAttention, nn.MultiheadAttention]:
    torch.manual_seed(seed)
    ours = MultiHeadAttention(E, HEADS).double()
    with torch.no_grad():
        for p in ours.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.1)  # non-zero biases, so that dropping one is noticed
    theirs = nn.MultiheadAttention(E, HEADS, batch_first=True, dtype=F64)
    return ours, copy_to_torch(ours, theirs)


def _compare_mha(ours, theirs, q, k, v, mask=None, *, key_padding_mask=None, attn_mask=None,
                 need_weights=False):
    q2, k2, v2 = clones(q, k, v)
    if q is k is v:
        k2 = v2 = q2
    elif k is v:
        v2 = k2
    out, weights = ours(q, k, v, mask, need_weights=need_weights)
    their_out, their_weights = theirs(q2, k2, v2, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                                      need_weights=need_weights, average_attn_weights=False)
    torch.testing.assert_close(out, their_out)
    if need_weights:
        assert weights.shape == their_weights.shape
        torch.testing.assert_close(weights, their_weights)
    else:
        assert weights is None and their_weights is None  # the same pair as PyTorch's
    backward_both(out, their_out)
    for ours_leaf, their_leaf in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(ours_leaf.grad, their_leaf.grad)
    assert_grads_match(ours, theirs)


@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_self_attention_matches_torch(need_weights):
    ours, theirs = _mha_pair()
    (x,) = leaves((2, 5, E))
    _compare_mha(ours, theirs, x, x, x, need_weights=need_weights)


@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_cross_attention_matches_torch(need_weights):
    ours, theirs = _mha_pair()
    query, key, value = leaves((2, 4, E), (2, 7, E), (2, 7, E))
    _compare_mha(ours, theirs, query, key, value, need_weights=need_weights)


@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_with_padding_mask_matches_torch(need_weights):
    ours, theirs = _mha_pair()
    query, memory = leaves((2, 4, E), (2, 7, E))
    tokens = torch.tensor([[3, 4, 5, 6, 7, 8, 9], [3, 4, 5, 0, 0, 0, 0]])
    mask = padding_mask(tokens, pad_id=0)  # (B, 1, 1, S)
    _compare_mha(ours, theirs, query, memory, memory, mask,
                 key_padding_mask=torch_key_padding_mask(mask), need_weights=need_weights)


@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_with_causal_mask_matches_torch(need_weights):
    ours, theirs = _mha_pair()
    (x,) = leaves((2, 6, E))
    mask = causal_mask(6)
    _compare_mha(ours, theirs, x, x, x, mask, attn_mask=torch_attn_mask(mask), need_weights=need_weights)


def test_mha_weights_have_one_map_per_head():
    ours, _ = _mha_pair()
    query, memory = leaves((2, 4, E), (2, 7, E))
    out, weights = ours(query, memory, memory, need_weights=True)
    assert out.shape == (2, 4, E) and weights.shape == (2, HEADS, 4, 7)


def test_mha_cached_self_attention_equals_full_self_attention():
    ours, _ = _mha_pair()
    (x,) = leaves((2, 5, E))
    full, _, _ = ours.self_attention(x, causal_mask(5))
    out, kv, _ = ours.self_attention(x[:, :3], causal_mask(3))
    rest, kv, _ = ours.self_attention(x[:, 3:], causal_mask(2, 5), past=kv)
    assert kv.k.shape == (2, HEADS, 5, E // HEADS)
    torch.testing.assert_close(torch.cat([out, rest], dim=1), full)


# -- training over short sequences on the CPU: _ShortSelfAttention ----------------------------------
def _short_path_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = attention_module._ShortSelfAttention.apply

    def counted(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(attention_module._ShortSelfAttention, "apply", counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask_name", ["none", "padding", "causal", "padding+causal",
                                       "fully_masked_rows", "fully_masked_batch_row"])
def test_short_self_attention_equals_the_reference_path(monkeypatch, dtype, mask_name):
    """Training-time self-attention (grad on, no dropout, T <= 64, CPU) takes the batched-product path;
    its output, cache and every gradient equal the reference path's (need_weights=True)."""
    calls = _short_path_calls(monkeypatch)
    torch.manual_seed(0)
    mha = MultiHeadAttention(H * D, H).to(dtype)
    mask = _masks(5, 5)[mask_name]
    (x,) = leaves((B, 5, H * D), dtype=dtype)
    grad = torch.randn(B, 5, H * D, dtype=dtype, generator=torch.Generator().manual_seed(2))
    results = []
    for need_weights in (False, True):
        mha.zero_grad(set_to_none=True)
        (xx,) = clones(x)
        out, kv, _ = mha.self_attention(xx, mask, need_weights=need_weights)
        (out * grad).sum().backward()
        results.append([out.detach(), kv.k.detach(), kv.v.detach(), xx.grad]
                       + [p.grad for p in mha.parameters()])
    assert len(calls) == 1  # the first pass only: weights asked for take the reference path
    for short, reference in zip(*results):
        assert torch.isfinite(short).all()
        torch.testing.assert_close(short, reference)
    if mask is not None and mask_name.startswith("fully"):
        blind = ~mask.expand(B, H, 5, 5).any(dim=-1).any(dim=1)  # (B, T): queries no head may see from
        attended = results[0][0] - mha.w_o.bias.detach()  # a blind query's output is W_o's bias alone
        assert blind.any() and (attended[blind] == 0).all()


def test_short_self_attention_passes_gradcheck_with_a_mask():
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 4, 3 * 2 * 3, generator=gen, dtype=F64, requires_grad=True)  # H=2, D=3
    mask = causal_mask(4).expand(2, 1, 4, 4).clone()
    mask[1, 0, 2] = False  # one fully masked query
    mask[0, 0, 3, 1] = False

    def short(qkv):
        return attention_module._ShortSelfAttention.apply(qkv, 2, mask, 0.5)

    assert torch.autograd.gradcheck(short, (qkv,))


def test_short_self_attention_is_taken_only_where_it_applies(monkeypatch):
    calls = _short_path_calls(monkeypatch)
    mha = MultiHeadAttention(8, 2)
    short_x = torch.randn(2, 3, 8, requires_grad=True)

    def taken(x, **kwargs) -> bool:
        before = len(calls)
        mha.self_attention(x, **kwargs)
        return len(calls) > before

    assert taken(short_x)
    assert taken(short_x.detach())  # the input needs no gradient, the weights do
    limit = attention_module.SHORT_ATTENTION_MAX_LEN
    assert taken(torch.randn(1, limit, 8, requires_grad=True))
    assert not taken(torch.randn(1, limit + 1, 8, requires_grad=True))  # too long: the fused kernel
    assert not taken(short_x, need_weights=True)  # the weights asked for: the reference path
    assert not taken(torch.randn(0, 3, 8, requires_grad=True))  # an empty batch
    with torch.no_grad():
        assert not taken(short_x)  # no gradient wanted
    mha.dropout = 0.1
    assert taken(short_x)  # dropout drawn here as on the reference path
    mha.eval()
    assert taken(short_x)  # evaluation with gradients: no dropout, still training-shaped work


def test_short_self_attention_refuses_a_second_derivative_and_torch_func_still_works():
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 2)
    (x,) = leaves((2, 3, 8), dtype=torch.float32)
    out = mha.self_attention(x).output
    with pytest.raises(RuntimeError, match="first derivatives only.*SHORT_ATTENTION_MAX_LEN = 0"):
        torch.autograd.grad(out.square().sum(), x, create_graph=True)  # e.g. for a gradient penalty
    (grad,) = torch.autograd.grad(mha.self_attention(x).output.square().sum(), x)  # a plain pass is fine
    with torch.no_grad():
        reference = mha.self_attention(x, need_weights=True).output
    torch.testing.assert_close(mha.self_attention(x).output.detach(), reference)

    def loss(x):
        return mha.self_attention(x).output.square().sum()

    torch.testing.assert_close(torch.func.grad(loss)(x.detach()), grad)  # torch.func takes the reference path


def test_mha_rejects_a_dropout_outside_0_1():
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="dropout probability"):
            MultiHeadAttention(8, 2, dropout=p)


@pytest.mark.parametrize("mask_name", ["none", "padding+causal", "fully_masked_rows"])
def test_short_self_attention_drops_the_weights_as_the_reference_path_does(monkeypatch, mask_name):
    """With dropout, both paths draw the same masks from the same seed: equal outputs and gradients."""
    calls = _short_path_calls(monkeypatch)
    torch.manual_seed(0)
    mha = MultiHeadAttention(H * D, H, dropout=0.3).double()
    mask = _masks(5, 5)[mask_name]
    (x,) = leaves((B, 5, H * D))
    grad = torch.randn(B, 5, H * D, dtype=F64, generator=torch.Generator().manual_seed(2))
    results = []
    for need_weights in (False, True):
        mha.zero_grad(set_to_none=True)
        (xx,) = clones(x)
        torch.manual_seed(7)
        out, _, _ = mha.self_attention(xx, mask, need_weights=need_weights)
        (out * grad).sum().backward()
        results.append([out.detach(), xx.grad] + [p.grad for p in mha.parameters()])
    assert len(calls) == 1
    for short, reference in zip(*results):
        torch.testing.assert_close(short, reference)
    torch.manual_seed(8)  # another seed, other masks
    assert not torch.allclose(mha.self_attention(x.detach(), mask).output, results[0][0])


def test_short_self_attention_with_dropout_passes_gradcheck():
    qkv = torch.randn(2, 4, 3 * 2 * 3, generator=torch.Generator().manual_seed(0), dtype=F64, requires_grad=True)

    def short(qkv):
        torch.manual_seed(3)  # the same masks at every evaluation
        return attention_module._ShortSelfAttention.apply(qkv, 2, None, 0.5, 0.4)

    assert torch.autograd.gradcheck(short, (qkv,))


# -- errors name the problem ------------------------------------------------------------------------
def test_d_model_not_divisible_by_heads():
    with pytest.raises(ValueError, match=r"d_model \(10\) must be divisible by num_heads \(3\)"):
        MultiHeadAttention(10, 3)


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_query_and_key_feature_sizes_differ():
    with pytest.raises(ValueError, match="query and key feature sizes differ"):
        scaled_dot_product_attention(_rand(1, 3, 4), _rand(1, 5, 6), _rand(1, 5, 6))
    mha = MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match="key has 6 features.*d_model=8"):
        mha(_rand(1, 3, 8), _rand(1, 5, 6), _rand(1, 5, 6))
    with pytest.raises(ValueError, match="query has 6 features.*d_model=8"):
        mha(_rand(1, 3, 6), _rand(1, 5, 8), _rand(1, 5, 8))


def test_mask_that_does_not_broadcast():
    q, k, v = _rand(2, 2, 3, 4), _rand(2, 2, 5, 4, seed=1), _rand(2, 2, 5, 4, seed=2)
    for need_weights in (False, True):
        with pytest.raises(ValueError, match=r"mask of shape \(2, 1, 1, 6\) does not broadcast"):
            scaled_dot_product_attention(q, k, v, torch.ones(2, 1, 1, 6, dtype=torch.bool),
                                         need_weights=need_weights)
    # A mask with more batch rows than the scores would silently broadcast the scores up: refused.
    with pytest.raises(ValueError, match="does not broadcast"):
        scaled_dot_product_attention(q, k, v, torch.ones(3, 2, 2, 3, 5, dtype=torch.bool))
    mha = MultiHeadAttention(8, 2)
    x = _rand(2, 3, 8)
    with pytest.raises(ValueError, match="does not broadcast"):
        mha(x, x, x, causal_mask(4))
    with pytest.raises(ValueError, match="does not broadcast"):
        mha(x, _rand(2, 5, 8), _rand(2, 5, 8), causal_mask(3))  # 3 keys, but 5 are given


def test_non_boolean_mask():
    q = _rand(1, 1, 3, 4)
    for mask in (torch.ones(3, 3), torch.ones(3, 3, dtype=torch.long)):
        with pytest.raises(ValueError, match="mask must be boolean"):
            scaled_dot_product_attention(q, q, q, mask)


# -- the fused Q/K/V projection -----------------------------------------------------------------------
def test_w_q_w_k_w_v_are_views_of_the_fused_projection():
    ours, _ = _mha_pair()
    for i, projection in enumerate((ours.w_q, ours.w_k, ours.w_v)):
        rows = slice(i * E, (i + 1) * E)
        assert projection.weight.data_ptr() == ours.in_proj_weight[rows].data_ptr()
        assert torch.equal(projection.bias, ours.in_proj_bias[rows])
    (x,) = leaves((2, 5, E))
    torch.testing.assert_close(ours.w_k(x), x @ ours.in_proj_weight[E : 2 * E].T + ours.in_proj_bias[E : 2 * E])
    with torch.no_grad():  # writing through a view writes the fused parameter
        ours.w_v.weight.fill_(0.5)
    assert (ours.in_proj_weight[2 * E :] == 0.5).all() and not (ours.in_proj_weight[: 2 * E] == 0.5).any()


def test_projections_start_as_separate_linears_would():
    torch.manual_seed(3)
    ours = MultiHeadAttention(E, HEADS)
    torch.manual_seed(3)
    linears = [nn.Linear(E, E) for _ in range(4)]  # W_q, W_k, W_v, W_o in the order they are made
    for projection, linear in zip((ours.w_q, ours.w_k, ours.w_v, ours.w_o), linears):
        assert torch.equal(projection.weight, linear.weight) and torch.equal(projection.bias, linear.bias)


@pytest.mark.parametrize("bias", [True, False])
def test_a_state_dict_with_separate_projections_still_loads(bias):
    """Checkpoints written before W_q, W_k, W_v were fused hold them as three nn.Linear entries."""
    torch.manual_seed(0)
    source = MultiHeadAttention(E, HEADS, bias=bias).double()
    old = {f"w_{name}.{kind}": getattr(getattr(source, f"w_{name}"), kind).clone()
           for name in "qkv" for kind in (("weight", "bias") if bias else ("weight",))}
    old.update({f"w_o.{k}": v for k, v in source.w_o.state_dict().items()})
    torch.manual_seed(1)
    target = MultiHeadAttention(E, HEADS, bias=bias).double()
    target.load_state_dict(old, strict=True)
    (x,) = leaves((2, 4, E))
    torch.testing.assert_close(target(x, x, x).output, source(x, x, x).output, rtol=0, atol=0)
    assert set(target.state_dict()) == {"in_proj_weight", "w_o.weight"} | (
        {"in_proj_bias", "w_o.bias"} if bias else set())


def test_the_public_pieces_check_their_inputs():
    ours, _ = _mha_pair()
    x, memory = leaves((2, 3, E), (2, 7, E))
    kv = ours.project_kv(memory, memory)
    with pytest.raises(ValueError, match="do not fit a batch of 1"):
        ours.attend(x[:1], kv)
    with pytest.raises(ValueError, match=r"mask of shape \(3, 3\) does not broadcast"):
        ours.attend(x, kv, causal_mask(3))
    _, past, _ = ours.self_attention(x)
    with pytest.raises(ValueError, match="does not broadcast"):
        ours.self_attention(x, causal_mask(3), past=past)  # 3 queries see 3 + 3 keys, not 3
    _, grown, weights = ours.self_attention(x, causal_mask(3, 6), past=past, need_weights=True)
    assert grown.k.shape == (2, HEADS, 6, E // HEADS) and weights.shape == (2, HEADS, 3, 6)
