"""Random loss weighting (Lin et al., TMLR 2022)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import Balancer, nothing_present, present_index


class RandomLossWeighting(Balancer):
    """Lin, Ye, Zhang & Tsang, "Reasonable Effectiveness of Random Weighting: A Litmus Test
    for Multi-Task Learning", TMLR 2022 (arXiv:2111.10603, 2021), RLW with the normal distribution:

        eps ~ N(0, I_K),   lambda = softmax(eps),   loss = sum_t lambda_t * L_t

    drawn afresh at every training step. `K` normals are drawn at every training step (so the draws
    follow the step count, whatever is present) from a `torch.Generator` seeded with `seed`; the
    softmax runs over the tasks present in the step. The same seed gives the same draws on every
    rank and in every run, and the generator's state is saved in `state_dict()` (a resumed run
    continues the draws). Outside training steps (`update` false: validation, `eval()`), no draw is
    made and the expected weight `1 / K_present` is used, so validation does not shift the draws.
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def get_extra_state(self):
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state) -> None:
        self.generator.set_state(state["generator"])

    def forward(self, losses: Tensor, present: Sequence[bool], update: bool) -> Tensor:
        where, idx = present_index(present, losses.device)
        eps = torch.randn(len(self.paths), generator=self.generator) if update else None
        if not where:
            return nothing_present(losses)
        if eps is None:
            weights = losses.new_full((len(where),), 1.0 / len(where))
        else:
            weights = torch.softmax(eps[where], 0).to(losses.device, losses.dtype)
        self._record(idx, weights)
        return (weights * losses[idx]).sum()
