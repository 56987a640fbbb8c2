"""Exact decision-threshold search, and tuned parameters as JSON files.

`threshold_sweep(scores, labels)` sorts the scores once and evaluates *every* distinct cut point
with cumulative counts: O(n log n), vectorised, no loop per candidate. `best_threshold` picks the
cut that maximises a metric of the confusion counts. For float32 scores the sort is a single sort
of int64 keys (the score's order-preserving bits with the label in the lowest bit), and for the
built-in metrics, which never get worse with one more true positive or true negative, only the
cuts with a negative just below and a positive just above can win, so only those are scored
(same result, tie rule included, as scoring all of them; a callable metric is scored at all).

Decision rule and candidates. A sample is predicted positive when `score > threshold` (as the
`ThresholdDecoder` decodes). With the distinct scores `v_0 < v_1 < ... < v_{m-1}` there are `m + 1`
different decisions, and each is represented by one threshold:

- "everything positive": the largest number below `v_0` in the scores' dtype (`nextafter`),
- "positive above `v_{j-1}`": the midpoint of `v_{j-1}` and `v_j`, computed in the scores' dtype; when
  the two are adjacent floats and the midpoint rounds up to `v_j`, `v_{j-1}` itself,
- "everything negative": `v_{m-1}`, the largest score.

Every threshold is a value of the scores' dtype, so comparing float32 activations with it (torch and
NumPy cast a Python float to the tensor's dtype) reproduces exactly the decision that was scored.

Ties and degenerate inputs. Among the cut points with the best metric value the one with the best
accuracy wins, and among those the lowest threshold. So constant scores give either "everything
positive" or "everything negative" (whichever is more accurate, positive on a tie), a single class
gives the decision that is right for all samples when the metric allows it, and an undefined
metric (NaN for every cut, e.g. a custom ratio over zero counts) falls back to the most accurate
cut. NaN metric values count as worse than any number.

Metrics are functions of the confusion counts `(tp, fp, fn, tn)`, float64 arrays with one entry
per cut point, returning an array of scores (higher is better): `"accuracy"` (default), `"f1"`,
`"balanced_accuracy"`, `"youden"` (J = TPR + TNR - 1), or any such callable.
"""
from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

import numpy as np

from .errors import TunedParamsError
from .files import write_json

ConfusionMetric = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


# Metrics of confusion counts ---------------------------------------------------------------------------------------


def _div(num: np.ndarray, den: np.ndarray, empty: float) -> np.ndarray:
    num, den = np.broadcast_arrays(np.asarray(num, np.float64), np.asarray(den, np.float64))
    return np.divide(num, den, out=np.full(num.shape, empty), where=den > 0)


def accuracy(tp, fp, fn, tn) -> np.ndarray:
    """`(tp + tn) / n`."""
    return _div(tp + tn, tp + fp + fn + tn, np.nan)


def f1(tp, fp, fn, tn) -> np.ndarray:
    """`2 tp / (2 tp + fp + fn)`, 0 where nothing is positive (scikit-learn's `zero_division=0`)."""
    return _div(2 * tp, 2 * tp + fp + fn, 0.0)


def balanced_accuracy(tp, fp, fn, tn) -> np.ndarray:
    """Mean of TPR and TNR over the classes present (scikit-learn's `balanced_accuracy_score`)."""
    pos, neg = tp + fn, tn + fp
    tpr, tnr = _div(tp, pos, np.nan), _div(tn, neg, np.nan)
    return np.where(np.asarray(pos) == 0, tnr, np.where(np.asarray(neg) == 0, tpr, (tpr + tnr) / 2))


def youden(tp, fp, fn, tn) -> np.ndarray:
    """Youden's J = TPR + TNR - 1 (`2 * balanced_accuracy - 1` when a class is absent)."""
    return 2 * balanced_accuracy(tp, fp, fn, tn) - 1


