"""The one protocol through which `FlowRunner` computes a batch's loss.

`FlowRunner.handle_batch` calls a `LossStep`: `step(outputs, targets, terms=None) -> (loss, kept)`,
where `terms` are loss terms the model already reduced (memory-balanced DataParallel replicas) and
`kept` is what the callbacks read as `runner.batch["loss_terms"]` (None: nothing to leave).
`loss_step(criterion)` adapts the criterion once, at the start of a run:

- a `FlowCriterion` (`FlowLoss` and its subclasses: per-task `(sum, count)` terms, and the loss
  from their stack, scaled for DDP under a process group) -> `FlowLossStep`, which stacks the
  terms once for the loss and the callbacks;
- any other callable `criterion(outputs, targets) -> loss` -> `PlainLossStep` (no per-task terms).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol, Sequence, Tuple, runtime_checkable

from torch import Tensor

from ..callbacks.batch import StackedLossTerms
from ..interpreters.loss import stack_terms

Terms = Mapping[str, Tuple[Tensor, Tensor]]


@runtime_checkable
class FlowCriterion(Protocol):
    """A criterion with per-task loss terms `{path: (sum, count)}` and the loss from their stack
    (`interpreters.loss.stack_terms` rows in the order of `paths`), as `FlowLoss` has them."""

    def terms(self, outputs: Mapping[str, Any], targets: Mapping[str, Tensor]) -> Terms: ...

    def from_stacked(self, stacked: Tensor, paths: Sequence[str]) -> Tensor: ...


class LossStep(Protocol):
    """`(loss, terms the callbacks read or None)` for a batch; `terms`: reduced by the model already."""

    def __call__(self, outputs: Mapping[str, Any], targets: Mapping[str, Tensor],
                 terms: Optional[Terms] = None) -> Tuple[Tensor, Optional[Terms]]: ...


class FlowLossStep:
    """A `FlowCriterion` as a `LossStep`: one stack of the terms for the loss and the callbacks."""

    def __init__(self, criterion: FlowCriterion):
        self.criterion = criterion

    def __call__(self, outputs: Mapping[str, Any], targets: Mapping[str, Tensor],
                 terms: Optional[Terms] = None) -> Tuple[Tensor, Optional[Terms]]:
        stacked_terms = getattr(self.criterion, "stacked_terms", None)
        if terms is None and stacked_terms is not None:  # FlowLoss's: computed stacked (per loss group)
            stacked, paths = stacked_terms(outputs, targets)
            return self.criterion.from_stacked(stacked, paths), StackedLossTerms(paths, stacked.detach())
        if terms is None:
            terms = self.criterion.terms(outputs, targets)
        paths = tuple(terms)
        stacked = stack_terms(terms)
        return self.criterion.from_stacked(stacked, paths), StackedLossTerms(paths, stacked.detach())


class PlainLossStep:
    """A plain `criterion(outputs, targets) -> loss` as a `LossStep` (no terms for the callbacks)."""

    def __init__(self, criterion: Any):
        self.criterion = criterion

    def __call__(self, outputs: Mapping[str, Any], targets: Mapping[str, Tensor],
                 terms: Optional[Terms] = None) -> Tuple[Tensor, Optional[Terms]]:
        if terms is not None:
            raise ValueError(f"the model reduced the loss terms itself (DataParallel memory balancing), which the "
                             f"criterion {type(self.criterion).__name__} cannot combine (it is no FlowLoss): leave "
                             f"criterion=None")
        return self.criterion(outputs, targets), None


def loss_step(criterion: Any) -> LossStep:
    """`criterion` adapted to the `LossStep` protocol (see the module docstring)."""
    if isinstance(criterion, FlowCriterion):
        return FlowLossStep(criterion)
    if not callable(criterion):
        raise TypeError(f"criterion must be a FlowLoss or a callable criterion(outputs, targets) -> loss, "
                        f"got {type(criterion).__name__}")
    return PlainLossStep(criterion)
