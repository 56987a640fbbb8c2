"""Exact decision-threshold search, and tuned parameters as JSON files.

`threshold_sweep(scores, labels)` sorts the scores once and evaluates *every* distinct cut point
with cumulative counts: O(n log n), vectorised, no loop per candidate. `best_threshold` picks the
cut that maximises a metric of the confusion counts.

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
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Tuple, Union

import numpy as np

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


METRICS: Dict[str, ConfusionMetric] = {
    "accuracy": accuracy,
    "f1": f1,
    "f1_score": f1,
    "balanced_accuracy": balanced_accuracy,
    "youden": youden,
    "youden_j": youden,
}


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
    """Confusion counts at every cut point, ascending. `values` are the distinct scores `(m,)`;
    cut `j` in `0..m` predicts positive the scores above `values[j - 1]` (all of them for `j = 0`),
    and `tp, fp, fn, tn` are float64 arrays `(m + 1,)`."""

    values: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    tn: np.ndarray

    def __len__(self) -> int:
        return self.tp.shape[0]

    def threshold(self, j: int) -> float:
        """The threshold (a value of the scores' dtype, as a Python float) that makes decision `j`."""
        v, m = self.values, self.values.shape[0]
        if not 0 <= j <= m:
            raise IndexError(f"cut {j} out of range 0..{m}")
        if j == 0:
            return float(np.nextafter(v[0], v.dtype.type(-np.inf)))
        if j == m:
            return float(v[m - 1])
        lo, hi = v[j - 1], v[j]
        with np.errstate(over="ignore", invalid="ignore"):
            mid = lo + (hi - lo) / v.dtype.type(2)
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


def threshold_sweep(scores: Any, labels: Any) -> ThresholdSweep:
    """Confusion counts of `scores > t` at every distinct cut point (see the module docstring).

    `scores`: finite floats `(n,)`, n >= 1; `labels`: booleans (or 0/1) `(n,)`.
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
    if s.dtype == np.float32:
        # One sort of int64 keys: the float's order-preserving int32 image, shifted, label in bit 0.
        i = s.view(np.int32)
        key = (i ^ ((i >> 31) & np.int32(0x7FFFFFFF))).astype(np.int64)
        key <<= 1
        key |= y
        key.sort()
        pos = key & 1
        key >>= 1
        change = key[1:] != key[:-1]
    else:
        order = np.argsort(s)
        s_sorted = s[order]
        pos = y[order].astype(np.int64)
        change = s_sorted[1:] != s_sorted[:-1]
    last = np.flatnonzero(change)
    last = np.append(last, n - 1)  # index of the last sample of each distinct score
    if s.dtype == np.float32:
        k = key[last].astype(np.int32)
        values = (k ^ ((k >> 31) & np.int32(0x7FFFFFFF))).view(np.float32)
    else:
        values = s_sorted[last]
    cpos = np.cumsum(pos)
    p = int(cpos[-1])
    fn = np.empty(last.shape[0] + 1, np.float64)
    fn[0] = 0
    fn[1:] = cpos[last]
    below = np.empty_like(fn)
    below[0] = 0
    below[1:] = last + 1
    tn = below - fn
    return ThresholdSweep(values=values, tp=p - fn, fp=(n - p) - tn, fn=fn, tn=tn)


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
    """The threshold `t` maximising `metric` of the decisions `scores > t`, exactly."""
    sweep = threshold_sweep(scores, labels)
    j, value = best_cut(sweep, metric)
    return Tuned(sweep.threshold(j), value, int(sweep.tp[0] + sweep.fp[0]))


def best_thresholds(scores: Any, labels: Any, available: Any,
                    metric: Union[str, ConfusionMetric] = "accuracy") -> List[Tuned | None]:
    """Per class (last dimension) of `(N, C)` arrays: the best threshold over the elements where
    `available` is true, or None for a class without any."""
    s, y, w = as_numpy(scores), as_numpy(labels), as_numpy(available).astype(bool)
    if s.ndim != 2 or y.shape != s.shape or w.shape != s.shape:
        raise ValueError(f"best_thresholds takes scores, labels and available of one shape (N, C), got "
                         f"{s.shape}, {y.shape} and {w.shape}")
    out: List[Tuned | None] = []
    for c in range(s.shape[1]):
        wc = w[:, c]
        out.append(best_threshold(s[wc, c], y[wc, c] > 0.5, metric) if wc.any() else None)
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
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tuned-", suffix=".json.tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({k: dict(v) for k, v in params.items()}, f, indent=2, sort_keys=False, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def load_tuned(path: Union[str, os.PathLike]) -> Dict[str, Dict[str, Any]]:
    """Read parameters written by `save_tuned`: `{task path: params}`; apply them with
    `flow.get_decoder().load_tuned(params)`."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no tuned parameters file {path!r}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path!r} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path!r} must hold a JSON object mapping task paths to objects of parameters")
    return data
