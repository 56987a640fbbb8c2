"""Binary classification: sigmoid, `activated > threshold`, BCE with logits; labels 0/1, NaN missing."""
from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple

import numpy as np

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LabelError
from ..functional import nan_available
from ..metrics import BinaryConfusionMetric
from .base import Task, ThresholdDecoder, builtin_loss_group, check_vector_labels, element_values, label_position
from .describe import describe_decisions


def _bce_elementwise(logits: Tensor, labels: Tensor) -> Tensor:
    """BCE with logits in the labels' shape (`(N, 1)` logits for `(N,)` labels); 0 where missing."""
    return F.binary_cross_entropy_with_logits(logits.reshape(labels.shape), torch.nan_to_num(labels, nan=0.0),
                                              reduction="none")


class BinaryClassificationTask(Task):
    """A yes/no question. The module outputs one logit per sample, `(N, 1)` or `(N,)`; with
    `element_dims=1` one per token, `(N, T, 1)` or `(N, T)`, for labels `(N, T)` (NaN marks a
    missing label and a padding position alike), and `out.<name>` then preconditions per token.

    Decoded `True` where the probability exceeds the (tunable) threshold; usable as a condition
    (`out.<name>`, `~out.<name>`) for later tasks of a flow.
    """

    kind = "BinaryClassificationTask"

    def __init__(self, name: str, module: nn.Module, threshold: float = 0.5, weight: float = 1.0,
                 element_dims: int = 0):
        super().__init__(name=name, module=module, loss=_bce_elementwise, activation=torch.sigmoid,
                         decoder=ThresholdDecoder(threshold, per_class=False),
                         metrics=[(k, BinaryConfusionMetric(k)) for k in BinaryConfusionMetric.KINDS],
                         available_func=nan_available, missing=math.nan, label_dtype=torch.float32, weight=weight,
                         element_dims=element_dims)

    def loss_group(self):
        """`("binary",)`: binary tasks with the built-in BCE share one loss computation."""
        return builtin_loss_group(self, BinaryClassificationTask, _bce_elementwise, nan_available, ("binary",))

    @property
    def can_condition(self) -> bool:
        return True

    def describe(self, decoded: np.ndarray, activated: np.ndarray, logits: Optional[np.ndarray] = None, *,
                 digits: int = 4, max_values: int = 16, top_k: int = 3) -> List[str]:
        """`decoded: [True (0.3068 > 0.0297)], logits: [-0.8153]`: the decision with the probability
        and the decoder's threshold as it is now (`<=` where the probability does not exceed it)."""
        return describe_decisions(decoded, activated, logits, self.decoder.threshold, None, digits, max_values)

    def label_shape(self) -> Optional[Tuple[int, ...]]:
        """One label per sample (per element: the data's shape, None)."""
        return () if not self.element_dims else None

    def prepare_labels(self, values: Any) -> Tensor:
        t = check_vector_labels(super().prepare_labels(values), self.name, self.element_dims)
        bad = ~(torch.isnan(t) | (t == 0) | (t == 1))
        if bad.any():
            pos, where = label_position(bad)
            raise LabelError(f"task {self.name!r}: binary labels must be 0, 1 or NaN (missing); "
                             f"{where} is {float(t[pos])}")
        return t

    def condition_not_false(self, labels: Tensor, negated: bool) -> Tensor:
        v = element_values(labels, self.element_dims)
        # comparisons with NaN are false, so a missing label never makes the condition FALSE
        return ~(v > 0.5) if negated else ~(v <= 0.5)

    def condition(self, values: Tensor, from_labels: bool) -> Tuple[Tensor, Tensor]:
        """`(known, value)`, boolean `(N,)` (`(N, *E)` per element) from labels or decoded outputs."""
        v = element_values(values, self.element_dims)
        if from_labels:
            return ~torch.isnan(v), v > 0.5
        return torch.ones_like(v, dtype=torch.bool), v.bool()


def first_column(values: Tensor) -> Tensor:
    """`(N,)` from `(N,)` or `(N, 1)` (also for an empty batch, where reshape(N, -1) is ambiguous)."""
    return element_values(values, 0)
