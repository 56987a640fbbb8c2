"""Metrics with one protocol: `reset()`, `update(preds, targets, mask)`, `compute()`.

Every metric keeps its state as a dict of tensors that are *sums and counts*, so that the states of
several batches, DataParallel replicas or DDP ranks merge exactly by addition (`merge`,
`all_reduce`). `mask` is the boolean `(N,)` precondition mask of the task (samples in which the
task applies), or `(N, *E)` per element for a task with element dimensions (`ITask.element_dims`:
labels `(N, T)`, one per token; a `(N,)` mask then covers all of a sample's elements); a metric
also skips elements whose label is missing, so it counts exactly the elements of `S_t`. Such a
task's elements count as samples: a classification task's labels `(N, T)` with decoded
predictions `(N, T, C)` are scored as `N * T` samples (`functional.element_rows`). `uses` tells
whether `update` wants activated (`"activated"`) or decoded (`"decoded"`) predictions.

Conventions (checked against scikit-learn in the tests):

- `compute()` is NaN when no element of `S_t` was seen since the last reset.
- A ratio whose denominator is zero although samples were seen (precision without predicted
  positives, recall without positive labels, F1 without either) is 0, as scikit-learn's
  `zero_division=0`.
- Classification precision, recall and F1 are *macro* averages by default over the classes that
  occur among the labels or the top-1 predictions of `S_t` (scikit-learn's `average="macro"`), from
  a confusion matrix state; `average="micro"` or `"weighted"` selects scikit-learn's others.
- Multilabel F1 is *micro* by default over the available elements: one tp/fp/fn count over all
  (sample, class) elements of `S_t` (scikit-learn's `average="micro"` when no element is missing);
  `average="macro"` / `"weighted"` average the classes' scores instead.
- Per class (`per_class()` of `ConfusionMatrixMetric` and `MultilabelConfusionMetric`, the
  per-class rows of the evaluation table): precision, recall and F1 of each class from the same
  states, as scikit-learn's `precision_recall_fscore_support(..., zero_division=0)` gives them,
  with `support` = the number of labels of the class (scikit-learn's support). Classification
  reports the classes the macro average runs over (those among the labels or top-1 predictions,
  so the macro scores are the means of the per-class ones); multilabel reports every class, NaN
  for a class without any available element.
- Perplexity is `exp(mean NLL)` over the masked tokens of `S_t`, the NLL taken from the activated
  probabilities as `-log(max(p_label, tiny))` (`tiny` the smallest normal number of their dtype, so a
  probability that underflowed to 0 costs about 87 nats in float32 instead of infinity).

States are float64 (exact counts up to 2**53) and live on the device of the first update, so that
accumulating on a GPU never synchronises; `compute()` synchronises once.

Metrics that count the same thing declare it with an equal `state_key` (a binary task's accuracy,
precision, recall and F1 all count one confusion matrix; the two mean absolute errors of a
regression task one sum of errors). A collection of one task's metrics (`FlowMetrics`) then
updates one of them and lets the others read its states (`share_states`), so that the counting is
done once; used on its own, every metric keeps its own states as before.

The common kinds' metrics also count several tasks at once (`Metric.stacked_increments`): given
the predictions, labels and masks of `G` tasks joined along the samples (`torch.cat`, equal
shapes), one kernel gives every task's state increments as `(G, ...)` tensors, the same counts as
`G` calls of `update`. `FlowMetrics` keeps such tasks' states stacked (`StateStack`).
"""
from __future__ import annotations

import abc
import math
from typing import Dict, Hashable, List, Mapping, NamedTuple, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

from . import distributed
from .functional import element_rows, expand_mask

States = Dict[str, Tensor]


