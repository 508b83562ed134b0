"""Label-smoothed cross-entropy, the paper's training loss (ε = 0.1).

The smoothed target puts 1 − ε on the true token and spreads ε evenly over the whole vocabulary
(PyTorch's convention): loss = (1 − ε) · (−log p_y) + ε · mean_v(−log p_v). Padding positions
contribute nothing.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["label_smoothed_loss"]


def label_smoothed_loss(
    logits: Tensor, target: Tensor, pad_id: int, smoothing: float = 0.1
) -> tuple[Tensor, Tensor]:
    """Summed label-smoothed loss over non-pad targets, and their count.

    Shape: logits (B, T, V), target (B, T) -> (scalar sum, scalar count).
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1), ignore_index=pad_id,
        label_smoothing=smoothing, reduction="sum",
    )
    return loss, (target != pad_id).sum()
