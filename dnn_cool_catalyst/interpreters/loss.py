"""`flow.get_loss()` and `flow.get_per_sample_loss()`: masked multi-task losses.

Flow loss = sum over leaf tasks of `weight_t * sum_{S_t} loss_t / max(|S_t|, 1)`, where `S_t` holds
the available elements of samples whose precondition is not FALSE. Computed with weights and
counts (static shapes), so an empty `S_t` adds exactly 0 and gives a zero (not absent) gradient.
"""
from __future__ import annotations

from typing import Dict, Mapping, Tuple

import torch
from torch import Tensor, nn

from ..errors import LabelError
from ..functional import masked_sum_count, per_sample_masked
from ..graph import FlowGraph


def _labels(targets: Mapping[str, Tensor], path: str, graph: FlowGraph) -> Tensor:
    try:
        return targets[path]
    except KeyError:
        raise LabelError(f"targets have no labels for task {path!r} of flow {graph.name!r}; "
                         f"they have {sorted(targets)}") from None


def _shape_error(path: str, logits: Tensor, labels: Tensor, err: Exception) -> LabelError:
    return LabelError(f"task {path!r}: logits of shape {tuple(logits.shape)} do not fit labels of shape "
                      f"{tuple(labels.shape)} ({err})")


class FlowLoss(nn.Module):
    """`loss(outputs, targets) -> scalar`; `outputs` as returned by `flow.torch()`.

    `terms(outputs, targets)` gives `{path: (sum, count)}`, the states from which the loss is
    recombined exactly (across DataParallel replicas or DDP ranks).
    """

    def __init__(self, graph: FlowGraph):
        super().__init__()
        self.graph = graph
        self._leaves = tuple((leaf.path, leaf.task) for leaf in graph.leaves)

    def terms(self, outputs: Mapping[str, Mapping[str, Tensor]], targets: Mapping[str, Tensor]) -> Dict[str, Tuple[Tensor, Tensor]]:
        logits, masks = outputs["logits"], outputs["mask"]
        result = {}
        for path, task in self._leaves:
            y = _labels(targets, path, self.graph)
            z = logits[path]
            try:
                elem = task.elementwise_loss(z, y)
                avail = task.available(y)
                result[path] = masked_sum_count(elem, avail, masks[path])
            except (RuntimeError, ValueError) as e:
                raise _shape_error(path, z, y, e) from e
        return result

    @staticmethod
    def combine(terms: Mapping[str, Tuple[Tensor, Tensor]], weights: Mapping[str, float]) -> Tensor:
        """`sum_t weight_t * sum_t / max(count_t, 1)`."""
        total = None
        for path, (s, c) in terms.items():
            v = s / c.clamp_min(1)
            w = weights[path]
            if w != 1.0:  # skip a multiplication (and its backward) per task in the common case
                v = w * v
            total = v if total is None else total + v
        return total

    @property
    def weights(self) -> Dict[str, float]:
        return {path: float(task.weight) for path, task in self._leaves}

    def forward(self, outputs, targets, return_terms: bool = False):
        """The flow loss; with `return_terms=True` also `{path: detached mean loss}` for logging."""
        terms = self.terms(outputs, targets)
        total = self.combine(terms, self.weights)
        if return_terms:
            return total, {p: (s / c.clamp_min(1)).detach() for p, (s, c) in terms.items()}
        return total


class FlowPerSampleLoss:
    """`(outputs, targets) -> {path: (N,), "overall": (N,)}`.

    A task's value is the mean loss over the sample's available elements, NaN where the sample is
    outside `S_t`; `"overall"` is the weighted sum with those NaNs counted as 0.
    """

    def __init__(self, graph: FlowGraph):
        self.graph = graph
        self._leaves = tuple((leaf.path, leaf.task) for leaf in graph.leaves)

    def __call__(self, outputs, targets) -> Dict[str, Tensor]:
        logits, masks = outputs["logits"], outputs["mask"]
        result: Dict[str, Tensor] = {}
        overall = None
        for path, task in self._leaves:
            y = _labels(targets, path, self.graph)
            z = logits[path]
            try:
                ps = per_sample_masked(task.sample_loss(z, y).reshape(-1), masks[path])
            except (RuntimeError, ValueError) as e:
                raise _shape_error(path, z, y, e) from e
            result[path] = ps
            term = float(task.weight) * torch.nan_to_num(ps, nan=0.0)
            overall = term if overall is None else overall + term
        result["overall"] = overall
        return result
