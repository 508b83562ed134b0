"""attnlab.nn.native: the compiled short self-attention kernel equals the PyTorch path it replaces,
and its build falls back cleanly."""

from __future__ import annotations

import warnings

import pytest
import torch

import attnlab.nn.attention as attention_module
from attnlab.nn import native
from attnlab.nn.attention import MultiHeadAttention, causal_mask

B, H = 3, 2


@pytest.fixture(scope="module")
def kernel() -> native.ShortAttentionKernel:
    if native._compiler() is None:
        pytest.skip("no C compiler on this machine: attnlab trains with PyTorch's operations")
    built = native.short_attention_kernel()
    assert built is not None, "a C compiler is here, but the kernel was not built (see the warning)"
    return built


def _masks(T: int) -> dict[str, torch.Tensor | None]:
    lengths = torch.tensor([T, max(T - 3, 1), max(T // 2, 1)])
    pad = (torch.arange(T)[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, T)
    blind = torch.ones(B, H, T, T, dtype=torch.bool)  # per-head rows, some with no key at all
    blind[0, 1, T // 2] = False
    blind[2] = False
    return {"none": None, "padding": pad, "causal": causal_mask(T), "padding+causal": pad & causal_mask(T),
            "per_head_with_blind_rows": blind}


def _run(qkv: torch.Tensor, mask, grad: torch.Tensor, dropout_p: float = 0.0, seed: int = 0):
    """Output and qkv gradient of _ShortSelfAttention (whichever path it takes)."""
    qkv = qkv.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    out = attention_module._ShortSelfAttention.apply(qkv, H, mask, 0.3, dropout_p)
    out.backward(grad)
    return out.detach(), qkv.grad


def _pytorch_path(monkeypatch) -> None:
    monkeypatch.setattr(native, "short_attention_kernel", lambda: None)


def _calls(monkeypatch, kernel) -> list[int]:
    calls: list[int] = []
    original = kernel.forward

    def counted(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(kernel, "forward", counted)
    return calls


@pytest.mark.parametrize("T", [1, 5, 8, 24, 64])
@pytest.mark.parametrize("D", [8, 24, 32])
@pytest.mark.parametrize("mask_name", ["none", "padding", "causal", "padding+causal", "per_head_with_blind_rows"])
def test_kernel_equals_the_pytorch_path(monkeypatch, kernel, T, D, mask_name):
    gen = torch.Generator().manual_seed(T * 100 + D)
    qkv = torch.randn(B, T, 3 * H * D, generator=gen) * 2
    grad = torch.randn(B, T, H * D, generator=gen)
    mask = _masks(T)[mask_name]
    calls = _calls(monkeypatch, kernel)
    ours = _run(qkv, mask, grad)
    assert calls == [1]
    _pytorch_path(monkeypatch)
    theirs = _run(qkv, mask, grad)
    exact = _run(qkv.double(), mask, grad.double())  # the PyTorch path in float64
    for a, b, c in zip(ours, theirs, exact):  # the output, then the gradient
        assert torch.isfinite(a).all()
        assert (a.double() - c).abs().max().item() <= 3e-6 * c.abs().max().item()  # float32 rounding ...
        ours_rms, theirs_rms = ((t.double() - c).square().mean().sqrt().item() for t in (a, b))
        assert ours_rms <= 3 * theirs_rms + 1e-9  # ... of the size of PyTorch's own (median ratio 1.0)


@pytest.mark.parametrize("mask_name", ["none", "padding+causal", "per_head_with_blind_rows"])
def test_kernel_drops_the_weights_as_the_pytorch_path_does(monkeypatch, kernel, mask_name):
    """The same seed draws the same dropout masks on both paths: equal outputs and gradients."""
    gen = torch.Generator().manual_seed(5)
    qkv, grad = torch.randn(B, 9, 3 * H * 16, generator=gen), torch.randn(B, 9, H * 16, generator=gen)
    mask = _masks(9)[mask_name]
    ours = _run(qkv, mask, grad, dropout_p=0.3, seed=11)
    other_seed = _run(qkv, mask, grad, dropout_p=0.3, seed=12)
    _pytorch_path(monkeypatch)
    theirs = _run(qkv, mask, grad, dropout_p=0.3, seed=11)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours[0], other_seed[0])


def test_kernel_takes_any_strides_and_the_widest_heads(monkeypatch, kernel):
    """Non-contiguous qkv and upstream gradient, a strided mask, D = 256: still the PyTorch path's numbers."""
    gen = torch.Generator().manual_seed(3)
    T, D = 9, 256
    wide = torch.randn(B, T, 2 * 3 * H * D, generator=gen)
    qkv = wide[:, :, ::2]  # every other column: not contiguous
    grad = torch.randn(B, H * D, T, generator=gen).transpose(1, 2)  # (B, T, H·D), transposed
    mask = (torch.rand(B, H, T, 2 * T, generator=gen) > 0.3)[..., ::2]  # strided keys
    mask[..., 0] = True
    calls = _calls(monkeypatch, kernel)
    ours = _run(qkv, mask, grad)
    assert calls == [1]
    _pytorch_path(monkeypatch)
    for a, b in zip(ours, _run(qkv, mask, grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_an_overflowing_score_at_a_closed_key_stays_out(kernel):
    """A key whose score overflows to inf, at a position the mask closes, changes nothing (the
    PyTorch path overwrites closed scores; adding -inf to +inf would make NaN)."""
    qkv = torch.randn(1, 4, 3 * 8, generator=torch.Generator().manual_seed(0))
    qkv[0, 3, 8:16] = 3e38  # key 3
    mask = torch.tensor([True, True, True, False]).view(1, 1, 1, 4)
    out = attention_module._ShortSelfAttention.apply(qkv, 1, mask, 8 ** -0.5, 0.0)
    reference = attention_module._ShortSelfAttention.apply(qkv[:, :3].contiguous(), 1, None, 8 ** -0.5, 0.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :3], reference)


def test_a_blind_query_gets_zero_output_and_gradient(kernel):
    qkv = torch.randn(1, 4, 3 * H * 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    mask[0, 0, 2] = False  # query 2 may attend to nothing
    out = attention_module._ShortSelfAttention.apply(qkv, H, mask, 0.3, 0.0)
    out.sum().backward()
    assert (out[0, 2] == 0).all()
    assert (qkv.grad[0, 2, : H * 8] == 0).all()  # its query receives no gradient


def test_nan_propagates_as_on_the_pytorch_path(kernel):
    qkv = torch.randn(2, 6, 3 * H * 8, generator=torch.Generator().manual_seed(0))
    qkv[1, 3, 5] = float("nan")  # one query entry of batch row 1, head 0
    out = attention_module._ShortSelfAttention.apply(qkv.requires_grad_(), H, None, 0.3, 0.0)
    assert torch.isnan(out[1, 3, :8]).all()  # that query's output is NaN, not silently finite
    assert torch.isfinite(out[0]).all()  # other batch rows are untouched


def test_threads_split_the_work_without_changing_a_bit(kernel):
    gen = torch.Generator().manual_seed(1)
    qkv, grad = torch.randn(16, 24, 3 * H * 32, generator=gen), torch.randn(16, 24, H * 32, generator=gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(qkv, causal_mask(24), grad)
        torch.set_num_threads(2)
        two = _run(qkv, causal_mask(24), grad)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_multihead_attention_trains_through_the_kernel(monkeypatch, kernel):
    """A float32 module with 8-wide heads takes the kernel; float64, 4-wide heads and long inputs do not."""
    calls = _calls(monkeypatch, kernel)
    mha = MultiHeadAttention(32, 4)  # D = 8
    x = torch.randn(2, 6, 32, requires_grad=True)
    out = mha.self_attention(x, causal_mask(6)).output
    assert calls == [1]
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(out.square().sum(), x, create_graph=True)
    mha.double().self_attention(x.double())
    MultiHeadAttention(16, 4).self_attention(torch.randn(2, 6, 16, requires_grad=True))  # D = 4
    assert calls == [1]
    assert not native.kernel_takes(torch.randn(2, native.MAX_LEN + 1, 96), 8, None)
    assert not native.kernel_takes(torch.randn(2, 6, 96), 8, torch.ones(6, 6))  # a float mask
    assert not native.kernel_takes(torch.randn(0, 6, 96), 8, None)  # an empty batch


def test_evaluation_without_gradients_runs_the_kernels_forward_pass(monkeypatch, kernel):
    """No gradient wanted (an encoder while translating): the kernel's forward alone, equal to
    PyTorch's fused attention; with dropout in training, or with gradients, not this way."""
    calls = _calls(monkeypatch, kernel)
    mha = MultiHeadAttention(32, 4, dropout=0.1).eval()
    x = torch.randn(3, 9, 32)
    pad = (torch.arange(9) < torch.tensor([[9], [4], [1]]))[:, None, None, :]  # (B, 1, 1, T)
    with torch.no_grad():
        fast = mha.self_attention(x, pad).output
        assert calls == [1]
        monkeypatch.setattr(MultiHeadAttention, "_inference_kernel", lambda self, qkv, mask: None)
        reference = mha.self_attention(x, pad).output
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)
    monkeypatch.undo()
    calls = _calls(monkeypatch, kernel)
    with torch.no_grad():
        mha.train().self_attention(x, pad)  # dropout on the weights: the reference paths draw it
    mha.eval().self_attention(x, pad)  # gradients wanted (x does not need them, the weights do)
    assert calls == [1]  # the training path's forward, through autograd


@pytest.mark.parametrize("V, R, K", [(4003, 4, 4), (8, 1, 4), (16000, 3, 5), (100, 12, 12)])
def test_beam_scores_kernel_equals_log_softmax_add_and_topk(kernel, V, R, K):
    """One pass of the kernel = PyTorch's log_softmax, + beam scores, banned ids at -inf, topk."""
    gen = torch.Generator().manual_seed(V + R)
    S, n = 5, min(2 * K, native.MAX_BEAM_CANDIDATES)
    logits = torch.randn(S * R, V, generator=gen) * 4
    alive = torch.randn(S, K, generator=gen).sort(dim=1, descending=True).values - 3
    alive[1, 1:] = float("-inf")  # a sentence with one live beam
    banned = torch.tensor([0, 1, V - 1])
    values, indices = native.beam_scores_kernel().top(logits, alive, n, banned)
    candidates = alive[:, :R, None] + logits.log_softmax(-1).view(S, R, V)
    candidates[..., banned] = float("-inf")
    want_values, want_indices = candidates.view(S, R * V).topk(n, dim=-1)
    finite = torch.isfinite(want_values)
    assert torch.equal(indices[finite], want_indices[finite])
    torch.testing.assert_close(values, want_values, rtol=1e-6, atol=1e-6)  # its sum of exps: a few ulp
    assert not torch.isin(indices[finite] % V, banned).any()


def test_beam_scores_kernel_refuses_what_it_would_misread(kernel):
    top = native.beam_scores_kernel().top
    logits, alive, banned = torch.randn(6, 10), torch.zeros(3, 2), torch.tensor([0])
    with pytest.raises(ValueError, match="alive must be a CPU torch.float32"):
        top(logits, alive.double(), 4, banned)
    with pytest.raises(ValueError, match="banned must be a CPU torch.int64"):
        top(logits, alive, 4, banned.int())
    with pytest.raises(ValueError, match=r"logits must be \(S·R, V\)"):
        top(torch.randn(7, 10), alive, 4, banned)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """float64 reference: one query (H, D) over keys/values (n, H, D)."""
    scores = torch.einsum("hd,nhd->hn", q.double(), k.double()) * scale
    return torch.einsum("hn,nhd->hd", scores.softmax(-1), v.double()).reshape(-1)


@pytest.mark.parametrize("H, D", [(4, 8), (2, 32), (3, 12), (1, 4), (2, 64)])
@pytest.mark.parametrize("t1", [1, 7, 8, 9, 23, 40])
def test_decoder_self_attention_follows_the_rows_through_every_step(kernel, H, D, t1):
    """Row r of the newest step attends to the keys of its own line of rows, step by step back
    through the parent maps (None: the rows stayed in place); eight keys at a time and the rest."""
    gen = torch.Generator().manual_seed(t1 * 100 + D)
    E = H * D
    counts = [int(torch.randint(1, 6, (), generator=gen)) for _ in range(t1)]
    steps = [torch.randn(n, 3 * E, generator=gen) for n in counts]
    parents = [None] + [None if p % 3 == 0 and counts[p] == counts[p - 1]
                        else torch.randint(0, counts[p - 1], (counts[p],), generator=gen) for p in range(1, t1)]
    scale = 0.7
    out = native.decoder_attention_kernel().self_attention(
        tuple(x.data_ptr() for x in steps), tuple(0 if m is None else m.data_ptr() for m in parents),
        counts[-1], H, D, scale)
    assert out.shape == (counts[-1], E)
    for r in range(counts[-1]):
        line, slot = [], r
        for p in range(t1 - 1, -1, -1):
            line.append(steps[p][slot])
            slot = slot if parents[p] is None else int(parents[p][slot])
        rows = torch.stack(line[::-1]).view(t1, 3, H, D)
        want = _attend(steps[-1][r, :E].view(H, D), rows[:, 1], rows[:, 2], scale)
        torch.testing.assert_close(out[r].double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("H, D", [(4, 8), (2, 32), (3, 12), (1, 4)])
@pytest.mark.parametrize("S", [1, 8, 13, 64])
def test_decoder_cross_attention_reads_each_rows_source_and_only_its_positions(kernel, H, D, S):
    gen = torch.Generator().manual_seed(S * 10 + D)
    Bs, E = 4, H * D
    lengths = torch.randint(1, S + 1, (Bs,), generator=gen)  # each source's positions, at least one
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    memory = torch.randn(int(offsets[-1]), 2 * E, generator=gen) * 2
    sources = torch.tensor([3, 0, 0, 2, 3, 1])
    q = torch.randn(len(sources), E + 5, generator=gen)[:, :E]  # rows of a wider tensor: a row stride of E + 5
    attend = native.decoder_attention_kernel().cross_attention
    out = attend(memory, offsets, sources, q, H, 0.3)
    for r, source in enumerate(sources.tolist()):
        kv = memory[offsets[source] : offsets[source + 1]].view(-1, 2, H, D)  # its positions, no other
        want = _attend(q[r].view(H, D), kv[:, 0], kv[:, 1], 0.3)
        torch.testing.assert_close(out[r].double(), want, rtol=1e-5, atol=1e-6)
    # No sources: row r reads source r.
    torch.testing.assert_close(attend(memory, offsets, None, q[:Bs], H, 0.3),
                               attend(memory, offsets, torch.arange(Bs), q[:Bs], H, 0.3), rtol=0, atol=0)
    with pytest.raises(ValueError, match="contiguous memory"):
        attend(memory[:, :E], offsets, sources, q, H, 0.3)
    with pytest.raises(ValueError, match="int64 offsets"):
        attend(memory, offsets.int(), sources, q, H, 0.3)
    empty = offsets.clone()
    empty[2] = empty[1]  # source 1 with no position: refused, not read past
    with pytest.raises(RuntimeError, match="a source with no position"):
        attend(memory, empty, sources, q, H, 0.3)


def test_decoder_attention_threads_split_the_rows_without_changing_a_bit(kernel):
    gen = torch.Generator().manual_seed(5)
    steps = [torch.randn(300, 3 * 64, generator=gen) for _ in range(12)]
    parents = [None] + [torch.randint(0, 300, (300,), generator=gen) for _ in range(11)]
    memory, offsets = torch.randn(300 * 20, 128, generator=gen), torch.arange(0, 300 * 20 + 1, 20)
    attention = native.decoder_attention_kernel()
    outs = []
    before = torch.get_num_threads()
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        try:
            outs.append((attention.self_attention(tuple(x.data_ptr() for x in steps),
                                                  tuple(0 if m is None else m.data_ptr() for m in parents), 300, 4,
                                                  16, 0.25),
                         attention.cross_attention(memory, offsets, None, steps[-1][:, :64], 4, 0.25)))
        finally:
            torch.set_num_threads(before)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


@pytest.mark.parametrize("V", [1, 7, 8, 40, 4000, 4003])
def test_greedy_pick_equals_argmax_with_the_banned_ids_at_minus_infinity(kernel, V):
    gen = torch.Generator().manual_seed(V)
    scores = torch.randn(64, V, generator=gen).mul(3).round()  # rounded: many exact ties
    banned = torch.tensor(sorted({0, min(1, V - 1)}))
    scores[1, banned] = 1e9  # the best place banned: the best of the rest
    scores[2] = float("-inf")  # nothing finite: the first id that may be chosen
    scores[3, V // 2] = float("nan")  # a NaN ranks first, as argmax has it
    scores[4, banned] = float("nan")  # ... unless banned
    picked = native.greedy_pick_kernel().pick(scores, banned)
    want = scores.index_fill(1, banned, float("-inf")).argmax(dim=1)
    if V > len(banned):
        want[2] = len(banned)
    assert torch.equal(picked, want)
    with pytest.raises(ValueError, match="scores must be a CPU torch.float32"):
        native.greedy_pick_kernel().pick(scores.double(), banned)


@pytest.mark.parametrize("at", [0, 16], ids=["vectors", "tail"])  # V = 19: two blocks of 8, then 3 one by one
@pytest.mark.parametrize("term", ["activations", "weights", "slack"])
def test_screened_pick_computes_the_tokens_its_bound_leaves_in_contention_and_no_others(kernel, term, at):
    """Token ``at`` looks best in int8 (3.0 against 0.0) but token ``at`` + 1 is best in float32 (4.0
    against 1.0): a bound of 1.6 a token, from any one of its three terms, keeps the latter in contention
    and it is chosen; a bound of 1.4 leaves token ``at`` alone, and it is chosen, the other's float32
    logit unseen. The banned id 2, best in both, is never chosen."""
    pick = native.greedy_pick_kernel().screened
    V = 19
    hidden, bias, rows = torch.ones(1, 8), torch.zeros(V), torch.zeros(V, 8)
    bias[at], rows[at + 1], bias[2] = 1.0, 0.5, 9.0  # float32 logits: 1.0 and 4.0 (9.0 for the banned id)
    approx = torch.full((1, V), -10.0)
    approx[0, at], approx[0, at + 1], approx[0, 2] = 3.0, 0.0, 9.0
    for bound, chosen in [(1.6, at + 1), (1.4, at)]:
        half_step, l1, error, slack = 0.0, torch.zeros(V), torch.zeros(V), 0.0
        if term == "activations":
            half_step, l1 = 0.25, torch.full((V,), bound / 0.25)
        elif term == "weights":  # β = Σ|x| = 8
            error = torch.full((V,), bound / 8)
        else:
            slack = bound
        picked = pick(approx.clone(), hidden, rows, bias, l1, error, half_step, slack, torch.tensor([2]))
        assert picked.tolist() == [chosen]
    # Ids outside the vocabulary in the banned list are passed over (the search bans BOS and PAD, inside).
    outside = torch.tensor([2, -1, V, V + 7])
    assert pick(approx.clone(), hidden, rows, bias, l1, error, half_step, slack, outside).tolist() == [at]
    approx[0, at + 1] = float("nan")  # a NaN: the caller is told to take the float32 logits
    assert pick(approx, hidden, rows, bias, l1, error, 0.0, 0.0, torch.tensor([2])) is None
    with pytest.raises(ValueError, match="do not make"):
        pick(approx, hidden, rows[:2], bias, l1, error, 0.0, 0.0, torch.tensor([2]))


# -- attnlab's int8 products (csrc/int8_output.c) ---------------------------------------------------------
def _int8_reference(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x Wᵀ + b as csrc/int8_output.c describes it, written independently: each weight row in 8 bits with
    its step max|w| / 127; each row of x in 7 bits with its step (max(x, 0) - min(x, 0)) / 127 and its
    zero point; the integer sums exact (float64), then scaled."""
    w = weight_t.t()
    a = w.abs().amax(dim=1) / 127
    a = torch.where(a > 0, a, torch.ones_like(a))
    q = torch.round(w / a[:, None]).clamp(-127, 127).double()
    lo, hi = x.clamp(max=0).amin(dim=1), x.clamp(min=0).amax(dim=1)
    s = ((hi - lo) / 127).clamp(min=1e-30)
    inverse = 1 / s
    z = torch.round(-lo * inverse).clamp(0, 127)
    p = (torch.round(x * inverse[:, None]) + z[:, None]).clamp(0, 127).double()
    sums = p @ q.t() - z.double()[:, None] * q.sum(dim=1)[None]
    return sums * (s.double()[:, None] * a.double()[None]) + bias.double()


def _int8_layer(E: int, V: int, seed: int):
    from attnlab.nn import fast_decode

    gen = torch.Generator().manual_seed(seed)
    weight_t, bias = torch.randn(E, V, generator=gen) * 0.1, torch.randn(V, generator=gen) * 0.1
    weight_t[:, V // 2] = 0.0  # an all-zero row of weights
    return weight_t, bias, fast_decode.int8_weights((weight_t, bias))


@pytest.mark.parametrize("N, E, V", [(1, 6, 13), (5, 32, 40), (9, 130, 4003), (4, 128, 4000), (3, 256, 16)])
def test_int8_kernel_computes_the_int8_products_it_describes(kernel, N, E, V):
    """Every size: rows in tiles of four and the rest one by one, inputs not a multiple of 4, outputs not
    a multiple of 16 (the padding never shows), an all-zero weight row, an all-zero and a one-signed row."""
    weight_t, bias, table = _int8_layer(E, V, N + E + V)
    x = torch.randn(N, E, generator=torch.Generator().manual_seed(E))
    if N > 1:
        x[0], x[1] = 0.0, x[1].abs()
    run = native.int8_output_kernel()
    outputs = run.linear(x, table)
    expected = _int8_reference(x, weight_t, bias)
    assert outputs.shape == (N, V)
    assert float((outputs.double() - expected).abs().max()) <= 1e-6 * (1 + float(expected.abs().max()))
    assert float((outputs - (x @ weight_t + bias)).abs().max()) > 0  # int8, not float32
    banned = torch.tensor([0, V - 1, -1, V, V + 20])  # ids outside the outputs are passed over
    chosen, logits = run.pick(x, table, banned, logits=True)
    assert torch.equal(logits, outputs)
    if V > 2:  # the choice: the largest open output, the first of equals
        assert torch.equal(chosen, logits.index_fill(1, torch.tensor([0, V - 1]), float("-inf")).argmax(dim=1))


def test_int8_kernel_refuses_what_it_cannot_quantize_and_a_choice_with_every_id_closed(kernel):
    weight_t, bias, table = _int8_layer(16, 20, 0)
    run = native.int8_output_kernel()
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    none = torch.tensor([], dtype=torch.int64)
    assert run.pick(x, table, none) is not None
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[5, 3] = bad  # in the rows one by one, after a tile of four
        assert run.linear(y, table) is None
        assert run.pick(y, table, none) is None
    assert run.pick(x, table, torch.arange(20)) is None  # every id banned
    # In the inputs past the last eight too (one by one there), wherever they lie, in any order.
    for E, bad_values in [(6, ["nan"]), (13, ["nan"]), (13, ["inf", "nan"]), (21, ["-inf"]), (21, ["nan", "inf"])]:
        _, _, narrow = _int8_layer(E, 20, E)
        y = torch.randn(5, E, generator=torch.Generator().manual_seed(E))
        for offset, value in enumerate(bad_values):
            y[4, E - 3 + offset] = float(value)  # not the last input: a later finite one must not hide it
        assert run.linear(y, narrow) is None and run.pick(y, narrow, none) is None, (E, bad_values)
    huge = x.clone()
    huge[0, :2] = torch.tensor([3e38, -3e38])  # a range beyond float32's
    assert run.linear(huge, table) is None
    with pytest.raises(ValueError, match="are not a layer of 33 outputs"):
        native.Int8OutputKernel.check(table._replace(out_features=33))
    with pytest.raises(ValueError, match="1 to 16384 inputs"):
        native.Int8OutputKernel.check(table._replace(in_features=16385))
    with pytest.raises(ValueError, match="rows must be CPU float32 \\(N, 16\\)"):
        run.linear(x.double(), table)
    with pytest.raises(ValueError, match="rows must be CPU float32"):
        run.linear(x[:, :15], table)


def test_int8_kernel_writes_float32_whatever_the_default_dtype(kernel):
    weight_t, bias, table = _int8_layer(16, 20, 2)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    expected = native.int8_output_kernel().linear(x, table)
    before = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        outputs = native.int8_output_kernel().linear(x, table)
    finally:
        torch.set_default_dtype(before)
    assert outputs.dtype == torch.float32 and torch.equal(outputs, expected)


def test_int8_kernel_threads_split_the_rows_without_changing_a_bit(kernel):
    weight_t, bias, table = _int8_layer(64, 300, 1)
    x = torch.randn(203, 64, generator=torch.Generator().manual_seed(1))
    run = native.int8_output_kernel()
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(run.pick(x, table, torch.tensor([7]), logits=True))
    finally:
        torch.set_num_threads(before)
    for chosen, logits in results[1:]:
        assert torch.equal(chosen, results[0][0]) and torch.equal(logits, results[0][1])


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("ATTNLAB_NATIVE", "0")
    native._kernels.cache_clear()
    try:
        assert native.short_attention_kernel() is None
    finally:
        native._kernels.cache_clear()


def _fake_compiler(tmp_path, body: str) -> str:
    script = tmp_path / "fake-cc"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return str(script)


def test_a_failed_build_warns_once_with_the_error_and_falls_back(monkeypatch, tmp_path):
    compiler = _fake_compiler(tmp_path, 'echo "note: something else" >&2\n'
                                        'echo "fake.c:1: error: the real problem" >&2\n'
                                        'echo "compilation terminated." >&2\nexit 1\n')
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", compiler)
    native._kernels.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"could not build its compiled kernels \(fake-cc -O3 "
                                                 r"-march=native.*error: the real problem.*delete .*native"):
            assert native.short_attention_kernel() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert native.short_attention_kernel() is None  # remembered in this process: no warning
        native._kernels.cache_clear()  # as a new process would: the cache remembers
        runs: list[list[str]] = []
        monkeypatch.setattr(native, "_run", lambda command: runs.append(command) or native.subprocess.run(
            command, capture_output=True, text=True))
        with pytest.warns(RuntimeWarning, match="error: the real problem"):
            assert native.short_attention_kernel() is None
        assert all("-shared" not in command for command in runs)  # not compiled again
    finally:
        native._kernels.cache_clear()
    assert not list(tmp_path.rglob("*.so"))


def test_without_openmp_the_kernel_runs_on_one_thread_and_says_so(monkeypatch, tmp_path, kernel):
    real = native._compiler()[0]
    compiler = _fake_compiler(tmp_path, 'for a in "$@"; do [ "$a" = -fopenmp ] && '
                                        '{ echo "error: no OpenMP here" >&2; exit 1; }; done\n'
                                        f'exec {real} "$@"\n')
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", compiler)
    native._kernels.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="run on one thread: their OpenMP build failed.*no OpenMP here"):
            single = native.short_attention_kernel()
        assert single is not None and single.path.parent == tmp_path / "cache" / "native"
        qkv = torch.randn(2, 5, 3 * H * 8, generator=torch.Generator().manual_seed(0))
        weights, out = single.forward(qkv, H, None, 0.3, None)
        torch.testing.assert_close(out, kernel.forward(qkv, H, None, 0.3, None)[1])
    finally:
        native._kernels.cache_clear()


def test_a_compiler_command_may_carry_arguments(monkeypatch, tmp_path, kernel):
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", f"env ATTNLAB_TEST=1 {native._compiler()[0]}")  # as CC="ccache gcc" would
    native._kernels.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            built = native.short_attention_kernel()
        assert built is not None and built.path.parent == tmp_path / "native"
    finally:
        native._kernels.cache_clear()


def test_a_built_kernel_is_reused_from_the_cache(monkeypatch, tmp_path, kernel):
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path))
    compiler = native._compiler()
    first, _ = native._build(compiler)
    assert first.parent == tmp_path / "native" and first.exists()
    runs: list[list[str]] = []
    real_run = native._run
    monkeypatch.setattr(native, "_run", lambda command: runs.append(command) or real_run(command))
    assert native._build(compiler) == (first, "")
    assert all("-shared" not in command for command in runs)  # found, not compiled again
    assert {p.name for p in first.parent.iterdir()} == {first.name, first.stem + ".sha256"}  # no scratch left


def test_a_damaged_cached_library_is_built_again_not_loaded(monkeypatch, tmp_path, kernel):
    """A truncated shared library would crash the process that loads it: its digest no longer
    matches the one recorded at build time, so it is rebuilt instead."""
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path))
    compiler = native._compiler()
    library, _ = native._build(compiler)
    whole = library.read_bytes()
    library.write_bytes(whole[:1000])
    assert native._build(compiler) == (library, "")
    assert native._intact(library) and library.stat().st_size > 1000  # a whole library again
    native._kernels.cache_clear()
    try:
        assert native.short_attention_kernel() is not None
    finally:
        native._kernels.cache_clear()


def test_tracing_and_exporting_record_pytorchs_operations_not_the_kernel(kernel):
    """A C call cannot be recorded: under no_grad a trace would keep one call's output as a constant."""
    mha = MultiHeadAttention(32, 4).eval()
    x, other = torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python conditions
        traced = torch.jit.trace(_SelfAttention(mha), (x,))
        torch.testing.assert_close(traced(other), mha.self_attention(other).output, rtol=1e-5, atol=1e-6)
        exported = torch.export.export(_SelfAttention(mha), (x,))
        torch.testing.assert_close(exported.module()(other), mha.self_attention(other).output, rtol=1e-5, atol=1e-6)


class _SelfAttention(torch.nn.Module):
    def __init__(self, mha: MultiHeadAttention) -> None:
        super().__init__()
        self.mha = mha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha.self_attention(x).output
