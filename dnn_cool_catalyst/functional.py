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
    """A mask of leading shape, per sample `(N,)` or per element `(N, *E)`, viewed to broadcast
    over a tensor `(N, *E, ...)` (trailing dimensions of size 1 added: never aligned from the
    right, which would pair a `(N,)` mask with a `(T,)` dimension)."""
    if like.dim() <= mask.dim():
        return mask
    return mask.reshape(*mask.shape, *([1] * (like.dim() - mask.dim())))


def and_masks(a: Tensor, b: Tensor) -> Tensor:
    """`a & b` for masks of leading shapes (`(N,)` and `(N, T)`, say): the one with fewer
    dimensions is broadcast over the other's element dimensions (`expand_mask`), not aligned from
    the right as torch's broadcasting would."""
    if a.dim() < b.dim():
        a = expand_mask(a, b)
    elif b.dim() < a.dim():
        b = expand_mask(b, a)
    return a & b


def element_dims(task: Any) -> int:
    """How many element dimensions follow the batch dimension in a task's labels: 0 for one label
    per sample (the default, also for tasks without the attribute), 1 for one per token `(N, T)`
    (`ITask.element_dims`)."""
    return int(getattr(task, "element_dims", 0) or 0)


def element_rows(k: int, mask: Tensor, *values: Tensor) -> Tuple[Tensor, ...]:
    """`(mask_rows, *value_rows)`: a task with `k` element dimensions seen as one row per element.

    `values` are `(N, *E, ...)` (labels `(N, *E)`, predictions `(N, *E, C)`), viewed as
    `(N * |E|, ...)`; `mask` (per sample `(N,)` or per element `(N, *E)`) is broadcast to
    `(N, *E)` and flattened to `(N * |E|,)`. So metrics, tuning and the evaluator score elements
    as they score samples. With `k == 0` everything is returned as it is.
    """
    if k == 0:
        return (mask, *values)
    if not values:
        raise ValueError("element_rows needs at least one value tensor to know the element shape")
    lead = values[0].shape[: 1 + k]
    if len(lead) != 1 + k:
        raise ValueError(f"a tensor of shape {tuple(values[0].shape)} has no {k} element dimension(s) after the batch")
    for v in values[1:]:
        if v.shape[: 1 + k] != lead:
            raise ValueError(f"tensors of shapes {tuple(values[0].shape)} and {tuple(v.shape)} do not share the "
                             f"element shape {tuple(lead)}")
    if mask.shape != lead:
        if mask.shape != lead[: mask.dim()]:
            raise ValueError(f"a mask of shape {tuple(mask.shape)} does not fit elements of shape {tuple(lead)}")
        mask = mask.reshape(*mask.shape, *([1] * (len(lead) - mask.dim()))).expand(lead)
    rows = lead.numel()
    return (mask.reshape(rows), *(v.reshape(rows, *v.shape[1 + k:]) for v in values))


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


def per_element_mask(task: Any, mask: Tensor, activated: Tensor) -> Tensor:
    """A task's mask where its statistics are: `(N,)` for a per-sample task, `(N, *E)` for one
    with element dimensions (`ITask.element_dims`; a per-sample mask broadcast over the elements,
    whose shape is read from the leading dimensions of its `activated` outputs `(N, *E, ...)`)."""
    k = element_dims(task)
    if not k:
        return mask.reshape(-1)
    shape = activated.shape[: 1 + k]
    if mask.shape == shape:
        return mask
    if mask.shape != shape[: mask.dim()]:
        raise ValueError(f"task {getattr(task, 'name', task)!r}: a mask of shape {tuple(mask.shape)} does not fit its "
                         f"outputs of shape {tuple(activated.shape)} (element_dims={k})")
    return mask.reshape(*mask.shape, *([1] * (len(shape) - mask.dim()))).expand(shape)


def per_sample_mean(elem_loss: Tensor, selected: Tensor) -> Tensor:
    """`(N,)`: the mean of each sample's selected elements of `elem_loss` (element shape), NaN where
    a sample has none; in `accumulation_dtype` (the tokens of one sample can overflow a float16
    sum), selected with `where` so that a non-finite loss of an unselected element never counts."""
    loss = elem_loss.to(accumulation_dtype(elem_loss.dtype))
    if loss.dim() == 1:
        return torch.where(selected, loss, float("nan"))
    keep = selected.flatten(1)
    count = keep.sum(1, dtype=loss.dtype)
    s = torch.where(keep, loss.flatten(1), 0.0).sum(1)
    return torch.where(count > 0, s / count.clamp_min(1), float("nan"))


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
