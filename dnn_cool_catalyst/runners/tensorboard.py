"""`FlowTensorboardLogger`: Catalyst's TensorBoard logger plus text and precision-recall curves.

Its writers (`FlowSummaryWriter`) are tensorboardX `SummaryWriter`s that write the same event files
(same file names, the same events) without tensorboardX's writer thread: tensorboardX sends every
event through a `multiprocessing.Queue` (pickled, piped, unpickled by a second thread) and computes
the CRC-32C of each record byte by byte in Python, which cost about 0.1 ms per scalar and 2 ms per
precision-recall curve, several percent of a small model's epoch for the ~150 values a flow logs.
Here an event is serialised when it is added and kept in memory; `flush()` (at each epoch's end,
Catalyst's `flush_log`) frames all pending records at once, with their checksums computed together
by a vectorised CRC-32C (`masked_crc32c`), and writes them in one call.
"""
from __future__ import annotations

import atexit
import os
import socket
import struct
import threading
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
from catalyst.loggers.tensorboard import TensorboardLogger
from catalyst.settings import SETTINGS
from tensorboardX import SummaryWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.proto.summary_pb2 import Summary
from tensorboardX.summary import hparams as hparams_summaries
from tensorboardX.writer import FileWriter

from .console import BestEpoch

HPARAMS_RUN = "hparams"  # the run (directory) of the hyperparameters and the best epoch's metrics

# CRC-32C (Castagnoli), as TFRecord framing uses it ---------------------------------------------------------------

_POLY = 0x82F63B78  # reflected Castagnoli polynomial
_SPAN = 1024  # bytes per block of the position tables (1 MiB of uint32)
_MASK_DELTA = 0xA282EAD8
_tables: Optional[np.ndarray] = None
_shift: Optional[List[List[int]]] = None


def _byte_table() -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(_POLY), t >> 1).astype(np.uint32)
    return t


def _position_tables() -> np.ndarray:
    """`rows[p, b]`: the CRC register (started at 0) after byte `b` followed by `p` zero bytes.

    The register update is linear over GF(2), so a message's register is the XOR of its bytes'
    rows at their distance from the end. Rows 0-3 are stepped one by one; then each block of rows
    is the previous ones shifted by `k` more zero bytes (a register `x` followed by `k >= 4` zero
    bytes acts as its 4 bytes at distances `k-1 .. k-4` from the end)."""
    global _tables, _shift
    if _tables is None:
        rows = np.empty((_SPAN, 256), dtype=np.uint32)
        table = _byte_table()
        rows[0] = table
        for p in range(1, 4):
            rows[p] = table[rows[p - 1] & 0xFF] ^ (rows[p - 1] >> 8)
        k = 4
        while k < _SPAN:
            m = min(k, _SPAN - k)
            block = rows[:m]
            out = np.zeros_like(block)
            for j in range(4):
                out ^= rows[k - 1 - j][(block >> np.uint32(8 * j)) & 0xFF]
            rows[k:k + m] = out
            k += m
        _shift = [rows[_SPAN - 1 - j].tolist() for j in range(4)]
        _tables = rows
    return _tables


def _crc32c_bytewise(data: bytes) -> int:
    table = _byte_table().tolist()
    crc = 0xFFFFFFFF
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def crc32c(messages: Sequence[bytes]) -> List[int]:
    """CRC-32C of each message (as `crc32c` packages compute it), all messages in one pass."""
    rows = _position_tables()
    lengths = np.fromiter((len(m) for m in messages), dtype=np.int64, count=len(messages))
    out = [0] * len(messages)
    long_enough = lengths >= 4
    for i in np.flatnonzero(~long_enough).tolist():  # the vectorised form folds the start value into 4 bytes
        out[i] = _crc32c_bytewise(messages[i])
    if not long_enough.any():
        return out
    which = np.flatnonzero(long_enough)
    lengths = lengths[which]
    buf = np.frombuffer(b"".join(messages[i] for i in which.tolist()), dtype=np.uint8).copy()
    starts = np.cumsum(lengths) - lengths
    buf[(starts[:, None] + np.arange(4)).reshape(-1)] ^= 0xFF  # the register starts at 0xFFFFFFFF
    total = int(lengths.sum())
    distance = np.repeat(starts + lengths - 1, lengths) - np.arange(total)  # from the message's end
    if int(lengths.max()) <= _SPAN:
        raw = np.bitwise_xor.reduceat(rows[distance, buf], starts).tolist()
    else:  # blocks of _SPAN bytes counted from the end, combined by shifting (Horner)
        within = distance % _SPAN
        first = np.zeros(total, dtype=bool)
        first[starts] = True
        segments = np.flatnonzero(first | (within == _SPAN - 1))
        parts = np.bitwise_xor.reduceat(rows[within, buf], segments).tolist()
        owner = np.searchsorted(starts, segments, side="right") - 1
        raw = [0] * len(lengths)
        s0, s1, s2, s3 = _shift
        for part, i in zip(parts, owner.tolist()):  # a message's blocks in order; raw[i] starts at 0
            acc = raw[i]
            raw[i] = s0[acc & 0xFF] ^ s1[(acc >> 8) & 0xFF] ^ s2[(acc >> 16) & 0xFF] ^ s3[acc >> 24] ^ part
    for i, r in zip(which.tolist(), raw):
        out[i] = r ^ 0xFFFFFFFF
    return out


