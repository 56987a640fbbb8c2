"""Texts for people about a batch of a task's outputs: what `ITask.describe` returns.

Each function takes the NumPy outputs of one task for a whole batch, `decoded`, `activated` and
`logits` (None when unknown), and returns one text per sample, e.g.
`"decoded: [True (0.3068 > 0.0297)], logits: [-0.8153]"`. Numbers are printed with `digits`
significant digits; vectors show their first `limit` values.

They work on the batch at once (one `%`-template per task, not per value): the tree explainer
formats every task of thousands of samples through them.

`ITask.describe_sample` texts one sample's label and prediction (the interpretation callback's
captions) through `sample_values`, `sample_decisions` or `sample_ranked`; each takes the task's
`decode`, the label and the activated outputs (torch tensors; None: unknown, shown as `"?"`).
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["describe_decisions", "describe_ranked", "describe_values", "sample_decisions", "sample_ranked",
           "sample_values"]


def _values(row: list, digits: int, limit: int) -> str:
    vals = row[:limit]
    text = ", ".join(f"{v:.{digits}g}" if isinstance(v, float) else str(v) for v in vals)
    return text + (f", ... ({len(row)} values)" if len(row) > limit else "")


def _rows(x: Optional[np.ndarray], n: int) -> List[list]:
    if x is None or n == 0:
        return [[] for _ in range(n)]
    return x.reshape(n, -1).tolist()


def _joined(count: int, spec: str) -> str:
    return ", ".join([spec] * count)


def describe_values(decoded: np.ndarray, activated: np.ndarray, logits: Optional[np.ndarray],
                    digits: int = 4, limit: int = 16) -> List[str]:
    """Any task: `decoded: [v, ...], activated: [v, ...], logits: [v, ...]`, the values of each sample
    flattened (bounded regression: one value each)."""
    n = decoded.shape[0]
    if decoded.size == n and activated.size == n and (logits is None or logits.size == n):
        # one value per sample: one template for the whole batch
        g = f"%.{digits}g"
        dspec = "%s" if decoded.dtype == np.bool_ else g
        cols = [decoded.reshape(-1).tolist(), activated.reshape(-1).tolist()]
        template = f"decoded: [{dspec}], activated: [{g}]"
        if logits is not None:
            cols.append(logits.reshape(-1).tolist())
            template += f", logits: [{g}]"
        return [template % row for row in zip(*cols)]
    return _flattened(decoded, activated, logits, digits, limit)


def _flattened(decoded, activated, logits, digits, limit) -> List[str]:
    """Each sample's values flattened, the first `limit` shown (floats with `digits` digits)."""
    n = decoded.shape[0]
    d, a, lg = _rows(decoded, n), _rows(activated, n), _rows(logits, n)
    out = []
    for i in range(n):
        text = f"decoded: [{_values(d[i], digits, limit)}], activated: [{_values(a[i], digits, limit)}]"
        if logits is not None:
            text += f", logits: [{_values(lg[i], digits, limit)}]"
        out.append(text)
    return out


def describe_ranked(decoded: np.ndarray, activated: np.ndarray, logits: Optional[np.ndarray],
                    class_names: Optional[Sequence[str]] = None, top_k: int = 3, digits: int = 4,
                    limit: int = 16) -> List[str]:
    """Sorted indices (classification): the `top_k` classes, by name when `class_names` are given,
    with their probabilities and logits in rank order, `decoded: [hoodie, polo], activated: [0.61,
    0.2], logits: [2.1, 1.0]`. For a sequence (`activated` of shape `(N, T, V)`, masked language
    modeling): the top-1 index per position, with its probability and logit."""
    if activated.ndim > 2:
        top = decoded[..., :1].astype(np.int64)  # (N, T, 1)
        probs = np.take_along_axis(activated, top, axis=-1)[..., 0]
        lgs = np.take_along_axis(logits, top, axis=-1)[..., 0] if logits is not None else None
        return _flattened(top[..., 0], probs, lgs, digits, limit)
    k = min(top_k, decoded.shape[-1])
    idx = decoded[:, :k].astype(np.int64)
    g = f"%.{digits}g"
    parts = [np.asarray(class_names, dtype=object)[idx] if class_names else idx,
             np.take_along_axis(activated, idx, axis=-1)]
    template = f"decoded: [{_joined(k, '%s')}], activated: [{_joined(k, g)}]"
    if logits is not None:
        parts.append(np.take_along_axis(logits, idx, axis=-1))
        template += f", logits: [{_joined(k, g)}]"
    rows = np.concatenate([p.astype(object) for p in parts], axis=1).tolist()
    return [template % tuple(row) for row in rows]


