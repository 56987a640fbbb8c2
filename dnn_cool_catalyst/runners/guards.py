"""What `FlowRunner` checks around Catalyst's events, so that a bad run fails at once and by name.

- `NonFiniteLossGuard`: a batch whose loss is NaN or infinite stops the run before any callback
  sees it (no backward pass, no optimizer step, no metrics), with an error naming the loader, the
  batch, the tasks whose loss terms are not finite and the inputs holding NaN/inf; or, with
  `nonfinite="skip"`, the batch is left out, counted (loader metric `nonfinite_batches`) and
  reported in a warning at the loader's end. Never trained on silently.
- `ValidMetricGuard`: `valid_metric` (and the `metric_key` of every callback that reads a loader
  metric, e.g. the checkpoint or early stopping) is checked before the first batch against the
  metrics the callbacks will produce, when all of them are known; otherwise when the loader ends,
  before anything reads it.
- `LoaderLossCallback`: a loader `loss` where `FlowMetricsCallback` is switched off, so that the
  default checkpoint (which selects by `loss`) still works.

Cost of the non-finite check: on the CPU the loss is looked at every batch (a read, no wait). On
an accelerator, waiting for the device at every batch would stall the queue of work, so in
"raise" mode each batch's `isfinite` is read when the next batch ends (or at the loader's end):
the error then comes one batch late, after the bad batch's optimizer step, and before any
checkpoint of that epoch. "skip" mode must know before the step: it reads `isfinite(loss)` every
batch (one device sync per batch), and under DDP takes the processes' verdicts together (one
small `all_reduce` per batch) so that every process skips the same batches.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from catalyst import dl
from catalyst.core.callback import Callback, CallbackOrder
from catalyst.core.misc import callback_isinstance
from torch import Tensor

from .. import distributed
from ..callbacks import BalancerCallback, FlowMetricsCallback, InterpretationCallback, ThresholdTuningCallback
from ..callbacks.common import resolve_callback_flow
from ..errors import NonFiniteLossError, capped, did_you_mean
from ..keys import GT, INDEX, INPUTS, LOGITS, LOSS_TERMS, TARGETS
from . import compat

NONFINITE_MODES = ("raise", "skip")
#: The loader metric counting the batches skipped with `nonfinite="skip"`.
NONFINITE_METRIC = "nonfinite_batches"
# Non-finite losses --------------------------------------------------------------------------------


@dataclass
class _Seen:
    """A batch whose loss was looked at (or waits to be): where it was, and its parts."""

    loader: str
    batch: int
    epoch: int
    loss: Any
    parts: Mapping[str, Any]
    finite: Any = None  # a bool, or a 0-dim bool tensor not read yet (lagged)
    others: bool = False  # finite here, not in another process (DDP, skip mode)
    described: Optional[str] = field(default=None, repr=False)


class NonFiniteLossGuard:
    """Looks at each batch's loss (`runner.batch_metrics["loss"]`) after `handle_batch`, before
    the callbacks' `on_batch_end`.

    `mode="raise"` (default): a `NonFiniteLossError` at the first batch whose loss is not finite.
    `mode="skip"`: the batch is not passed to the callbacks (the runner skips its `on_batch_end`),
    `nonfinite_batches` is set in the loader's metrics and a warning lists the skipped batches at
    the loader's end; a loader whose every batch was skipped is an error. `lagged` (default: on
    anything but the CPU in "raise" mode) reads each batch's verdict one batch later (see the
    module's docstring).
    """

    def __init__(self, mode: str = "raise", lagged: Optional[bool] = None):
        if mode not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {mode!r}")
        if lagged and mode == "skip":
            raise ValueError("nonfinite='skip' must know a batch's verdict before its optimizer step: it cannot be lagged")
        self.mode = mode
        self.lagged = lagged
        self._batches = 0
        self._skipped: List[_Seen] = []
        self._pending: Optional[_Seen] = None

    def before(self, event: str, runner: Any) -> bool:
        """Called before Catalyst runs `event`; False: skip the event (a batch left out)."""
        if event == "on_loader_start":
            self._batches, self._skipped, self._pending = 0, [], None
        elif event == "on_batch_end":
            return self._admit(runner)
        elif event == "on_loader_end":
            self._end_loader(runner)
        return True

    def _admit(self, runner: Any) -> bool:
        self._batches += 1
        loss = runner.batch_metrics.get("loss") if isinstance(runner.batch_metrics, Mapping) else None
        if loss is None:  # a loader without labels: no loss to look at
            return True
        seen = _Seen(runner.loader_key, self._batches, getattr(runner, "epoch_step", 0), loss,
                     runner.batch if isinstance(runner.batch, Mapping) else {})
        if not isinstance(loss, Tensor):
            seen.finite = math.isfinite(float(loss))
        else:
            finite = torch.isfinite(loss.detach()).all()
            lagged = self.lagged if self.lagged is not None else (self.mode == "raise" and finite.device.type != "cpu")
            if lagged:
                self._check_pending(runner)
                seen.finite, self._pending = finite, seen
                return True
            if self.mode == "skip" and distributed.world_size() > 1:
                seen.finite, seen.others = self._agree(finite)
            else:
                seen.finite = bool(finite)
        if seen.finite and not seen.others:
            return True
        if self.mode == "raise":
            raise NonFiniteLossError(self._message(seen, runner))
        seen.described = _describe(seen, runner, lagged=False)
        self._skipped.append(seen)
        return False

    @staticmethod
    def _agree(finite: Tensor) -> Tuple[bool, bool]:
        """(this process's verdict, whether only another process's loss was not finite)."""
        import torch.distributed as dist

        bad = (~finite).to(torch.int32).reshape(1)
        anywhere = bad.clone()
        dist.all_reduce(anywhere, op=dist.ReduceOp.MAX)
        here = bool(bad)
        return not here, bool(anywhere) and not here

    def _check_pending(self, runner: Any) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and not bool(pending.finite):
            raise NonFiniteLossError(self._message(pending, runner, lagged=True))

    def _end_loader(self, runner: Any) -> None:
        self._check_pending(runner)
        if self.mode != "skip":
            return
        runner.loader_metrics[NONFINITE_METRIC] = float(len(self._skipped))
        if not self._skipped:
            return
        if len(self._skipped) == self._batches:
            raise NonFiniteLossError(
                f"FlowRunner: the loss of every batch ({self._batches}) of loader {runner.loader_key!r} "
                f"(epoch {getattr(runner, 'epoch_step', 0)}) was not finite, so all were skipped "
                f"(nonfinite='skip'); the first: {self._skipped[0].described}")
        listed = "; ".join(s.described for s in self._skipped[:3])
        more = f"; and {len(self._skipped) - 3} more" if len(self._skipped) > 3 else ""
        warnings.warn(f"FlowRunner: skipped {len(self._skipped)} batch(es) of loader {runner.loader_key!r} "
                      f"(epoch {getattr(runner, 'epoch_step', 0)}) whose loss was not finite (nonfinite='skip'; "
                      f"no backward pass, optimizer step or metrics for them; loader metric "
                      f"{NONFINITE_METRIC!r}): {listed}{more}", UserWarning, stacklevel=2)

    def _message(self, seen: _Seen, runner: Any, lagged: bool = False) -> str:
        return (f"FlowRunner: {_describe(seen, runner, lagged)}. Fix or drop those samples, or pass "
                f"nonfinite='skip' to FlowRunner.train to leave such batches out (no backward pass, no "
                f"optimizer step; counted as the loader metric {NONFINITE_METRIC!r})")


def nonfinite_parameters(model: torch.nn.Module) -> List[str]:
    """The state-dict names of `model`'s floating-point entries (parameters, and buffers such as
    BatchNorm's running statistics) holding NaN or inf. State-dict names, not `named_parameters`:
    a fused head group (`flow.torch(fuse=True)`) is one parameter, but its state dict names each
    task's rows, so the task whose head diverged is named."""
    return [name for name, t in model.state_dict(keep_vars=True).items()
            if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all())]


