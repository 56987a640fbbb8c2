"""Pure tensor functions behind the interpreters: masked reductions with static shapes.

Elements outside `S_t` are *selected away* (`torch.where`), never multiplied by a 0 weight: a
non-finite value there (an overflowing logit, a NaN element loss of an excluded sample) must not
reach the loss (`NaN * 0` is NaN). Sums and counts are accumulated in at least float32
(`accumulation_dtype`), so half-precision logits neither overflow the sums (65504 is fp16's
largest number) nor round the counts (fp16 counts exactly only to 2048, bfloat16 to 256).
"""
from __future__ import annotations

from typing import Any, Tuple

import torch
from torch import Tensor


def expand_mask(mask: Tensor, like: Tensor) -> Tensor:
    """A per-sample mask `(N,)` viewed to broadcast over an element tensor `(N, ...)`."""
    if like.dim() == 1:
        return mask
    return mask.reshape(mask.shape[0], *([1] * (like.dim() - 1)))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which losses of `dtype` are summed and counted: float32 for half precision
    (float16, bfloat16) and for integer dtypes, the dtype itself when it is wider (float64)."""
    return torch.promote_types(dtype, torch.float32)


def selected_sum_count(elem_loss: Tensor, selected: Tensor) -> Tuple[Tensor, Tensor]:
    """Sum of `elem_loss` where `selected` (element shape) holds, and the number of such elements,
    both in `accumulation_dtype(elem_loss.dtype)`. Unselected values never enter the sum (whatever
    they are, NaN and inf included) and get a gradient of exactly 0."""
    acc = accumulation_dtype(elem_loss.dtype)
    s = torch.where(selected, elem_loss.to(acc), 0.0).sum()
    return s, selected.sum(dtype=acc)


def grouped_sum_count(elem_loss: Tensor, selected: Tensor, groups: int) -> Tuple[Tensor, Tensor]:
    """`selected_sum_count` of each of `groups` equal blocks along the first dimension: the element
    losses of several tasks joined with `torch.cat` (task-major), `(groups,)` sums and counts in
    `accumulation_dtype`. Each block's sum adds the same elements as its own `selected_sum_count`
    (the order of the additions may differ: equal up to float rounding)."""
    acc = accumulation_dtype(elem_loss.dtype)
    shape = (groups, selected.numel() // groups)  # not -1: an empty batch has blocks of 0 elements
    s = torch.where(selected, elem_loss.to(acc), 0.0).reshape(shape).sum(1)
    return s, selected.reshape(shape).sum(1, dtype=acc)


def masked_sum_count(elem_loss: Tensor, available: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    """Sum of `elem_loss` over available elements of masked samples, and their count
    (`selected_sum_count` on `available & mask`).

    No boolean indexing: shapes are static. Values outside the selection never reach the sum and
    their gradient is exactly zero; for the gradient of the *logits* to be zero (not NaN) where the
    logits themselves are not finite, compute `elem_loss` on `where_selected(...)` inputs.
    """
    return selected_sum_count(elem_loss, available & expand_mask(mask, available))


def masked_mean(elem_loss: Tensor, available: Tensor, mask: Tensor) -> Tensor:
    """`sum / max(count, 1)`: the mean over the selected elements, exactly 0 when none is selected."""
    s, c = masked_sum_count(elem_loss, available, mask)
    return s / c.clamp_min(1)


def where_selected(values: Tensor, selected: Tensor, mask: Tensor, fill: Any) -> Tensor:
    """`values` (logits or labels of a task) with `fill` wherever their element is not selected.

    `selected` has the element shape `(N, ...)`; `values` may carry trailing dimensions (class or
    vocabulary logits `(N, C)`, `(N, T, V)`) or be a reshaped view of it (`(N, 1)` logits of
    `(N,)` elements). Values of any other shape are filled per sample, where `mask` `(N,)` is false.
    Used on the logits before an element loss: its backward at an excluded non-finite logit or
    label (softmax of an infinite logit: NaN) would be multiplied into the gradient (`NaN * 0` is
    NaN); the backward of this `where` drops it, and the loss sees `fill` there instead.
    """
    if values.shape[: selected.dim()] == selected.shape:
        keep = selected.reshape(*selected.shape, *([1] * (values.dim() - selected.dim())))
    elif values.numel() == selected.numel():
        keep = selected.reshape(values.shape)
    else:
        keep = expand_mask(mask, values)
    return torch.where(keep, values, fill)


def per_sample_masked(per_sample: Tensor, mask: Tensor) -> Tensor:
    """Per-sample values with NaN where the precondition mask is false."""
    return torch.where(mask, per_sample, torch.full_like(per_sample, float("nan")))



# Task kinds' building blocks (module-level functions, so that tasks pickle for DDP workers) --------


def nan_available(labels: Tensor) -> Tensor:
    """Which label elements are present: float labels mark a missing one with NaN."""
    return ~torch.isnan(labels)


def softmax_last(logits: Tensor) -> Tensor:
    """Softmax over the last dimension (the classes, or a token's vocabulary)."""
    return torch.softmax(logits, dim=-1)


def is_compiling() -> bool:
    """Whether torch.compile (dynamo) is tracing the caller: trace-time code must then neither
    branch on data nor fill caches with traced tensors."""
    fn = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3; torch._dynamo's before
    if fn is None:
        from torch._dynamo import is_compiling as fn
    return bool(fn())
