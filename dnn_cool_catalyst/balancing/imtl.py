"""Impartial multi-task learning (Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, ICLR 2021)."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .gradient import GradientBalancer


class IMTL(GradientBalancer):
    """Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task Learning",
    ICLR 2021: the hybrid IMTL (IMTL-L on the losses, IMTL-G on the gradients), as in the paper
    and LibMTL. No hyperparameters.

    IMTL-L (`transform`): each task has a learned log-scale `s_t` (initialised to 0) and is
    differentiated as `exp(s_t) L_t - s_t`. The heads get this loss's gradient (`h_t = 1`), and
    `s_t` gets `exp(s_t) L_t - 1`, which drives the scaled losses `exp(s_t) L_t` towards 1: every
    task's loss on the same scale. The `s_t` are `loss_fn.parameters()` (one `(T,)` Parameter,
    `log_scales`; an absent task's entry gets a zero gradient and keeps its value from that step,
    see `balancing.base`).

    IMTL-G (`weigh`): with the (scaled) task gradients `g_t` and their unit vectors
    `u_t = g_t / ||g_t||`, the shared part descends `d = sum_t alpha_t g_t`, `sum_t alpha_t = 1`,
    chosen so that `d` has the same projection on every `u_t` (no task dominates):

        alpha_{2..P} = g_1 U^T (D U^T)^-1,  alpha_1 = 1 - sum alpha_{2..P},
        D = [g_1 - g_t]_t,  U = [u_1 - u_t]_t  (t = 2..P)

    computed on the Gram matrix (`g_i . u_j = A_ij / sqrt(A_jj)`) as the linear system
    `alpha^T B (e_1 - e_t) = 0`, `sum alpha = 1`, `B_ij = g_i . u_j`, solved by least squares
    (minimum norm where gradients are linearly dependent, where the paper's inverse does not
    exist). A present task with a zero gradient has no direction: it gets `alpha_t = 0` and no
    condition. Both variants (the paper applies IMTL-G to the shared representation:
    `representation=True`). The recorded weights are `alpha`.
    """

    def _bind(self, n: int) -> None:
        self.log_scales = self.task_parameter("log_scales", 0.0)

    def transform(self, losses: Tensor, index: Tensor) -> Tensor:
        """IMTL-L: `exp(s_t) L_t - s_t` for the present tasks (called on training steps only)."""
        self.hold_absent(index.tolist(), update=True)
        s = self.log_scales[index.to(self.log_scales.device)].to(losses.device, losses.dtype)
        return torch.exp(s) * losses - s

    def weigh(self, gram: Tensor, losses: Tensor, index: Tensor, update: bool) -> Tuple[Tensor, Tensor]:
        """IMTL-G's `alpha` (see the class docstring) and `h = 1`."""
        alpha = impartial_weights(gram.detach().to("cpu", torch.float64)).to(gram.device, gram.dtype)
        self._record(index, alpha)
        return alpha, torch.ones_like(alpha)


def impartial_weights(gram: Tensor) -> Tensor:
    """IMTL-G's `alpha` from the Gram matrix `(P, P)` of the task gradients: `sum alpha = 1` and
    `d = alpha @ G` has the same projection on every non-zero task gradient's unit vector."""
    n = gram.shape[0]
    norms = gram.diagonal().clamp_min(0.0).sqrt()
    # every gradient 0 (d = 0 whatever alpha), or a non-finite one (d is too; no SVD of it)
    if not bool(norms.max() > 0) or not bool(torch.isfinite(gram).all()):
        return torch.full((n,), 1.0 / n, dtype=gram.dtype)
    live = (norms > 1e-12 * norms.max()).nonzero().flatten()
    alpha = torch.zeros(n, dtype=gram.dtype)
    if len(live) == 1:
        alpha[live] = 1.0
        return alpha
    b = gram[live][:, live] / norms[live]  # b_ij = g_i . u_j
    m = len(live)
    # rows: (B (e_1 - e_t))^T alpha = 0 for t = 2..m (equal projections), and 1^T alpha = 1
    system = torch.cat([(b[:, :1] - b[:, 1:]).T, torch.ones(1, m, dtype=gram.dtype)])
    rhs = torch.zeros(m, dtype=gram.dtype)
    rhs[-1] = 1.0
    alpha[live] = torch.linalg.pinv(system) @ rhs
    return alpha
