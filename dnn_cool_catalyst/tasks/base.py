"""The task protocol (`ITask`), the `Task` dataclass behind every predefined kind, and decoders.

A task owns everything that is specific to one kind of output: how labels look and which value
marks them missing, the elementwise loss, the activation, the decoder (with its tunable parameters)
and the default metrics. The flow interpreters only combine these pieces with masks; they never
ask which kind a task is.

Shapes: `N` is the batch size. A task's *elements* are what availability is decided on: one per
sample for binary, classification and bounded regression, one per class for multilabel, one per
token for masked language modeling. `elementwise_loss` and `available` both return tensors of the
element shape `(N, ...)`.
"""
from __future__ import annotations

import abc
import copy
import math
import warnings
from dataclasses import InitVar, dataclass, field
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import LabelError
from ..functional import nan_available, per_sample_mean
from ..keys import ACTIVATED, DECODED, GT, LOGITS, MASK
from ..tuning import check_threshold
from .describe import describe_ranked, describe_values, sample_decisions, sample_ranked, sample_values

JSON = Any


class Decoder(abc.ABC):
    """Turns activated outputs into decoded predictions; tunable parameters are plain JSON values.

    Tuning is two acts: `fit` computes parameters (pure: the decoder is not changed) and
    `load_tuned` applies them. `tune` does both, for callers that want the seed's one call. A
    decoder of your own with parameters overrides `params`, `load_tuned` and `fit`.
    """

    def __call__(self, activated: Tensor) -> Tensor:
        return self.decode(activated)

    @abc.abstractmethod
    def decode(self, activated: Tensor) -> Tensor:
        """Decode a batch of activated outputs."""

    def params(self) -> Dict[str, JSON]:
        """The current parameters, JSON-serialisable (empty when there is nothing to tune)."""
        return {}

    def load_tuned(self, params: Dict[str, JSON]) -> None:
        """Apply parameters as `fit`, `params` or `tune` give them (the keys of a `fit` report,
        `TUNING_INFO_KEYS`, are skipped: `tune`'s result and `tuned_params.json` hold both)."""
        params = {k: v for k, v in params.items() if k not in TUNING_INFO_KEYS}
        if params:
            raise ValueError(f"{type(self).__name__} has no tunable parameters, got {sorted(params)}")

    def fit(self, activated: Tensor, labels: Tensor, available: Tensor,
            **kwargs) -> Tuple[Dict[str, JSON], Dict[str, JSON]]:
        """`(params, report)`: the best parameters on `activated`/`labels` restricted to `available`
        (element shape: the elements of `S_t`), and what happened (see `ThresholdDecoder.fit`).
        Pure: apply `params` with `load_tuned`. Decoders without parameters give `({}, {})`."""
        return {}, {}

    def tune(self, activated: Tensor, labels: Tensor, available: Tensor, **kwargs) -> Dict[str, JSON]:
        """`fit`, then `load_tuned(params)`; returns the parameters and the report in one dict
        (`{**params, **report}`, the format of `tuned_params.json`)."""
        params, report = self.fit(activated, labels, available, **kwargs)
        self.load_tuned(params)
        return {**params, **report}


# The keys of a `fit` report. `tune`'s result and `tuned_params.json` put them next to the
# parameters (a public file format), so `load_tuned` skips them there.
TUNING_INFO_KEYS = frozenset({"tuned", "reason", "metric", "score", "num_samples", "untuned_classes"})

NO_SAMPLES = "no samples in S_t"


