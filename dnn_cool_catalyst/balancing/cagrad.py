"""Conflict-averse gradient descent (Liu, Liu, Jin, Stone & Liu, NeurIPS 2021)."""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
from torch import Tensor

from .gradient import GradientBalancer


class CAGrad(GradientBalancer):
    """Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
    NeurIPS 2021 (arXiv:2110.14048), with the defaults of the authors' code and LibMTL: `c=0.5`,
    `rescale=1`.

    With `g_0 = mean_t g_t` over the P present tasks, CAGrad takes the direction in the ball
    `||d - g_0|| <= c ||g_0||` that maximises the worst task's improvement `min_t <g_t, d>`.
    Its dual is a problem on the simplex, solved on the Gram matrix `A = G G^T`:

        w* = argmin_{w in simplex}  w^T A 1/P + c ||g_0|| sqrt(w^T A w),   ||g_0|| = sqrt(mean(A))
        d  = (g_0 + c ||g_0|| g_w / ||g_w||) / (1 + c^2),                  g_w = w*^T G

    (`rescale=1` divides by `1 + c^2`, `rescale=2` by `1 + c`, `rescale=0` not at all, as in the
    authors' code). So `d = coef @ G` with `coef = (1/P + c ||g_0|| w* / ||g_w||) / (1 + c^2)`;
    the recorded weights are `coef`. The heads get their own task's gradient (`h_t = 1`), as in the
    authors' code and LibMTL, where only the shared parameters' gradient is replaced.

    The dual is solved deterministically in float64 on the CPU (the same result on every rank) by
    projected gradient descent with backtracking on the simplex (`dual_weights`; LibMTL and the
    authors use scipy's SLSQP: the same minimiser up to the solvers' tolerances, measured within
    1e-10 of the objective). Works on the Gram matrix, so both variants: `representation=True` gives
    CAGrad on the shared features. No state: absent tasks are simply not rows.
    """

    def __init__(self, c: float = 0.5, rescale: int = 1, representation: bool = False, max_iter: int = 1000,
                 tol: float = 1e-12):
        super().__init__(representation=representation)
        if c < 0:
            raise ValueError(f"CAGrad's c is the radius of the ball around the mean gradient, relative to its norm; "
                             f"it must be >= 0, got {c}")
        if rescale not in (0, 1, 2):
            raise ValueError(f"CAGrad's rescale must be 0 (none), 1 (divide by 1 + c^2) or 2 (divide by 1 + c), "
                             f"got {rescale!r}")
        self.c, self.rescale, self.max_iter, self.tol = float(c), int(rescale), int(max_iter), float(tol)

    def weigh(self, gram: Tensor, losses: Tensor, index: Tensor, update: bool) -> Tuple[Tensor, Tensor]:
        """`coef` (see the class docstring) and `h = 1`."""
        a = gram.detach().to("cpu", torch.float64)
        n = a.shape[0]
        mean_norm_sq = a.mean().clamp_min(0.0)  # ||g_0||^2
        w = dual_weights(a, self.c, self.max_iter, self.tol)
        gw_norm = (w @ a @ w).clamp_min(0.0).sqrt()
        radius = self.c * mean_norm_sq.sqrt()
        # g_w ~ 0 (a convex combination of the gradients vanishes, up to the solver's smoothing
        # sqrt(q + 1e-8) on the normalised Gram matrix; the authors' code divides by ||g_w|| + 1e-8):
        # its direction is noise, so d = g_0. A relative guard, not their absolute 1e-8, so that
        # small gradients are treated like large ones.
        degenerate = not bool(gw_norm > 1e-4 * mean_norm_sq.sqrt())
        lam = torch.zeros((), dtype=torch.float64) if degenerate else radius / gw_norm
        coef = torch.full((n,), 1.0 / n, dtype=torch.float64) + lam * w
        coef = coef / {0: 1.0, 1: 1.0 + self.c ** 2, 2: 1.0 + self.c}[self.rescale]
        coef = coef.to(gram.device, gram.dtype)
        self._record(index, coef)
        return coef, torch.ones(n, dtype=gram.dtype, device=gram.device)


def dual_weights(gram: Tensor, c: float, max_iter: int = 1000, tol: float = 1e-12) -> Tensor:
    """The minimiser over the simplex of CAGrad's dual `w^T A 1/P + c ||g_0|| sqrt(w^T A w)`
    (`gram = A`, float64 on the CPU).

    The objective scales linearly with `A`, so it is solved on `A / ||g_0||^2` (where `c ||g_0||`
    becomes `c`): step sizes and tolerances do not depend on the gradients' scale. Projected
    gradient descent from the uniform weights with a backtracking step (doubled after each accepted
    step), stopping when the objective falls by less than `tol` relative to its value. In numpy:
    the P-dimensional steps are too small for torch's per-operation cost (measured 8x slower)."""
    n = gram.shape[0]
    w = np.full(n, 1.0 / n)
    scale = float(gram.mean())
    # one task, g_0 = 0, the ball is a point (d = g_0), or non-finite gradients (d is too, whatever w)
    if n == 1 or not scale > 0 or c == 0.0 or not bool(torch.isfinite(gram).all()):
        return torch.from_numpy(w)
    a = gram.numpy() / scale
    ab = a.mean(1)  # A 1/P

    def objective(v: np.ndarray) -> float:
        return float(v @ ab + c * np.sqrt(max(float(v @ a @ v), 0.0) + 1e-8))

    step, f_w = 1.0, objective(w)
    for _ in range(max_iter):
        av = a @ w
        grad = ab + c * av / np.sqrt(max(float(w @ av), 0.0) + 1e-8)
        while True:
            nxt = _project_to_simplex(w - step * grad)
            diff = nxt - w
            f_nxt = objective(nxt)
            if f_nxt <= f_w + grad @ diff + diff @ diff / (2 * step) + 1e-15 or step < 1e-20:
                break
            step *= 0.5
        decrease = f_w - f_nxt
        w, f_w = nxt, f_nxt
        if decrease <= tol * (abs(f_w) + 1e-3):
            break
        step *= 2.0
    return torch.from_numpy(w)


def _project_to_simplex(v: np.ndarray) -> np.ndarray:
    """The Euclidean projection of `v` onto the probability simplex (Duchi et al., ICML 2008)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    rho = np.nonzero(u - css / np.arange(1, len(v) + 1) > 0)[0][-1]
    return np.maximum(v - css[rho] / (rho + 1), 0.0)
