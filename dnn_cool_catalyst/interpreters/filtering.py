"""`flow.get_filter()`: each task's predictions and labels, restricted to where the task applies.

For users who score with their own metrics (scikit-learn, torchmetrics): the flow decides which
samples count for each task (its precondition holds and its label is present), the user's metric
gets exactly those.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

from ..functional import element_dims, element_rows, expand_mask
from ..graph import FlowGraph
from ..keys import ACTIVATED, DECODED, LOGITS, MASK
from .decoding import as_tensor, prepare_labels
from .evaluator import precondition_masks

OUTPUTS = (DECODED, ACTIVATED, LOGITS)


class FlowFilter:
    """`filter(outputs, targets) -> {path: (predictions, labels)}`, each restricted to the samples
    where the task applies: its precondition is not FALSE and at least one of its label elements is
    present (the samples the flow's metrics score, `|S_t|` of them).

    `outputs`: what `flow.torch()` returned (`"logits"` at least; `"activated"` and `"decoded"` are
    computed with the tasks' current, e.g. tuned, decoders where absent, as in training mode).
    `targets`: `{path: labels}` for every task (tensors or arrays).

    `output` chooses the predictions: `"decoded"` (default: booleans for binary tasks, the classes
    ranked best first for classification, column 0 being the top-1 class, the selected labels for
    multilabel, values in label units for regressions), `"activated"` (probabilities, for AUC and
    the like) or `"logits"`.

    `preconditions` chooses where a task applies: None (default) the masks in `outputs["mask"]`
    (ground truth when the model was given `x["gt"]`, else its decoded predictions), `"gt"` from
    the labels (API.md section 4), `"predicted"` from the decoded predictions.

    Tasks with several label elements per sample (multilabel classes, masked-language-model tokens)
    keep their rows: a missing element inside a kept row keeps its missing marker (NaN, -100).
    `elements=True` gives instead the present elements of the kept rows, flattened, for those tasks
    whose predictions have the labels' shape (predictions and labels then both `(K,)`).

    Tasks with element dimensions (`element_dims=1`: one label per token, `(N, T)`) are filtered
    per element: each token is a row (`functional.element_rows`), kept where the task applies at
    that token (its precondition there is not FALSE: a per-token condition is read per token, a
    per-sample one for all tokens of the sample) and its label is present (padding positions carry
    the missing marker, or are left out by the masks of a model given `x["elements"]`). The
    selected tokens of all samples come flattened in sample-major order: labels `(K,)`,
    predictions `(K, ...)` with the task's own trailing dimensions (classification `(K, C)`, the
    classes ranked, or probabilities / logits per class; binary `(K, 1)` for `(N, T, 1)` logits,
    `(K,)` for `(N, T)`), `K` the number of selected tokens (what the metrics score for such a task).
    A per-token multilabel task `(N, T, C)` keeps each token with at least one present label,
    as per-sample multilabel rows (`elements=True` flattens their present elements).
    Everything returned is a detached CPU tensor.
    """

    def __init__(self, graph: FlowGraph, output: str = DECODED, preconditions: Optional[str] = None,
                 elements: bool = False):
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if preconditions not in (None, "gt", "predicted"):
            raise ValueError(f"preconditions must be None (the outputs' masks), 'gt' or 'predicted', got {preconditions!r}")
        self.graph = graph
        self.output = output
        self.preconditions = preconditions
        self.elements = bool(elements)

    def __call__(self, outputs: Mapping[str, Any], targets: Mapping[str, Any]) -> Dict[str, Tuple[Tensor, Tensor]]:
        if not isinstance(outputs, Mapping) or not isinstance(outputs.get(LOGITS), Mapping):
            raise TypeError("get_filter() takes the outputs of flow.torch() (a mapping with 'logits', 'mask', ...), got "
                            f"{type(outputs).__name__}" + (f" with keys {sorted(outputs)}" if isinstance(outputs, Mapping) else ""))
        logits = {p: as_tensor(outputs[LOGITS][p], p, "logits") for p in self._paths_in(outputs[LOGITS], LOGITS)}
        n = logits[self.graph.paths[0]].shape[0]
        labels = prepare_labels(self.graph, targets, self.graph.paths, n)
        activated, decoded = self._predictions(outputs, logits)
        masks = self._masks(outputs, labels, decoded, n)
        chosen = {DECODED: decoded, ACTIVATED: activated, LOGITS: logits}[self.output]
        result = {}
        for leaf in self.graph.leaves:
            p = leaf.path
            k = element_dims(leaf.task)
            try:  # a task with element dimensions: each element a row (identity for k == 0)
                mask, pred, y = element_rows(k, masks[p], chosen[p], labels[p])
            except ValueError as e:
                raise ValueError(f"task {p!r} (element_dims={k}): its {self.output} outputs "
                                 f"{tuple(chosen[p].shape)}, labels {tuple(labels[p].shape)} and mask "
                                 f"{tuple(masks[p].shape)} do not fit: {e}") from None
            available = leaf.task.available(y)
            selected = available & expand_mask(mask, available)
            rows = selected.reshape(selected.shape[0], -1).any(dim=1)
            if self.elements and available.dim() > 1 and pred.shape == y.shape:
                result[p] = pred[selected], y[selected]
            else:
                result[p] = pred[rows], y[rows]
        return result

    def _paths_in(self, values: Mapping[str, Any], what: str):
        missing = [p for p in self.graph.paths if p not in values]
        if missing:
            raise KeyError(f"outputs[{what!r}] have no entry for task(s) {missing} of flow {self.graph.name!r}")
        return self.graph.paths

    def _predictions(self, outputs: Mapping[str, Any], logits: Dict[str, Tensor]):
        given_a = outputs.get(ACTIVATED) or {}
        given_d = outputs.get(DECODED) or {}
        activated, decoded = {}, {}
        with torch.no_grad():
            for leaf in self.graph.leaves:
                p, task = leaf.path, leaf.task
                a = as_tensor(given_a[p], p, "activated") if p in given_a else task.activate(logits[p])
                activated[p] = a
                decoded[p] = as_tensor(given_d[p], p, "decoded") if p in given_d else task.decode(a)
        return activated, decoded

    def _masks(self, outputs: Mapping[str, Any], labels: Dict[str, Tensor], decoded: Dict[str, Tensor],
               n: int) -> Dict[str, Tensor]:
        if self.preconditions is not None:
            return precondition_masks(self.graph, self.preconditions, labels, decoded, n)
        given = outputs.get(MASK)
        if not isinstance(given, Mapping):
            raise KeyError("outputs have no 'mask' (precondition masks): pass the outputs of flow.torch(), or "
                           "get_filter(preconditions='gt' | 'predicted')")
        masks = {}
        for leaf in self.graph.leaves:  # per sample (N,), or per element (N, *E) for tasks with element dimensions
            p = leaf.path
            m = as_tensor(given[p], p, "mask").bool() if p in given else None
            if m is None:
                self._paths_in(given, MASK)  # raises, naming every task without a mask
            if m.dim() == 0 or m.shape[0] != n:
                raise ValueError(f"mask of task {p!r} has shape {tuple(m.shape)}, the outputs {n} samples")
            if not element_dims(leaf.task):
                if m.numel() != n:
                    raise ValueError(f"mask of task {p!r} has shape {tuple(m.shape)}: a task without element dimensions "
                                     f"has one mask value per sample ({n},)")
                m = m.reshape(n)
            masks[p] = m
        return masks

