"""The balancer protocol: how a flow loss combines its tasks' masked means.

`flow.get_loss(balancer=b)` binds `b` to the flow's leaf paths (`bind`, once) and calls it at every
step with each task's loss `L_t = weight_t * mean_{S_t} loss_t` (the task's own `weight=` applies
first) and which tasks are *present*: `|S_t| > 0` over the whole batch (all ranks under DDP).
A task that is not present takes no part in the step: it gets no term (its head's gradient is
exactly zero, its learned weight is not in the step's graph, so its `.grad` stays None and the
optimizer leaves it alone), and no state of the balancer is updated from it.

State (loss histories, random draws) advances only on training steps: `update` is true when the
loss module is in training mode and gradients are enabled (a validation loop under
`torch.no_grad()` or after `loss_fn.eval()` leaves it as it was).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn


class Balancer(nn.Module):
    """Base class: `forward(losses, present, update) -> scalar loss`.

    `losses`: `(T,)` per-task losses in the order of the bound paths (0 where a task is absent);
    `present`: `T` Python booleans; `update`: whether this is a training step. `last_weights` holds
    the effective weight of each task in the last step (`d loss / d L_t`, 0 where absent), detached,
    for logging; `effective_weights()` names them by path.
    """

    def __init__(self):
        super().__init__()
        self.paths: Tuple[str, ...] = ()
        self.last_weights: Tensor = torch.zeros(0)

    def bind(self, paths: Sequence[str]) -> "Balancer":
        """Fix the tasks (the flow's leaf paths, in loss order); creates per-task parameters and state."""
        if self.paths:
            raise ValueError(f"{type(self).__name__} is already bound to the tasks {list(self.paths)}; "
                             "create one balancer per loss")
        self.paths = tuple(paths)
        self.last_weights = torch.zeros(len(self.paths))
        self._bind(len(self.paths))
        return self

    def _bind(self, n: int) -> None:
        """Create the state for `n` tasks (nothing by default)."""

    def effective_weights(self) -> Dict[str, float]:
        """`{path: effective weight in the last step}` (0 where the task was absent)."""
        return {p: float(w) for p, w in zip(self.paths, self.last_weights.tolist())}

    def epoch_end(self) -> None:
        """Called after each training epoch (`FlowRunner` does; a plain loop calls
        `loss_fn.balancer.epoch_end()`). Nothing by default; DynamicWeightAverage closes its period."""

    def _record(self, idx: Tensor, weights: Tensor) -> None:
        full = torch.zeros(len(self.paths), dtype=weights.dtype, device=weights.device)
        self.last_weights = full.index_copy(0, idx, weights.detach())


def present_index(present: Sequence[bool], device: torch.device) -> Tuple[List[int], Tensor]:
    """The positions of the present tasks, as a list and as an index tensor on `device`."""
    where = [i for i, p in enumerate(present) if p]
    return where, torch.tensor(where, dtype=torch.long, device=device)


def nothing_present(losses: Tensor) -> Tensor:
    """The loss of a step where no task is present: exactly 0, with a (zero) gradient path."""
    return losses.sum() * 0.0
