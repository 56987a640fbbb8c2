"""`FlowTensorboardLogger`: Catalyst's TensorBoard logger plus text, precision-recall curves and the
run's hyperparameters, written through `RunWriter`s.

`RunWriter` is one run's event file written in the calling thread by tensorboardX's own synchronous
`EventsWriter` (its file names, record framing and CRC-32C; the checksums by the native `crc32c`
package, a dependency of this package, without which tensorboardX computes them byte by byte in
Python). The summaries are built by tensorboardX's `tensorboardX.summary` functions, as its
`SummaryWriter.add_*` methods build them. What tensorboardX lacks is here: `RunWriter.add_scalars`
(many scalars at one step, the events of `add_scalar` built directly) and `pr_curve_data` (the data
of `add_pr_curve`, one `bincount` per row).

Why not `SummaryWriter` itself: it sends every event through a `multiprocessing.Queue` to a writer
thread (pickled, piped, unpickled), about 0.1 ms of CPU per event in those threads, 15-20 ms per
epoch for the ~170 events a flow of 16 tasks logs, against about 2 ms written here (see
benchmarks/README.md, callbacks_overhead); and each of its `FileWriter`s registers an exit handler
of its own.

Exit: `FlowTensorboardLogger.close_log` (Catalyst calls it at the end of a run) closes its writers.
Writers still open when the interpreter exits (a run that raised, a logger never closed) are closed
by one exit handler for all of them (`_close_open_writers`, registered with the first writer), so
what they hold reaches the files, as tensorboardX does.
"""
from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from typing import Any, Dict, Mapping, Optional

import numpy as np
from catalyst.loggers.tensorboard import TensorboardLogger
from catalyst.settings import SETTINGS
# tensorboardX 2.6.5: `EventsWriter` is the synchronous writer that its `SummaryWriter`'s thread calls;
# public by name but not exported from `tensorboardX` itself, so tests/runners/test_tensorboard.py
# compares our files with `SummaryWriter`'s event by event, read back by TensorBoard's own loader.
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.proto.summary_pb2 import Summary
from tensorboardX.summary import hparams as hparams_summaries
from tensorboardX.summary import image as image_summary
from tensorboardX.summary import pr_curve_raw, text as text_summary

from .console import BestEpoch

HPARAMS_RUN = "hparams"  # the run (directory) of the hyperparameters and the best epoch's metrics
EPOCH_RUN = "_epoch_"  # Catalyst's key of the epoch-level metrics (scope "epoch"), a run of its own
MAX_PR_THRESHOLDS = 127  # as tensorboardX's `pr_curve_raw` (more breaks its protobuf)

_open_writers: "weakref.WeakSet[RunWriter]" = weakref.WeakSet()
_exit_handler_lock = threading.Lock()
_exit_handler_registered = False


def _close_open_writers() -> None:
    """At exit: close every `RunWriter` still open (one handler for all of them)."""
    for writer in list(_open_writers):
        writer.close()


def _register_exit_handler() -> None:
    global _exit_handler_registered
    with _exit_handler_lock:
        if not _exit_handler_registered:
            atexit.register(_close_open_writers)
            _exit_handler_registered = True


