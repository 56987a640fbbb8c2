"""Metrics with one protocol: `reset()`, `update(preds, targets, mask)`, `compute()`.

Every metric keeps its state as a dict of tensors that are *sums and counts*, so that the states of
several batches, DataParallel replicas or DDP ranks merge exactly by addition (`merge`,
`all_reduce`). `mask` is the boolean `(N,)` precondition mask of the task (samples in which the
task applies); a metric also skips elements whose label is missing, so it counts exactly the
samples of `S_t`. `uses` tells whether `update` wants activated or decoded predictions.
"""
from __future__ import annotations

import abc
from typing import Dict

import torch
from torch import Tensor


class Metric(abc.ABC):
    """Base of all metrics: subclasses define `initial_states`, `update` and `compute`."""

    uses: str = "decoded"  # "decoded" or "activated"

    def __init__(self) -> None:
        self.states: Dict[str, Tensor] = self.initial_states()

    @abc.abstractmethod
    def initial_states(self) -> Dict[str, Tensor]:
        """Zero states (float64 or int64 tensors on the CPU)."""

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.states = self.initial_states()

    @abc.abstractmethod
    def update(self, preds: Tensor, targets: Tensor, mask: Tensor) -> None:
        """Add one batch: `preds` (activated or decoded), `targets` (labels), `mask` `(N,)` bool."""

    @abc.abstractmethod
    def compute(self) -> float:
        """The metric over everything seen since the last reset (NaN when nothing was seen)."""

    def merge(self, states: Dict[str, Tensor]) -> None:
        """Add the states of another instance of the same metric (another device or batch)."""
        for k, v in states.items():
            self.states[k] = self.states[k] + v.to(self.states[k].device)

    def all_reduce(self) -> None:
        """Sum states across the processes of an initialised `torch.distributed` group."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            for k in sorted(self.states):
                t = self.states[k].clone()
                dist.all_reduce(t)
                self.states[k] = t

    def _add(self, **values: Tensor) -> None:
        for k, v in values.items():
            self.states[k] = self.states[k] + v.detach().to(self.states[k].device, self.states[k].dtype)


def _ratio(num: Tensor, den: Tensor) -> float:
    den = float(den)
    return float(num) / den if den > 0 else float("nan")


def _zeros(*names: str, shape=()) -> Dict[str, Tensor]:
    return {n: torch.zeros(shape, dtype=torch.float64) for n in names}


class BinaryConfusionMetric(Metric):
    """Accuracy, f1_score, precision or recall of decoded binary predictions, from confusion counts."""

    KINDS = ("accuracy", "f1_score", "precision", "recall")

    def __init__(self, kind: str = "accuracy") -> None:
        if kind not in self.KINDS:
            raise ValueError(f"unknown binary metric {kind!r}; known: {self.KINDS}")
        self.kind = kind
        super().__init__()

    def initial_states(self) -> Dict[str, Tensor]:
        return _zeros("tp", "fp", "fn", "tn")

    def update(self, preds: Tensor, targets: Tensor, mask: Tensor) -> None:
        t = targets.reshape(-1)
        p = preds.reshape(-1).bool()
        w = ~torch.isnan(t) & mask.reshape(-1)
        pos = (t > 0.5) & w
        neg = (t <= 0.5) & w
        self._add(tp=(p & pos).sum(), fp=(p & neg).sum(), fn=(~p & pos).sum(), tn=(~p & neg).sum())

    def compute(self) -> float:
        s = self.states
        tp, fp, fn, tn = s["tp"], s["fp"], s["fn"], s["tn"]
        if self.kind == "accuracy":
            return _ratio(tp + tn, tp + fp + fn + tn)
        if self.kind == "precision":
            return _ratio(tp, tp + fp)
        if self.kind == "recall":
            return _ratio(tp, tp + fn)
        return _ratio(2 * tp, 2 * tp + fp + fn)


class TopKAccuracy(Metric):
    """Share of samples whose label is among the first `k` decoded (sorted) classes."""

    def __init__(self, k: int = 1) -> None:
        self.k = k
        super().__init__()

    def initial_states(self) -> Dict[str, Tensor]:
        return _zeros("correct", "count")

    def update(self, preds: Tensor, targets: Tensor, mask: Tensor) -> None:
        t = targets.reshape(-1).long()
        w = (t >= 0) & mask.reshape(-1)
        hit = (preds[..., : self.k] == t.unsqueeze(-1)).any(-1) & w
        self._add(correct=hit.sum(), count=w.sum())

    def compute(self) -> float:
        return _ratio(self.states["correct"], self.states["count"])


class ElementAccuracy(Metric):
    """Share of available label elements equal to the decoded prediction (multilabel per class)."""

    def initial_states(self) -> Dict[str, Tensor]:
        return _zeros("correct", "count")

    def update(self, preds: Tensor, targets: Tensor, mask: Tensor) -> None:
        w = ~torch.isnan(targets) & mask.reshape(-1, *([1] * (targets.dim() - 1)))
        hit = (preds.bool() == (targets > 0.5)) & w
        self._add(correct=hit.sum(), count=w.sum())

    def compute(self) -> float:
        return _ratio(self.states["correct"], self.states["count"])


class MeanAbsoluteError(Metric):
    """Mean absolute error between activated outputs and labels (both in [0, 1]), times `scale`."""

    uses = "activated"

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = float(scale)
        super().__init__()

    def initial_states(self) -> Dict[str, Tensor]:
        return _zeros("abs_sum", "count")

    def update(self, preds: Tensor, targets: Tensor, mask: Tensor) -> None:
        t = targets.reshape(-1)
        p = preds.reshape(-1)
        w = ~torch.isnan(t) & mask.reshape(-1)
        err = torch.where(w, (p.double() - torch.nan_to_num(t).double()).abs(), torch.zeros((), dtype=torch.float64, device=t.device))
        self._add(abs_sum=err.sum(), count=w.sum())

    def compute(self) -> float:
        return _ratio(self.states["abs_sum"], self.states["count"]) * self.scale


class TokenAccuracy(Metric):
    """Share of masked tokens (label != -100) whose most probable decoded token is the label."""

    def initial_states(self) -> Dict[str, Tensor]:
        return _zeros("correct", "count")

    def update(self, preds: Tensor, targets: Tensor, mask: Tensor) -> None:
        w = (targets != -100) & mask.reshape(-1, 1)
        hit = (preds[..., 0] == targets) & w
        self._add(correct=hit.sum(), count=w.sum())

    def compute(self) -> float:
        return _ratio(self.states["correct"], self.states["count"])