METRICS: Dict[str, ConfusionMetric] = {  # all non-decreasing in tp and in tn (at fixed class sizes)
    "accuracy": accuracy,
    "f1": f1,
    "f1_score": f1,
    "balanced_accuracy": balanced_accuracy,
    "youden": youden,
    "youden_j": youden,
}


_MONOTONE = frozenset(METRICS.values())


def metric_function(metric: Union[str, ConfusionMetric]) -> Tuple[str, ConfusionMetric]:
    """`(name, function)` for a metric name of `METRICS` or a callable on `(tp, fp, fn, tn)`."""
    if callable(metric):
        return getattr(metric, "__name__", type(metric).__name__), metric
    try:
        return metric, METRICS[metric]
    except (KeyError, TypeError):
        raise ValueError(f"unknown tuning metric {metric!r}; known: {sorted(METRICS)} or a callable "
                         "f(tp, fp, fn, tn) -> scores") from None


# The sweep ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThresholdSweep:
    """Confusion counts at candidate cut points, ascending. Candidate `j` predicts negative the
    `cuts[j]` lowest scores and positive the others (`cuts[0] == 0`: everything positive,
    `cuts[-1] == n`: everything negative); `tp, fp, fn, tn` are float64 arrays, one entry per
    candidate. A full sweep has one candidate per distinct score plus one; a pruned sweep keeps only
    the cuts with a negative just below and a positive just above (and both ends)."""

    cuts: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    tn: np.ndarray
    _sorted: Callable[[int], np.floating]  # the i-th lowest score, in the scores' dtype

    def __len__(self) -> int:
        return self.tp.shape[0]

    def threshold(self, j: int) -> float:
        """The threshold (a value of the scores' dtype, as a Python float) that makes decision `j`."""
        if not -len(self) <= j < len(self):
            raise IndexError(f"cut {j} out of range for {len(self)} candidates")
        i, n = int(self.cuts[j]), int(self.cuts[-1])
        if i == 0:
            first = self._sorted(0)
            return float(np.nextafter(first, type(first)(-np.inf)))
        lo = self._sorted(i - 1)
        if i == n:
            return float(lo)
        hi = self._sorted(i)
        with np.errstate(over="ignore", invalid="ignore"):
            mid = lo + (hi - lo) / type(lo)(2)
        return float(mid) if lo <= mid < hi else float(lo)


