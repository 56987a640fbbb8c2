"""Projecting conflicting gradients (Yu et al., NeurIPS 2020)."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .gradient import GradientBalancer


class PCGrad(GradientBalancer):
    """Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for Multi-Task Learning",
    NeurIPS 2020 (arXiv:2001.06782). No hyperparameters.

    For each present task `i`, starting from `g_i^PC = g_i`, in a random order of the other present
    tasks `j`:

        if <g_i^PC, g_j> < 0:   g_i^PC <- g_i^PC - <g_i^PC, g_j> / ||g_j||^2 * g_j

    (projected against the *original* `g_j`), and the shared part descends `d = sum_i g_i^PC`; the
    heads get their plain gradients (`h_t = 1`). Every `g_i^PC` is a combination `C_i @ G` of the
    task gradients, so the method is computed on the Gram matrix (`weigh`: `c = sum_i C_i`) and has
    both variants (parameters, and representation: the gradients with respect to the heads' inputs).
    A task with a zero gradient is never projected against.

    The orders are drawn (one permutation per task per training step) from a `torch.Generator`
    seeded with `seed`: the same draws on every rank and in every run; the generator's state is in
    `state_dict()`. Outside training steps the tasks' own order is used and nothing is drawn.
    Recorded weights: `c`.
    """

    def __init__(self, seed: int = 0, representation: bool = False):
        super().__init__(representation=representation)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def get_extra_state(self):
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state) -> None:
        self.generator.set_state(state["generator"])

    def weigh(self, gram: Tensor, losses: Tensor, index: Tensor, update: bool) -> Tuple[Tensor, Tensor]:
        """`c = sum_i C_i`, `C_i` the coefficients of `g_i^PC` over the task gradients; `h = 1`."""
        gram = gram.detach().to(torch.float64).cpu()
        p = gram.shape[0]
        coef = torch.eye(p, dtype=torch.float64)
        for i in range(p):
            order = torch.randperm(p, generator=self.generator) if update else torch.arange(p)
            for j in order.tolist():
                if j == i or gram[j, j] <= 0:
                    continue
                dot = coef[i] @ gram[:, j]  # <g_i^PC, g_j>
                if dot < 0:
                    coef[i, j] -= dot / gram[j, j]
        c = coef.sum(0).to(losses.device, losses.dtype)
        self._record(index, c)
        return c, torch.ones_like(c)
