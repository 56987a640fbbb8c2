"""Console output that stays readable with many tasks: one line per epoch, the per-task metrics of
the best epoch at the end (every loader's, every epoch, with `verbose`), a progress bar of the
overall batch metrics."""
from __future__ import annotations

import math
import sys
import time
from collections import defaultdict
from typing import Any, Dict, List, Mapping, Optional, Tuple

from catalyst.callbacks.misc import TqdmCallback
from catalyst.loggers.console import ConsoleLogger

EPOCH_SCOPE_KEY = "_epoch_"  # Catalyst's key for metrics of no loader (`runner.epoch_metrics["_epoch_"]`)


def _number(value: Any) -> str:
    return f"{float(value):.4g}"


def stdout_is_terminal() -> bool:
    """Whether standard output is attached to a terminal (not a file, a pipe or a notebook)."""
    try:
        return bool(sys.stdout.isatty())
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def format_by_task(metrics: Dict[str, Any], prefix: str) -> str:
    """`prefix` and the metrics without a task (`loss`, `lr`) on one line, then one line per task
    path (`<path>/<metric>` keys) with that task's metrics."""
    overall: List[str] = []
    by_task: Dict[str, List[str]] = defaultdict(list)
    for key in sorted(metrics):
        path, sep, name = key.partition("/")
        if sep:
            by_task[path].append(f"{name} {_number(metrics[key])}")
        else:
            overall.append(f"{key}: {_number(metrics[key])}")
    lines = [prefix + " | ".join(overall)]
    lines += [f"  {path}: " + " | ".join(values) for path, values in by_task.items()]
    return "\n".join(lines)


def format_epoch(epoch_metrics: Mapping[str, Mapping[str, Any]], epoch: int, num_epochs: int,
                 seconds: Optional[float] = None, valid_loader: Optional[str] = None,
                 valid_metric: Optional[str] = None, best: bool = False) -> str:
    """One line for an epoch: each loader's `loss` (and `nonfinite_batches` when it has them),
    `valid_metric` of `valid_loader` when it is not the loss, the learning rate once (the epoch's,
    not the one a scheduler set for the next), and the other epoch-scope metrics (`"_epoch_"`)
    when there are any; loaders with none of these are left out.

    `Epoch 2/3 (1.2 s) | train loss 0.41 | valid loss 0.45, door_open/f1_score 0.8 | lr 0.003 | best so far`
    """
    parts = [f"Epoch {epoch}/{num_epochs}" + (f" ({seconds:.1f} s)" if seconds is not None else "")]
    lr = None
    for loader, values in epoch_metrics.items():
        if loader == EPOCH_SCOPE_KEY or not isinstance(values, Mapping):
            continue
        shown = [f"{key} {_number(values[key])}" for key in ("loss", "nonfinite_batches") if key in values]
        if loader == valid_loader and valid_metric not in (None, "loss") and valid_metric in values:
            shown.append(f"{valid_metric} {_number(values[valid_metric])}")
        if shown:
            parts.append(f"{loader} " + ", ".join(shown))
        if lr is None and "lr" in values:
            lr = values["lr"]
    extra = dict(epoch_metrics.get(EPOCH_SCOPE_KEY) or {})
    # a scheduler's epoch step leaves the next epoch's lr (and momentum) there: this epoch's is shown
    scheduled = {k: extra.pop(k) for k in list(extra) if k.split("/")[0] in ("lr", "momentum")}
    if lr is None:
        lr = scheduled.get("lr")
    if lr is not None:
        parts.append(f"lr {_number(lr)}")
    parts += [f"{key} {_number(extra[key])}" for key in sorted(extra)]
    if best:
        parts.append("best so far")
    return " | ".join(parts)