def as_numpy(x: Any) -> np.ndarray:
    """A CPU NumPy view/copy of a tensor or array-like (half-precision tensors become float32)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch here
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _canonical_scores(scores: Any) -> np.ndarray:
    s = as_numpy(scores)
    if s.dtype == np.float16:
        s = s.astype(np.float32)
    elif s.dtype == np.float64:
        s32 = s.astype(np.float32)
        if np.array_equal(s32, s):  # float32 values in a float64 array: the fast path is exact
            s = s32
    elif s.dtype != np.float32:
        s = s.astype(np.float64)
    return s


_MAGNITUDE = np.int32(0x7FFFFFFF)


def _float32_from_key(key: np.int64) -> np.float32:
    k = np.int32(key >> 1)
    return (np.array([k ^ ((k >> 31) & _MAGNITUDE)], dtype=np.int32)).view(np.float32)[0]


def _sweep_float32(s: np.ndarray, y: np.ndarray, prune: bool):
    """One sort of int64 keys: the float's order-preserving int32 image, shifted left, and in bit 0
    1 for a negative, so that in each run of equal scores the positives come first."""
    i = s.view(np.int32)
    key = (i ^ ((i >> 31) & _MAGNITUDE)).astype(np.int64)
    key <<= 1
    key += ~y
    key.sort()
    neg = key & 1
    if prune:  # a negative followed by a positive: the only cuts a monotone metric needs
        inner = np.flatnonzero(neg[:-1] > neg[1:]) + 1
    else:
        shifted = key >> 1
        inner = np.flatnonzero(shifted[1:] != shifted[:-1]) + 1
    neg_below = np.cumsum(neg)[inner - 1]
    return inner, neg_below, int(neg.sum() if len(neg) else 0), lambda j: _float32_from_key(key[j])


def _sweep_sorted(s: np.ndarray, y: np.ndarray, prune: bool):
    order = np.argsort(s, kind="stable")
    ss, yy = s[order], y[order].astype(np.int64)
    n = ss.shape[0]
    last = np.append(np.flatnonzero(ss[1:] != ss[:-1]), n - 1)  # last index of each run of equal scores
    cpos = np.cumsum(yy)
    pos_upto = cpos[last]
    inner = last[:-1] + 1  # cut after each run but the last
    neg_below = inner - pos_upto[:-1]
    if prune and inner.shape[0]:
        run_pos = np.diff(pos_upto, prepend=0)
        run_len = np.diff(last, prepend=-1)
        keep = (run_len[:-1] > run_pos[:-1]) & (run_pos[1:] > 0)
        inner, neg_below = inner[keep], neg_below[keep]
    return inner, neg_below, n - int(cpos[-1]), lambda j: ss[j]


def threshold_sweep(scores: Any, labels: Any, prune: bool = False) -> ThresholdSweep:
    """Confusion counts of `scores > t` at every distinct cut point (see the module docstring).

    `scores`: finite floats `(n,)`, n >= 1; `labels`: booleans (or 0/1) `(n,)`. With `prune=True`
    only the cuts between a negative (below) and a positive (above) are kept, plus both ends: the
    best cut of any metric that does not decrease with `tp` and with `tn` (all of `METRICS`) is
    among them, with the same tie rule.
    """
    s = _canonical_scores(scores)
    y = as_numpy(labels)
    if s.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"threshold_sweep takes scores and labels of the same shape (n,), got {s.shape} and {y.shape}")
    n = s.shape[0]
    if n == 0:
        raise ValueError("threshold_sweep needs at least one sample")
    if not np.isfinite(s).all():
        raise ValueError(f"scores must be finite; {int((~np.isfinite(s)).sum())} of {n} are NaN or infinite")
    y = y.astype(bool, copy=False)
    s = s + s.dtype.type(0)  # -0.0 -> +0.0, so that equal scores have equal sort keys
    sweep = _sweep_float32 if s.dtype == np.float32 else _sweep_sorted
    inner, neg_below, negatives, sorted_score = sweep(s, y, prune)
    k = inner.shape[0] + 2
    cuts = np.empty(k, np.int64)
    cuts[0], cuts[1:-1], cuts[-1] = 0, inner, n
    tn = np.empty(k, np.float64)
    tn[0], tn[1:-1], tn[-1] = 0, neg_below, negatives
    fn = cuts - tn
    positives = n - negatives
    return ThresholdSweep(cuts=cuts, tp=positives - fn, fp=negatives - tn, fn=fn, tn=tn, _sorted=sorted_score)


class Tuned(NamedTuple):
    """The result of `best_threshold`: the threshold, its metric value, the number of samples."""

    threshold: float
    score: float
    num_samples: int


def best_cut(sweep: ThresholdSweep, metric: Union[str, ConfusionMetric] = "accuracy") -> Tuple[int, float]:
    """`(j, value)`: the best cut of a sweep under the tie rule of the module docstring."""
    name, fn = metric_function(metric)
    vals = np.asarray(fn(sweep.tp, sweep.fp, sweep.fn, sweep.tn), dtype=np.float64)
    if vals.shape != sweep.tp.shape:
        raise ValueError(f"metric {name!r} returned shape {vals.shape} for {len(sweep)} cut points; it must "
                         "return one value per cut point")
    vals = np.where(np.isnan(vals), -np.inf, vals)
    best = vals.max()
    ties = np.flatnonzero(vals == best)
    if ties.shape[0] == 1:
        j = int(ties[0])
    else:
        acc = accuracy(sweep.tp[ties], sweep.fp[ties], sweep.fn[ties], sweep.tn[ties])
        j = int(ties[np.argmax(acc)])  # argmax takes the first, i.e. the lowest threshold
    return j, (float(best) if np.isfinite(best) else float("nan"))


def best_threshold(scores: Any, labels: Any, metric: Union[str, ConfusionMetric] = "accuracy") -> Tuned:
    """The threshold `t` maximising `metric` of the decisions `scores > t`, exactly.

    The metrics of `METRICS` are monotone (never worse with one more true positive or true
    negative), so they are evaluated on the pruned sweep; a callable is evaluated at every cut."""
    name, fn = metric_function(metric)
    sweep = threshold_sweep(scores, labels, prune=fn in _MONOTONE)
    j, value = best_cut(sweep, fn)
    return Tuned(sweep.threshold(j), value, int(sweep.cuts[-1]))


def best_thresholds(scores: Any, labels: Any, available: Any,
                    metric: Union[str, ConfusionMetric] = "accuracy") -> List[Tuned | None]:
    """Per class (last dimension) of `(N, C)` arrays: the best threshold (`best_threshold`) over
    the elements where `available` is true (labels are positive above 0.5), or None for a class
    without any."""
    s, y, w = as_numpy(scores), as_numpy(labels), as_numpy(available).astype(bool)
    if s.ndim != 2 or y.shape != s.shape or w.shape != s.shape:
        raise ValueError(f"best_thresholds takes scores, labels and available of one shape (N, C), got "
                         f"{s.shape}, {y.shape} and {w.shape}")
    # one contiguous row per class: cheaper to select from than a strided column
    s, y, w = (np.ascontiguousarray(v.T) for v in (s, y, w))
    out: List[Tuned | None] = []
    for sc, yc, wc in zip(s, y, w):
        if not wc.any():
            out.append(None)
            continue
        if not wc.all():
            sc, yc = sc[wc], yc[wc]
        out.append(best_threshold(sc, yc > 0.5, metric))
    return out


# Persistence -------------------------------------------------------------------------------------------------------


def save_tuned(path: Union[str, os.PathLike], params: Mapping[str, Mapping[str, Any]]) -> None:
    """Write `{task path: params}` (as returned by `decoder.tune` or `decoder.params()`) to a JSON
    file, atomically (a temporary file in the same directory, then `os.replace`). NaN and infinity
    are refused, so that any JSON reader can load the file."""
    if not isinstance(params, Mapping):
        raise TypeError(f"save_tuned takes a mapping task path -> params, got {type(params).__name__}")
    for task_path, p in params.items():
        if not isinstance(task_path, str) or not isinstance(p, Mapping):
            raise TypeError(f"save_tuned: entry {task_path!r} must map a task path (str) to a dict of params, "
                            f"got {type(p).__name__}")
        try:
            json.dumps(p, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"save_tuned: params of task {task_path!r} are not plain JSON ({e}): {p!r}") from None
        if "threshold" in p:  # what load_tuned would refuse is not written
            try:
                check_threshold(p["threshold"])
            except ValueError as e:
                raise TunedParamsError(f"save_tuned: params of task {task_path!r}: {e}") from None
    write_json(path, {k: dict(v) for k, v in params.items()}, fsync=True)


def load_tuned(path: Union[str, os.PathLike]) -> Dict[str, Dict[str, Any]]:
    """Read parameters written by `save_tuned`: `{task path: params}`; apply them with
    `flow.get_decoder().load_tuned(params, source=path)`, which checks them against the flow's tasks.

    What can be checked without the flow is checked here, with errors (`TunedParamsError`) naming
    the file and the task: every entry is an object; a `threshold` is a finite number or a non-empty
    list of finite numbers; no value anywhere is NaN or infinite. Python's `json` reads the
    non-standard literals `NaN`, `Infinity` and `-Infinity` (and `1e400` as infinity); `save_tuned`
    never writes them, and a NaN threshold would decode every sample as false, `-Infinity` every
    sample as true, so they are refused."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f, parse_constant=_JsonConstant)
    except FileNotFoundError:
        raise FileNotFoundError(f"no tuned parameters file {path!r}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path!r} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise TunedParamsError(f"{path!r} must hold a JSON object mapping task paths to objects of parameters, "
                               f"got {_describe(data)}")
    for task_path, params in data.items():
        where = f"tuned parameters of task {task_path!r} in {path!r}"
        if not isinstance(params, dict):
            raise TunedParamsError(f"{where} must be an object such as {{\"threshold\": 0.5}}, got {_describe(params)}")
        for key, value in params.items():
            try:
                if key == "threshold":
                    check_threshold(value)
                else:
                    _check_finite(value, key)
            except ValueError as e:
                raise TunedParamsError(f"{where}: {e}; {FIX_TUNED}") from None
    return data