class RunWriter:
    """The event file of one TensorBoard run (a directory): `events.out.tfevents.<time>.<host>` in
    `logdir`, written by tensorboardX's `EventsWriter` in the calling thread; the summaries are
    tensorboardX's (`add_text`, `add_image`, `add_pr_curve_raw` write what `SummaryWriter`'s methods
    of those names write). Events reach the file at `flush()` (which also syncs it to disk), at the
    first event `flush_secs` after the last flush, and at `close()`; after `close()` the next event
    opens a new file, as tensorboardX's writers do."""

    def __init__(self, logdir: str, flush_secs: float = 120):
        self.logdir = str(logdir)
        self.flush_secs = float(flush_secs)
        self._events: Optional[EventsWriter] = None
        self._last_flush = time.monotonic()
        self._open()

    def _open(self) -> EventsWriter:
        if self._events is None:
            os.makedirs(self.logdir, exist_ok=True)
            self._events = EventsWriter(os.path.join(self.logdir, "events"))  # writes the file-version event
            _register_exit_handler()
            _open_writers.add(self)
        return self._events

    def add_summary(self, summary: Summary, global_step: Optional[int] = None) -> None:
        """One event with `summary` at `global_step` and the current wall time."""
        event = Event(summary=summary, wall_time=time.time())
        if global_step is not None:
            event.step = int(global_step)
        self._open().write_event(event)
        if time.monotonic() - self._last_flush >= self.flush_secs:
            self.flush()

    def add_scalars(self, values: Mapping[str, float], global_step: Optional[int] = None) -> None:
        """`add_scalar(tag, value, global_step)` of tensorboardX for each item: the same events, one per
        value, built directly (its `add_scalar` spends most of its time checking and converting one
        value)."""
        for tag, value in values.items():
            self.add_summary(Summary(value=[Summary.Value(tag=tag, simple_value=float(value))]), global_step)

    def add_text(self, tag: str, text: str, global_step: Optional[int] = None) -> None:
        """Markdown `text` under `tag` (TensorBoard's TEXT tab)."""
        self.add_summary(text_summary(tag, text), global_step)

    def add_image(self, tag: str, image: np.ndarray, global_step: Optional[int] = None) -> None:
        """An RGB `image` of shape (height, width, 3), uint8 or floats in [0, 1], as a PNG."""
        self.add_summary(image_summary(tag, image, dataformats="HWC"), global_step)

    def add_pr_curve_raw(self, tag: str, curve: np.ndarray, global_step: Optional[int] = None) -> None:
        """A precision-recall curve from its rows `tp, fp, tn, fn, precision, recall` (`pr_curve_data`)."""
        self.add_summary(pr_curve_raw(tag, *curve, num_thresholds=curve.shape[1]), global_step)

    def flush(self) -> None:
        """Write what is buffered and sync the file to disk."""
        if self._events is not None:
            self._events.flush()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Flush and close the file (the next event opens a new one)."""
        if self._events is not None:
            events, self._events = self._events, None
            _open_writers.discard(self)
            events.close()


# The logger ---------------------------------------------------------------------------------------------------------


def _flat(values: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}/"))
        elif value is not None:
            out[f"{prefix}{key}"] = value if isinstance(value, (bool, str, int, float)) else str(value)
    return out


def _train_batch_size(runner: Any) -> Optional[int]:
    loaders = getattr(runner, "loaders", None) or {}
    loader = next((v for k, v in loaders.items() if str(k).startswith("train")), None)
    for source in (loader, getattr(loader, "batch_sampler", None)):
        size = getattr(source, "batch_size", None)
        if isinstance(size, int):
            return size
    return None


def run_hparams(runner: Any, given: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """A run's hyperparameters for TensorBoard's HPARAMS tab: what the runner knows (`flow` name,
    `num_tasks`, `optimizer` class, its initial `lr`, `batch_size` of the train loader, `num_epochs`,
    `seed`, `valid_metric`), then `given` (`train(hparams=...)`, nested keys as `a/b`; its values win).
    Values other than numbers, booleans and strings are written as strings; None is left out."""
    known: Dict[str, Any] = {}
    flow = getattr(runner, "flow", None)
    if flow is not None:
        known["flow"] = getattr(flow, "name", None)
        known["num_tasks"] = len(flow.graph.paths)
    optimizer = getattr(runner, "optimizer", None)
    if hasattr(getattr(optimizer, "optimizer", None), "param_groups"):  # accelerate's AcceleratedOptimizer
        optimizer = optimizer.optimizer
    if isinstance(getattr(optimizer, "defaults", None), Mapping):
        known["optimizer"] = type(optimizer).__name__
        known["lr"] = optimizer.defaults.get("lr")
    known["batch_size"] = _train_batch_size(runner)
    known["num_epochs"] = getattr(runner, "num_epochs", None)
    known["seed"] = getattr(runner, "seed", None)
    known["valid_metric"] = getattr(runner, "_valid_metric", None)
    return _flat({**known, **dict(given or {})})


def best_epoch_metrics(epochs: BestEpoch) -> Dict[str, float]:
    """The HPARAMS tab's metrics: `best/<loader>/loss` of every loader and `best/<valid loader>/<valid
    metric>` at the best epoch so far, and `best/epoch`; `final/...` of the last epoch when no epoch
    could be ranked (no valid metric)."""
    if epochs.best is not None:
        prefix, (epoch, _, loaders) = "best", epochs.best
    elif epochs.last is not None:
        prefix, (epoch, _, loaders) = "final", epochs.last
    else:
        return {}
    out = {f"{prefix}/{loader}/loss": values["loss"] for loader, values in loaders.items() if "loss" in values}
    selecting = loaders.get(epochs.loader, {})
    if epochs.metric in selecting:
        out[f"{prefix}/{epochs.loader}/{epochs.metric}"] = selecting[epochs.metric]
    out[f"{prefix}/epoch"] = float(epoch)
    return out


def pr_curve_data(labels: np.ndarray, scores: np.ndarray, num_thresholds: int = 127) -> np.ndarray:
    """Rows `tp, fp, tn, fn, precision, recall` at `num_thresholds` thresholds, exactly as
    tensorboardX's `add_pr_curve` computes them for boolean `labels` and `scores` clipped to [0, 1]
    (its `compute_curve`), with one `bincount` per row instead of two weighted histograms.
    Scores that are not finite fall outside every bucket there, and are left out here too."""
    labels = np.asarray(labels).astype(bool).reshape(-1).astype(float)
    scores = np.clip(np.asarray(scores, dtype=np.float64).reshape(-1), 0, 1)
    finite = np.isfinite(scores)
    if not finite.all():
        labels, scores = labels[finite], scores[finite]
    bucket = np.floor(scores * (num_thresholds - 1)).astype(np.int64)
    tp = np.cumsum(np.bincount(bucket, weights=labels, minlength=num_thresholds)[::-1])[::-1]
    fp = np.cumsum(np.bincount(bucket, weights=1.0 - labels, minlength=num_thresholds)[::-1])[::-1]
    tn = fp[0] - fp
    fn = tp[0] - tp
    precision = tp / np.maximum(1e-7, tp + fp)
    recall = tp / np.maximum(1e-7, tp + fn)
    return np.stack((tp, fp, tn, fn, precision, recall))


class FlowTensorboardLogger(TensorboardLogger):
    """Catalyst's `TensorboardLogger` (scalars per loader under `<logdir>/<loader>/`, images), plus
    `log_text` (markdown) and `log_pr_curve`, both at the current epoch in the current loader's run,
    and the run's hyperparameters for TensorBoard's HPARAMS tab. `FlowRunner` adds one under
    `<logdir>/tensorboard` when no TensorBoard logger is given.

    Scalar tags are the metric keys as they are, `<path>/<metric>` (and `loss`, `lr`) at each epoch,
    which puts every task's values in a group of their own, with the loaders' curves overlaid (one
    run per loader); batch values (`log_batch_metrics=True`) are `<key>/batch`. (Catalyst's logger
    tags epoch values `<key>/epoch`.)
    `FlowMetricsCallback` adds, per loader that does not train, PR curves (`<path>/pr_curve`, per
    class `<path>/pr_curve/<class>` for multilabel tasks) and confusion-matrix images
    (`<path>/confusion_matrix`, through `log_image`).

    Hyperparameters (`log_hparams`, the runner's `train(hparams=...)`, with what the runner knows:
    `run_hparams`) go to TensorBoard's hparams plugin in the run `<logdir>/hparams/` at the end of the
    first epoch, with the metrics of the best epoch so far (`best_epoch_metrics`, by the runner's
    `valid_metric`) as scalars there, updated at every epoch: the HPARAMS tab compares runs by them.

    Its writers are `RunWriter`s (`self.loggers[run]`, see the module docstring), made when a run
    is first written: events reach the files at each epoch's end (Catalyst's `flush_log`), every
    `flush_secs` and at `close_log`, which closes the files. `max_queue` is accepted for
    compatibility with tensorboardX's writers and unused (no queue).
    """

    def __init__(self, logdir: str, use_logdir_postfix: bool = False,
                 log_batch_metrics: bool = SETTINGS.log_batch_metrics, log_epoch_metrics: bool = SETTINGS.log_epoch_metrics,
                 max_queue: int = 1000, flush_secs: int = 60):
        super().__init__(logdir, use_logdir_postfix=use_logdir_postfix, log_batch_metrics=log_batch_metrics,
                         log_epoch_metrics=log_epoch_metrics)
        self.max_queue, self.flush_secs = int(max_queue), int(flush_secs)
        self._hparams: Optional[Dict[str, Any]] = None
        self._hparams_written = False
        self._epochs = BestEpoch()

    def log_hparams(self, hparams: Mapping[str, Any], runner: Any = None) -> None:
        """Keep the run's hyperparameters; they are written with the first epoch's metrics, once the
        runner's optimizer and loaders exist (Catalyst calls this before it builds them)."""
        self._hparams = dict(hparams or {})
        self._hparams_written = False
        self._epochs.reset()

    def log_metrics(self, metrics: Mapping[str, Any], scope: str, runner: Any) -> None:
        """Scalars, as Catalyst's logger chooses them: batch values (`<key>/batch` at the sample step,
        with `log_batch_metrics`), each loader's values at its end and the epoch's `_epoch_` values
        (`<key>` at the epoch step, with `log_epoch_metrics`); then, at the epoch's end, the best
        epoch's metrics in the hyperparameters' run (when `log_hparams` was called)."""
        if scope == "batch" and self.log_batch_metrics:
            self.writer(runner.loader_key).add_scalars(_suffixed(metrics, "/batch"), runner.sample_step)
        elif scope == "loader" and self.log_epoch_metrics:
            self.writer(runner.loader_key).add_scalars(metrics, runner.epoch_step)
        elif scope == "epoch" and self.log_epoch_metrics:
            self.writer(EPOCH_RUN).add_scalars(metrics[EPOCH_RUN], runner.epoch_step)
        if scope == "epoch" and self._hparams is not None:
            self._log_best_epoch(metrics, runner)

    def _log_best_epoch(self, metrics: Mapping[str, Any], runner: Any) -> None:
        self._epochs.update(metrics, runner)
        values = best_epoch_metrics(self._epochs)
        writer = self.writer(HPARAMS_RUN)
        if not self._hparams_written:
            experiment, session_start, _ = hparams_summaries(run_hparams(runner, self._hparams), values)
            writer.add_summary(experiment)
            writer.add_summary(session_start)
            self._hparams_written = True
        writer.add_scalars(values, runner.epoch_step)

    def close_log(self) -> None:
        """Mark the hyperparameter session ended (when one was written), then write what is pending
        and close the writers; a later event opens new ones (new event files in the same runs)."""
        if self._hparams_written and HPARAMS_RUN in self.loggers:
            _, _, session_end = hparams_summaries({}, {})
            self.loggers[HPARAMS_RUN].add_summary(session_end)
            self._hparams_written = False
        super().close_log()

    def writer(self, run: Optional[str]) -> RunWriter:
        """The writer of the run `run` (a loader's key; `_epoch_` for None), made when first asked for."""
        run = run or EPOCH_RUN
        if run not in self.loggers:
            self.loggers[run] = RunWriter(os.path.join(self.logdir, run), flush_secs=self.flush_secs)
        return self.loggers[run]

    def log_image(self, tag: str, image: np.ndarray, runner: Any, scope: str = None) -> None:
        """An RGB `image` (height, width, 3) under `tag` at the current epoch in the current loader's run."""
        if runner.loader_key is None:
            raise ValueError(f"log_image({tag!r}): images are logged per loader, and the runner is not in a loader "
                             "(runner.loader_key is None); log it from a loader's event")
        self.writer(runner.loader_key).add_image(tag, image, runner.epoch_step)

    def log_text(self, tag: str, text: str, runner: Any, scope: str = None) -> None:
        """Markdown `text` under `tag`."""
        self.writer(runner.loader_key).add_text(tag, text, runner.epoch_step)

    def log_pr_curve(self, tag: str, labels: np.ndarray, scores: np.ndarray, runner: Any,
                     num_thresholds: int = MAX_PR_THRESHOLDS) -> None:
        """A precision-recall curve of 0/1 `labels` against `scores` in [0, 1] (the event
        tensorboardX's `add_pr_curve` writes; see `pr_curve_data`)."""
        curve = pr_curve_data(labels, scores, min(int(num_thresholds), MAX_PR_THRESHOLDS))
        self.writer(runner.loader_key).add_pr_curve_raw(tag, curve, runner.epoch_step)


def _suffixed(metrics: Mapping[str, float], suffix: str) -> Dict[str, float]:
    return {f"{key}{suffix}": value for key, value in metrics.items()}