class Metric(abc.ABC):
    """Base of all metrics: subclasses define `initial_states`, `update` and `compute`."""

    uses: str = "decoded"  # "decoded" or "activated"

    def __init__(self) -> None:
        self.states: States = self.initial_states()

    @abc.abstractmethod
    def initial_states(self) -> States:
        """Zero states (float64 tensors on the CPU)."""

    @property
    def state_key(self) -> Optional[Hashable]:
        """What `update` counts, or None (the default) for states of its own: metrics with equal
        keys (and equal `uses`) fill equal states from the same predictions and differ only in
        `compute`, so that one of them can count for all (`share_states`)."""
        return None

    def share_states(self, owner: "Metric") -> None:
        """Read `owner`'s states from now on: the same dict, so `owner.update`, `merge`,
        `all_reduce` and `reset` show here too. Only the owner may then be updated, merged or
        reduced (doing it for each sharing metric would count everything once per metric)."""
        if self.state_key is None or owner.state_key != self.state_key or owner.uses != self.uses:
            raise ValueError(f"{type(self).__name__} (state key {self.state_key!r}) cannot share the states of "
                             f"{type(owner).__name__} (state key {owner.state_key!r})")
        self.states = owner.states

    def reset(self) -> None:
        """Forget everything seen so far (in place, so that metrics sharing the states see it)."""
        self.states.clear()
        self.states.update(self.initial_states())

    @abc.abstractmethod
    def update(self, preds: Tensor, targets: Tensor, mask: Tensor) -> None:
        """Add one batch: `preds` (activated or decoded), `targets` (labels), `mask` bool `(N,)`, or
        `(N, *E)` per element of labels with element dimensions (see the module docstring)."""

    @abc.abstractmethod
    def compute(self) -> float:
        """The metric over everything seen since the last reset (NaN when nothing was seen)."""

    def stacked_increments(self, preds: Tensor, targets: Tensor, mask: Tensor, groups: int) -> Optional[States]:
        """What `update` would add to the states of each of `groups` metrics like this one (equal
        `state_key`), for their tasks' batches joined along the first dimension (task-major, equal
        blocks): `{state: (groups, *state shape)}`; None (the default) when the metric has no such
        kernel, or cannot count these inputs together (they are then updated one by one, where an
        error names the problem)."""
        return None

    @property
    def rows_key(self) -> Optional[Hashable]:
        """Metrics with equal keys compute alike from stacked states (`compute_rows`); None (the
        default): this metric computes only from its own states."""
        return None

    def compute_rows(self, states: Mapping[str, Tensor]) -> List[float]:
        """`compute()` of each row of stacked states `{state: (G, ...)}`, as a metric like this
        one would compute it from that row alone (the same float64 operations: the same values);
        for metrics with a `rows_key`."""
        raise NotImplementedError(f"{type(self).__name__} computes from its own states only")

    def merge(self, other: Union["Metric", Mapping[str, Tensor]]) -> None:
        """Add the states of another instance of the same metric (another device, batch or rank),
        given as the instance or as its `states` dict."""
        states = other.states if isinstance(other, Metric) else other
        missing = set(self.states) ^ set(states)
        if missing:
            raise ValueError(f"{type(self).__name__}.merge: states {sorted(states)} do not match {sorted(self.states)}")
        for k, v in states.items():
            mine = self.states[k]
            self.states[k] = mine + v.to(mine.device, mine.dtype)

    def all_reduce(self, device: Optional[torch.device] = None) -> None:
        """Sum states across the processes of an initialised `torch.distributed` group (no-op
        otherwise). States are moved for the reduction to `distributed.collective_device(device)`: the
        CUDA device under the NCCL backend (`device`, by default the current one), else the CPU."""
        if not distributed.initialized():
            return
        device = distributed.collective_device(device)
        for k in sorted(self.states):
            t = self.states[k].to(device).clone()
            dist.all_reduce(t)
            self.states[k] = t

    def _add(self, **values: Tensor) -> None:
        for k, v in values.items():
            s = self.states[k]
            if s.device != v.device and v.device.type != "mps":  # MPS has no float64: keep such states on the CPU
                s = s.to(v.device)
            self.states[k] = s + v.detach().to(s.device, s.dtype)


