"""Multilabel classification: sigmoid per class, per-class thresholds, BCE; labels 0/1 (N, C), NaN per element."""
from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LabelError
from ..functional import nan_available
from ..metrics import MultilabelConfusionMetric, averaged_name
from .base import Task, ThresholdDecoder, builtin_loss_group, label_position, raw_labels
from .describe import describe_decisions


def _bce_elementwise(logits: Tensor, labels: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(labels, nan=0.0), reduction="none")


class MultilabelClassificationTask(Task):
    """Any subset of C classes. The module outputs `(N, C)` logits; labels are `(N, C)` floats
    0/1 with NaN for a missing element. Decoded: `activated > thresholds` (one per class once tuned).
    Metrics: accuracy per available element and F1 over the available elements (counted per class,
    for the per-class precision / recall / F1 of the evaluation table), `average="micro"` by default
    (named `f1_score`); `"macro"` or `"weighted"` average the classes' F1 instead (named
    `f1_score_macro`, `f1_score_weighted`). With `element_dims=1` a label vector per token:
    logits and labels `(N, T, C)`."""

    kind = "MultilabelClassificationTask"

    def __init__(self, name: str, module: nn.Module, class_names: Optional[Sequence[str]] = None,
                 weight: float = 1.0, average: str = "micro", element_dims: int = 0):
        self.class_names = list(class_names) if class_names is not None else None
        n = len(self.class_names) if self.class_names is not None else None
        super().__init__(name=name, module=module, loss=_bce_elementwise, activation=torch.sigmoid,
                         decoder=ThresholdDecoder(0.5, classes=n),
                         # counts per class: the micro values, and the per-class rows of the evaluation table
                         metrics=[("accuracy", MultilabelConfusionMetric("accuracy", n or None)),
                                  (averaged_name("f1_score", average, "micro"),
                                   MultilabelConfusionMetric("f1_score", n or None, average))],
                         available_func=nan_available, missing=math.nan, label_dtype=torch.float32, weight=weight,
                         element_dims=element_dims)

    def loss_group(self):
        """`("multilabel",)`: multilabel tasks with the built-in BCE share one loss computation (the
        flow loss joins only those with equal numbers of labels)."""
        return builtin_loss_group(self, MultilabelClassificationTask, _bce_elementwise, nan_available, ("multilabel",))

    def describe(self, decoded: np.ndarray, activated: np.ndarray, logits: Optional[np.ndarray] = None, *,
                 digits: int = 4, max_values: int = 16, top_k: int = 3) -> List[str]:
        """`decoded: [glasses: True (0.81 > 0.42), beard: False (0.03 <= 0.5)], logits: [...]`: every
        class (by name when the task has `class_names`) with its decision, probability and the
        decoder's threshold as it is now."""
        return describe_decisions(decoded, activated, logits, self.decoder.threshold, self.class_names, digits,
                                  max_values)

    def label_shape(self) -> Optional[Tuple[int, ...]]:
        """`(C,)` with `class_names`; without them the number of classes is the data's (None)."""
        return (len(self.class_names),) if self.class_names is not None and not self.element_dims else None

    def prepare_labels(self, values: Any) -> Tensor:
        t = raw_labels(values, self.name).to(torch.float32)
        n = len(self.class_names) if self.class_names is not None else None
        k = self.element_dims
        if t.dim() != 2 + k or (n is not None and t.shape[-1] != n):
            want = "(N, " + "T, " * k + (f"{n})" if n is not None else "C)")
            raise LabelError(f"task {self.name!r}: multilabel labels must have shape {want}, got {tuple(t.shape)}")
        bad = ~(torch.isnan(t) | (t == 0) | (t == 1))
        if bad.any():
            pos, where = label_position(bad)
            raise LabelError(f"task {self.name!r}: multilabel labels must be 0, 1 or NaN; {where} is {float(t[pos])}")
        return t
