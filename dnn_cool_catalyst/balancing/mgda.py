"""Multiple-gradient descent (Sener & Koltun, NeurIPS 2018), with its upper-bound variant MGDA-UB."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .gradient import GradientBalancer

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def min_norm_2(v11: float, v12: float, v22: float) -> Tuple[float, float]:
    """`(gamma, cost)`: the point `gamma u + (1 - gamma) v` of smallest norm on the segment between
    two vectors given by `<u,u>`, `<u,v>`, `<v,v>`, and its squared norm."""
    if v12 >= v11:
        return 1.0, v11
    if v12 >= v22:
        return 0.0, v22
    gamma = (v22 - v12) / (v11 + v22 - 2.0 * v12)
    return gamma, v22 + gamma * (v12 - v22)


def min_norm_weights(gram: Tensor, max_iter: int = 250, tol: float = 1e-5) -> Tensor:
    """The weights `w` on the simplex minimising `||sum_t w_t g_t||^2 = w^T gram w`, by Frank-Wolfe
    with exact line search, started from the best pair, as Sener & Koltun's
    `MinNormSolver.find_min_norm_element_FW` (250 iterations, stop when `w` moves less than 1e-5)."""
    gram = gram.detach().to(torch.float64).cpu()
    p = gram.shape[0]
    w = torch.zeros(p, dtype=torch.float64)
    if p == 1:
        return w + 1.0
    best = None
    for i in range(p):
        for j in range(i + 1, p):
            gamma, cost = min_norm_2(float(gram[i, i]), float(gram[i, j]), float(gram[j, j]))
            if best is None or cost < best[0]:
                best = (cost, i, j, gamma)
    _, i, j, gamma = best
    w[i], w[j] = gamma, 1.0 - gamma
    for _ in range(max_iter):
        t = int(torch.argmin(gram @ w))  # the vertex most opposed to the current point
        v11, v12, v22 = float(w @ gram @ w), float(w @ gram[:, t]), float(gram[t, t])
        gamma, _ = min_norm_2(v11, v12, v22)
        new = gamma * w
        new[t] += 1.0 - gamma
        change = float((new - w).abs().sum())
        w = new
        if change < tol:
            break
    return w


class MGDA(GradientBalancer):
    """Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018
    (arXiv:1810.04650).

    The common descent direction of smallest norm: with the present tasks' gradients `g_t`
    normalised by `n_t`,

        w = argmin_{w in simplex} || sum_t w_t g_t / n_t ||^2      (Frank-Wolfe on the Gram matrix)

    and, as the authors' code does, the step is `sum_t w_t L_t`: the shared part descends
    `d = sum_t w_t g_t`, head `t` gets `w_t dL_t` (`c = h = w`). `normalization` (the authors'
    `gradient_normalizers`): `"none"` (default, as LibMTL), `"l2"` (`n_t = ||g_t||`), `"loss"`
    (`n_t = L_t`), `"loss+"` (`n_t = L_t ||g_t||`); a zero norm counts as 1.

    MGDA-UB, the paper's upper-bound variant, is `MGDA(representation=True)`: the gradients are
    those with respect to the shared representation the heads read (one backward through the
    backbone), its Gram matrix gives `w`. Recorded weights: `w`.

    Known behaviour (the method's, not the masks'): the min-norm point is no longer than the
    shortest task gradient, so with `normalization="none"` a task that is nearly solved (gradient
    ~0) takes all the weight, and as the heads get `w_t` too, the other tasks stop training.
    Measured on the demo's story (MGDA-UB): from about step 20 `camera_blocked` (representation
    gradient norm ~1e-7) had `w = 1.000` and every other task `w < 0.001`, and the loss rose; with
    `normalization="l2"` the weights stayed near `1/P` over the same steps.
    """

    def __init__(self, normalization: str = "none", representation: bool = False, max_iter: int = 250,
                 tol: float = 1e-5):
        super().__init__(representation=representation)
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"MGDA: normalization={normalization!r} is not one of {list(NORMALIZATIONS)}")
        self.normalization, self.max_iter, self.tol = normalization, int(max_iter), float(tol)

    def normalizers(self, gram: Tensor, losses: Tensor) -> Tensor:
        """`n_t` per present task (float64), 1 where it would be 0 or not finite."""
        norms = gram.diagonal().clamp_min(0).sqrt()
        loss = losses.detach().to(norms)
        n = {"none": torch.ones_like(norms), "l2": norms, "loss": loss, "loss+": loss * norms}[self.normalization]
        return torch.where((n > 0) & torch.isfinite(n), n, torch.ones_like(n))

    def weigh(self, gram: Tensor, losses: Tensor, index: Tensor, update: bool) -> Tuple[Tensor, Tensor]:
        """`w` on the normalised Gram matrix; `c = h = w`."""
        gram = gram.detach().to(torch.float64)
        n = self.normalizers(gram, losses.to(gram.device))
        w = min_norm_weights(gram / (n[:, None] * n[None, :]), self.max_iter, self.tol)
        w = w.to(losses.device, losses.dtype)
        self._record(index, w)
        return w, w
