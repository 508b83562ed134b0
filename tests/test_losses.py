"""Label-smoothed cross-entropy against a hand-computed case; padding is ignored. The blockwise
loss from the hidden states (``linear_cross_entropy``) equals the loss of the logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_transformer

from attnlab.train.losses import label_smoothed_loss, linear_cross_entropy

PAD = 0
LOGITS = [[[1.0, 2.0, 0.5, -1.0], [0.3, 0.1, 2.0, -0.5]]]  # (B=1, T=2, V=4)


def _neg_log_probs(row: list[float]) -> list[float]:
    """-log softmax(row), computed with math only."""
    log_z = math.log(sum(math.exp(x) for x in row))
    return [log_z - x for x in row]


def _hand_loss(row: list[float], y: int, eps: float) -> float:
    """(1 - eps) · (-log p_y) + eps · mean over the whole vocabulary of (-log p_v)."""
    nll = _neg_log_probs(row)
    return (1 - eps) * nll[y] + eps * sum(nll) / len(nll)


def test_matches_the_hand_computed_value():
    logits = torch.tensor(LOGITS)
    target = torch.tensor([[2, 1]])
    loss, count = label_smoothed_loss(logits, target, PAD, smoothing=0.1)
    expected = _hand_loss(LOGITS[0][0], 2, 0.1) + _hand_loss(LOGITS[0][1], 1, 0.1)
    # the first position by hand: log Z = log(e + e^2 + e^0.5 + e^-1) = log 12.1239 = 2.4952,
    # so -log p_2 = 2.4952 - 0.5
    assert _neg_log_probs(LOGITS[0][0])[2] == pytest.approx(1.99518, abs=1e-5)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert count.item() == 2
    assert loss.dim() == 0 and count.dim() == 0


def test_padding_contributes_nothing_and_is_not_counted():
    target = torch.tensor([[2, PAD]])
    loss, count = label_smoothed_loss(torch.tensor(LOGITS), target, PAD, smoothing=0.1)
    assert count.item() == 1
    assert loss.item() == pytest.approx(_hand_loss(LOGITS[0][0], 2, 0.1), rel=1e-6)
    # whatever the model predicts at a padded position does not matter
    other = torch.tensor(LOGITS)
    other[0, 1] = torch.tensor([9.0, -7.0, 3.0, 100.0])
    loss_other, _ = label_smoothed_loss(other, target, PAD, smoothing=0.1)
    assert loss_other.item() == loss.item()


def test_padding_gets_no_gradient():
    logits = torch.tensor(LOGITS, requires_grad=True)
    loss, _ = label_smoothed_loss(logits, torch.tensor([[2, PAD]]), PAD, smoothing=0.1)
    loss.backward()
    assert torch.count_nonzero(logits.grad[0, 1]) == 0
    assert torch.count_nonzero(logits.grad[0, 0]) == 4


def test_all_padding_gives_zero_loss_and_count():
    loss, count = label_smoothed_loss(torch.tensor(LOGITS), torch.tensor([[PAD, PAD]]), PAD)
    assert loss.item() == 0.0 and count.item() == 0


def test_no_smoothing_is_plain_negative_log_likelihood():
    target = torch.tensor([[2, 1]])
    loss, count = label_smoothed_loss(torch.tensor(LOGITS), target, PAD, smoothing=0.0)
    by_hand = _neg_log_probs(LOGITS[0][0])[2] + _neg_log_probs(LOGITS[0][1])[1]
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    nll = torch.nn.functional.nll_loss(torch.tensor(LOGITS)[0].log_softmax(-1), target[0], reduction="sum")
    assert loss.item() == pytest.approx(nll.item(), rel=1e-6)
    assert count.item() == 2


def test_batches_sum_over_rows():
    logits = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([[1, 2, 3, PAD, PAD], [4, 5, 6, 1, PAD], [2, PAD, PAD, PAD, PAD]])
    total, count = label_smoothed_loss(logits, target, PAD, 0.1)
    parts = [label_smoothed_loss(logits[i : i + 1], target[i : i + 1], PAD, 0.1) for i in range(3)]
    assert total.item() == pytest.approx(sum(p[0].item() for p in parts), rel=1e-6)
    assert count.item() == 8 == sum(p[1].item() for p in parts)


@pytest.mark.parametrize("smoothing", [-0.1, 1.0, 1.5])
def test_bad_smoothing_raises(smoothing):
    with pytest.raises(ValueError, match="label smoothing"):
        label_smoothed_loss(torch.tensor(LOGITS), torch.tensor([[2, 1]]), PAD, smoothing)


# -- linear_cross_entropy: the same loss from the hidden states, without the logits ------------------
B, T, E, V = 3, 5, 8, 11
TARGET = torch.tensor([[4, 7, 1, 10, 3], [2, 9, PAD, PAD, PAD], [5, 5, 8, PAD, PAD]])  # (B, T), 10 targets


def _leaves(dtype: torch.dtype, bias: bool, tied: bool) -> dict[str, torch.Tensor]:
    """Weights of a little model whose hidden states are tanh(embedding[tokens] @ M): with ``tied``,
    the output layer's weight is the embedding, which then gets gradient from both of its uses."""
    g = torch.Generator().manual_seed(3)
    leaves = {
        "embedding": torch.randn(V, E, generator=g, dtype=dtype),
        "mix": torch.randn(E, E, generator=g, dtype=dtype) / E**0.5,
        "weight": torch.randn(V, E, generator=g, dtype=dtype),
        "bias": torch.randn(V, generator=g, dtype=dtype),
    }
    if tied:
        del leaves["weight"]
    if not bias:
        del leaves["bias"]
    return {name: t.requires_grad_() for name, t in leaves.items()}


