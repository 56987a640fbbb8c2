"""Masked language modeling: softmax over the vocabulary, top token ids, cross entropy per masked token."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LabelError
from ..functional import softmax_last
from ..metrics import Perplexity, TokenAccuracy
from .base import RankedTask, SortDecoder, check_index_floats, raw_labels

IGNORE = -100


def _ce_per_token(logits: Tensor, labels: Tensor) -> Tensor:
    v = logits.shape[-1]
    # clamped into [0, V): see `classification._ce_elementwise`
    return F.cross_entropy(logits.reshape(-1, v), labels.reshape(-1).clamp(0, v - 1),
                           reduction="none").reshape(labels.shape)


def _token_available(labels: Tensor) -> Tensor:
    return labels != IGNORE


class MaskedLanguageModelingTask(RankedTask):
    """Predict masked tokens. The module outputs `(N, T, V)` logits; labels are token ids `(N, T)`
    with `-100` where a token is not masked. Decoded: the `top_k` most probable token ids per token,
    by declining probability (a full sort of a large vocabulary is never needed). Metrics: token
    accuracy of the top-1 token and perplexity over the masked tokens."""

    kind = "MaskedLanguageModelingTask"

    def __init__(self, name: str, module: nn.Module, top_k: int = 5, weight: float = 1.0):
        super().__init__(name=name, module=module, loss=_ce_per_token, activation=softmax_last,
                         decoder=SortDecoder(top_k),
                         metrics=[("accuracy", TokenAccuracy()), ("perplexity", Perplexity())],
                         available_func=_token_available, missing=IGNORE, label_dtype=torch.int64, weight=weight)

    def prepare_labels(self, values: Any) -> Tensor:
        t = raw_labels(values, self.name)
        if t.is_floating_point():
            check_index_floats(t, torch.zeros_like(t, dtype=torch.bool), self.name, "token", missing_hint="-100")
        t = t.to(torch.int64)
        if t.dim() != 2:
            raise LabelError(f"task {self.name!r}: token labels must have shape (N, T), got {tuple(t.shape)}")
        bad = (t < 0) & (t != IGNORE)
        if bad.any():
            i, j = (int(v) for v in bad.nonzero()[0])
            raise LabelError(f"task {self.name!r}: token id {int(t[i, j])} at [{i}, {j}] is negative and not -100")
        return t