def _describe(seen: _Seen, runner: Any, lagged: bool) -> str:
    """What is not finite in a batch: the loss, the tasks' terms, inputs (rows and dataset
    indices), infinite labels, and with finite inputs the model's non-finite parameters."""
    loss = seen.loss.detach().float().reshape(-1)[:1].item() if isinstance(seen.loss, Tensor) else float(seen.loss)
    where = f"batch {seen.batch} of loader {seen.loader!r} (epoch {seen.epoch})"
    if distributed.world_size() > 1:  # batches are counted in each process
        where = f"{where[:-1]}, process {distributed.rank()})"
    if seen.others:
        return f"the loss of {where} was not finite in another process (the batch is skipped in every process)"
    text = f"the loss of {where} is not finite (loss {loss})"
    terms = seen.parts.get(LOSS_TERMS)
    if isinstance(terms, Mapping):
        bad = [p for p in terms if not bool(torch.isfinite(torch.as_tensor(terms[p][0])).all())]
        text += f"; task(s) whose loss terms are not finite: [{capped(bad, 20)}]"
    else:
        text += "; the criterion gives no per-task terms"
    x = seen.parts.get(INPUTS)
    x = x if isinstance(x, Mapping) else {}
    index = x.get(INDEX)
    inputs = [(f"X[{k!r}]", rows) for k, rows in _nonfinite_rows(x, skip=(INDEX, GT), infinite_only=False)]
    if inputs:
        text += "; the inputs hold NaN/inf: " + "; ".join(
            f"{name} in row(s) [{capped(rows)}] of the batch{_dataset_index(index, rows)}" for name, rows in inputs)
    else:
        text += "; the inputs (X) are finite"
    labels = seen.parts.get(TARGETS)
    for path, rows in _nonfinite_rows(labels if isinstance(labels, Mapping) else {}, infinite_only=True):
        text += f"; the labels (y) of {path!r} are infinite in row(s) [{capped(rows)}]{_dataset_index(index, rows)}"
    if lagged:
        device = seen.loss.device.type if isinstance(seen.loss, Tensor) else "device"
        text += (f". (On {device} the loss is checked one batch late, so as not to wait for the device at every "
                 f"batch: the model took this batch's optimizer step; no checkpoint of this epoch was written)")
    elif not inputs:
        model = getattr(runner, "model", None)
        params = nonfinite_parameters(model) if isinstance(model, torch.nn.Module) else []
        if params:
            text += (f"; the model's parameters [{capped(params)}] are not finite (training diverged: lower the "
                     f"learning rate, clip gradients)")
        else:
            text += "; the model's parameters are finite (an overflow in the model or the loss? e.g. half precision)"
    return text


