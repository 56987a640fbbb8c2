"""The protocol of the balancers that act on the tasks' gradients (GradNorm, MGDA, PCGrad, CAGrad,
IMTL, DB-MTL).

A gradient method sees, for the tasks present in a step (`|S_t| > 0` over all ranks), the
gradients `g_t` of their losses `L_t = weight_t * mean_{S_t} loss_t` with respect to the *shared*
part of the network, and chooses

- the direction `d` the shared part descends, and
- a weight `h_t` per present task for the task-specific parameters (the heads): head `t` gets
  `h_t * dL_t/d head_t`.

Two variants, chosen by the method's `representation=` argument:

- **parameters** (the default): `g_t` is the gradient with respect to the shared parameters
  (`loss_fn.backward(..., shared_parameters=...)`; `FlowRunner`: every parameter that is not a task
  head). One backward per present task.
- **representation**: `g_t` is the gradient with respect to the features the heads read (one cheap
  backward per task through its head, then one backward through the backbone). Only for methods
  that work on the Gram matrix (`weigh`); a method that needs the gradient vectors themselves
  (`supports_representation = False`) refuses it.

Tasks not present in a step are not in `grads`, `gram` or `losses` at all: they are never projected
against, never counted in a mean, their head's gradient is exactly zero and no state of the method
is updated from them. `index` gives the positions (in the bound paths) of the rows, for methods that
keep per-task state.

Under DDP the rows are those of the global batch (the loss all-reduces the gradient matrix, or the
Gram matrix for the representation variant, before calling the method), identical on every rank, so
every rank computes the same `d` and `h` and updates its state identically.

Each method records its effective weights for logging (`self._record(index, w)` in `weigh` or
`direction`): the shared coefficients `c` where it has them, else the heads' weights `h`.

The logged value of the loss is the sum of the present tasks' losses (as `EqualWeighting`), in
training and evaluation alike; only the gradients follow the method.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .base import Balancer, nothing_present, present_index


class GradientBalancer(Balancer):
    """Base class of the gradient methods (see the module docstring).

    Subclasses implement `weigh` (methods defined on the Gram matrix of the task gradients; both
    variants) or override `direction` (methods that need the gradient vectors; parameters only,
    with `supports_representation = False`). `representation=True` selects the representation
    variant.
    """

    #: whether the method can act on the gradients with respect to the heads' input features
    supports_representation: bool = True

    def __init__(self, representation: bool = False):
        super().__init__()
        if representation and not self.supports_representation:
            raise ValueError(f"{type(self).__name__} needs the gradient vectors of the shared parameters and has no "
                             f"representation variant: leave representation=False")
        self.representation = bool(representation)

    def transform(self, losses: Tensor, index: Tensor) -> Tensor:
        """The present tasks' losses `(P,)` (with their graph) as the method differentiates them:
        `g_t` is the gradient of `transform(losses)[t]`. Identity by default; IMTL scales them by
        learned `exp(s_t)`, DB-MTL takes their logarithm. May involve the method's own parameters,
        which then get their gradient through the heads' term `sum_t h_t transform(L)_t`."""
        return losses

    def auxiliary_loss(self) -> Optional[Tensor]:
        """A scalar the loss adds to the step's backward with its value removed (the logged loss is
        unchanged), whose gradient is the update of the method's own learnable parameters
        (GradNorm's gradient-norm loss for its weights). Set by `weigh`/`direction` for the current
        step (read once, right after them); None by default."""
        return None

    def weigh(self, gram: Tensor, losses: Tensor, index: Tensor, update: bool) -> Tuple[Tensor, Tensor]:
        """`(c, h)` from the Gram matrix `gram = G G^T` `(P, P)` (float64) of the present tasks'
        global gradients, their global losses `losses` `(P,)` (detached) and their positions `index`
        `(P,)`: the shared part descends `d = c @ G`, head `t` gets `h_t * dL_t`. `update`: a
        training step (advance the method's state only then)."""
        raise NotImplementedError(f"{type(self).__name__} implements neither weigh nor direction")

    def direction(self, grads: Tensor, losses: Tensor, index: Tensor, update: bool) -> Tuple[Tensor, Tensor]:
        """`(d, h)` from the present tasks' global gradient matrix `grads` `(P, D)` (parameters
        variant): `d` `(D,)` is the gradient the shared parameters receive, `h` `(P,)` the heads'
        weights. Default: `weigh` on the Gram matrix, `d = c @ grads`."""
        gram = (grads.double() @ grads.double().T)
        c, h = self.weigh(gram, losses, index, update)
        return c.to(grads.dtype) @ grads, h

    def forward(self, losses: Tensor, present: Sequence[bool], update: bool) -> Tensor:
        """The logged value (without the gradient step): the sum of the present tasks' losses."""
        self.restore_absent()
        where, idx = present_index(present, losses.device)
        if not where:
            return nothing_present(losses)
        return losses[idx].sum()


def task_gradients(losses: Tensor, inputs: Sequence[Tensor]) -> Tensor:
    """`(P, D)`: row `t` is the gradient of `losses[t]` with respect to `inputs` (parameters or
    features), flattened and concatenated in their order, in `losses`' dtype; zero where an input
    does not depend on a loss. The graph is kept (the step's backward follows).

    One vectorised backward over the `P` losses (`torch.autograd.grad(..., is_grads_batched=True)`);
    when an operation in the graph has no batching rule, one backward per loss instead (same result).
    """
    p = losses.shape[0]
    if p == 1:
        rows = [torch.autograd.grad(losses[0], inputs, retain_graph=True, allow_unused=True)]
        return _flatten_rows(rows, inputs, losses.dtype)
    eye = torch.eye(p, dtype=losses.dtype, device=losses.device)
    try:
        with warnings.catch_warnings():
            # vmap's note that an operation falls back to a loop: still correct, nothing for the user to do
            warnings.filterwarnings("ignore", message=".*(batching rule|fallback|vmap).*")
            batched = torch.autograd.grad(losses, inputs, grad_outputs=eye, retain_graph=True, allow_unused=True,
                                          is_grads_batched=True)
    except (RuntimeError, NotImplementedError):
        rows = [torch.autograd.grad(losses[t], inputs, retain_graph=True, allow_unused=True) for t in range(p)]
        return _flatten_rows(rows, inputs, losses.dtype)
    flat = [g.reshape(p, -1).to(losses.dtype) if g is not None
            else torch.zeros(p, x.numel(), dtype=losses.dtype, device=losses.device) for g, x in zip(batched, inputs)]
    return torch.cat(flat, dim=1)


def _flatten_rows(rows: Sequence[Sequence[Optional[Tensor]]], inputs: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    return torch.stack([torch.cat([(g if g is not None else torch.zeros_like(x)).reshape(-1).to(dtype)
                                   for g, x in zip(row, inputs)]) for row in rows])


def split_like(flat: Tensor, inputs: Sequence[Tensor]) -> Tuple[Tensor, ...]:
    """`flat` `(D,)` cut into tensors shaped (and typed) as `inputs` (the inverse of a row of
    `task_gradients`)."""
    pieces = torch.split(flat, [x.numel() for x in inputs])
    return tuple(piece.reshape(x.shape).to(x.dtype) for piece, x in zip(pieces, inputs))