class ThresholdDecoder(Decoder):
    """`activated > threshold`; one threshold, or one per class (last dimension) once tuned.

    Thresholds are finite numbers (`tuning.check_threshold`): `per_class=False` allows only one
    (a binary task), `classes` fixes the length of a per-class list (a multilabel task with class
    names); a bad value is refused by the constructor and by `load_tuned`, leaving the decoder as
    it was.

    The decoder belongs to its task, and the task to its `Tasks` registry: every flow, module,
    evaluator and runner built from one `Tasks` decodes with the same thresholds (see
    `FlowDecoder`).
    """

    def __init__(self, threshold: float | Sequence[float] = 0.5, per_class: bool = True,
                 classes: Optional[int] = None):
        self.per_class, self.classes = per_class, classes
        self.threshold: float | List[float] = check_threshold(threshold, per_class, classes)
        self._cache: Dict[Tuple[torch.device, torch.dtype], Tensor] = {}

    def decode(self, activated: Tensor) -> Tensor:
        if activated.dtype in (torch.float16, torch.bfloat16):
            activated = activated.float()  # thresholds are float32 values; half precision would round them
        if isinstance(self.threshold, float):
            return activated > self.threshold
        key = (activated.device, activated.dtype)
        t = self._cache.get(key)
        if t is None:
            t = self._cache[key] = torch.tensor(self.threshold, device=activated.device, dtype=activated.dtype)
        if activated.shape[-1] != t.shape[0]:
            raise ValueError(f"{len(self.threshold)} tuned thresholds for outputs of shape {tuple(activated.shape)}")
        return activated > t

    def params(self) -> Dict[str, JSON]:
        return {"threshold": self.threshold}

    def load_tuned(self, params: Dict[str, JSON]) -> None:
        unknown = set(params) - {"threshold"} - TUNING_INFO_KEYS
        if unknown:
            raise ValueError(f"ThresholdDecoder takes only 'threshold', got {sorted(unknown)}")
        if "threshold" in params:
            self.threshold = check_threshold(params["threshold"], self.per_class, self.classes)
            self._cache.clear()

    def fit(self, activated: Tensor, labels: Tensor, available: Tensor,
            metric: Any = "accuracy") -> Tuple[Dict[str, JSON], Dict[str, JSON]]:
        """Exact best threshold(s) on the elements where `available` holds (`dnn_cool_catalyst.tuning`),
        without changing the decoder: `({"threshold": t}, report)`, plain JSON.

        One threshold for outputs `(N,)` / `(N, 1)`, one per class for `(N, C)` (or when thresholds are
        already per class). `metric`: a name of `tuning.METRICS` or a callable on `(tp, fp, fn, tn)`.
        Report: `{"tuned": true, "metric": name, "score": value or null, "num_samples": n}`; without
        any element the current threshold and `{"tuned": false, "reason": "no samples in S_t"}`. Per
        class, `threshold`, `score` and `num_samples` are lists, `"untuned_classes"` lists the
        classes without elements (they keep their threshold) and `"tuned"` is false only when no
        class had any.
        """
        from ..tuning import as_numpy, best_threshold, best_thresholds, metric_function

        name, fn = metric_function(metric)
        a, y, w = as_numpy(activated), as_numpy(labels), as_numpy(available).astype(bool)
        # a decoder with one threshold (`per_class=False`, binary) is never per class: per-token
        # outputs `(N, T)` are T elements, not T classes
        per_class = isinstance(self.threshold, list) or (self.per_class and a.ndim >= 2 and a.shape[-1] > 1)
        if not per_class:
            a, y, w = a.reshape(-1), y.reshape(-1), w.reshape(-1)
            if not a.shape == y.shape == w.shape:
                raise ValueError(f"tune: activated {a.shape}, labels {y.shape} and available {w.shape} "
                                 "must have one element per sample")
            if not w.any():
                return self.params(), {"tuned": False, "reason": NO_SAMPLES}
            if not w.all():
                a, y = a[w], y[w]
            r = best_threshold(a, y > 0.5, fn)
            return {"threshold": r.threshold}, {"tuned": True, "metric": name, "score": _json_score(r.score),
                                                "num_samples": r.num_samples}
        c = a.shape[-1]
        if y.shape != a.shape or w.shape != a.shape:
            raise ValueError(f"tune: activated {a.shape}, labels {y.shape} and available {w.shape} must have one shape")
        current = list(self.threshold) if isinstance(self.threshold, list) else [self.threshold] * c
        if len(current) != c:
            raise ValueError(f"{len(current)} thresholds for outputs with {c} classes")
        if not w.any():
            return self.params(), {"tuned": False, "reason": NO_SAMPLES}
        found = best_thresholds(a.reshape(-1, c), y.reshape(-1, c), w.reshape(-1, c), fn)
        thresholds = [r.threshold if r is not None else current[k] for k, r in enumerate(found)]
        report = {"tuned": True, "metric": name,
                  "score": [_json_score(r.score) if r is not None else None for r in found],
                  "num_samples": [r.num_samples if r is not None else 0 for r in found],
                  "untuned_classes": [k for k, r in enumerate(found) if r is None]}
        return {"threshold": thresholds}, report

    def __getstate__(self):  # cached device tensors are not part of the state
        return {"threshold": self.threshold, "per_class": self.per_class, "classes": self.classes}

    def __setstate__(self, state):
        self.threshold = state["threshold"]
        self.per_class, self.classes = state.get("per_class", True), state.get("classes")
        self._cache = {}


