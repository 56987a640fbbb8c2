"""`flow.get_activation()` and `flow.get_decoder()`: per-task functions applied by path."""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ..errors import LabelError, TunedParamsError, did_you_mean
from ..functional import element_dims, expand_mask
from ..graph import FlowGraph
from ..tuning import FIX_TUNED, ConfusionMetric
from .masks import compute_masks
from .metrics import task_rows

#: What a decoder is tuned for: a name of `tuning.METRICS` or a function of the confusion counts
#: (not `metrics.Metric`, the per-task metric protocol).
TuningMetric = Union[str, ConfusionMetric]


class FlowActivation:
    """`{path: logits} -> {path: activated}` (paths absent from the input are skipped)."""

    def __init__(self, graph: FlowGraph):
        self.graph = graph

    def __call__(self, logits: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        return {leaf.path: leaf.task.activate(logits[leaf.path]) for leaf in self.graph.leaves if leaf.path in logits}


class FlowDecoder:
    """`{path: activated} -> {path: decoded}` with the tasks' current (tuned) parameters.

    The decoders belong to the tasks, so parameters loaded here are also what `flow.torch()` uses
    to decode and to evaluate preconditions at inference. Tasks belong to their `Tasks` registry:
    every flow built from one `Tasks` (and every runner, module, evaluator and callback of those
    flows) shares one set of tuned parameters, by design: thresholds tuned by one runner are the
    ones the others decode with. For independent parameters, build the tasks twice (call the
    function that builds the `Tasks` again).

    Tuning is pure: `fit(...)` returns `(params, report)` and changes nothing; `load_tuned(params)`
    applies. `tune(...)` does both and returns `merge_report(params, report)`.
    """

    def __init__(self, graph: FlowGraph):
        self.graph = graph

    def __call__(self, activated: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        return {leaf.path: leaf.task.decode(activated[leaf.path]) for leaf in self.graph.leaves if leaf.path in activated}

    def params(self) -> Dict[str, Dict[str, Any]]:
        """Current parameters of every task decoder that has some, `{path: params}` (JSON values)."""
        return {leaf.path: leaf.task.decoder.params() for leaf in self.graph.leaves if leaf.task.decoder.params()}

    def load_tuned(self, params: Mapping[str, Mapping[str, Any]], source: Optional[str] = None) -> None:
        """Apply `{path: params}` (as `tune`, `params` or `dcc.load_tuned(file)` give them), all or
        nothing: an unknown path, or parameters a task's decoder refuses (a threshold that is not a
        finite number, a list for a binary task, the wrong number of per-class thresholds), raise
        `TunedParamsError` naming the task path and `source` (the file they came from, when given),
        and leave every decoder as it was."""
        where = f" in {os.fspath(source)!r}" if source is not None else ""
        if not isinstance(params, Mapping):
            raise TunedParamsError(f"tuned parameters{where} must map task paths to parameters, got {type(params).__name__}")
        for p in params:
            if p not in self.graph.paths:
                raise TunedParamsError(f"tuned parameters for unknown task path {p!r}{where}: flow {self.graph.name!r} "
                                       f"has no such task{did_you_mean(str(p), self.graph.paths)}")
            if not isinstance(params[p], Mapping):
                raise TunedParamsError(f"tuned parameters of task {p!r}{where} must be a mapping such as "
                                       f"{{'threshold': 0.5}}, got {type(params[p]).__name__}")
        leaves = [leaf for leaf in self.graph.leaves if leaf.path in params]
        before = {leaf.path: leaf.task.decoder.params() for leaf in leaves}
        for leaf in leaves:
            try:
                leaf.task.decoder.load_tuned(dict(params[leaf.path]))
            except (TypeError, ValueError) as e:
                for done in leaves:  # all or nothing: the entries applied so far are undone
                    done.task.decoder.load_tuned(before[done.path])
                raise TunedParamsError(f"tuned parameters of task {leaf.path!r}{where}: {e}; {FIX_TUNED}") from None

    def fit(self, predictions: Optional[Mapping[str, Any]] = None, targets: Optional[Mapping[str, Any]] = None,
            masks: Optional[Mapping[str, Any]] = None,
            metric: Union[TuningMetric, Mapping[str, TuningMetric]] = "accuracy") -> Tuple[Dict[str, Dict[str, Any]], Dict[str, Dict[str, Any]]]:
        """`(params, report)`, each `{path: ...}` of plain JSON values: the best parameters of every
        task decoder that has some (thresholds), on the samples of `S_t` only, and what happened.
        Pure: no decoder changes; apply `params` with `load_tuned`.

        `predictions`: `{path: activated (N, ...)}` (tensors or arrays); tasks absent from it are
        left out. `targets`: `{path: labels}` in the tasks' label format. `masks`: `{path: bool
        (N,)}` (`(N, T)` per element for a task with element dimensions), or None to take them from
        the targets with ground-truth precondition semantics (then `targets` must also hold the
        labels of the precondition tasks). A task with element dimensions (`ITask.element_dims`,
        labels `(N, T)`) is tuned over its elements: each token of `S_t` is one sample (a per-token
        binary task's threshold is the best over its tokens; `num_samples` counts them). `metric`: a name of
        `dnn_cool_catalyst.tuning.METRICS` ("accuracy", "f1", "balanced_accuracy", "youden"), a
        callable `f(tp, fp, fn, tn) -> scores` on arrays of confusion counts, or `{path: metric}`
        (paths not named use "accuracy").

        Per task, the decoder's `fit` (`ThresholdDecoder.fit`): params e.g. `{"threshold": 0.43}`,
        report `{"tuned": true, "metric": "accuracy", "score": 0.91, "num_samples": 812}`, or the
        current params and `{"tuned": false, "reason": "no samples in S_t"}` for a task without
        samples.
        """
        if predictions is None or targets is None:
            raise TypeError(_TUNE_NEEDS)
        paths = set(self.graph.paths)
        unknown = sorted(set(predictions) - paths)
        if unknown:
            raise KeyError(f"predictions for unknown task path(s) {unknown}; flow {self.graph.name!r} has {list(self.graph.paths)}")
        if isinstance(metric, Mapping):
            bad = sorted(set(metric) - paths)
            if bad:
                raise KeyError(f"tuning metric given for unknown task path(s) {bad}; flow {self.graph.name!r} has "
                               f"{list(self.graph.paths)}")
            metrics = {p: metric.get(p, "accuracy") for p in paths}
        else:
            metrics = {p: metric for p in paths}
        leaves = [leaf for leaf in self.graph.leaves if leaf.path in predictions and leaf.task.decoder.params()]
        if not leaves:
            return {}, {}
        activated = {leaf.path: as_tensor(predictions[leaf.path], leaf.path, "predictions") for leaf in leaves}
        n = activated[leaves[0].path].shape[0]
        labels = prepare_labels(self.graph, targets, [leaf.path for leaf in leaves], n)
        if masks is None:
            masks = ground_truth_masks(self.graph, targets, n, labels)
        params: Dict[str, Dict[str, Any]] = {}
        report: Dict[str, Dict[str, Any]] = {}
        for leaf in leaves:
            p = leaf.path
            a, y = activated[p], labels[p]
            if a.shape[0] != n:
                raise LabelError(f"predictions of task {p!r} have {a.shape[0]} samples, those of {leaves[0].path!r} {n}")
            if p not in masks:
                raise KeyError(f"masks have no entry for task {p!r}; they have {sorted(masks)}")
            m = task_mask(leaf.task, as_tensor(masks[p], p, "masks"), p, n)
            k = element_dims(leaf.task)
            if k:  # per element (tokens): tuned over the elements of S_t, each one row
                m, a, y = task_rows(p, k, m, a, y)
            avail = leaf.task.available(y)
            in_s = avail & expand_mask(m, avail)
            try:
                params[p], report[p] = leaf.task.decoder.fit(a, y, in_s, metric=metrics[p])
            except ValueError as e:
                raise ValueError(f"tuning task {p!r}: {e}") from e
        return params, report

    def tune(self, predictions: Optional[Mapping[str, Any]] = None, targets: Optional[Mapping[str, Any]] = None,
             masks: Optional[Mapping[str, Any]] = None,
             metric: Union[TuningMetric, Mapping[str, TuningMetric]] = "accuracy") -> Dict[str, Dict[str, Any]]:
        """`fit(...)`, then `load_tuned(params)` (all or nothing); returns `{path: {**params,
        **report}}` (`merge_report`), e.g. `{"threshold": 0.43, "tuned": true, "metric": "accuracy",
        "score": 0.91, "num_samples": 812}`. `load_tuned` accepts these dicts as they are."""
        params, report = self.fit(predictions, targets, masks=masks, metric=metric)
        self.load_tuned(params)
        return merge_report(params, report)


def merge_report(params: Mapping[str, Mapping[str, Any]],
                 report: Mapping[str, Mapping[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """`{path: {**params[path], **report[path]}}`: what `FlowDecoder.tune` returns and
    `tuned_params.json` holds (`load_tuned` skips the report's keys)."""
    return {p: {**values, **report.get(p, {})} for p, values in params.items()}


# The seed's `flow.get_decoder().tune()` took no arguments; a decoder here records nothing, so it
# has nothing to tune on unless it is given predictions and targets.
_TUNE_NEEDS = (
    "decoder.tune needs predictions and targets: decoder.tune(activated, targets), with activated = {task path: "
    "activated outputs} and targets = {task path: labels} (e.g. r = runner.infer(loader); "
    "decoder.tune(r['activated'], r['targets'])), or, with a FlowRunner, runner.tune(loader), which predicts on "
    "the loader and tunes. (FlowRunner.train already tunes at the end of each validation epoch and writes "
    "tuned_params.json; the seed's no-argument tune() has no equivalent: a decoder records no predictions.)")


def as_tensor(value: Any, path: str, what: str) -> Tensor:
    """A CPU tensor from a tensor or array (no copy where possible), with errors naming the task."""
    if isinstance(value, Tensor):
        return value.detach().cpu()
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{what} of task {path!r} must be a tensor or a numeric array ({e})") from None


def task_mask(task: Any, mask: Tensor, path: str, n: int) -> Tensor:
    """A task's precondition mask as given by a user, checked: bool `(N,)` (`(N, 1)` is flattened),
    or `(N, *E)` per element for a task with element dimensions (`ITask.element_dims`)."""
    mask = mask.bool()
    k = element_dims(task)
    per_element = k and 2 <= mask.dim() <= 1 + k and mask.shape[1:].numel() != 1  # (N, 1): per sample
    if not per_element:
        mask = mask.reshape(-1)
    if mask.shape[0] != n:
        raise ValueError(f"mask of task {path!r} has {mask.shape[0]} entries for {n} samples"
                         + (f" (a mask per element has shape (N, T), here ({n}, T))" if k else ""))
    return mask


def prepare_labels(graph: FlowGraph, targets: Mapping[str, Any], paths: Sequence[str], n: int) -> Dict[str, Tensor]:
    """`{path: labels}` in canonical form (`task.prepare_labels`), checked to hold `n` samples."""
    out = {}
    for p in paths:
        if p not in targets:
            raise LabelError(f"targets have no labels for task {p!r} of flow {graph.name!r}; they have {sorted(targets)}")
        y = graph.leaf(p).task.prepare_labels(targets[p])
        if y.shape[0] != n:
            raise LabelError(f"task {p!r}: {y.shape[0]} labels for {n} predictions")
        out[p] = y
    return out


def ground_truth_masks(graph: FlowGraph, targets: Mapping[str, Any], n: int,
                       prepared: Optional[Mapping[str, Tensor]] = None) -> Dict[str, Tensor]:
    """Precondition masks from the targets (three-valued ground-truth semantics, API.md section 4)."""
    prepared = dict(prepared or {})
    missing = [p for p in graph.condition_paths if p not in prepared and p not in targets]
    if missing:
        raise LabelError(f"targets have no labels for precondition task(s) {missing} of flow {graph.name!r}, needed "
                         "for ground-truth masks (pass masks= or preconditions='predicted' instead)")
    gt = {p: prepared[p] if p in prepared else prepare_labels(graph, targets, [p], n)[p] for p in graph.condition_paths}
    return compute_masks(graph, n, torch.device("cpu"), gt=gt)