def _hidden_and_head(leaves: dict[str, torch.Tensor]):
    tokens = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [3, 1, 4, 1, 5]])  # (B, T)
    hidden = torch.tanh(leaves["embedding"][tokens] @ leaves["mix"])  # (B, T, E)
    weight = leaves.get("weight", leaves["embedding"])  # (V, E), the embedding itself when tied
    return hidden, weight, leaves.get("bias")


def _loss_and_grads(leaves, loss_fn, scale: float = 0.37):
    """The summed loss, its count, and every leaf's gradient of ``scale`` x the loss."""
    hidden, weight, bias = _hidden_and_head(leaves)
    loss, count = loss_fn(hidden, weight, bias)
    (loss * scale).backward()
    grads = {name: t.grad for name, t in leaves.items()}
    for t in leaves.values():
        t.grad = None
    return loss.detach(), count, grads


def _from_logits(smoothing: float):
    return lambda h, w, b: label_smoothed_loss(F.linear(h, w, b), TARGET, PAD, smoothing)


def _blockwise(smoothing: float, chunk_rows: int):
    return lambda h, w, b: linear_cross_entropy(h, w, b, TARGET, PAD, smoothing, chunk_rows=chunk_rows)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_rows", [1, 4, 100])  # a block per row, blocks with a remainder, one block
def test_linear_cross_entropy_equals_the_loss_of_the_logits(dtype, tolerance, smoothing, tied, bias, chunk_rows):
    leaves = _leaves(dtype, bias, tied)
    loss, count, grads = _loss_and_grads(leaves, _from_logits(smoothing))
    ours, our_count, our_grads = _loss_and_grads(leaves, _blockwise(smoothing, chunk_rows))
    assert ours.dtype == loss.dtype == dtype and our_count.item() == count.item() == 10
    torch.testing.assert_close(ours, loss, rtol=tolerance, atol=tolerance)
    for name, grad in grads.items():
        assert grad.abs().max() > 0.01, name  # every leaf gets a gradient worth comparing
        torch.testing.assert_close(our_grads[name], grad, rtol=tolerance, atol=tolerance, msg=name)


