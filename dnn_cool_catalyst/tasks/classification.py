"""Multi-class classification: softmax, classes sorted by probability, cross entropy; labels int, -1 missing."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LabelError
from ..functional import softmax_last
from ..metrics import ConfusionMatrixMetric, TopKAccuracy, averaged_name
from .base import RankedTask, SortDecoder, builtin_loss_group, check_index_floats, check_vector_labels, label_position, raw_labels


def _ce_elementwise(logits: Tensor, labels: Tensor) -> Tensor:
    # clamped into [0, C): missing labels (-1) get a finite loss, and an index beyond the logits
    # never reaches cross_entropy (a device-side assert on CUDA; the flow loss reports it)
    # (classes last, so per-element logits `(N, T, C)` read as rows; `(N, C)` is unchanged)
    c = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, c), labels.reshape(-1).clamp(0, c - 1),
                           reduction="none").reshape(labels.shape)


def _index_available(labels: Tensor) -> Tensor:
    return labels >= 0


class ClassificationTask(RankedTask):
    """One of C classes. The module outputs `(N, C)` logits; labels are class indices `(N,)`,
    `-1` (or NaN in a float array) for missing. Decoded: class indices by declining probability;
    metrics report top-1/3/5 accuracy (those `k <= top_k` and, when `class_names` tell the number of
    classes, `k < C`) and f1_score, precision and recall of the top-1 class, averaged over the
    classes as `average` says: `"macro"` (the default, named `f1_score`, ...), `"micro"` or
    `"weighted"` (named `f1_score_micro`, ...; scikit-learn's meanings).

    `element_dims=1`: one class per token, logits `(N, T, C)` and labels `(N, T)` (-1 marks a
    missing label and a padding position alike); metrics and the loss run over the tokens."""

    kind = "ClassificationTask"

    def __init__(self, name: str, module: nn.Module, class_names: Optional[Sequence[str]] = None,
                 top_k: int = 5, weight: float = 1.0, average: str = "macro", element_dims: int = 0):
        self.class_names = list(class_names) if class_names is not None else None
        self.top_k = int(top_k)
        n = len(self.class_names) if self.class_names is not None else None
        ks = [k for k in (1, 3, 5) if k <= self.top_k and (n is None or k == 1 or k < n)]
        super().__init__(name=name, module=module, loss=_ce_elementwise, activation=softmax_last, decoder=SortDecoder(),
                         metrics=[(f"accuracy_{k}", TopKAccuracy(k)) for k in ks]
                         + [(averaged_name(kind, average, "macro"), ConfusionMatrixMetric(kind, n, average))
                            for kind in ConfusionMatrixMetric.KINDS],
                         available_func=_index_available, missing=-1, label_dtype=torch.int64, weight=weight,
                         element_dims=element_dims)

    def loss_group(self):
        """`("classification",)`: classification tasks with the built-in cross entropy share one loss
        computation (the flow loss joins only those whose logits have equal widths)."""
        return builtin_loss_group(self, ClassificationTask, _ce_elementwise, _index_available, ("classification",))

    def label_shape(self) -> Optional[Tuple[int, ...]]:
        """One label per sample (per element: the data's shape, None)."""
        return () if not self.element_dims else None

    def prepare_labels(self, values: Any) -> Tensor:
        t = check_vector_labels(raw_labels(values, self.name), self.name, self.element_dims)
        if t.is_floating_point():
            nan = torch.isnan(t)
            check_index_floats(t, nan, self.name, "class", missing_hint="NaN or -1")
            t = torch.where(nan, torch.full_like(t, -1), t)
        t = t.to(torch.int64)
        n = len(self.class_names) if self.class_names is not None else None
        bad = (t < -1) | ((t >= n) if n is not None else torch.zeros_like(t, dtype=torch.bool))
        if bad.any():
            i, where = label_position(bad)
            raise LabelError(f"task {self.name!r}: class index {int(t[i])} at {where} is outside "
                             f"[0, {n if n is not None else 'C'}) and is not -1 (missing)")
        return t