class BestEpoch:
    """The best epoch so far of a run, as the runner selects checkpoints: by its `valid_metric` on its
    `valid_loader` (Catalyst's `Runner` keeps train's arguments as `_valid_loader`, `_valid_metric`,
    `_minimize_valid_metric`), minimised unless `minimize_valid_metric=False`; and the last epoch.
    `best` and `last` are `(epoch, num_epochs, {loader: metrics})`; `best` is None while the metric
    is missing or not finite. `loader`: the selecting loader (the last one when the runner names none)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Forget the epochs (a new run)."""
        self.best: Optional[Tuple[int, int, Dict[str, Dict[str, float]]]] = None
        self.last: Optional[Tuple[int, int, Dict[str, Dict[str, float]]]] = None
        self.loader: Optional[str] = None
        self.metric: Optional[str] = None
        self._score: Optional[float] = None

    def update(self, epoch_metrics: Mapping[str, Any], runner: Any) -> bool:
        """Take an epoch's metrics (`runner.epoch_metrics`); whether it is the best so far."""
        loaders = {k: dict(v) for k, v in epoch_metrics.items() if k != EPOCH_SCOPE_KEY and isinstance(v, Mapping)}
        self.metric = getattr(runner, "_valid_metric", None)
        self.loader = getattr(runner, "_valid_loader", None) or next(reversed(list(loaders)), None)
        self.last = (runner.epoch_step, runner.num_epochs, loaders)
        score = loaders.get(self.loader, {}).get(self.metric) if self.metric is not None else None
        if score is None or not math.isfinite(float(score)):
            return False
        score = -float(score) if getattr(runner, "_minimize_valid_metric", None) is False else float(score)
        if self._score is not None and score >= self._score:
            return False
        self._score, self.best = score, self.last
        return True


class FlowConsoleLogger(ConsoleLogger):
    """Catalyst's console logger, short: one line per epoch (`format_epoch`: each loader's loss, the
    validation metric that selects checkpoints, the learning rate, the epoch's time), and at the end
    of the run the per-task metrics of the validation loader at its best epoch (by the runner's
    `valid_metric`; the last epoch when there is none), one line per task (`format_by_task`).
    `verbose=True` prints every loader's per-task metrics at every epoch instead.
    Catalyst's empty `* Epoch (1/3)` line is not printed."""

    def __init__(self, verbose: bool = False, log_hparams: bool = False):
        super().__init__(log_hparams=log_hparams)
        self.verbose = bool(verbose)
        self._start_run()

    def _start_run(self) -> None:
        self._epoch_started = time.monotonic()
        self._epochs = BestEpoch()
        self._summarised = False

    def log_hparams(self, hparams: Dict, runner: Any = None) -> None:
        # Catalyst calls this once when a run starts (FlowRunner's on_experiment_start): a new run
        super().log_hparams(hparams, runner)
        self._start_run()

    def log_metrics(self, metrics: Dict[str, Any], scope: str, runner: Any) -> None:
        if scope == "loader" and self.verbose:
            print(format_by_task(metrics, f"{runner.loader_key} ({runner.epoch_step}/{runner.num_epochs}) "))
        elif scope == "epoch":
            self._log_epoch(metrics, runner)

    def _log_epoch(self, metrics: Mapping[str, Any], runner: Any) -> None:
        now = time.monotonic()
        seconds, self._epoch_started = now - self._epoch_started, now
        epochs = self._epochs
        best = epochs.update(metrics, runner) and runner.num_epochs > 1
        print(format_epoch(metrics, runner.epoch_step, runner.num_epochs, seconds, epochs.loader, epochs.metric, best))

    def close_log(self) -> None:
        """At the end of a run: the validation loader's per-task metrics at its best (else last) epoch,
        unless `verbose` printed them at every epoch."""
        super().close_log()
        epochs = self._epochs
        if self.verbose or epochs.last is None or self._summarised:
            return
        self._summarised = True  # once per run (the loggers may be closed again)
        loader = epochs.loader
        if epochs.best is not None and epochs.best[1] > 1:
            epoch, num_epochs, values = epochs.best
            prefix = f"{loader} at the best epoch {epoch}/{num_epochs} (by {epochs.metric}): "
        else:
            epoch, num_epochs, values = epochs.last
            prefix = f"{loader} ({epoch}/{num_epochs}) "
        if loader in values:
            print(format_by_task(values[loader], prefix))


class FlowProgressBar(TqdmCallback):
    """Catalyst's progress bar showing only the batch metrics without a task (`loss`, `lr`, ...):
    per-task values of many tasks do not fit on a line (they reach the loggers all the same)."""

    def on_batch_end(self, runner: Any) -> None:
        if runner.engine.process_index > 0:
            return
        shown = {k: float(v) for k, v in runner.batch_metrics.items() if "/" not in k or k.startswith("_timer/")}
        self.tqdm.set_postfix(**{k: f"{v:3.3f}" if abs(v) > 1e-3 else f"{v:1.3e}" for k, v in sorted(shown.items())})
        self.tqdm.update()