FIX_TUNED = "tune again (runner.tune or decoder.tune) or correct the value"


class _JsonConstant(str):
    """`NaN`, `Infinity` or `-Infinity` as read by `json.load(parse_constant=...)`: kept as text so
    that the error can name the task and key that hold it."""


def _is_number(value: Any) -> bool:
    """A number, or one of JSON's non-standard NaN/Infinity literals (refused later as not finite)."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)) or isinstance(value, _JsonConstant)


def _describe(value: Any) -> str:
    """A value as the JSON it came from, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, _JsonConstant):
        return str(value)
    if isinstance(value, (bool, np.bool_)):
        return f"{str(bool(value)).lower()} (a boolean)"
    if isinstance(value, str):
        return f"the string {value!r} (write numbers without quotes)"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}" if value else "an empty list"
    if isinstance(value, Mapping):
        return "an object"
    return repr(value) if _is_number(value) else type(value).__name__


def _finite(value: Any, what: str) -> float:
    """`value` (a number or a `_JsonConstant`) as a finite float, or a `ValueError`."""
    got = value if isinstance(value, _JsonConstant) else repr(value)
    try:
        f = float(value)
    except OverflowError:  # an int beyond float's range
        f, got = math.inf, "a number beyond float's range"
    if not math.isfinite(f):
        why = ("a threshold of NaN or Infinity decodes every sample as false, -Infinity every sample as true"
               if what.startswith("threshold") else
               "standard JSON has no NaN or infinities; save_tuned never writes them")
        raise ValueError(f"{what} must be a finite number, got {got} ({why})")
    return f