def _nonfinite_rows(tree: Mapping[str, Any], skip: Iterable[str] = (), infinite_only: bool = False,
                    prefix: str = "") -> List[Tuple[str, List[int]]]:
    """`[(key, rows)]` of the floating tensors of a (nested) mapping holding NaN/inf (or only
    infinite values: NaN marks a missing label) in some rows."""
    found: List[Tuple[str, List[int]]] = []
    for key, value in tree.items():
        if key in skip:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            found += _nonfinite_rows(value, infinite_only=infinite_only, prefix=f"{name}/")
        elif isinstance(value, Tensor) and value.is_floating_point() and value.dim() > 0:
            bad = torch.isinf(value) if infinite_only else ~torch.isfinite(value)
            rows = torch.nonzero(bad.reshape(value.shape[0], -1).any(1)).reshape(-1).tolist()
            if rows:
                found.append((name, rows))
    return found


def _dataset_index(index: Any, rows: List[int]) -> str:
    if not isinstance(index, Tensor) or index.dim() != 1:
        return ""
    return f" (dataset index [{capped([int(index[r]) for r in rows if r < len(index)])}])"


# valid_metric -------------------------------------------------------------------------------------

#: Callbacks that put no metrics of their own on the valid loader (beyond those `known_metrics`
#: lists; `BalancerCallback` logs its weights on the training loaders only).
_SILENT = (InterpretationCallback, BalancerCallback, dl.IBackwardCallback, dl.ISchedulerCallback, dl.ICheckpointCallback,
           dl.ICriterionCallback, dl.TqdmCallback, dl.TimerCallback, dl.CheckRunCallback, dl.BatchOverfitCallback,
           dl.ProfilerCallback, dl.EarlyStoppingCallback)


