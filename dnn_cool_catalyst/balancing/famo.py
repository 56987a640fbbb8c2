"""Fast adaptive multitask optimization (Liu, Liu, Stone & Liu, NeurIPS 2023)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import Balancer, nothing_present, present_index


class FAMO(Balancer):
    """Liu, Liu, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023
    (arXiv:2306.03792), with the defaults of the authors' code: `lr=0.025` (beta, the logits' step),
    `gamma=0.01` (their decay), `min_losses=0`, `eps=1e-8`.

    Task logits `xi` give `z = softmax(xi)` over the present tasks, and with `D_t = L_t - L*_t + eps`

        loss = c * sum_t z_t log D_t,    c = (sum_t z_t / D_t)^-1  (detached)

    so the model descends `c * sum_t z_t grad L_t / D_t` (the log losses, balanced). The logits
    then follow the decrease of each task's log loss, `delta_t = log D_t(before) - log D_t(after)`:
    `xi <- Adam(xi; grad = J_z(xi)^T delta + gamma * xi, lr)` (the authors' update, Adam with
    weight decay `gamma`): a task that improved less gains weight.

    One forward per step: `D_t(before)` is the task's loss at its previous present step and
    `D_t(after)` its loss now (the authors evaluate the same batch again after the step). Both are
    taken over the steps where the task was present: an absent task has no `delta`, no Adam step
    and keeps its history; `z` and `J_z` run over the tasks present (with a history, for `J_z`).
    The logits change only by this rule, never by the loss's gradient, so they are buffers
    (`state_dict`), not parameters: nothing of FAMO goes to the optimizer.
    """

    def __init__(self, lr: float = 0.025, gamma: float = 0.01, min_losses: float = 0.0, eps: float = 1e-8,
                 betas=(0.9, 0.999)):
        super().__init__()
        self.lr, self.gamma, self.min_losses, self.eps = float(lr), float(gamma), float(min_losses), float(eps)
        self.betas = (float(betas[0]), float(betas[1]))

    def _bind(self, n: int) -> None:
        for name in ("xi", "exp_avg", "exp_avg_sq", "previous"):  # logits, Adam's moments, log D_t before
            self.register_buffer(name, torch.zeros(n, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros(n, dtype=torch.long))  # Adam steps of each task's logit
        self.register_buffer("seen", torch.zeros(n, dtype=torch.bool))  # has a previous present step

    def forward(self, losses: Tensor, present: Sequence[bool], update: bool) -> Tensor:
        where, idx = present_index(present, losses.device)
        if not where:
            return nothing_present(losses)
        d = losses[idx] - self.min_losses + self.eps
        if update:
            self._update_logits(idx.to(self.xi.device), d.detach().to(self.xi.device, torch.float64).log())
        z = torch.softmax(self.xi[idx.to(self.xi.device)], 0).to(losses.device, losses.dtype)
        c = 1.0 / (z / d.detach()).sum()
        self._record(idx, c * z / d.detach())
        return c * (z * d.log()).sum()

    @torch.no_grad()
    def _update_logits(self, idx: Tensor, log_d: Tensor) -> None:
        """One Adam step of the logits of the tasks present now and at an earlier step; then the history."""
        had = self.seen[idx]
        if had.any():
            q = idx[had]
            delta = self.previous[q] - log_d[had]
            z = torch.softmax(self.xi[q], 0)
            grad = z * (delta - (z * delta).sum()) + self.gamma * self.xi[q]  # J_z^T delta + decay
            b1, b2 = self.betas
            steps = self.steps[q] + 1
            m = self.exp_avg[q] * b1 + (1 - b1) * grad
            v = self.exp_avg_sq[q] * b2 + (1 - b2) * grad * grad
            m_hat, v_hat = m / (1 - b1 ** steps), v / (1 - b2 ** steps)
            self.xi[q] -= self.lr * m_hat / (v_hat.sqrt() + 1e-8)
            self.exp_avg[q], self.exp_avg_sq[q], self.steps[q] = m, v, steps
        self.previous[idx] = log_d
        self.seen[idx] = True
