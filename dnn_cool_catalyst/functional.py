"""Pure tensor functions behind the interpreters: masked reductions with static shapes."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


def expand_mask(mask: Tensor, like: Tensor) -> Tensor:
    """A per-sample mask `(N,)` viewed to broadcast over an element tensor `(N, ...)`."""
    if like.dim() == 1:
        return mask
    return mask.reshape(mask.shape[0], *([1] * (like.dim() - 1)))


def masked_sum_count(elem_loss: Tensor, available: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    """Sum of `elem_loss` over available elements of masked samples, and their count.

    No boolean indexing: every element takes part with weight 0 or 1, so shapes are static and
    the gradient of excluded elements is exactly zero (never NaN: `elem_loss` must be finite).
    """
    w = (available & expand_mask(mask, available)).to(elem_loss.dtype)
    return (elem_loss * w).sum(), w.sum()


def masked_mean(elem_loss: Tensor, available: Tensor, mask: Tensor) -> Tensor:
    """`sum / max(count, 1)`: the mean over the selected elements, exactly 0 when none is selected."""
    s, c = masked_sum_count(elem_loss, available, mask)
    return s / c.clamp_min(1)


def per_sample_masked(per_sample: Tensor, mask: Tensor) -> Tensor:
    """Per-sample values with NaN where the precondition mask is false."""
    return torch.where(mask, per_sample, torch.full_like(per_sample, float("nan")))