@dataclass
class KnownMetrics:
    """The loader metrics the callbacks will produce: exact names, prefixes of names that depend
    on what happens (tuned parameters, several optimizers), and whether every callback is known."""

    names: List[str]
    prefixes: List[str]
    complete: bool

    def allows(self, name: str) -> bool:
        return name in self.names or any(name.startswith(p) for p in self.prefixes) or not self.complete


def known_metrics(runner: Any, nonfinite: str = "raise") -> KnownMetrics:
    """What the runner's callbacks (`runner.callbacks`) will put into `runner.loader_metrics`."""
    names: Dict[str, None] = {}
    prefixes: List[str] = []
    complete = True
    for callback in runner.callbacks.values():
        if callback_isinstance(callback, FlowMetricsCallback):
            flow = resolve_callback_flow(getattr(callback, "flow", None), runner, "FlowMetricsCallback")
            names.update(dict.fromkeys(["loss", *(f"{p}/loss" for p in flow.graph.paths),
                                        *(tm.key for tm in flow.get_metrics())]))
        elif callback_isinstance(callback, ThresholdTuningCallback):
            flow = resolve_callback_flow(getattr(callback, "flow", None), runner, "ThresholdTuningCallback")
            prefixes += [f"{p}/tuned/" for p in flow.graph.paths]
        elif callback_isinstance(callback, LoaderLossCallback):
            names["loss"] = None
        elif callback_isinstance(callback, dl.IOptimizerCallback):
            names.update(dict.fromkeys(["lr", "momentum"] if compat.logs_momentum_metric(callback, runner) else ["lr"]))
            prefixes += ["lr/", "momentum/"]  # with an optimizer_key
        elif not callback_isinstance(callback, _SILENT):
            complete = False
    if nonfinite == "skip":
        names[NONFINITE_METRIC] = None
    return KnownMetrics(list(names), prefixes, complete)


