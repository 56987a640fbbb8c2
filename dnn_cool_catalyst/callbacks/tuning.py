"""`ThresholdTuningCallback`: tune the decoders at the end of each validation loader."""
from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from catalyst.core.callback import Callback

from ..distributed import is_main_process
from ..errors import capped
from ..interpreters.decoding import merge_report
from ..keys import ACTIVATED, LOGITS
from .batch import labelled_batch
from .common import resolve_callback_flow, resolve_logdir
from ..files import read_json, write_atomic
from .loader_outputs import LoaderOutputs, shared_outputs
from .metrics import METRICS_ORDER

TUNED_PARAMS_FILE = "tuned_params.json"
HISTORY_FILE = "tuned_params_history.json"


def numeric_params(path: str, params: Mapping[str, Any], class_names: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Loggable scalars of one task's tuned params: `<path>/tuned/<key>` for numbers and
    `<path>/tuned/<key>/<class>` for lists of numbers; booleans, strings and counts are left out."""
    out: Dict[str, float] = {}
    for key, value in params.items():
        if key == "num_samples" or isinstance(value, (bool, str)) or value is None:
            continue
        if isinstance(value, (int, float)):
            out[f"{path}/tuned/{key}"] = float(value)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    name = class_names[i] if class_names is not None and i < len(class_names) else str(i)
                    out[f"{path}/tuned/{key}/{name}"] = float(v)
    return out


class HistoryFile:
    """`{epoch: tuned params}` as `write_json` writes it (indented), each epoch's entry encoded once:
    Python's indenting JSON encoder is pure Python, and re-encoding the whole history at every
    epoch would make a long training's epochs slower and slower."""

    def __init__(self, entries: Mapping[str, Any]):
        self._entries: Dict[str, str] = {}
        for key, value in entries.items():
            self[key] = value

    def __setitem__(self, epoch: str, params: Any) -> None:
        text = json.dumps(params, indent=2, allow_nan=False)  # NaN and infinities are refused, as by write_json
        self._entries[str(epoch)] = json.dumps(str(epoch)) + ": " + text.replace("\n", "\n  ")

    def dumps(self) -> str:
        """The text of `json.dumps(history, indent=2)`, and a final newline."""
        if not self._entries:
            return "{}\n"
        return "{\n  " + ",\n  ".join(self._entries.values()) + "\n}\n"


class ThresholdTuningCallback(Callback):
    """At the end of each validation loader, tunes every tunable decoder of the flow on the
    activated outputs and targets of the whole loader (only samples in `S_t`).

    Then it logs the tuned values into `runner.loader_metrics` (`<path>/tuned/threshold`, per class
    for multilabel tasks), writes `tuned_params.json` (what `decoder.tune` returns: the parameters
    and the report of `decoder.fit`) and `tuned_params_history.json` (per epoch) atomically into the
    logdir, and, with `apply=True`, loads the tuned parameters into the decoders, so that the epoch's
    decoded metrics (`FlowMetricsCallback`), the interpretation's captions and trees, and later epochs
    use them. With `apply=False` the decoders are left as they are.

    The decoders are the tasks' (`FlowDecoder`): every flow and runner built from the same `Tasks`
    decodes with the thresholds tuned here.

    The tuning runs once per loader before any flow callback decodes at the loader's end, whatever
    the callbacks' order, and the activated outputs are kept once for the callbacks that need them
    (`callbacks.loader_outputs`).

    On a resumed run (the first epoch of the experiment is not epoch 1) the parameters of the last
    epoch before it are loaded back from the history file, so decoding continues as it stopped.

    Args:
        flow: the `TaskFlow` (default: `runner.flow`).
        metric: what the thresholds maximise: "accuracy", "f1", "balanced_accuracy", "youden" or a
            callable on the confusion counts (see `dnn_cool_catalyst.tuning`).
        apply: keep the tuned parameters in the decoders.
        loaders: loader keys to tune on (default: every validation loader, `runner.is_valid_loader`).
        logdir: where to write the files (default: `runner.logdir`; no files when neither is set).
        buffer_elements: batches are kept on their device and moved to the CPU in chunks of about
            this many elements.
    """

    def __init__(self, flow: Any = None, metric: Any = "accuracy", apply: bool = True,
                 loaders: Optional[Sequence[str]] = None, logdir: Optional[str] = None,
                 buffer_elements: int = 2 ** 24):
        super().__init__(order=METRICS_ORDER)
        self.flow = flow
        self.metric = metric
        self.apply = apply
        self.loaders = list(loaders) if loaders is not None else None
        self.logdir = logdir
        self.buffer_elements = int(buffer_elements)
        self.tuned: Dict[str, Dict[str, Any]] = {}
        # set at the experiment's start
        self._flow: Any = None
        self._leaves: List[Any] = []
        self._decoder: Any = None
        self._logdir: Optional[str] = None
        self._first_epoch = True
        self._history: Optional[HistoryFile] = None  # the history file's content, read once per experiment
        # set at each loader's start
        self._active = False
        self._shared: Optional[LoaderOutputs] = None

    def on_experiment_start(self, runner: Any) -> None:
        self._flow = resolve_callback_flow(self.flow, runner, type(self).__name__)  # the given flow, else the runner's
        self._leaves = [leaf for leaf in self._flow.graph.leaves if leaf.task.decoder.params()]
        self._decoder = self._flow.get_decoder()
        self._logdir = resolve_logdir(self.logdir, runner)
        self._first_epoch = True
        self._history = None
        self._active, self._shared = False, None

    def on_epoch_start(self, runner: Any) -> None:
        if self._first_epoch:
            self._first_epoch = False
            if runner.epoch_step > 1:
                self._restore(runner.epoch_step - 1)

    def _selected(self, runner: Any) -> bool:
        if self.loaders is not None:
            return runner.loader_key in self.loaders
        return bool(runner.is_valid_loader)

    def on_loader_start(self, runner: Any) -> None:
        self._active = bool(self._leaves) and self._selected(runner)
        self._shared = None
        if self._active:
            self._shared = shared_outputs(runner, self._flow)
            self._shared.start(self, [leaf.path for leaf in self._leaves], self.buffer_elements,
                               before_decoding=self._tune)

    def on_batch_end(self, runner: Any) -> None:  # no grad-mode switch per batch: see FlowMetricsCallback
        batch = labelled_batch(runner, type(self).__name__, self._active)
        if batch is None:
            return
        outputs = batch.outputs
        source = ACTIVATED if outputs.get(ACTIVATED) else LOGITS
        missing = [leaf.path for leaf in self._leaves if leaf.path not in outputs.get(source, {})]
        if missing:
            raise KeyError(f"ThresholdTuningCallback: the batch outputs have no {source!r} for the tunable task(s) "
                           f"[{capped(missing)}] (with DataParallel memory balancing, keep them in the gathered "
                           "outputs)")
        self._shared.add(self, runner)

    def on_loader_end(self, runner: Any) -> None:
        if self._active:
            try:
                self._shared.before_decoding(runner)  # runs `_tune`, unless another callback ran it already
            finally:
                self._shared.done(self)

    @torch.no_grad()
    def _tune(self, runner: Any) -> None:
        """Fit on the whole loader's outputs, apply (with `apply`), log and write."""
        kept = self._shared.outputs()
        kept = {leaf.path: kept[leaf.path] for leaf in self._leaves if leaf.path in kept}
        if not kept:
            return
        params, report = self._decoder.fit({p: v[0] for p, v in kept.items()}, {p: v[1] for p, v in kept.items()},
                                           masks={p: v[2] for p, v in kept.items()}, metric=self.metric)
        if self.apply:
            self._decoder.load_tuned(params)
        self.tuned = merge_report(params, report)
        for leaf in self._leaves:
            if leaf.path in self.tuned:
                values = numeric_params(leaf.path, self.tuned[leaf.path], leaf.task.class_names)
                runner.loader_metrics.update({k: v for k, v in values.items() if math.isfinite(v)})
        self._write(runner)

    def _write(self, runner: Any) -> None:
        if self._logdir is None or not is_main_process():
            return
        from ..tuning import save_tuned

        save_tuned(os.path.join(self._logdir, TUNED_PARAMS_FILE), self.tuned)
        history_path = os.path.join(self._logdir, HISTORY_FILE)
        if self._history is None:  # a resumed run adds to the epochs before it (later ones it writes again)
            old = read_json(history_path) if os.path.exists(history_path) else {}
            self._history = HistoryFile({e: v for e, v in old.items() if str(e).isdigit() and int(e) < runner.epoch_step})
        self._history[str(runner.epoch_step)] = self.tuned
        write_atomic(history_path, lambda fh: fh.write(self._history.dumps().encode("utf-8")))

    def _restore(self, epoch: int) -> None:
        path = os.path.join(self._logdir, HISTORY_FILE) if self._logdir else None
        if path is None or not os.path.exists(path):
            warnings.warn(f"ThresholdTuningCallback: resuming after epoch {epoch} but there is no {HISTORY_FILE} in "
                          f"the logdir ({self._logdir}); decoders keep their current parameters", stacklevel=2)
            return
        history = read_json(path)
        epochs = [int(e) for e in history if int(e) <= epoch]
        if not epochs:
            return
        self.tuned = history[str(max(epochs))]
        if self.apply:
            self._decoder.load_tuned(self.tuned)
