"""Bounded regression: sigmoid, `activated * scale`, MSE (or L1, smooth L1) on the sigmoid; labels in [0, 1], NaN missing."""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import LabelError
from ..functional import nan_available
from ..metrics import MeanAbsoluteError
from .base import ScaleDecoder, Task, builtin_loss_group, check_vector_labels, label_position


def _mse_on_sigmoid(logits: Tensor, labels: Tensor) -> Tensor:
    """Squared error of sigmoid(logits) in the labels' shape; finite where labels are missing."""
    return (torch.sigmoid(logits.reshape(labels.shape)) - torch.nan_to_num(labels, nan=0.0)) ** 2


def _l1_on_sigmoid(logits: Tensor, labels: Tensor) -> Tensor:
    """Absolute error of sigmoid(logits) in the labels' shape; finite where labels are missing."""
    return (torch.sigmoid(logits.reshape(labels.shape)) - torch.nan_to_num(labels, nan=0.0)).abs()


SMOOTH_L1_BETA = 0.1  # a tenth of the label range; torch's beta=1 would be half the MSE on all of [0, 1]


def _smooth_l1_on_sigmoid(logits: Tensor, labels: Tensor) -> Tensor:
    """Smooth L1 (Huber, `beta=SMOOTH_L1_BETA`) of sigmoid(logits); finite where labels are missing."""
    return F.smooth_l1_loss(torch.sigmoid(logits.reshape(labels.shape)), torch.nan_to_num(labels, nan=0.0),
                            reduction="none", beta=SMOOTH_L1_BETA)


LOSSES = {"mse": _mse_on_sigmoid, "l1": _l1_on_sigmoid, "smooth_l1": _smooth_l1_on_sigmoid}


class BoundedRegressionTask(Task):
    """A value in `[0, scale]`. The module outputs one logit per sample; labels are already divided
    by `scale` (in [0, 1]), NaN for missing. Decoded: `sigmoid(logits) * scale`. With
    `element_dims=1` one value per token: logits `(N, T, 1)` or `(N, T)`, labels `(N, T)`.

    `loss` compares the activated value `sigmoid(logits)` with the label:
    - `"mse"` (default): squared error. Its gradient shrinks with the error and with the sigmoid's
      slope, so near the target such a task pulls little on a shared backbone;
    - `"l1"`: absolute error, a gradient of constant size (times the sigmoid's slope); favours
      the median, robust to outlying labels;
    - `"smooth_l1"`: Huber with `beta=0.1` (`SMOOTH_L1_BETA`): squared below an error of 0.1
      (smooth at the target), absolute above it.
    """

    kind = "BoundedRegressionTask"

    def __init__(self, name: str, module: nn.Module, scale: float = 1.0, weight: float = 1.0, loss: str = "mse",
                 element_dims: int = 0):
        if not scale > 0:
            raise ValueError(f"task {name!r}: scale must be positive, got {scale}")
        if loss not in LOSSES:
            raise ValueError(f"task {name!r}: loss must be one of {sorted(LOSSES)}, got {loss!r}")
        self.scale = float(scale)
        self.loss_name = loss
        super().__init__(name=name, module=module, loss=LOSSES[loss], activation=torch.sigmoid,
                         decoder=ScaleDecoder(scale),
                         metrics=[("mean_absolute_error", MeanAbsoluteError(1.0)),
                                  ("mean_absolute_error_decoded", MeanAbsoluteError(scale))],
                         available_func=nan_available, missing=math.nan, label_dtype=torch.float32, weight=weight,
                         element_dims=element_dims)

    def loss_group(self):
        """`("bounded_regression", loss)`: bounded regressions with the same built-in loss share one
        loss computation (`scale` only enters the decoder and a metric)."""
        return builtin_loss_group(self, BoundedRegressionTask, LOSSES.get(self.loss_name), nan_available,
                                  ("bounded_regression", self.loss_name))

    def label_shape(self) -> Optional[Tuple[int, ...]]:
        """One label per sample (per element: the data's shape, None)."""
        return () if not self.element_dims else None

    def prepare_labels(self, values: Any) -> Tensor:
        t = check_vector_labels(super().prepare_labels(values), self.name, self.element_dims)
        bad = (t < 0) | (t > 1)
        if bad.any():
            i, where = label_position(bad)
            raise LabelError(f"task {self.name!r}: bounded regression labels must lie in [0, 1] "
                             f"(divide by scale={self.scale}); {where} is {float(t[i])}")
        return t