def describe_decisions(decoded: np.ndarray, activated: np.ndarray, logits: Optional[np.ndarray],
                       threshold: float | Sequence[float] | None, class_names: Optional[Sequence[str]] = None,
                       digits: int = 4, limit: int = 16) -> List[str]:
    """Thresholded decisions: one for a binary task, `decoded: [True (0.81 > 0.5)], logits: [1.45]`;
    one per class for a multilabel task, `decoded: [glasses: True (0.81 > 0.42), beard: False (0.03
    <= 0.5)], logits: [...]` (classes by name when `class_names` fit, else by index). `threshold`:
    one, or one per class; when it does not fit the outputs, the decisions and probabilities are
    shown without it."""
    n = decoded.shape[0]
    if decoded.ndim != 2 or (decoded.shape[1] == 1 and not class_names):  # a binary task
        if isinstance(threshold, float) and decoded.size == n and activated.size == n:
            return _decisions(logits, activated.reshape(n, 1), decoded.reshape(n, 1), None, [threshold], digits)
        return describe_values(decoded, activated, logits, digits, limit)
    c = decoded.shape[1]
    names = list(class_names) if class_names and len(class_names) == c else [str(j) for j in range(c)]
    thresholds = [threshold] * c if isinstance(threshold, float) else threshold
    if isinstance(thresholds, list) and len(thresholds) == c and activated.size == decoded.size:
        return _decisions(logits, activated.reshape(decoded.shape), decoded, names, thresholds, digits)
    g = f"%.{digits}g"
    flags = ", ".join(f"{k.replace('%', '%%')}: %s" for k in names)
    parts = [decoded, activated.reshape(decoded.shape)]
    template = f"decoded: [{flags}], activated: [{_joined(c, g)}]"
    if logits is not None:
        parts.append(logits.reshape(decoded.shape))
        template += f", logits: [{_joined(c, g)}]"
    rows = np.concatenate([p.astype(object) for p in parts], axis=1).tolist()
    return [template % tuple(row) for row in rows]


def _decisions(logits, activated, decoded, names, thresholds, digits) -> List[str]:
    """`decoded: [<class>: <decision> (<activated> > <threshold>), ...], logits: [...]` for `(N, C)`
    arrays (`names` None: one unnamed column, a binary task)."""
    n, c = decoded.shape
    g = f"%.{digits}g"
    # compared in the precision the decoder compares in (at least float32), so that `>` / `<=`
    # agrees with a decision taken by the same threshold
    a = activated.astype(np.promote_types(activated.dtype, np.float32), copy=False)
    above = a > np.asarray(thresholds, dtype=a.dtype)
    ops = np.where(above, ">", "<=").astype(object)
    labels = [""] * c if names is None else [f"{k.replace('%', '%%')}: " for k in names]
    cells = ", ".join(f"{label}%s ({g} %s {t:.{digits}g})" for label, t in zip(labels, thresholds))
    parts = np.stack([decoded.astype(object), activated.astype(object), ops], axis=2).reshape(n, 3 * c)
    template = f"decoded: [{cells}]"
    if logits is not None:
        parts = np.concatenate([parts, logits.reshape(n, c).astype(object)], axis=1)
        template += f", logits: [{_joined(c, g)}]"
    return [template % tuple(row) for row in parts.tolist()]


# One sample's label and prediction -----------------------------------------------------------------
Decode = Callable[[Tensor], Tensor]


def _number(v: float, digits: int) -> str:
    return f"{v:.{digits}g}"


