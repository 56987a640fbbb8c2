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
    `valid_metric` of `valid_loader` when it is not the loss, the learning rate once, and the
    epoch-scope metrics (`"_epoch_"`) when there are any; loaders with none of these are left out.

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
    if lr is not None:
        parts.append(f"lr {_number(lr)}")
    extra = epoch_metrics.get(EPOCH_SCOPE_KEY) or {}
    parts += [f"{key} {_number(extra[key])}" for key in sorted(extra)]
    if best:
        parts.append("best so far")
    return " | ".join(parts)


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
        self._best: Optional[Tuple[float, int, int, Dict[str, float]]] = None  # score, epoch, num_epochs, metrics
        self._last: Optional[Tuple[int, int, Dict[str, float]]] = None
        self._selection: Tuple[Optional[str], Optional[str]] = (None, None)

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
        loader = getattr(runner, "_valid_loader", None)  # Catalyst's Runner keeps train's arguments so
        metric = getattr(runner, "_valid_metric", None)
        minimize = getattr(runner, "_minimize_valid_metric", None)
        values = metrics.get(loader) if loader is not None else None
        score = values.get(metric) if isinstance(values, Mapping) and metric is not None else None
        best = False
        if score is not None and math.isfinite(float(score)):
            score = float(score) if minimize is not False else -float(score)
            best = self._best is None or score < self._best[0]
            if best:
                self._best = (score, runner.epoch_step, runner.num_epochs, dict(values))
        if loader is None:  # a runner that does not say which loader validates: the last one
            loader = next((k for k in reversed(list(metrics)) if k != EPOCH_SCOPE_KEY), None)
        self._selection = (loader, metric)
        if loader is not None and isinstance(metrics.get(loader), Mapping):
            self._last = (runner.epoch_step, runner.num_epochs, dict(metrics[loader]))
        several = runner.num_epochs > 1 and self._best is not None
        print(format_epoch(metrics, runner.epoch_step, runner.num_epochs, seconds, loader, metric, best and several))

    def close_log(self) -> None:
        """At the end of a run: the validation loader's per-task metrics at its best (else last) epoch,
        unless `verbose` printed them at every epoch."""
        super().close_log()
        if self.verbose or self._last is None:
            return
        loader, metric = self._selection
        if self._best is not None and self._best[2] > 1:
            _, epoch, num_epochs, values = self._best
            prefix = f"{loader} at the best epoch {epoch}/{num_epochs} (by {metric}): "
        else:
            epoch, num_epochs, values = self._last
            prefix = f"{loader} ({epoch}/{num_epochs}) "
        print(format_by_task(values, prefix))
        self._last = None  # once per run (Catalyst may close the loggers again)


class FlowProgressBar(TqdmCallback):
    """Catalyst's progress bar showing only the batch metrics without a task (`loss`, `lr`, ...):
    per-task values of many tasks do not fit on a line (they reach the loggers all the same)."""

    def on_batch_end(self, runner: Any) -> None:
        if runner.engine.process_index > 0:
            return
        shown = {k: float(v) for k, v in runner.batch_metrics.items() if "/" not in k or k.startswith("_timer/")}
        self.tqdm.set_postfix(**{k: f"{v:3.3f}" if abs(v) > 1e-3 else f"{v:1.3e}" for k, v in sorted(shown.items())})
        self.tqdm.update()
