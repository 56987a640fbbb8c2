"""`flow.get_evaluator()`: the per-task evaluation table of a whole prediction set."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Union

import pandas as pd
import torch
from torch import Tensor

from ..graph import FlowGraph
from ..keys import ACTIVATED, DECODED, LOGITS, MASK
from ..functional import element_dims
from .decoding import as_tensor, ground_truth_masks, prepare_labels, task_mask
from .masks import compute_masks
from .metrics import FlowMetrics, task_rows

COLUMNS = ["task_path", "metric_name", "metric_res", "num_samples"]
MODES = ("gt", "predicted")


class FlowEvaluator:
    """`evaluator(predictions, targets) -> DataFrame[task_path, metric_name, metric_res, num_samples]`,
    one row per task and metric, in flow order.

    `predictions`: `{path: activated (N, ...)}` (tensors or arrays; the full output mapping of
    `flow.torch()` is accepted too, its `"activated"` entry is used); they are decoded with the
    tasks' current (tuned) decoders. `targets`: `{path: labels}` for every task.

    `preconditions` says which samples a task is scored on: `"gt"` (default) the samples of `S_t`,
    preconditions from the labels (API.md section 4); `"predicted"` the samples whose *decoded*
    precondition holds and whose label is present (end-to-end quality: a door wrongly seen as
    closed hides its person tasks). A mapping `{path: bool (N,)}` gives the masks directly
    (`(N, T)` per element for a task with element dimensions).
    `num_samples` is the number of samples scored (with at least one available label element).

    Tasks with element dimensions (`ITask.element_dims`, labels `(N, T)`: one per token) are
    scored over their elements: every element of `S_t` (labelled, not padding, where its
    precondition holds, per token or per sample) counts as one scored item, so their metrics are
    token-level and their `num_samples` counts *elements* (tokens), not samples.

    `per_class` (default True): classification and multilabel tasks also get one row per class and
    kind, `metric_name` `precision/<class>`, `recall/<class>`, `f1_score/<class>` (the class's name
    from the task's `class_names`, else its index), after the task's overall rows. Their
    `num_samples` is the class's *support*, the number of labels of that class among the scored
    samples (scikit-learn's `support`; for multilabel the positive labels among the available
    elements), not the task's sample count: it tells how much each per-class value rests on.
    Classification lists the classes among the labels or top-1 predictions (the macro scores are
    their means); multilabel lists every class (NaN where a class has no available label). Values
    follow scikit-learn's `precision_recall_fscore_support(..., zero_division=0)` on the scored samples.

    `uncertainty` (a call's keyword): MC-dropout statistics `{path: {"entropy", "variance", ...}}`
    per sample, as `uncertainty.mc_dropout` or `runner.predict(loader, mc_samples=n)["uncertainty"]`
    give them. The table then gains two columns, the same value on every row of a task: `entropy`,
    the mean predictive entropy (nats) of a classifier (binary, classification, multilabel, masked
    language modeling; NaN for other tasks), and `variance`, the mean variance of the activated
    outputs of any other task (regression; NaN for classifiers), each averaged over the samples
    the task is scored on (those counted in `num_samples`) and over each sample's values (classes
    of a multilabel task, tokens, outputs); NaN where no sample is scored. For a task with element
    dimensions the mean runs over its scored elements, from statistics per element `(N, T, ...)`;
    statistics of another shape give NaN there.
    """

    def __init__(self, graph: FlowGraph, preconditions: str = "gt", per_class: bool = True):
        self.graph = graph
        self.preconditions = _check_mode(preconditions)
        self.per_class = bool(per_class)

    def __call__(self, predictions: Mapping[str, Any], targets: Mapping[str, Any],
                 preconditions: Union[None, str, Mapping[str, Any]] = None,
                 uncertainty: Optional[Mapping[str, Mapping[str, Any]]] = None) -> pd.DataFrame:
        mode = self.preconditions if preconditions is None else preconditions
        if isinstance(predictions, Mapping) and isinstance(predictions.get(ACTIVATED), Mapping):
            predictions = predictions[ACTIVATED]
        unknown = sorted(set(predictions) - set(self.graph.paths))
        if unknown:
            raise KeyError(f"predictions for unknown task path(s) {unknown}; flow {self.graph.name!r} has "
                           f"{list(self.graph.paths)}")
        missing = [p for p in self.graph.paths if p not in predictions]
        if missing:
            raise KeyError(f"predictions have no entry for task(s) {missing} of flow {self.graph.name!r}; "
                           f"they have {sorted(predictions)}")
        activated = {p: as_tensor(predictions[p], p, "predictions") for p in self.graph.paths}
        n = activated[self.graph.paths[0]].shape[0]
        for p, a in activated.items():
            if a.shape[0] != n:
                raise ValueError(f"predictions of task {p!r} have {a.shape[0]} samples, "
                                 f"those of {self.graph.paths[0]!r} {n}")
        labels = prepare_labels(self.graph, targets, self.graph.paths, n)
        with torch.no_grad():
            decoded = {leaf.path: leaf.task.decode(activated[leaf.path]) for leaf in self.graph.leaves}
            masks = precondition_masks(self.graph, mode, labels, decoded, n)
            metrics = FlowMetrics(self.graph)
            metrics.update({LOGITS: {}, ACTIVATED: activated, DECODED: decoded, MASK: masks}, labels)
        values = metrics.compute()
        counts = metrics.num_samples()
        rows = [(tm.path, tm.name, values[tm.key], counts[tm.path]) for tm in metrics]
        if self.per_class:
            order = {p: i for i, p in enumerate(self.graph.paths)}
            rows += metrics.per_class()
            rows.sort(key=lambda row: order[row[0]])  # stable: a task's per-class rows after its overall rows
        table = pd.DataFrame(rows, columns=COLUMNS)
        if uncertainty is not None:
            table = _with_uncertainty(self.graph, table, uncertainty, labels, masks, n)
        return table


UNCERTAINTY_COLUMNS = ("entropy", "variance")


def _with_uncertainty(graph: FlowGraph, table: pd.DataFrame, uncertainty: Mapping[str, Mapping[str, Any]],
                      labels: Dict[str, Tensor], masks: Dict[str, Tensor], n: int) -> pd.DataFrame:
    """`table` with the columns `entropy` and `variance` (see `FlowEvaluator`)."""
    from ..uncertainty import per_sample, predictive_kind  # the core module of the statistics

    values = {}
    for leaf in graph.leaves:
        p = leaf.path
        stats = uncertainty.get(p)
        if stats is None:
            raise KeyError(f"uncertainty has no statistics for task {p!r}; it has {sorted(uncertainty)} (give the "
                           "whole result of mc_dropout or of predict(..., mc_samples=n))")
        kind = "entropy" if predictive_kind(leaf.task) is not None else "variance"
        if kind not in stats:
            raise KeyError(f"uncertainty of task {p!r} has no {kind!r} (it has {sorted(stats)})")
        raw = as_tensor(stats[kind], p, f"uncertainty[{kind!r}]")
        if raw.dim() == 0 or raw.shape[0] != n:
            raise ValueError(f"uncertainty of task {p!r} has {raw.shape[0] if raw.dim() else 0} samples, "
                             f"the predictions {n}")
        k = element_dims(leaf.task)
        if k:  # one value per scored element (token): statistics (N, *E, ...) as rows
            lead = labels[p].shape[: 1 + k]
            if raw.shape[: 1 + k] != lead:
                values[p] = {kind: float("nan")}  # not per element: no per-token mean to give
                continue
            m, v, y = task_rows(p, k, masks[p].bool(), raw, labels[p])
        else:
            m, v, y = masks[p].reshape(-1).bool(), raw, labels[p]
        v = per_sample(v)
        scored = m & leaf.task.available(y).reshape(y.shape[0], -1).any(1)
        mean = float(v[scored].double().mean()) if bool(scored.any()) else float("nan")
        values[p] = {kind: mean}
    out = table.copy()
    for column in UNCERTAINTY_COLUMNS:
        out[column] = [values[p].get(column, float("nan")) for p in out["task_path"]]
    return out


def precondition_masks(graph: FlowGraph, mode: Union[str, Mapping[str, Any]], labels: Dict[str, Tensor],
                       decoded: Dict[str, Tensor], n: int) -> Dict[str, Tensor]:
    """`{path: bool (N,)}` (`(N, T)` per element where a task's precondition is per token): where
    each task applies. `mode`: `"gt"` (from the prepared `labels`, three-valued), `"predicted"`
    (from the `decoded` predictions) or a mapping of masks `{path: (N,)}` or `(N, T)` (checked: one
    per task, `n` entries each)."""
    if isinstance(mode, Mapping):
        masks = {}
        for p in graph.paths:
            if p not in mode:
                raise KeyError(f"preconditions (masks) have no entry for task {p!r}; they have {sorted(mode)}")
            masks[p] = task_mask(graph.leaf(p).task, as_tensor(mode[p], p, "masks"), p, n)
        return masks
    if _check_mode(mode) == "gt":
        return ground_truth_masks(graph, labels, n, labels)
    return compute_masks(graph, n, torch.device("cpu"), decoded=decoded)


def _check_mode(mode: Any) -> str:
    if mode not in MODES:
        raise ValueError(f"preconditions must be one of {MODES} (or a mapping of masks), got {mode!r}")
    return mode