def _json_score(value: float) -> Optional[float]:
    return None if math.isnan(value) or math.isinf(value) else float(value)


class SortDecoder(Decoder):
    """Indices along the last dimension sorted by declining activation (the first `top_k` only
    when `top_k` is given, as for a vocabulary)."""

    def __init__(self, top_k: Optional[int] = None):
        self.top_k = top_k

    def decode(self, activated: Tensor) -> Tensor:
        if self.top_k is None or self.top_k >= activated.shape[-1]:
            return torch.argsort(activated, dim=-1, descending=True, stable=True)
        return torch.topk(activated, self.top_k, dim=-1, sorted=True).indices


class ScaleDecoder(Decoder):
    """`activated * scale`: bounded regression back in label units."""

    def __init__(self, scale: float = 1.0):
        self.scale = float(scale)

    def decode(self, activated: Tensor) -> Tensor:
        return activated * self.scale


class ITask(abc.ABC):
    """What every task offers to the flow interpreters. Subclass it for a task of your own, or
    build a `Task(...)` from functions."""

    name: str
    module: nn.Module
    decoder: Decoder  # holds the tuned parameters; shared by the module, decoder and evaluator
    weight: float = 1.0
    # The classes' names, in the order of the last dimension of the outputs, for tasks with named
    # classes (classification, multilabel); None for any other task. Shown by the explainer, the
    # per-class metrics and the evaluation table (indices where None).
    class_names: Optional[List[str]] = None
    # How many element dimensions follow the batch dimension in the labels: 0 (the default) for
    # one label (or one label vector, multilabel) per sample; 1 for one per token, labels `(N, T)`
    # and logits `(N, T, ...)` (token tagging); 2 for a grid. Preconditions of such a task apply
    # per element where the condition task has the same element dimensions, and are broadcast from
    # a per-sample condition; loss, metrics and tuning run over its elements
    # (`functional.element_rows`). Masked language modeling keeps 0: its tokens are label elements
    # of one sample, as a multilabel task's classes are.
    element_dims: int = 0
    # A stable name of the task's kind, recorded in an export's manifest and compared when it is
    # loaded. Each predefined kind sets its own; any other subclass gets its class name (see
    # `__init_subclass__`) unless it sets `kind` itself.
    kind: str = "ITask"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" not in vars(cls):
            cls.kind = cls.__name__

    def describe(self, decoded: np.ndarray, activated: np.ndarray, logits: Optional[np.ndarray] = None, *,
                 digits: int = 4, max_values: int = 16, top_k: int = 3) -> List[str]:
        """For people: one text per sample about a batch of this task's outputs (NumPy arrays, batch
        dimension first; `logits` None when unknown); `flow.get_treelib_explainer()` tags the task's
        nodes with them. Numbers get `digits` significant digits, vectors show their first
        `max_values` values, rankings their `top_k` best entries.

        The default shows the values of each sample, flattened: `"decoded: [12.5], activated:
        [0.625], logits: [0.51]"` (`describe.describe_values`); the predefined kinds show
        thresholded decisions with their threshold (`describe.describe_decisions`) or the best
        classes by name (`describe.describe_ranked`). Override it to describe your own task's
        outputs; it works on the whole batch at once, as the explainer formats thousands of samples.
        """
        return describe_values(decoded, activated, logits, digits, max_values)

    def describe_sample(self, label: Tensor, activated: Optional[Tensor], *, digits: int = 4) -> Tuple[str, str]:
        """For people: one sample's label and prediction as short texts (`activated` None: the
        prediction is `"?"`); the interpretation callback captions the samples it ranks with them.

        The default reads the decoder: a thresholded task (`decides_by_threshold`) shows decisions,
        `"True"` / `"False (0.25)"` for one value, else the classes set (`describe.sample_decisions`);
        ranked classes (`SortDecoder`) with one label show the class names (`describe.sample_ranked`);
        any other task the label and the prediction decoded alike (`describe.sample_values`).
        Override it to describe your own task's samples.
        """
        label = torch.as_tensor(label).detach().cpu()
        activated = activated.detach().cpu() if activated is not None else None
        if self.decides_by_threshold:
            return sample_decisions(self.decode, label, activated, self.class_names, digits)
        if isinstance(getattr(self, "decoder", None), SortDecoder) and label.numel() == 1:
            return sample_ranked(self.decode, label, activated, self.class_names, digits)
        return sample_values(self.decode, label, activated, digits)

    @property
    def decides_by_threshold(self) -> bool:
        """Whether the decoded outputs are yes/no decisions `activated > threshold`, one per value of
        the last dimension (binary, multilabel): such tasks get precision-recall curves and show
        their decisions. The default: whether the decoder is a `ThresholdDecoder`."""
        return isinstance(getattr(self, "decoder", None), ThresholdDecoder)

    @property
    def can_condition(self) -> bool:
        """Whether `out.<task>` may precondition other tasks (binary tasks)."""
        return False

    @abc.abstractmethod
    def elementwise_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Unreduced loss, element shape; must be finite where labels are missing."""

    @abc.abstractmethod
    def available(self, labels: Tensor) -> Tensor:
        """Boolean tensor of element shape: the label is present."""

    @abc.abstractmethod
    def activate(self, logits: Tensor) -> Tensor:
        """Logits to activated outputs (probabilities, normalised values)."""

    @abc.abstractmethod
    def decode(self, activated: Tensor) -> Tensor:
        """Activated outputs to decoded predictions."""

    @abc.abstractmethod
    def prepare_labels(self, values: Any) -> Tensor:
        """Labels (array, tensor, list) in canonical dtype and shape; raises `LabelError`."""

    def create_metrics(self) -> List[Tuple[str, Any]]:
        """Fresh metric objects `(name, metric)` for this task."""
        return []

    def label_shape(self) -> Optional[Tuple[int, ...]]:
        """The shape of one sample's labels without the batch dimension (`()` for one label per
        sample, `(C,)` for a multilabel task with C named classes), or None where the data decides
        it (a multilabel task without `class_names`, token labels, a custom task): what
        `missing_labels` needs."""
        return None

    def missing_labels(self, n: int) -> Tensor:
        """Labels of `n` samples that are all missing, in the canonical dtype and shape: what
        `flow.get_dataset(..., partial=True)` gives a task that a source does not label. Raises
        `LabelError` when the shape is unknown (`label_shape` is None) or the task has no missing
        marker."""
        raise LabelError(f"task {self.name!r} ({type(self).__name__}) does not know the shape of its labels before "
                         "it sees some: pass all-missing labels yourself, an array of shape (N, ...) full of its "
                         "missing marker (a multilabel task knows its shape once it has class_names)")

    def label_bound(self, logits: Tensor) -> Optional[int]:
        """For labels that index the last dimension of the logits (class indices, token ids): the
        size of that dimension, which every label must stay below (the flow loss checks it before
        the loss runs: an out-of-range index is a device-side assert on CUDA); None (the default)
        for labels of any other kind."""
        return None

    def loss_group(self) -> Optional[Hashable]:
        """A key under which the flow loss may compute this task's loss together with other tasks'
        (one element loss over their batches joined along the sample dimension), or None (the
        default): computed alone.

        Tasks with equal keys promise that `elementwise_loss`, `available`, `sample_loss` and
        `label_bound` are the same functions of the logits and labels, applied sample by sample:
        on `torch.cat` of several tasks' logits and labels (equal shapes past the first dimension)
        they give the `torch.cat` of each task's own results. The predefined kinds return a key
        only while their loss is the kind's built-in one (`builtin_loss_group`); a subclass that
        overrides any of those methods, or a task whose `loss` was replaced, is computed alone."""
        return None

    def condition(self, values: Tensor, from_labels: bool) -> Tuple[Tensor, Tensor]:
        """For condition tasks: `(known, value)` boolean `(N,)` from labels or decoded outputs."""
        raise TypeError(f"task {self.name!r} cannot be used as a condition")

    def condition_not_false(self, labels: Tensor, negated: bool) -> Tensor:
        """From labels, boolean `(N,)`: where `out.<task>` (`~out.<task>` when `negated`) is not
        FALSE, i.e. the label is missing or says yes (no). Overridden by tasks that can do it in
        fewer tensor ops; the result must equal this default."""
        known, value = self.condition(labels, from_labels=True)
        return ~known | (value != negated)

    def sample_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Mean loss over each sample's available elements, `(N,)`, NaN where none is available."""
        return per_sample_mean(self.elementwise_loss(logits, labels), self.available(labels))


