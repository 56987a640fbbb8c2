"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .gradient import GradientBalancer


class GradNorm(GradientBalancer):
    """Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss
    Balancing in Deep Multitask Networks", ICML 2018 (arXiv:1711.02257), with the paper's
    `alpha=1.5` (its choice for NYUv2).

    Learned weights `w_t` (initialised to 1): the network descends `sum_t w_t L_t` (shared part
    `d = sum_t w_t g_t`, heads `h_t = w_t`), and the weights follow the paper's gradient loss
    over the P present tasks

        G_t = ||w_t g_t|| = w_t sqrt(A_tt),   r_t = (L_t / L_t(0)) / mean_s (L_s / L_s(0)),
        L_grad = sum_t | G_t - [mean_s G_s * r_t^alpha] |   (the bracket held constant)

    so a task that trains slower than the others (larger `r_t`) gets a larger gradient norm.
    `L_grad` is `auxiliary_loss()`: the loss adds it with its value removed, so its gradient
    reaches the `w_t`, which are `loss_fn.parameters()` and step with the model's optimizer (the
    paper uses the same learning rate). At each training step the present tasks' weights are first
    renormalised to sum to P (the paper renormalises to the number of tasks after each step; here
    the tasks of the step), in place; a weight driven below 0 (a large learning rate) is clipped
    to 0 first, and weights that are all 0 start again from 1.

    With masks: `L_t(0)` is the task's loss at its first present training step; an absent task's
    weight (an entry of the `(T,)` Parameter `task_weights`) gets a zero gradient, keeps its value
    from that step (see `balancing.base`), is not renormalised and its `L_t(0)` is kept. The norms come from the Gram matrix's diagonal, so both variants work (the paper
    takes the gradients of the last shared layer; `representation=True` takes those of the shared
    features the heads read). The recorded weights are the `w_t` used.
    """

    def __init__(self, alpha: float = 1.5, representation: bool = False):
        super().__init__(representation=representation)
        self.alpha = float(alpha)
        self._auxiliary: Optional[Tensor] = None

    def _bind(self, n: int) -> None:
        self.task_weights = self.task_parameter("task_weights", 1.0)
        self.register_buffer("initial_losses", torch.zeros(n, dtype=torch.float64))  # L_t(0)
        self.register_buffer("seen", torch.zeros(n, dtype=torch.bool))  # L_t(0) recorded

    def auxiliary_loss(self) -> Optional[Tensor]:
        """The step's `L_grad` (None outside training steps)."""
        return self._auxiliary

    def weigh(self, gram: Tensor, losses: Tensor, index: Tensor, update: bool) -> Tuple[Tensor, Tensor]:
        """`c = h = w` over the present tasks; on a training step, renormalise the present weights
        first, record new tasks' `L_t(0)` and set `auxiliary_loss()` to `L_grad`."""
        self._auxiliary = None
        where = index.tolist()
        self.hold_absent(where, update)
        count = len(where)
        at_weights = index.to(self.task_weights.device)
        if update:
            with torch.no_grad():
                w = self.task_weights[at_weights].clamp_min(0.0)
                total = w.sum()
                # all weights driven to 0 (a large learning rate): start again from 1
                w = w * (count / total) if bool(total > 0) else torch.ones_like(w)
                self.task_weights.index_copy_(0, at_weights, w)
                at = index.to(self.seen.device)
                new = at[~self.seen[at]]
                if len(new):
                    self.initial_losses[new] = losses.detach().to(self.initial_losses)[~self.seen[at]]
                    self.seen[new] = True
        weights = self.task_weights[at_weights]
        if update:
            self._auxiliary = self._gradient_loss(weights, gram, losses, index).to(losses.dtype)
            used = weights.detach()
        else:  # not renormalised in place outside training: renormalise the value used
            used = weights.detach() * (count / weights.detach().sum().clamp_min(1e-12))
        used = used.to(gram.device, gram.dtype)
        self._record(index, used)
        return used, used

    def _gradient_loss(self, weights: Tensor, gram: Tensor, losses: Tensor, index: Tensor) -> Tensor:
        """The paper's `L_grad`, with the weights' graph."""
        norms = gram.detach().diagonal().clamp_min(0.0).sqrt()
        g = weights.to(norms.device, norms.dtype) * norms  # G_t = ||w_t g_t||
        initial = self.initial_losses[index.to(self.initial_losses.device)].to(norms.device)
        ratio = losses.detach().to(norms.device, norms.dtype) / initial.clamp_min(1e-12)  # L_t / L_t(0)
        r = ratio / ratio.mean().clamp_min(1e-12)  # relative inverse training rate
        target = (g.detach().mean() * r ** self.alpha).detach()
        return (g - target).abs().sum()
