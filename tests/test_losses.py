"""Label-smoothed cross-entropy against a hand-computed case; padding is ignored."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.train.losses import label_smoothed_loss

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