class ValidMetricGuard:
    """Checks the loader metrics that will be read: `valid_metric` on `valid_loader` when given,
    and the `(loader_key, metric_key)` of every callback that has both (the checkpoint, a plateau
    scheduler, early stopping). Before the first batch when every callback's metrics are known
    (`known_metrics`); otherwise at the end of each such loader, before anything reads it (the
    checkpoint and early stopping read at the epoch's end)."""

    def __init__(self, valid_loader: Optional[str] = None, valid_metric: Optional[str] = None, nonfinite: str = "raise"):
        self.valid_loader, self.valid_metric, self.nonfinite = valid_loader, valid_metric, nonfinite
        self._reads: Dict[Tuple[str, str], str] = {}

    def after(self, event: str, runner: Any) -> None:
        """Called after Catalyst ran `event`."""
        if event == "on_experiment_start":
            self._check_known(runner)
        elif event == "on_loader_end":
            self._check_produced(runner)

    def _check_known(self, runner: Any) -> None:
        reads: Dict[Tuple[str, str], str] = {}
        if self.valid_metric is not None and self.valid_loader is not None:
            reads[(self.valid_loader, self.valid_metric)] = "valid_metric"
        for key, callback in runner.callbacks.items():
            loader, metric = getattr(callback, "loader_key", None), getattr(callback, "metric_key", None)
            if isinstance(loader, str) and isinstance(metric, str):
                reads.setdefault((loader, metric), f"metric_key of {type(callback).__name__} ({key!r})")
        self._reads = reads
        loaders = list(getattr(runner, "loaders", None) or {})
        known = known_metrics(runner, self.nonfinite)
        for (loader, metric), who in reads.items():
            if loaders and loader not in loaders:
                raise ValueError(f"{who} reads metric {metric!r} of loader {loader!r}, which is not one of the "
                                 f"loaders {loaders}")
            if not known.allows(metric):
                raise ValueError(f"{who} {metric!r} is not a metric the callbacks produce on loader {loader!r}"
                                 f"{did_you_mean(metric, known.names, listed=0)}; "
                                 f"they produce [{capped(known.names, 40)}]"
                                 f"{' and [' + capped(known.prefixes) + ']...' if known.prefixes else ''}")

    def _check_produced(self, runner: Any) -> None:
        for (loader, metric), who in self._reads.items():
            produced = list(runner.loader_metrics)
            if loader == runner.loader_key and metric not in produced:
                raise ValueError(f"{who} {metric!r}: loader {loader!r} produced no metric {metric!r}"
                                 f"{did_you_mean(metric, produced, listed=0)}; "
                                 f"it produced [{capped(sorted(produced), 40)}]")


# The guards together, as the runner calls them -----------------------------------------------------


class RunGuards:
    """The guards of one `FlowRunner.train`, called around each of Catalyst's events."""

    def __init__(self, nonfinite: str = "raise", valid_loader: Optional[str] = None, valid_metric: Optional[str] = None):
        self.nonfinite = NonFiniteLossGuard(nonfinite)
        self.valid_metric = ValidMetricGuard(valid_loader, valid_metric, nonfinite)

    def before(self, event: str, runner: Any) -> bool:
        """False: Catalyst must not run `event` (a batch left out)."""
        return self.nonfinite.before(event, runner)

    def after(self, event: str, runner: Any) -> None:
        """Called after Catalyst ran `event`."""
        self.valid_metric.after(event, runner)


# A loader loss without FlowMetricsCallback ---------------------------------------------------------


class LoaderLossCallback(Callback):
    """`loss` in each loader's metrics: the mean of the batch losses weighted by batch size
    (accumulated on the loss's device, read once at the loader's end; summed over the processes
    under DDP). `FlowRunner` adds it when there is no `FlowMetricsCallback` (whose loader loss is
    exact), so that checkpoint selection by `loss` works with `flow_metrics=False`."""

    def __init__(self):
        super().__init__(order=CallbackOrder.Metric)
        self._sum: Any = None
        self._count = 0

    def on_loader_start(self, runner: Any) -> None:
        self._sum, self._count = None, 0

    def on_batch_end(self, runner: Any) -> None:
        loss = runner.batch_metrics.get("loss")
        if loss is None:
            return
        n = int(runner.batch_size)
        value = loss.detach().to(torch.float64) * n if isinstance(loss, Tensor) else float(loss) * n
        self._sum = value if self._sum is None else self._sum + value
        self._count += n

    def on_loader_end(self, runner: Any) -> None:
        if distributed.world_size() > 1:
            import torch.distributed as dist

            device = distributed.collective_device(self._sum.device if isinstance(self._sum, Tensor) and
                                                   self._sum.device.type == "cuda" else None)
            total = torch.tensor([float(self._sum) if self._sum is not None else 0.0, float(self._count)],
                                 dtype=torch.float64, device=device)
            dist.all_reduce(total)
            self._sum, self._count = float(total[0]), int(total[1])
        if self._count and "loss" not in runner.loader_metrics:
            runner.loader_metrics["loss"] = float(self._sum) / self._count

