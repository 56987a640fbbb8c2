"""Dynamic weight average (Liu, Johns & Davison, CVPR 2019)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .base import Balancer, nothing_present, present_index


class DynamicWeightAverage(Balancer):
    """Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019
    (arXiv:1803.10704), eq. 7:

        w_t = K * exp(r_t / T) / sum_k exp(r_k / T),   r_t = L_t(-1) / L_t(-2),   T = 2 (the paper's)

    `loss = sum_{t present} w_t * L_t` with the weights detached; `L_t(-1)`, `L_t(-2)` are task t's
    mean training losses over its last two completed *periods*. As in the paper a period is an
    epoch: call `epoch_end()` after each training epoch (in a plain loop
    `loss_fn.balancer.epoch_end()`); or give `period=n` to close each task's period after `n` of its
    own present steps (`period=1`: per step, noisy where a task has few samples per batch).

    Here `K` and the softmax run over the tasks present in the step, and a task's periods are made
    of the steps *in which it was present*: an absent step neither enters its mean nor advances its
    period, and an epoch in which it never appeared leaves its history as it was. A task with fewer
    than two completed periods has `r_t = 1` (the paper's `w = 1` for the first two epochs).
    """

    def __init__(self, temperature: float = 2.0, period: Optional[int] = None):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"DynamicWeightAverage: temperature must be positive, got {temperature}")
        if period is not None and int(period) < 1:
            raise ValueError(f"DynamicWeightAverage: period must be a number of steps >= 1 or None (epochs), "
                             f"got {period}")
        self.temperature = float(temperature)
        self.period = None if period is None else int(period)

    def _bind(self, n: int) -> None:
        self.register_buffer("history", torch.zeros(n, 2, dtype=torch.float64))  # [L(-2), L(-1)] per task
        self.register_buffer("seen", torch.zeros(n, dtype=torch.long))  # completed periods
        self.register_buffer("running", torch.zeros(n, dtype=torch.float64))  # loss sum of the open period
        self.register_buffer("steps", torch.zeros(n, dtype=torch.long))  # present steps in the open period

    def forward(self, losses: Tensor, present: Sequence[bool], update: bool) -> Tensor:
        where, idx = present_index(present, losses.device)
        if not where:
            return nothing_present(losses)
        state = idx.to(self.history.device)
        hist, seen = self.history[state], self.seen[state]
        ratio = torch.where((seen >= 2) & (hist[:, 0] > 0), hist[:, 1] / hist[:, 0].clamp_min(1e-300),
                            torch.ones_like(hist[:, 0]))
        weights = (len(where) * torch.softmax(ratio / self.temperature, 0)).to(losses.device, losses.dtype)
        self._record(idx, weights)
        if update:
            with torch.no_grad():
                self.running[state] += losses[idx].detach().to(self.running)
                self.steps[state] += 1
                if self.period is not None:
                    self._close(state[self.steps[state] >= self.period])
        return (weights * losses[idx]).sum()

    def epoch_end(self) -> None:
        """Close the period of every task that was present since the last one (the paper's epochs)."""
        with torch.no_grad():
            self._close(torch.nonzero(self.steps > 0).reshape(-1))

    def _close(self, tasks: Tensor) -> None:
        mean = self.running[tasks] / self.steps[tasks]
        self.history[tasks] = torch.stack([self.history[tasks, 1], mean], 1)
        self.seen[tasks] += 1
        self.running[tasks] = 0.0
        self.steps[tasks] = 0
