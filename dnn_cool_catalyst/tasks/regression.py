"""Bounded regression: sigmoid, `activated * scale`, MSE on the sigmoid; labels in [0, 1], NaN missing."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LabelError
from ..functional import nan_available
from ..metrics import MeanAbsoluteError
from .base import ScaleDecoder, Task, check_vector_labels


def _mse_on_sigmoid(logits: Tensor, labels: Tensor) -> Tensor:
    """Squared error of sigmoid(logits) in the labels' shape; finite where labels are missing."""
    return (torch.sigmoid(logits.reshape(labels.shape)) - torch.nan_to_num(labels, nan=0.0)) ** 2


class BoundedRegressionTask(Task):
    """A value in `[0, scale]`. The module outputs one logit per sample; labels are already divided
    by `scale` (in [0, 1]), NaN for missing. Decoded: `sigmoid(logits) * scale`."""

    kind = "BoundedRegressionTask"

    def __init__(self, name: str, module: nn.Module, scale: float = 1.0, weight: float = 1.0):
        if not scale > 0:
            raise ValueError(f"task {name!r}: scale must be positive, got {scale}")
        self.scale = float(scale)
        super().__init__(name=name, module=module, loss=_mse_on_sigmoid, activation=torch.sigmoid,
                         decoder=ScaleDecoder(scale),
                         metrics=[("mean_absolute_error", MeanAbsoluteError(1.0)),
                                  ("mean_absolute_error_decoded", MeanAbsoluteError(scale))],
                         available_func=nan_available, missing=math.nan, label_dtype=torch.float32, weight=weight)

    def prepare_labels(self, values: Any) -> Tensor:
        t = check_vector_labels(super().prepare_labels(values), self.name)
        bad = (t < 0) | (t > 1)
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise LabelError(f"task {self.name!r}: bounded regression labels must lie in [0, 1] "
                             f"(divide by scale={self.scale}); sample {i} is {float(t[i])}")
        return t
