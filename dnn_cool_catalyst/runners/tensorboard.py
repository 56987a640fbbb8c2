"""`FlowTensorboardLogger`: Catalyst's TensorBoard logger plus text and precision-recall curves."""
from __future__ import annotations

import os
from typing import Any

import numpy as np
from catalyst.loggers.tensorboard import TensorboardLogger
from catalyst.settings import SETTINGS
from tensorboardX import SummaryWriter


class FlowTensorboardLogger(TensorboardLogger):
    """Catalyst's `TensorboardLogger` (scalars as `<key>/epoch` per loader under `<logdir>/<loader>/`,
    images), plus `log_text` (markdown) and `log_pr_curve`, both at the current epoch in the current
    loader's run. `FlowRunner` adds one under `<logdir>/tensorboard` when no TensorBoard logger is given.

    Metric keys `<path>/<metric>` put every task's values in a group of their own in TensorBoard.

    `max_queue`: events kept before the writer thread must catch up; tensorboardX's default (10)
    makes every few of the hundreds of scalars a flow logs per epoch wait for a disk write.
    Everything is flushed at each epoch's end all the same.
    """

    def __init__(self, logdir: str, use_logdir_postfix: bool = False,
                 log_batch_metrics: bool = SETTINGS.log_batch_metrics, log_epoch_metrics: bool = SETTINGS.log_epoch_metrics,
                 max_queue: int = 1000, flush_secs: int = 60):
        super().__init__(logdir, use_logdir_postfix=use_logdir_postfix, log_batch_metrics=log_batch_metrics,
                         log_epoch_metrics=log_epoch_metrics)
        self.max_queue, self.flush_secs = int(max_queue), int(flush_secs)

    def _check_loader_key(self, loader_key: str) -> None:
        if loader_key not in self.loggers:
            self.loggers[loader_key] = SummaryWriter(os.path.join(self.logdir, loader_key), max_queue=self.max_queue,
                                                     flush_secs=self.flush_secs)

    def log_text(self, tag: str, text: str, runner: Any, scope: str = None) -> None:
        """Markdown `text` under `tag`."""
        writer = self._writer(runner)
        writer.add_text(tag, text, global_step=runner.epoch_step)

    def log_pr_curve(self, tag: str, labels: np.ndarray, scores: np.ndarray, runner: Any,
                     num_thresholds: int = 127) -> None:
        """A precision-recall curve of 0/1 `labels` against `scores` in [0, 1]."""
        writer = self._writer(runner)
        writer.add_pr_curve(tag, np.asarray(labels).astype(bool), np.clip(np.asarray(scores, dtype=np.float64), 0, 1),
                            global_step=runner.epoch_step, num_thresholds=num_thresholds)

    def _writer(self, runner: Any):
        key = runner.loader_key or "_epoch_"
        self._check_loader_key(key)
        return self.loggers[key]