def _float(t: Tensor) -> float:
    return float(t.detach().cpu())


def _ratio(num: Tensor, den: Tensor, seen: Tensor) -> float:
    """`num / den`; 0 where `den` is 0 but something was `seen`; NaN when nothing was seen."""
    if _float(seen) <= 0:
        return float("nan")
    den_ = _float(den)
    return _float(num) / den_ if den_ > 0 else 0.0


def _ratio_rows(num: Tensor, den: Tensor, scale: float) -> List[float]:
    """`_ratio(num, den, den) * scale` of each row `(G,)`, with the same float64 operations."""
    num, den = num.double(), den.double()
    values = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), math.nan)
    return (values * scale).tolist()


def label_rows(mask: Tensor, targets: Tensor) -> Tuple[Tensor, Tensor]:
    """`(mask, labels)` flat, one row per label: labels with one value per sample `(N,)` or per
    element `(N, *E)` viewed as `(N * |E|,)`, the mask (`(N,)` or `(N, *E)`) broadcast over the
    elements with them (`functional.element_rows`), for the metrics of one value per row."""
    mask, targets = element_rows(max(targets.dim() - 1, 0), mask, targets)
    return mask.reshape(-1), targets.reshape(-1)


def _zeros(*names: str, shape=()) -> States:
    return {n: torch.zeros(shape, dtype=torch.float64) for n in names}


# Binary decisions (binary tasks, multilabel elements) ---------------------------------------------------------


