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

Learned per-task values (UncertaintyWeighting's log-variances, GradNorm's weights, IMTL's
log-scales) are one `(T,)` Parameter per method (`Balancer.task_parameter`), not T scalars: the
optimizer steps one tensor instead of T tiny ones (AdamW on the CPU loops over its tensors). An
absent task's entry gets an exactly zero gradient, but an optimizer with momentum or weight decay
(AdamW) still moves an entry whose gradient is 0. So a training step notes which entries were
absent and their values, and the balancer puts those values back (`restore_absent`): at its next
call and before `state_dict()`, always; and right after `optimizer.step()` together with the rows
of the optimizer's state (Adam's moments) when the optimizer is attached (`attach(optimizer)`;
`FlowRunner` does). An absent task's learned value is then never updated from that step, as if
its gradient were None; the one difference with T scalars is the optimizer's shared step count
(Adam's bias correction counts every step of the vector).
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

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
        self._task_parameters: Tuple[str, ...] = ()  # names of the (T,) learned vectors (task_parameter)
        self._holding = False  # whether the last training step left some task out (host bool: no sync)

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

    def task_parameter(self, name: str, init: float) -> nn.Parameter:
        """Register `name`, a learned `(T,)` vector (one entry per bound task, all `init`), whose
        absent tasks' entries are kept where they were (see the module docstring). Call in `_bind`."""
        n = len(self.paths)
        self.register_parameter(name, nn.Parameter(torch.full((n,), float(init))))
        # the values to put back and where (not saved: state_dict() restores them first)
        self.register_buffer(name + "_held", torch.full((n,), float(init)), persistent=False)
        self.register_buffer(name + "_hold", torch.zeros(n, dtype=torch.bool), persistent=False)
        self._task_parameters += (name,)
        return getattr(self, name)

    def restore_absent(self) -> None:
        """Put back the values the tasks absent from the last training step had in that step (in
        the learned per-task vectors). Idempotent; every call of the balancer starts with it."""
        if not self._holding:
            return
        with torch.no_grad():
            for name in self._task_parameters:
                value = getattr(self, name)
                value.copy_(torch.where(getattr(self, name + "_hold"), getattr(self, name + "_held"), value))

    def hold_absent(self, where: Sequence[int], update: bool) -> None:
        """Start of a call: `restore_absent()`, then on a training step note the tasks absent from
        it (`where`: the present tasks' positions) and their current values."""
        self.restore_absent()
        if not update or not self._task_parameters:
            return
        self._holding = len(where) < len(self.paths)
        if not self._holding:  # every task present: nothing to keep (no tensor work on the common path)
            return
        absent = torch.ones(len(self.paths), dtype=torch.bool)
        absent[torch.tensor(list(where), dtype=torch.long)] = False
        with torch.no_grad():
            for name in self._task_parameters:
                getattr(self, name + "_held").copy_(getattr(self, name))
                getattr(self, name + "_hold").copy_(absent)  # to the parameter's device

    def attach(self, optimizer: Any) -> List[Any]:
        """Make `optimizer.step()` leave the absent tasks' entries of the learned per-task vectors
        untouched, with their rows of the optimizer's state (every state tensor shaped as the
        vector: Adam's moments), as if their gradient were None. Returns the hooks' handles
        (`handle.remove()` detaches); nothing to attach for a method without learned vectors or an
        optimizer without step hooks (then `restore_absent` still puts the values back at the next
        call). A wrapper holding the optimizer that steps as `.optimizer` (accelerate's
        `AcceleratedOptimizer`, which Catalyst's engines use) is unwrapped. `FlowRunner` attaches
        its optimizer for the run."""
        inner = getattr(optimizer, "optimizer", None)
        while isinstance(inner, torch.optim.Optimizer):  # the wrapper's step() calls the inner one's
            optimizer, inner = inner, getattr(inner, "optimizer", None)
        if not self._task_parameters or not hasattr(optimizer, "register_step_pre_hook"):
            return []
        saved: Dict[str, Any] = {}

        def before(opt: Any, args: Any, kwargs: Any) -> None:
            saved.clear()
            if self._holding:
                for name in self._task_parameters:
                    value = getattr(self, name)
                    state = opt.state.get(value, {})
                    saved[name] = {k: v.detach().clone() for k, v in state.items()
                                   if torch.is_tensor(v) and v.shape == value.shape}

        def after(opt: Any, args: Any, kwargs: Any) -> None:
            if not saved:
                return
            self.restore_absent()
            with torch.no_grad():
                for name, rows in saved.items():
                    hold, state = getattr(self, name + "_hold"), opt.state.get(getattr(self, name), {})
                    for key, old in rows.items():
                        if key in state:
                            state[key].copy_(torch.where(hold, old, state[key]))
            saved.clear()

        return [optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after)]

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """`nn.Module.state_dict`, with the absent tasks' learned values put back first."""
        self.restore_absent()
        return super().state_dict(*args, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # checkpoints of the versions with one scalar Parameter per task (`<name>.<i>`): stack them
        for name in self._task_parameters:
            old = [f"{prefix}{name}.{i}" for i in range(len(self.paths))]
            if prefix + name not in state_dict and old and all(k in state_dict for k in old):
                state_dict[prefix + name] = torch.stack([state_dict.pop(k).reshape(()) for k in old])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._holding = False  # the loaded values are the ones to use

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