def _numbers(t: Tensor, digits: int, limit: int = 8) -> str:
    values = t.reshape(-1).tolist()
    shown = ", ".join(_number(v, digits) if isinstance(v, float) else str(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


def _class_name(names: Optional[Sequence[str]], i: int) -> str:
    return str(names[i]) if names and 0 <= i < len(names) else str(i)


def sample_values(decode: Decode, label: Tensor, activated: Optional[Tensor], digits: int = 4) -> Tuple[str, str]:
    """Any task: the label and the prediction decoded alike (e.g. both in pixels), `("[32]", "[16]")`."""
    with torch.no_grad():
        label_text = _numbers(decode(label.unsqueeze(0).float())[0], digits)
        prediction = _numbers(decode(activated.unsqueeze(0))[0], digits) if activated is not None else "?"
    return label_text, prediction


def sample_decisions(decode: Decode, label: Tensor, activated: Optional[Tensor],
                     class_names: Optional[Sequence[str]] = None, digits: int = 4) -> Tuple[str, str]:
    """Thresholded decisions: one label without class names (a binary task) as `("True", "False
    (0.25)")`, the decision with its probability; else the classes set, `("[glasses, hat]",
    "[glasses]")`, by name where `class_names` has it (`name?` where the label is missing)."""
    flat = label.reshape(-1).float()
    if flat.numel() == 1 and not class_names:  # a binary task
        label_text = str(bool(flat[0] > 0.5))
        if activated is None:
            return label_text, "?"
        decided = bool(decode(activated.reshape(1, -1)).reshape(-1)[0])
        return label_text, f"{decided} ({_number(float(activated.reshape(-1)[0]), digits)})"

    def classes(flags: Sequence[Any]) -> str:  # the classes set; `name?` where the label is missing
        return "[" + ", ".join(_class_name(class_names, j) + ("?" if f is None else "")
                               for j, f in enumerate(flags) if f is None or f) + "]"

    label_text = classes([None if v != v else v > 0.5 for v in flat.tolist()])
    if activated is None:
        return label_text, "?"
    return label_text, classes(decode(activated.reshape(1, -1)).reshape(-1).tolist())


def sample_ranked(decode: Decode, label: Tensor, activated: Optional[Tensor],
                  class_names: Optional[Sequence[str]] = None, digits: int = 4) -> Tuple[str, str]:
    """A class index (classification): the labelled class and the top-ranked one with its
    probability, `("hoodie", "tee (0.7)")`, by name where `class_names` has it."""
    label_text = _class_name(class_names, int(label.reshape(-1)[0]))
    if activated is None:
        return label_text, "?"
    top = int(decode(activated.unsqueeze(0))[0].reshape(-1)[0])
    return label_text, f"{_class_name(class_names, top)} ({_number(float(activated.reshape(-1)[top]), digits)})"


# Tasks with element dimensions (one label per token) -------------------------------------------------


def describe_elements(describe: Callable[..., List[str]], element_dims: int, decoded: np.ndarray,
                      activated: np.ndarray, logits: Optional[np.ndarray], **options: Any) -> List[List[str]]:
    """Texts per element of a task with `element_dims` k > 0 (`ITask.element_dims`, one label per
    token): `describe` (the task's `describe`) on the elements seen as samples, arrays `(N, *E, ...)`
    viewed as `(N * |E|, ...)`; returns, per sample, the texts of its `|E|` elements in row-major
    order (`[[text of token 0, text of token 1, ...], ...]`). `options` go to `describe`."""
    n = decoded.shape[0]
    lead = activated.shape[: 1 + element_dims]
    for name, x in (("decoded", decoded), ("logits", logits)):
        if x is not None and x.shape[: 1 + element_dims] != lead:
            raise ValueError(f"{name} of shape {x.shape} and activated of shape {activated.shape} do not share the "
                             f"element shape {lead} (element_dims={element_dims})")
    per_sample = int(np.prod(lead[1:], dtype=np.int64))
    rows = n * per_sample

    def flat(x: Optional[np.ndarray]) -> Optional[np.ndarray]:
        return None if x is None else x.reshape(rows, *x.shape[1 + element_dims:])

    texts = describe(flat(decoded), flat(activated), flat(logits), **options)
    if len(texts) != rows:
        raise ValueError(f"describe() returned {len(texts)} texts for {rows} elements ({n} samples of {per_sample})")
    return [list(texts[i * per_sample:(i + 1) * per_sample]) for i in range(n)]