def test_linear_cross_entropy_ignores_what_the_padding_rows_hold():
    leaves = _leaves(torch.float64, bias=True, tied=False)
    hidden, weight, bias = _hidden_and_head(leaves)
    loss, _ = linear_cross_entropy(hidden, weight, bias, TARGET, PAD)
    changed = hidden.detach().clone().masked_fill((TARGET == PAD)[..., None], 1e6).requires_grad_()
    other, _ = linear_cross_entropy(changed, weight, bias, TARGET, PAD)
    assert other.item() == loss.item()
    other.backward()
    assert torch.count_nonzero(changed.grad[TARGET == PAD]) == 0
    assert torch.count_nonzero(changed.grad[TARGET != PAD]) > 0


def test_linear_cross_entropy_of_only_padding_is_zero_with_zero_gradients():
    leaves = _leaves(torch.float32, bias=True, tied=False)
    hidden, weight, bias = _hidden_and_head(leaves)
    loss, count = linear_cross_entropy(hidden, weight, bias, torch.full((B, T), PAD), PAD)
    assert loss.item() == 0.0 and count.item() == 0
    loss.backward()
    assert all(torch.count_nonzero(t.grad) == 0 for t in leaves.values())


def test_linear_cross_entropy_without_gradients_gives_the_same_loss():
    leaves = _leaves(torch.float64, bias=True, tied=True)
    hidden, weight, bias = _hidden_and_head(leaves)
    with_grad, _ = linear_cross_entropy(hidden, weight, bias, TARGET, PAD, chunk_rows=4)
    with torch.no_grad():
        without, _ = linear_cross_entropy(hidden, weight, bias, TARGET, PAD, chunk_rows=4)
    assert without.grad_fn is None and with_grad.grad_fn is not None
    assert without.item() == with_grad.item()


def test_linear_cross_entropy_under_autocast_follows_the_logits_loss():
    """bf16 products (as F.linear under autocast), softmax and sums in fp32."""
    leaves = _leaves(torch.float32, bias=True, tied=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, grads = _loss_and_grads(leaves, _from_logits(0.1))
        ours, _, our_grads = _loss_and_grads(leaves, _blockwise(0.1, 4))
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, loss, rtol=1e-2, atol=0)
    for name, grad in grads.items():
        assert our_grads[name].dtype == torch.float32
        torch.testing.assert_close(our_grads[name], grad, rtol=0, atol=0.03 * float(grad.abs().max()), msg=name)


def test_the_transformers_training_loss_from_its_hidden_states():
    """What the translation task trains on: ``features_only`` hidden states into the blockwise loss,
    equal to the loss of the model's logits, gradients of every parameter included (tied output)."""
    model = tiny_transformer(vocab=V, share_embeddings=True, train=True)
    src = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 0, 0], [3, 5, 7, 9, 0]])
    tgt_in = torch.tensor([[1, 4, 7, 2, 10], [1, 2, 9, 0, 0], [1, 5, 5, 8, 0]])

    def grads(loss: torch.Tensor) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    loss, count = label_smoothed_loss(model(src, tgt_in), TARGET, PAD, 0.1)
    expected = grads(loss / count)
    hidden = model(src, tgt_in, features_only=True)  # (B, T, E)
    ours, our_count = linear_cross_entropy(hidden, model.output.weight, model.output.bias, TARGET, PAD, 0.1)
    got = grads(ours / our_count)
    assert hidden.shape == (B, T, model.config.d_model)
    torch.testing.assert_close(ours, loss, rtol=1e-6, atol=1e-6)
    assert model.output.weight is model.tgt_embed.embedding.weight
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("smoothing", [-0.1, 1.0])
def test_linear_cross_entropy_checks_its_arguments(smoothing):
    hidden, weight, bias = _hidden_and_head(_leaves(torch.float32, bias=True, tied=False))
    with pytest.raises(ValueError, match="label smoothing"):
        linear_cross_entropy(hidden, weight, bias, TARGET, PAD, smoothing)
    with pytest.raises(ValueError, match="chunk_rows must be positive"):
        linear_cross_entropy(hidden, weight, bias, TARGET, PAD, chunk_rows=0)
    with pytest.raises(ValueError, match="do not fit"):
        linear_cross_entropy(hidden, weight[:, :-1], bias, TARGET, PAD)
    with pytest.raises(ValueError, match="do not fit"):
        linear_cross_entropy(hidden, weight, bias, TARGET[:, :-1], PAD)
