"""Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import Balancer, nothing_present, present_index


class UncertaintyWeighting(Balancer):
    """Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
    Geometry and Semantics", CVPR 2018 (arXiv:1705.07115).

    Each task has a learned log-variance `s_t = log sigma_t^2` (initialised to 0, sigma_t = 1), and

        loss = sum_{t present} 0.5 * exp(-s_t) * L_t + 0.5 * s_t

    (the paper's eq. 7, `L_t / (2 sigma_t^2) + log sigma_t`, in the log-variance parametrisation the
    paper recommends for numerical stability). The effective weight of task t is
    `0.5 * exp(-s_t)`. The `s_t` are learned by the same optimizer as the model: they are
    `loss_fn.parameters()`, so a plain loop passes
    `torch.optim.AdamW([*model.parameters(), *loss_fn.parameters()])` (and moves `loss_fn` to the
    model's device). `log_vars` is one `(T,)` Parameter (`loss_fn.balancer.log_vars[t]` is
    `s_t`; checkpoints of the earlier one-scalar-per-task layout load into it). An absent task's
    `s_t` gets a zero gradient and keeps its value from that step, optimizer moments included when
    the optimizer is attached (`Balancer.attach`, see `balancing.base`).
    """

    def _bind(self, n: int) -> None:
        self.log_vars = self.task_parameter("log_vars", 0.0)

    def forward(self, losses: Tensor, present: Sequence[bool], update: bool) -> Tensor:
        where, idx = present_index(present, losses.device)
        self.hold_absent(where, update)
        if not where:
            return nothing_present(losses)
        s = self.log_vars[idx.to(self.log_vars.device)].to(losses.device, losses.dtype)
        weights = 0.5 * torch.exp(-s)
        self._record(idx, weights)
        return (weights * losses[idx] + 0.5 * s).sum()
