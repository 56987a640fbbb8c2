"""Geometric loss strategy (Chennupati et al., CVPR Workshops 2019)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import Balancer, nothing_present, present_index


class GeometricLossStrategy(Balancer):
    """Chennupati, Sistu, Yogamani & Rawashdeh, "MultiNet++: Multi-Stream Feature Aggregation and
    Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019 (arXiv:1904.08492):

        loss = (prod_{t present} L_t) ^ (1 / n),   n = the number of tasks present in the step

    computed as `exp(mean log L_t)`. Its gradient weighs task t by `loss / (n * L_t)`: a task with a
    small loss is pulled up, whatever the scale of the losses. No state and no hyperparameters. A
    present task whose loss is 0 is taken at the smallest positive float (the loss is then ~0 and
    every gradient finite).
    """

    def forward(self, losses: Tensor, present: Sequence[bool], update: bool) -> Tensor:
        where, idx = present_index(present, losses.device)
        if not where:
            return nothing_present(losses)
        chosen = losses[idx].clamp_min(torch.finfo(losses.dtype).tiny)
        total = torch.exp(torch.log(chosen).mean())
        self._record(idx, total.detach() / (len(where) * chosen.detach()))
        return total
