"""Dual-balancing multi-task learning (Lin, Jiang, Ye, Zhang, Chen, Chen, Liu & Kwok, 2023)."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .gradient import GradientBalancer


class DBMTL(GradientBalancer):
    """Lin, Jiang, Ye, Zhang, Chen, Chen, Liu & Kwok, "Dual-Balancing for Multi-Task Learning"
    (arXiv:2308.12029, 2023), with the defaults of the authors' code (LibMTL's DB_MTL):
    `beta=0.9`, `beta_sigma=0.5`, `eps=1e-8`.

    Loss-scale balancing (`transform`): every task is differentiated as `log(L_t + eps)`, so its
    gradient is `g_t = grad L_t / (L_t + eps)`; the heads get exactly that (`h_t = 1`).
    Gradient-magnitude balancing (`direction`): a per-task exponential moving average of `g_t`,

        buffer_t <- g_t + (beta / step_t^beta_sigma) * (buffer_t - g_t)
        alpha_t  = max_s ||buffer_s|| / ||buffer_t||,     d = sum_t alpha_t buffer_t

    (every task's averaged gradient scaled to the largest norm; max and sum over the present
    tasks; the authors' `||buffer_t|| + 1e-8` as the divisor).

    With masks: `step_t` counts the task's present training steps (the paper's step count, per
    task), and only the rows of the present tasks are updated: an absent task's buffer and count
    stay as they were. The buffers `(T, D)` span the shared parameters (`D` their size, fixed at
    the first step) and are saved in `state_dict()`: the memory of T copies of the shared
    gradient, as in the authors' code. Needs the gradient vectors, so there is no representation
    variant (`supports_representation = False`). The recorded weights are `alpha`.

    Known behaviour with small `S_t`: `L_t` is the mean over the task's samples in the batch, and a
    task with one or two of them can get a loss near 0 by chance (one MSE term `r^2`: the
    expectation of `1 / L_t` is then infinite); `log(L_t + eps)` turns it into a gradient hundreds
    of times the usual, and the magnitude balancing scales every task up to it. Measured on the
    synthetic case of `benchmarks/balancing_quality.py` (seed 2): `level_rare` with one sample and
    `L = 2.9e-6` gave a task gradient of norm 953 (usually ~20) and a shared step 50x the usual,
    after which its MAE went from 0.044 to 0.24-0.31; with `eps=1e-4` the same run stays at
    0.042-0.053. The default stays the authors' `eps`.
    """

    supports_representation = False

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.5, eps: float = 1e-8, representation: bool = False):
        super().__init__(representation=representation)
        self.beta, self.beta_sigma, self.eps = float(beta), float(beta_sigma), float(eps)

    def _bind(self, n: int) -> None:
        # (T, 0) until the first step gives the shared parameters' size D
        self.register_buffer("grad_buffer", torch.zeros(n, 0))
        self.register_buffer("steps", torch.zeros(n, dtype=torch.long))  # present training steps of each task

    def transform(self, losses: Tensor, index: Tensor) -> Tensor:
        """`log(L_t + eps)`."""
        return torch.log(losses + self.eps)

    def direction(self, grads: Tensor, losses: Tensor, index: Tensor, update: bool) -> Tuple[Tensor, Tensor]:
        """`d = sum_t alpha_t buffer_t` after this step's update of the present rows; `h = 1`.
        Outside training steps the buffers are not changed (the would-be update is used)."""
        grads = grads.detach()
        rows, dim = len(self.paths), grads.shape[1]
        fresh = self.grad_buffer.shape[1] == 0
        if not fresh and self.grad_buffer.shape[1] != dim:
            raise ValueError(f"DBMTL keeps a gradient average over the {self.grad_buffer.shape[1]} shared parameter "
                             f"values of its first step, but this step has {dim}: the shared parameters changed; "
                             f"use a new DBMTL (or a new loss) for a different model")
        at = index.to(self.steps.device)
        steps = self.steps[at] + 1
        decay = (self.beta / steps.to(grads.dtype) ** self.beta_sigma).to(grads.device).unsqueeze(1)
        old = torch.zeros_like(grads) if fresh else self.grad_buffer[at.to(self.grad_buffer.device)].to(grads)
        buffer = grads + decay * (old - grads)
        if update:
            if fresh:  # the first training step fixes D
                self.grad_buffer = torch.zeros(rows, dim, dtype=grads.dtype, device=grads.device)
            self.grad_buffer[at.to(self.grad_buffer.device)] = buffer.to(self.grad_buffer)
            self.steps[at] = steps
        norms = buffer.norm(dim=1)
        alpha = norms.max() / (norms + 1e-8)
        self._record(index, alpha)
        return alpha @ buffer, torch.ones_like(alpha)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # a fresh DBMTL has the (T, 0) placeholder: take the saved buffers' D
        key = prefix + "grad_buffer"
        saved = state_dict.get(key)
        placeholder = self.grad_buffer.shape[1] == 0
        if saved is not None and placeholder and saved.dim() == 2 and saved.shape[0] == len(self.paths):
            self.grad_buffer = torch.zeros_like(saved, device=self.grad_buffer.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