_GROUPED_METHODS = ("elementwise_loss", "available", "sample_loss", "label_bound")


def builtin_loss_group(task: "Task", kind: type, loss: Callable, available: Callable, key: Hashable) -> Optional[Hashable]:
    """`key` if `task` computes its loss as the predefined `kind` does: `loss` and `available` are
    its fields, no per-sample override, and `kind`'s own `_GROUPED_METHODS` (a subclass may
    override anything else, e.g. `describe`); None otherwise (`ITask.loss_group`)."""
    if task.loss is not loss or task.available_func is not available or task.per_sample_loss is not None:
        return None
    cls = type(task)
    if any(getattr(cls, m) is not getattr(kind, m) for m in _GROUPED_METHODS):
        return None
    return key


def _identity(x: Tensor) -> Tensor:
    return x


@dataclass(eq=False)
class Task(ITask):
    """A task assembled from functions; the predefined kinds are subclasses of it.

    Fields: `loss(logits, labels)` is the *elementwise* loss (finite where labels are missing, e.g.
    computed on labels with the missing marker replaced); `available_func(labels)` the boolean
    availability of each element; `per_sample_loss` an optional override of the derived per-sample
    mean; `metrics` a sequence of `(name, metric)` prototypes copied for each evaluation;
    `label_dtype` and `missing` describe the labels; `weight` scales the task's term in the flow loss.

    Example (a custom task)::

        Task(name="depth", module=nn.Linear(64, 1),
             loss=lambda logits, y: (logits.squeeze(-1) - y.nan_to_num()) ** 2,
             available_func=lambda y: ~torch.isnan(y))

    The seed's fields are accepted by keyword: `activation=None` and `decoder=None` mean the
    identity; `labels` and `inputs` are ignored with a `DeprecationWarning` (labels are given to
    `flow.get_dataset(inputs, labels)`, and the flow function names each task's input).
    """

    name: str
    module: nn.Module
    loss: Callable[[Tensor, Tensor], Tensor]
    per_sample_loss: Optional[Callable[[Tensor, Tensor], Tensor]] = None
    activation: Callable[[Tensor], Tensor] = _identity
    decoder: Decoder = field(default_factory=lambda: _IdentityDecoder())
    metrics: Sequence[Tuple[str, Any]] = ()
    available_func: Callable[[Tensor], Tensor] = nan_available
    missing: Any = math.nan
    label_dtype: torch.dtype = torch.float32
    weight: float = 1.0
    labels: InitVar[Any] = None  # the seed's fields, not kept (see the class docstring)
    inputs: InitVar[Any] = None
    element_dims: int = 0  # see `ITask.element_dims`

    def __post_init__(self, labels: Any = None, inputs: Any = None):
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"task name must be a Python identifier, got {self.name!r}")
        if self.name in _RESERVED:
            raise ValueError(f"task name {self.name!r} is reserved")
        if not isinstance(self.module, nn.Module):
            raise TypeError(f"task {self.name!r}: module must be an nn.Module, got {type(self.module).__name__}"
                            + ("" if type(self) is not Task else
                               " (Task's second field is the module; the seed's Task took labels there: "
                               "pass the fields by keyword, e.g. Task(name=..., module=..., loss=...))"))
        if isinstance(self.element_dims, bool) or not isinstance(self.element_dims, int) or self.element_dims < 0:
            raise ValueError(f"task {self.name!r}: element_dims must be a whole number >= 0 (0: one label per sample, "
                             f"1: one per token), got {self.element_dims!r}")
        if self.activation is None:  # the seed's `activation: Optional[nn.Module]`
            self.activation = _identity
        if self.decoder is None:
            self.decoder = _IdentityDecoder()
        for field_name, value, where in (
                ("labels", labels, "give labels to flow.get_dataset(inputs, {task path: labels})"),
                ("inputs", inputs, "the flow function names the task's input, e.g. flow.<task>(x.features)")):
            if value is not None:
                warnings.warn(f"Task({field_name}=...) is ignored for task {self.name!r}: {where}",
                              DeprecationWarning, stacklevel=3)

    def elementwise_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        loss = self.loss(logits, labels)
        if loss.dim() == 0 and labels.dim() > 0:
            # a reduced loss (the seed's `loss=nn.BCEWithLogitsLoss()`) would average over samples
            # outside S_t and missing labels: the flow loss must mask each element first
            raise ValueError(f"task {self.name!r}: loss(logits, labels) returned one number for the whole batch; it "
                             "must return one value per label (unreduced, e.g. nn.MSELoss(reduction='none')), which "
                             "the flow loss masks and averages over the samples where the task applies")
        return loss

    def available(self, labels: Tensor) -> Tensor:
        return self.available_func(labels)

    def activate(self, logits: Tensor) -> Tensor:
        return self.activation(logits)

    def decode(self, activated: Tensor) -> Tensor:
        return self.decoder(activated)

    def prepare_labels(self, values: Any) -> Tensor:
        return raw_labels(values, self.name).to(self.label_dtype)

    def sample_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.per_sample_loss is not None:
            return self.per_sample_loss(logits, labels)
        return ITask.sample_loss(self, logits, labels)

    def create_metrics(self) -> List[Tuple[str, Any]]:
        return [(name, copy.deepcopy(m)) for name, m in self.metrics]

    def missing_labels(self, n: int) -> Tensor:
        shape = self.label_shape()
        if shape is None:
            return ITask.missing_labels(self, n)  # its error: the shape is the data's
        values = torch.full((int(n), *shape), self.missing, dtype=torch.float64 if self.label_dtype.is_floating_point
                            else torch.int64)
        return self.prepare_labels(values)  # the task's own dtype and checks: a marker it refuses fails here