def per_group(values: Tensor, groups: Optional[int], per_class: bool = False) -> Tensor:
    """The sum of `values` (element shape, first dimension the samples): over everything, or per
    index of the last dimension (`per_class`); with `groups`, separately for each of that many
    equal blocks of samples (tasks joined with `torch.cat`), `(groups,)` or `(groups, C)`."""
    if groups is None:
        return values.sum(tuple(range(values.dim() - 1)) if per_class else ())
    if per_class:
        c = values.shape[-1]
        return values.reshape(groups, values.numel() // (groups * c) if c else 0, c).sum(1)
    return values.reshape(groups, values.numel() // groups).sum(1)


def binary_counts(preds: Tensor, targets: Tensor, mask: Tensor, per_class: bool = False,
                  groups: Optional[int] = None) -> Dict[str, Tensor]:
    """`tp, fp, fn, tn` of boolean decisions `preds` against 0/1/NaN `targets` (same element shape,
    `(N,)` labels also accept `(N, 1)` predictions) over the available elements of masked samples;
    `per_class`: one count per index of the last dimension (multilabel classes) instead of one in
    all; `groups`: counted per task of that many joined ones (`per_group`)."""
    if preds.shape != targets.shape:
        preds = preds.reshape(targets.shape)
    w = ~torch.isnan(targets) & expand_mask(mask, targets)
    p = preds.bool()
    pos = (targets > 0.5) & w
    neg = (targets <= 0.5) & w  # NaN compares false: missing elements are in neither
    tp = per_group(p & pos, groups, per_class)
    fp = per_group(p & neg, groups, per_class)
    return {"tp": tp, "fp": fp, "fn": per_group(pos, groups, per_class) - tp,
            "tn": per_group(neg, groups, per_class) - fp}


def binary_scores(tp, fp, fn, tn, kind: str):
    """accuracy / precision / recall / f1_score from confusion counts (numbers or float64
    tensors), with this module's zero-division convention."""
    tp, fp, fn, tn = (_float(v) if isinstance(v, Tensor) else v for v in (tp, fp, fn, tn))
    n = tp + fp + fn + tn
    if kind == "accuracy":
        num, den = tp + tn, n
    elif kind == "precision":
        num, den = tp, tp + fp
    elif kind == "recall":
        num, den = tp, tp + fn
    elif kind == "f1_score":
        num, den = 2 * tp, 2 * tp + fp + fn
    else:
        raise ValueError(f"unknown binary metric {kind!r}")
    if n <= 0:
        return float("nan")
    return num / den if den > 0 else 0.0


class BinaryConfusionMetric(Metric):
    """Accuracy, f1_score, precision or recall of decoded boolean predictions, from confusion counts.

    Works per element, so on a multilabel task it gives element accuracy and *micro* F1 over the
    available (sample, class) elements.
    """

    KINDS = ("accuracy", "f1_score", "precision", "recall")

    def __init__(self, kind: str = "accuracy") -> None:
        if kind not in self.KINDS:
            raise ValueError(f"unknown binary metric {kind!r}; known: {self.KINDS}")
        self.kind = kind
        super().__init__()

    def initial_states(self) -> States:
        return _zeros("tp", "fp", "fn", "tn")

    @property
    def state_key(self) -> Hashable:
        return "binary_confusion"

    def update(self, preds: Tensor, targets: Tensor, mask: Tensor) -> None:
        self._add(**binary_counts(preds, targets, mask))

    def stacked_increments(self, preds: Tensor, targets: Tensor, mask: Tensor, groups: int) -> Optional[States]:
        return binary_counts(preds, targets, mask, groups=groups)

    @property
    def rows_key(self) -> Optional[Hashable]:
        own = type(self).compute is BinaryConfusionMetric.compute  # a subclass computing otherwise: alone
        return ("binary_confusion", self.kind) if own else None

    def compute_rows(self, states: Mapping[str, Tensor]) -> List[float]:
        tp, fp, fn, tn = (states[k].double() for k in ("tp", "fp", "fn", "tn"))
        n = tp + fp + fn + tn  # `binary_scores`, row by row
        num, den = {"accuracy": (tp + tn, n), "precision": (tp, tp + fp), "recall": (tp, tp + fn),
                    "f1_score": (2 * tp, 2 * tp + fp + fn)}[self.kind]
        values = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)
        return torch.where(n > 0, values, math.nan).tolist()

    def compute(self) -> float:
        s = self.states
        return binary_scores(s["tp"], s["fp"], s["fn"], s["tn"], self.kind)


class ElementAccuracy(BinaryConfusionMetric):
    """Share of available label elements equal to the decoded prediction (multilabel per class)."""

    def __init__(self) -> None:
        super().__init__("accuracy")


class ClassResult(NamedTuple):
    """One class of `per_class()`: its index, `{"precision", "recall", "f1_score"}` and its support."""

    index: int
    scores: Dict[str, float]
    support: int


PER_CLASS_KINDS = ("precision", "recall", "f1_score")


def per_class_results(tp: Tensor, fp: Tensor, fn: Tensor, seen: Tensor, classes: Tensor) -> List[ClassResult]:
    """Precision, recall and F1 of each class in `classes` (indices) from count vectors `(C,)`:
    0 on a zero division where the class `seen` anything, NaN where it saw nothing; support `tp + fn`."""
    tp, fp, fn, seen = (v.detach().double().cpu() for v in (tp, fp, fn, seen))
    out = []
    for k in classes.tolist():
        a, b, c = float(tp[k]), float(fp[k]), float(fn[k])
        scores = {kind: binary_scores(a, b, c, float(seen[k]) - a - b - c, kind) for kind in PER_CLASS_KINDS}
        out.append(ClassResult(int(k), scores, int(round(a + c))))
    return out


class MultilabelConfusionMetric(BinaryConfusionMetric):
    """`BinaryConfusionMetric` (element accuracy, micro precision / recall / F1 over the available
    elements) with its counts kept per class: the same values, plus `per_class()`.

    `average` (precision, recall, f1_score): `"micro"` (the default: one count over all available
    elements), `"macro"` (the mean of the classes' scores) or `"weighted"` (weighted by each class's
    positive labels), over the classes with at least one available element. Accuracy is always
    per element.

    States are `(C,)` vectors; without `num_classes` they start as scalar zeros (zero for every
    class) and take the classes of the first update."""

    def __init__(self, kind: str = "f1_score", num_classes: Optional[int] = None, average: str = "micro") -> None:
        self.num_classes = num_classes
        self.average = check_average(average)
        super().__init__(kind)

    def initial_states(self) -> States:
        return _zeros("tp", "fp", "fn", "tn", shape=(self.num_classes,) if self.num_classes else ())

    @property
    def state_key(self) -> Hashable:
        return ("binary_confusion_per_class", self.num_classes)

    def update(self, preds: Tensor, targets: Tensor, mask: Tensor) -> None:
        self._add(**binary_counts(preds, targets, mask, per_class=True))

    def stacked_increments(self, preds: Tensor, targets: Tensor, mask: Tensor, groups: int) -> Optional[States]:
        if targets.dim() < 2:
            return None
        return binary_counts(preds, targets, mask, per_class=True, groups=groups)

    def compute(self) -> float:
        s = self.states
        if self.kind == "accuracy" or self.average == "micro" or s["tp"].dim() == 0:
            return binary_scores(s["tp"].sum(), s["fp"].sum(), s["fn"].sum(), s["tn"].sum(), self.kind)
        seen = s["tp"] + s["fp"] + s["fn"] + s["tn"]
        return averaged_scores(s["tp"], s["fp"], s["fn"], seen > 0, self.kind, self.average)

    def all_reduce(self, device: Optional[torch.device] = None) -> None:
        if not distributed.initialized():
            return
        device = distributed.collective_device(device)
        names = ("tp", "fp", "fn", "tn")
        size = torch.tensor([self.states["tp"].numel() if self.states["tp"].dim() else 0], dtype=torch.int64,
                            device=device)
        dist.all_reduce(size, op=dist.ReduceOp.MAX)  # a rank that saw nothing holds scalar zeros
        c = int(size)
        flat = torch.stack([self.states[k].to(device, torch.float64).expand(c) if c else
                            self.states[k].to(device, torch.float64) for k in names])
        dist.all_reduce(flat)
        for k, v in zip(names, flat):
            self.states[k] = v.clone()

    def per_class(self) -> List[ClassResult]:
        """Every class (index order): precision, recall, F1 over its available elements, support =
        its positive labels (NaN scores where the class had no available element)."""
        s = self.states
        if s["tp"].dim() == 0:  # nothing seen and the classes unknown
            return []
        seen = s["tp"] + s["fp"] + s["fn"] + s["tn"]
        return per_class_results(s["tp"], s["fp"], s["fn"], seen, torch.arange(s["tp"].shape[0]))


# Classification ---------------------------------------------------------------------------------------------------


class TopKAccuracy(Metric):
    """Share of samples whose label is among the first `k` decoded (sorted) classes."""

    def __init__(self, k: int = 1) -> None:
        if k < 1:
            raise ValueError(f"top-k accuracy needs k >= 1, got {k}")
        self.k = k
        super().__init__()

    def initial_states(self) -> States:
        return _zeros("correct", "count")

    @property
    def state_key(self) -> Hashable:
        return ("top_k_accuracy", self.k)

    def update(self, preds: Tensor, targets: Tensor, mask: Tensor) -> None:
        self._add(**self._counts(preds, targets, mask, None))

    def stacked_increments(self, preds: Tensor, targets: Tensor, mask: Tensor, groups: int) -> Optional[States]:
        return self._counts(preds, targets, mask, groups)

    @property
    def rows_key(self) -> Optional[Hashable]:
        return "correct_ratio" if type(self).compute is TopKAccuracy.compute else None

    def compute_rows(self, states: Mapping[str, Tensor]) -> List[float]:
        return _ratio_rows(states["correct"], states["count"], 1.0)

    def _counts(self, preds: Tensor, targets: Tensor, mask: Tensor, groups: Optional[int]) -> States:
        m, t = label_rows(mask, targets)
        t = t.long()
        w = (t >= 0) & m
        if preds.dim() > 2:  # per element (N, *E, C): one row per element, as the labels
            preds = preds.reshape(t.shape[0], preds.shape[-1])
        hit = (preds[..., : self.k] == t.unsqueeze(-1)).any(-1) & w
        return {"correct": per_group(hit, groups), "count": per_group(w, groups)}

    def compute(self) -> float:
        return _ratio(self.states["correct"], self.states["count"], self.states["count"])


def confusion_matrix(top1: Tensor, targets: Tensor, mask: Tensor, num_classes: int) -> Tensor:
    """`(C, C)` counts, rows = label, columns = top-1 prediction, over labelled masked samples
    (labelled masked elements for labels `(N, *E)`)."""
    m, t = label_rows(mask, targets)
    t = t.long()
    w = (t >= 0) & m
    idx = t.clamp_min(0) * num_classes + top1.reshape(-1).long()
    counts = torch.bincount(idx[w], minlength=num_classes * num_classes)
    if counts.numel() != num_classes * num_classes:
        raise ValueError(f"class index out of range for {num_classes} classes "
                         f"(largest label {int(t[w].max())}, largest prediction {int(top1.reshape(-1)[w].max())})")
    return counts.reshape(num_classes, num_classes)


def confusion_matrices(top1: Tensor, targets: Tensor, mask: Tensor, num_classes: int, groups: int) -> Optional[Tensor]:
    """`confusion_matrix` of each of `groups` tasks joined along the samples, `(groups, C, C)`, with
    one `bincount`; None when a label or prediction of a counted sample is outside `[0, C)` (it
    would land in another task's matrix: counted one by one instead, where `confusion_matrix`
    raises)."""
    m, t = label_rows(mask, targets)
    t = t.long()
    p = top1.reshape(-1).long()
    w = (t >= 0) & m
    cc = num_classes * num_classes
    if bool((w & ((torch.maximum(t, p) >= num_classes) | (p < 0))).any()):  # one host sync, as bincount's own
        return None
    task = torch.arange(groups, device=t.device).repeat_interleave(t.shape[0] // groups)
    idx = task * cc + t.clamp_min(0) * num_classes + p
    return torch.bincount(idx[w], minlength=groups * cc).reshape(groups, num_classes, num_classes)


AVERAGES = ("macro", "micro", "weighted")


def check_average(average: str) -> str:
    """`average` if it is one of `AVERAGES`, else a `ValueError` listing them."""
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
    return average


def averaged_name(kind: str, average: str, default: str) -> str:
    """The metric's name in the evaluation table and TensorBoard: `kind` for the task's default
    averaging (the seed's names), `<kind>_<average>` for another (`f1_score_micro`)."""
    return kind if check_average(average) == default else f"{kind}_{average}"


def averaged_scores(tp: Tensor, fp: Tensor, fn: Tensor, classes: Tensor, kind: str, average: str) -> float:
    """Precision / recall / f1_score over the classes where `classes` (bool `(C,)`) holds, from
    per-class counts `(C,)`, as scikit-learn's `average=`: `"macro"` the mean of the per-class
    scores, `"micro"` the score of the counts summed over the classes, `"weighted"` the per-class
    scores weighted by their support (`tp + fn`, the labels of the class; 0 when no class has any).
    A zero division inside a class's score gives 0; NaN when no class is selected."""
    if not bool(classes.any()):
        return float("nan")
    tp, fp, fn = (v.double()[classes] for v in (tp, fp, fn))
    if kind == "precision":
        num, den = tp, tp + fp
    elif kind == "recall":
        num, den = tp, tp + fn
    elif kind == "f1_score":
        num, den = 2 * tp, 2 * tp + fp + fn
    else:
        raise ValueError(f"unknown classification metric {kind!r}")
    if check_average(average) == "micro":
        total = _float(den.sum())
        return _float(num.sum()) / total if total > 0 else 0.0
    per_class = torch.where(den > 0, num / den.clamp_min(1), torch.zeros_like(num))
    if average == "macro":
        return _float(per_class.mean())
    support = tp + fn
    total = _float(support.sum())
    return _float((per_class * support).sum()) / total if total > 0 else 0.0


def matrix_scores(matrix: Tensor, kind: str, average: str = "macro") -> float:
    """Precision / recall / f1_score of a `(C, C)` confusion matrix (rows: labels, columns: top-1
    predictions) over the classes present among labels or predictions, averaged as `average`."""
    m = matrix.double()
    tp, pred, true = m.diagonal(), m.sum(0), m.sum(1)
    return averaged_scores(tp, pred - tp, true - tp, (pred + true) > 0, kind, average)


class ConfusionMatrixMetric(Metric):
    """Precision, recall or f1_score of the top-1 decoded class, from a `(C, C)` confusion matrix
    state, averaged over the classes present among the labels or top-1 predictions as `average`
    says (`"macro"`, the default, `"micro"` or `"weighted"`; scikit-learn's meanings). `num_classes`
    may be left out: it is then taken from the decoded predictions (their last dimension, all
    classes sorted) at the first update."""

    KINDS = ("f1_score", "precision", "recall")

    def __init__(self, kind: str = "f1_score", num_classes: Optional[int] = None, average: str = "macro") -> None:
        if kind not in self.KINDS:
            raise ValueError(f"unknown classification metric {kind!r}; known: {self.KINDS}")
        self.kind = kind
        self.num_classes = num_classes
        self.average = check_average(average)
        super().__init__()

    def initial_states(self) -> States:
        c = self.num_classes or 0
        return {"matrix": torch.zeros((c, c), dtype=torch.float64)}

    @property
    def state_key(self) -> Hashable:
        return ("confusion_matrix", self.num_classes)

    def update(self, preds: Tensor, targets: Tensor, mask: Tensor) -> None:
        c = self.states["matrix"].shape[0]
        if c == 0:
            if preds.dim() < 2:
                raise ValueError("ConfusionMatrixMetric without num_classes needs decoded predictions (N, C) "
                                 f"(classes sorted by probability), got shape {tuple(preds.shape)}")
            c = preds.shape[-1]
            self.states["matrix"] = torch.zeros((c, c), dtype=torch.float64)
        top1 = preds[..., 0] if preds.dim() >= 2 else preds
        self._add(matrix=confusion_matrix(top1, targets, mask, c))

    def stacked_increments(self, preds: Tensor, targets: Tensor, mask: Tensor, groups: int) -> Optional[States]:
        c = self.states["matrix"].shape[0] or (preds.shape[-1] if preds.dim() >= 2 else 0)
        if c == 0:
            return None
        top1 = preds[..., 0] if preds.dim() >= 2 else preds
        matrices = confusion_matrices(top1, targets, mask, c, groups)
        return None if matrices is None else {"matrix": matrices}

    def merge(self, other: Union[Metric, Mapping[str, Tensor]]) -> None:
        states = other.states if isinstance(other, Metric) else other
        a, b = self.states["matrix"], states["matrix"].to(self.states["matrix"].device, torch.float64)
        c = max(a.shape[0], b.shape[0])
        self.states["matrix"] = _pad(a, c) + _pad(b, c)

    def all_reduce(self, device: Optional[torch.device] = None) -> None:
        if not distributed.initialized():
            return
        device = distributed.collective_device(device)
        size = torch.tensor([self.states["matrix"].shape[0]], dtype=torch.int64, device=device)
        dist.all_reduce(size, op=dist.ReduceOp.MAX)  # a rank that saw nothing has a 0 x 0 matrix
        m = _pad(self.states["matrix"].to(device), int(size))
        dist.all_reduce(m)
        self.states["matrix"] = m

    def compute(self) -> float:
        return matrix_scores(self.states["matrix"], self.kind, self.average)

    def per_class(self) -> List[ClassResult]:
        """The classes among the labels or top-1 predictions (those of the macro average), in index
        order: precision, recall, F1 of each, support = its labels (the matrix's row sum)."""
        m = self.states["matrix"].detach().double().cpu()
        tp, pred, true = m.diagonal(), m.sum(0), m.sum(1)
        seen = torch.full_like(tp, float(m.sum()))
        return per_class_results(tp, pred - tp, true - tp, seen, torch.nonzero((pred + true) > 0).reshape(-1))


def _pad(m: Tensor, c: int) -> Tensor:
    if m.shape[0] == c:
        return m.clone()
    out = torch.zeros((c, c), dtype=m.dtype, device=m.device)
    out[: m.shape[0], : m.shape[1]] = m
    return out


# Regression ---------------------------------------------------------------------------------------------------------


class MeanAbsoluteError(Metric):
    """Mean absolute error between activated outputs and labels (both in [0, 1]), times `scale`."""

    uses = "activated"

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = float(scale)
        super().__init__()

    def initial_states(self) -> States:
        return _zeros("abs_sum", "count")

    @property
    def state_key(self) -> Hashable:
        return "absolute_error"  # `scale` only enters `compute`

    def update(self, preds: Tensor, targets: Tensor, mask: Tensor) -> None:
        self._add(**self._sums(preds, targets, mask, None))

    def stacked_increments(self, preds: Tensor, targets: Tensor, mask: Tensor, groups: int) -> Optional[States]:
        return self._sums(preds, targets, mask, groups)

    @property
    def rows_key(self) -> Optional[Hashable]:
        return ("absolute_error", self.scale) if type(self).compute is MeanAbsoluteError.compute else None

    def compute_rows(self, states: Mapping[str, Tensor]) -> List[float]:
        return _ratio_rows(states["abs_sum"], states["count"], self.scale)

    @staticmethod
    def _sums(preds: Tensor, targets: Tensor, mask: Tensor, groups: Optional[int]) -> States:
        m, t = label_rows(mask, targets)
        p = preds.reshape(-1)
        w = ~torch.isnan(t) & m
        err = torch.where(w, (p.double() - torch.nan_to_num(t).double()).abs(), torch.zeros((), dtype=torch.float64, device=t.device))
        return {"abs_sum": per_group(err, groups), "count": per_group(w, groups)}

    def compute(self) -> float:
        return _ratio(self.states["abs_sum"], self.states["count"], self.states["count"]) * self.scale


# Masked language modeling -------------------------------------------------------------------------------------------


class TokenAccuracy(Metric):
    """Share of masked tokens (label != -100) whose most probable decoded token is the label."""

    def initial_states(self) -> States:
        return _zeros("correct", "count")

    def update(self, preds: Tensor, targets: Tensor, mask: Tensor) -> None:
        w = (targets != -100) & expand_mask(mask, targets)
        top1 = preds[..., 0] if preds.dim() > targets.dim() else preds
        hit = (top1 == targets) & w
        self._add(correct=hit.sum(), count=w.sum())

    def compute(self) -> float:
        return _ratio(self.states["correct"], self.states["count"], self.states["count"])


class Perplexity(Metric):
    """`exp(mean NLL)` over masked tokens, from activated probabilities `(N, T, V)` (see the module
    docstring for the clamp of zero probabilities)."""

    uses = "activated"

    def initial_states(self) -> States:
        return _zeros("nll_sum", "count")

    def update(self, preds: Tensor, targets: Tensor, mask: Tensor) -> None:
        w = (targets != -100) & expand_mask(mask, targets)
        # clamped into the vocabulary: a token id beyond it is the flow loss's error to report,
        # never a device-side assert here
        p = preds.gather(-1, targets.clamp(0, preds.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
        tiny = torch.finfo(p.dtype).tiny
        nll = -torch.log(p.clamp_min(tiny).double())  # the log in float64: half precision would round it
        self._add(nll_sum=torch.where(w, nll, torch.zeros((), dtype=torch.float64, device=nll.device)).sum(),
                  count=w.sum())

    def compute(self) -> float:
        count = _float(self.states["count"])
        if count <= 0:
            return float("nan")
        return float(torch.exp(self.states["nll_sum"].detach().cpu() / count))