def masked_crc32c(messages: Sequence[bytes]) -> List[int]:
    """The masked CRC-32C of TFRecord framing (TensorBoard's event files) of each message."""
    return [((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF for c in crc32c(messages)]


def tf_records(payloads: Sequence[bytes]) -> bytes:
    """`payloads` framed as TFRecords: length, its masked CRC, the payload, its masked CRC."""
    headers = [struct.pack("<Q", len(p)) for p in payloads]
    crcs = masked_crc32c(headers + list(payloads))
    n = len(payloads)
    pack = struct.Struct("<I").pack
    return b"".join(b"".join((h, pack(crcs[i]), p, pack(crcs[n + i]))) for i, (h, p) in enumerate(zip(headers, payloads)))


# Writers ------------------------------------------------------------------------------------------------------------


class EventFile:
    """An event file written synchronously: tensorboardX's `EventFileWriter` interface without its
    queue and thread. Events are serialised by `add_event` and written by `flush()` (also when
    `max_pending_bytes` are pending, or `flush_secs` after the last write); `close()` flushes,
    syncs the file to disk and closes it. The file is named as tensorboardX names it,
    `events.out.tfevents.<time>.<host><suffix>`, and starts with the same version event."""

    def __init__(self, logdir: str, flush_secs: float = 120, filename_suffix: str = "",
                 max_pending_bytes: int = 1 << 22):
        self._logdir = str(logdir)
        self._flush_secs = float(flush_secs)
        self._suffix = filename_suffix or ""
        self._max_pending = int(max_pending_bytes)
        self._lock = threading.Lock()
        self._file = None
        self._open()

    def _open(self) -> None:
        os.makedirs(self._logdir, exist_ok=True)
        name = "events.out.tfevents." + str(time.time())[:10] + "." + socket.gethostname() + self._suffix
        self.path = os.path.join(self._logdir, name)
        self._file = open(self.path, "wb")
        self._pending: List[bytes] = []
        self._pending_bytes = 0
        self._last_write = time.monotonic()
        self._closed = False
        atexit.register(self.close)  # as tensorboardX: what is pending is written at exit
        self.add_event(Event(wall_time=time.time(), file_version="brain.Event:2"))

    def get_logdir(self) -> str:
        """The directory of the event file."""
        return self._logdir

    def add_event(self, event: Event) -> None:
        """Keep one `Event` (serialised now) for the next write."""
        if self._closed:
            return
        data = event.SerializeToString()
        with self._lock:
            self._pending.append(data)
            self._pending_bytes += len(data)
            due = self._pending_bytes >= self._max_pending or time.monotonic() - self._last_write >= self._flush_secs
        if due:
            self.flush()

    def flush(self) -> None:
        """Write the pending events and flush the file to the operating system."""
        with self._lock:
            if self._closed:
                return
            pending, self._pending, self._pending_bytes = self._pending, [], 0
            if pending:
                self._file.write(tf_records(pending))
                self._file.flush()
            self._last_write = time.monotonic()

    def close(self) -> None:
        """Write what is pending, sync the file to disk and close it (later events are dropped)."""
        if self._closed:
            return
        self.flush()
        with self._lock:
            self._closed = True
            os.fsync(self._file.fileno())
            self._file.close()
        atexit.unregister(self.close)

    def reopen(self) -> None:
        """After `close()`: a new event file in the same directory (as tensorboardX does)."""
        if self._closed:
            self._open()


class _FileWriter(FileWriter):
    """tensorboardX's `FileWriter` over an `EventFile`."""

    def __init__(self, logdir: str, max_queue: int = 10, flush_secs: float = 120, filename_suffix: str = "", **_: Any):
        self.event_writer = EventFile(str(logdir), flush_secs=flush_secs, filename_suffix=filename_suffix)
        self._default_metadata = {}


class FlowSummaryWriter(SummaryWriter):
    """tensorboardX's `SummaryWriter` (every `add_*` method) writing through an `EventFile`:
    the same event files, written in the calling thread at `flush()`, `close()`, every
    `flush_secs` or every 4 MiB of pending events (see the module docstring)."""

    def _get_file_writer(self):
        if not self._write_to_disk:
            return super()._get_file_writer()
        if self.all_writers is None or self.file_writer is None:
            self.file_writer = _FileWriter(self.logdir, self._max_queue, self._flush_secs, self._filename_suffix)
            if self.purge_step is not None:
                self.file_writer.add_event(Event(step=self.purge_step, file_version="brain.Event:2"))
                self.file_writer.add_event(Event(step=self.purge_step, session_log=SessionLog(status=SessionLog.START)))
            self.all_writers = {self.file_writer.get_logdir(): self.file_writer}
        return self.file_writer

    def add_simple_scalars(self, values: Mapping[str, float], global_step: Optional[int] = None,
                           walltime: Optional[float] = None) -> None:
        """`add_scalar(tag, value, global_step)` for each item, the same events built directly
        (tensorboardX's `add_scalar` spends most of its time checking and converting one value)."""
        writer = self._get_file_writer()
        for tag, value in values.items():
            writer.add_event(Event(summary=Summary(value=[Summary.Value(tag=tag, simple_value=float(value))])),
                             global_step, walltime)


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
    (`<path>/confusion_matrix`, through Catalyst's `log_image`).

    Hyperparameters (`log_hparams`, the runner's `train(hparams=...)`, with what the runner knows:
    `run_hparams`) go to TensorBoard's hparams plugin in the run `<logdir>/hparams/` at the end of the
    first epoch, with the metrics of the best epoch so far (`best_epoch_metrics`, by the runner's
    `valid_metric`) as scalars there, updated at every epoch: the HPARAMS tab compares runs by them.

    Its writers are `FlowSummaryWriter`s (`self.loggers[loader]`): events reach the files at each
    epoch's end (Catalyst flushes the loggers then), every `flush_secs`, or every 4 MiB of
    pending events. `max_queue` is accepted for compatibility and unused (no queue).
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
        super().log_metrics(metrics, scope, runner)
        if scope == "epoch" and self._hparams is not None:
            self._log_best_epoch(metrics, runner)

    def _log_best_epoch(self, metrics: Mapping[str, Any], runner: Any) -> None:
        self._epochs.update(metrics, runner)
        values = best_epoch_metrics(self._epochs)
        self._check_loader_key(HPARAMS_RUN)
        writer = self.loggers[HPARAMS_RUN]
        if not self._hparams_written:
            experiment, session_start, _ = hparams_summaries(run_hparams(runner, self._hparams), values)
            writer.file_writer.add_summary(experiment)
            writer.file_writer.add_summary(session_start)
            self._hparams_written = True
        writer.add_simple_scalars(values, runner.epoch_step)

    def close_log(self) -> None:
        """Mark the hyperparameter session ended (when one was written), then close the writers."""
        if self._hparams_written and HPARAMS_RUN in self.loggers:
            _, _, session_end = hparams_summaries({}, {})
            self.loggers[HPARAMS_RUN].file_writer.add_summary(session_end)
            self._hparams_written = False
        super().close_log()

    def _check_loader_key(self, loader_key: str) -> None:
        if loader_key not in self.loggers:
            self.loggers[loader_key] = FlowSummaryWriter(os.path.join(self.logdir, loader_key), max_queue=self.max_queue,
                                                         flush_secs=self.flush_secs)

    def _log_metrics(self, metrics: Mapping[str, float], step: int, loader_key: str, suffix: str = "") -> None:
        # Catalyst tags epoch values `<key>/epoch`; here they are `<path>/<metric>` (TensorBoard groups
        # by the first component: one group per task, each loader a run of its own so that train and
        # valid overlay). Batch values keep their `/batch` suffix, apart from the epoch curves.
        if suffix == "/epoch":
            suffix = ""
        writer = self.loggers[loader_key]
        if isinstance(writer, FlowSummaryWriter):
            writer.add_simple_scalars({f"{key}{suffix}": value for key, value in metrics.items()}, step)
        else:
            super()._log_metrics(metrics, step, loader_key, suffix)

    def log_text(self, tag: str, text: str, runner: Any, scope: str = None) -> None:
        """Markdown `text` under `tag`."""
        writer = self._writer(runner)
        writer.add_text(tag, text, global_step=runner.epoch_step)

    def log_pr_curve(self, tag: str, labels: np.ndarray, scores: np.ndarray, runner: Any,
                     num_thresholds: int = 127) -> None:
        """A precision-recall curve of 0/1 `labels` against `scores` in [0, 1] (the event
        tensorboardX's `add_pr_curve` writes; see `pr_curve_data`)."""
        writer = self._writer(runner)
        num_thresholds = min(int(num_thresholds), 127)  # as tensorboardX (more breaks its protobuf)
        tp, fp, tn, fn, precision, recall = pr_curve_data(labels, scores, num_thresholds)
        writer.add_pr_curve_raw(tag, tp, fp, tn, fn, precision, recall, global_step=runner.epoch_step,
                                num_thresholds=num_thresholds)

    def _writer(self, runner: Any):
        key = runner.loader_key or "_epoch_"
        self._check_loader_key(key)
        return self.loggers[key]
