"""Dynamic weight average (Liu, Johns & Davison, CVPR 2019)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import Balancer, nothing_present, present_index


class DynamicWeightAverage(Balancer):
    """Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019
    (arXiv:1803.10704), eq. 7:

        w_t = K * exp(r_t / T) / sum_k exp(r_k / T),   r_t = L_t(-1) / L_t(-2),   T = 2 (the paper's)

    `loss = sum_{t present} w_t * L_t`, the weights computed from the history before this step
    (detached). Here `K` and the softmax run over the tasks present in the step, and each task's
    history holds its (detached) losses of the last two steps *in which it was present*, not
    calendar steps: an absent step neither enters nor advances it. A task with fewer than two such
    steps has `r_t = 1` (the paper's `w = 1` for the first two). The paper averages `L_t` over an
    epoch; this loss sees steps, so the history is per step (noisier; a larger `temperature`
    smooths the weights).
    """

    def __init__(self, temperature: float = 2.0):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"DynamicWeightAverage: temperature must be positive, got {temperature}")
        self.temperature = float(temperature)

    def _bind(self, n: int) -> None:
        self.register_buffer("history", torch.zeros(n, 2))  # [L(-2), L(-1)] per task
        self.register_buffer("seen", torch.zeros(n, dtype=torch.long))  # present steps so far

    def forward(self, losses: Tensor, present: Sequence[bool], update: bool) -> Tensor:
        where, idx = present_index(present, losses.device)
        if not where:
            return nothing_present(losses)
        hist, seen = self.history.to(losses.device)[idx], self.seen.to(losses.device)[idx]
        ratio = torch.where((seen >= 2) & (hist[:, 0] > 0), hist[:, 1] / hist[:, 0].clamp_min(1e-30),
                            torch.ones_like(hist[:, 0]))
        weights = (len(where) * torch.softmax(ratio / self.temperature, 0)).to(losses.dtype)
        self._record(idx, weights)
        if update:
            current = losses[idx].detach().to(self.history.dtype)
            self.history = self.history.to(losses.device).index_copy(0, idx, torch.stack([hist[:, 1], current], 1))
            self.seen = self.seen.to(losses.device).index_add(0, idx, torch.ones_like(seen))
        return (weights * losses[idx]).sum()
