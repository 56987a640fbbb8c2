"""Equal weighting: the flow loss as a plain sum (what `flow.get_loss()` computes without a balancer)."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor

from .base import Balancer, present_index


class EqualWeighting(Balancer):
    """`loss = sum_{t present} L_t`, with `L_t = weight_t * mean_{S_t} loss_t`.

    The baseline of every multi-task paper; no state, no hyperparameters. Absent tasks add
    nothing (their `L_t` is exactly 0 and gets no gradient).
    """

    def forward(self, losses: Tensor, present: Sequence[bool], update: bool) -> Tensor:
        _, idx = present_index(present, losses.device)
        self._record(idx, losses.new_ones(len(idx)))
        return losses.sum()