class RankedTask(Task):
    """A task whose labels index the last dimension of the logits (class indices, token ids) and
    whose decoder ranks that dimension by declining probability: what `ClassificationTask` and
    `MaskedLanguageModelingTask` share."""

    def label_bound(self, logits: Tensor) -> Optional[int]:
        return logits.shape[-1]

    def describe(self, decoded: np.ndarray, activated: np.ndarray, logits: Optional[np.ndarray] = None, *,
                 digits: int = 4, max_values: int = 16, top_k: int = 3) -> List[str]:
        """`decoded: [hoodie, polo, shirt], activated: [0.61, 0.2, 0.09], logits: [2.1, 1.0, 0.2]`: the
        `top_k` classes by declining probability (by name when the task has `class_names`); for a
        sequence (masked language modeling) the most probable token id of each position (the first
        `max_values` positions) with its probability and logit (`describe.describe_ranked`)."""
        return describe_ranked(decoded, activated, logits, self.class_names, top_k, digits, max_values)


class _IdentityDecoder(Decoder):
    def decode(self, activated: Tensor) -> Tensor:
        return activated


_RESERVED = {GT, LOGITS, ACTIVATED, DECODED, MASK, "overall"}


def _as_tensor(values: Any, name: str) -> Tensor:
    if isinstance(values, Tensor):
        return values.detach().cpu()
    try:
        arr = np.asarray(values)
    except Exception as e:  # ragged lists etc.
        raise LabelError(f"task {name!r}: cannot turn labels into an array: {e}") from None
    if arr.dtype == object:
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError):
            raise LabelError(f"task {name!r}: labels must be numeric, got an object array "
                             f"(first value {arr.flat[0]!r})") from None
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise LabelError(f"task {name!r}: labels must be numeric, got dtype {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr))


def raw_labels(values: Any, name: str) -> Tensor:
    """Labels as a CPU tensor of their own dtype, with a batch dimension."""
    t = _as_tensor(values, name)
    if t.dim() == 0:
        raise LabelError(f"task {name!r}: labels must have a batch dimension, got a scalar")
    return t


def squeeze_last(t: Tensor) -> Tensor:
    """`(N, 1)` -> `(N,)`; other shapes unchanged."""
    return t.squeeze(-1) if t.dim() == 2 and t.shape[-1] == 1 else t


def check_vector_labels(t: Tensor, name: str, element_dims: int = 0) -> Tensor:
    """Labels with one value per sample: `(N,)` or `(N, 1)` -> `(N,)`; with `element_dims` k > 0,
    one value per element: exactly `(N, *E)` with k element dimensions (`ITask.element_dims`)."""
    if element_dims:
        if t.dim() != 1 + element_dims:
            dims = ", ".join(["N", "T", "U", "V"][: 1 + element_dims]) if element_dims <= 3 else f"N and {element_dims} more"
            raise LabelError(f"task {name!r}: labels must have shape ({dims}) (element_dims={element_dims}: one label per "
                             f"element, missing or padding positions marked missing), got {tuple(t.shape)}")
        return t
    t = squeeze_last(t)
    if t.dim() != 1:
        raise LabelError(f"task {name!r}: labels must have shape (N,) or (N, 1), got {tuple(t.shape)}"
                         + (" (labels per token: give the task element_dims=1)" if t.dim() == 2 else ""))
    return t


def element_values(values: Tensor, element_dims: int) -> Tensor:
    """A one-value-per-element task's labels or outputs as `(N, *E)`: `(N, *E, 1)` (a head with one
    output) is squeezed; `(N,)` / `(N, 1)` per sample when `element_dims` is 0 (`first_column`)."""
    if element_dims == 0:
        return values if values.dim() == 1 else values.reshape(values.shape[0], values.shape[1:].numel())[:, 0]
    if values.dim() == element_dims + 2 and values.shape[-1] == 1:
        return values.squeeze(-1)
    if values.dim() != element_dims + 1:
        raise ValueError(f"values of shape {tuple(values.shape)} do not have one value per element "
                         f"(element_dims={element_dims})")
    return values



def label_position(bad: Tensor) -> Tuple[Tuple[int, ...], str]:
    """The first true position of `bad` (labels' shape) as an index tuple, and in words:
    "sample 3" for one label per sample, "[3, 7]" for labels per element."""
    pos = tuple(int(v) for v in bad.nonzero()[0])
    return pos, (f"sample {pos[0]}" if len(pos) == 1 else f"[{', '.join(map(str, pos))}]")


# float64 represents every whole number up to 2**53 exactly; beyond, a "class index" cannot be one
_LARGEST_EXACT_INDEX = 2.0 ** 53


def check_index_floats(t: Tensor, missing: Tensor, name: str, kind: str, missing_hint: str) -> None:
    """Float labels that are to become int64 indices (`kind`: "class", "token"): each one where
    `missing` is false must be a finite whole number of magnitude at most 2**53, checked *before*
    the cast (which turns inf or 1e20 into -9223372036854775808). Raises `LabelError` naming the
    task, the value and its position."""
    bad = ~missing & ~(torch.isfinite(t) & (t == t.round()) & (t.abs() <= _LARGEST_EXACT_INDEX))
    if bad.any():
        pos, where = label_position(bad)
        n = int(bad.sum())
        more = f" ({n - 1} more such label(s))" if n > 1 else ""
        raise LabelError(f"task {name!r}: {kind} label {float(t[pos])!r} at {where} is not a {kind} index (a finite "
                         f"whole number of magnitude at most 2**53){more}; fix the labels (missing: {missing_hint})")