def _number(value: Any, what: str) -> float:
    if not _is_number(value):
        raise ValueError(f"{what} must be a number, got {_describe(value)}")
    return _finite(value, what)


def _check_finite(value: Any, what: str) -> None:
    """No NaN or infinity in `value` (numbers, lists and objects of them, strings, null)."""
    if _is_number(value):
        _finite(value, what)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(v, f"{what}[{i}]")
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _check_finite(v, f"{what}.{k}")


def check_threshold(value: Any, per_class: bool = True, classes: Optional[int] = None) -> Union[float, List[float]]:
    """`value` as `ThresholdDecoder` keeps it: a finite number (a float) or, with `per_class`, a
    non-empty list of finite numbers, one per class (`classes` of them when given). Raises
    `ValueError` saying what is wrong; callers add the task and file."""
    if _is_number(value):
        return _finite(value, "threshold")
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not per_class:
        want = ("one number or a list of numbers (one per class)" if per_class
                else "one number (this decoder has one threshold, not one per class)")
        raise ValueError(f"threshold must be {want}, got {_describe(value)}")
    if not value or (classes is not None and len(value) != classes):
        count = f"{classes}" if classes is not None else "one or more"
        raise ValueError(f"threshold must be one number or a list of {count} (one per class), got {_describe(value)}")
    return [_number(v, f"threshold[{i}]") for i, v in enumerate(value)]
