"""The learning-rate schedules at hand-computed steps, and the optimizer's settings and groups."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_transformer
from torch import nn

from attnlab.nn.model import Transformer
from attnlab.train.optim import build_adam, cosine_lr, noam_lr


# -- noam: factor · d_model^-0.5 · min(step^-0.5, step · warmup^-1.5) ------------------------------
def test_noam_at_hand_computed_steps():
    d, w = 512, 4000
    # step 1 is on the warm-up line: 1 · 4000^-1.5 < 1^-0.5
    assert noam_lr(1, d, w) == pytest.approx(1 / math.sqrt(512) / (4000 * math.sqrt(4000)), rel=1e-12)
    # the peak, where both branches meet: 512^-0.5 · 4000^-0.5 ≈ 6.988e-4
    peak = 1 / math.sqrt(512 * 4000)
    assert peak == pytest.approx(6.98771242e-4, rel=1e-8)
    assert noam_lr(4000, d, w) == pytest.approx(peak, rel=1e-12)
    # four times the warm-up: half the peak (1/sqrt(4))
    assert noam_lr(16000, d, w) == pytest.approx(1 / math.sqrt(512 * 16000), rel=1e-12)
    assert noam_lr(16000, d, w) == pytest.approx(peak / 2, rel=1e-12)


def test_noam_rises_linearly_then_decays_as_inverse_sqrt():
    d, w = 256, 600
    first = noam_lr(1, d, w)
    for step in (2, 10, 299, 600):
        assert noam_lr(step, d, w) == pytest.approx(step * first, rel=1e-12)
    for step in (600, 1000, 2500):
        assert noam_lr(4 * step, d, w) == pytest.approx(noam_lr(step, d, w) / 2, rel=1e-12)
    # the peak is the maximum
    assert noam_lr(599, d, w) < noam_lr(600, d, w) > noam_lr(601, d, w)


def test_noam_factor_scales_the_rate():
    assert noam_lr(123, 256, 600, factor=0.4) == pytest.approx(0.4 * noam_lr(123, 256, 600), rel=1e-12)
    # the multi30k presets' comment: 0.4 · 256^-0.5 · 600^-0.5 = 1.0e-3
    assert noam_lr(600, 256, 600, factor=0.4) == pytest.approx(1.0206e-3, rel=1e-4)


@pytest.mark.parametrize("step", [0, -1])
def test_noam_rejects_steps_before_one(step):
    with pytest.raises(ValueError, match="step counts from 1"):
        noam_lr(step, 512, 4000)


def test_noam_rejects_zero_warmup():
    with pytest.raises(ValueError, match="warmup"):
        noam_lr(1, 512, 0)


# -- cosine: linear warm-up to the peak, cosine decay to the minimum --------------------------------
def test_cosine_at_warmup_end_midpoint_and_end():
    peak, minimum, warmup, total = 1e-3, 1e-4, 100, 2100
    assert cosine_lr(1, peak, warmup, total, minimum) == pytest.approx(peak / 100, rel=1e-12)
    assert cosine_lr(50, peak, warmup, total, minimum) == pytest.approx(peak / 2, rel=1e-12)
    assert cosine_lr(warmup, peak, warmup, total, minimum) == pytest.approx(peak, rel=1e-12)
    # halfway through the decay, cos(pi/2) = 0: the mean of peak and minimum
    assert cosine_lr(1100, peak, warmup, total, minimum) == pytest.approx((peak + minimum) / 2, rel=1e-12)
    # a quarter of the way: minimum + (peak - minimum) · (1 + cos(pi/4)) / 2
    quarter = minimum + (peak - minimum) * (1 + math.sqrt(0.5)) / 2
    assert cosine_lr(600, peak, warmup, total, minimum) == pytest.approx(quarter, rel=1e-12)
    assert cosine_lr(total, peak, warmup, total, minimum) == pytest.approx(minimum, rel=1e-12)
    assert cosine_lr(total + 500, peak, warmup, total, minimum) == pytest.approx(minimum, rel=1e-12)


def test_cosine_decreases_after_warmup():
    rates = [cosine_lr(s, 1.0, 10, 110, 0.0) for s in range(10, 111)]
    assert all(a > b for a, b in zip(rates, rates[1:]))


@pytest.mark.parametrize("step", [0, -3])
def test_cosine_rejects_steps_before_one(step):
    with pytest.raises(ValueError, match="step counts from 1"):
        cosine_lr(step, 1e-3, 10, 100)


# -- Adam ---------------------------------------------------------------------------------------
def _tied_model() -> Transformer:
    """The shared tiny Transformer with one vocabulary of 50, one embedding matrix for all three uses."""
    return tiny_transformer(0, vocab=50, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                            share_embeddings=True)


def test_build_adam_uses_the_papers_settings():
    model = _tied_model()
    optimizer = build_adam(model)
    assert type(optimizer) is torch.optim.Adam
    (group,) = optimizer.param_groups
    assert group["betas"] == (0.9, 0.98)
    assert group["eps"] == 1e-9
    assert group["weight_decay"] == 0
    assert group["lr"] == 0.0  # set by the training loop from the schedule
    assert {id(p) for p in group["params"]} == {id(p) for p in model.parameters()}


def test_build_adam_skips_frozen_parameters():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    model[0].bias.requires_grad_(False)
    (group,) = build_adam(model).param_groups
    assert {id(p) for p in group["params"]} == {id(model[0].weight), id(model[1].weight), id(model[1].bias)}


def test_build_adam_with_weight_decay_decays_only_matrices():
    model = _tied_model()
    optimizer = build_adam(model, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    assert isinstance(optimizer, torch.optim.AdamW)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert decayed["betas"] == plain["betas"] == (0.9, 0.99)
    assert decayed["eps"] == plain["eps"] == 1e-8
    assert decayed["params"] and all(p.dim() >= 2 for p in decayed["params"])
    assert plain["params"] and all(p.dim() < 2 for p in plain["params"])
    # every parameter in exactly one group; the tied embedding/output matrix once
    ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert id(model.output.weight) in {id(p) for p in decayed["params"]}
    biases_and_norms = {id(p) for n, p in model.named_parameters() if n.endswith("bias") or "norm" in n}
    assert biases_and_norms <= {id(p) for p in plain["params"]}
