"""`FlowTensorboardLogger`: Catalyst's TensorBoard logger plus text and precision-recall curves."""
from __future__ import annotations

from typing import Any

import numpy as np
from catalyst.loggers.tensorboard import TensorboardLogger


class FlowTensorboardLogger(TensorboardLogger):
    """Catalyst's `TensorboardLogger` (scalars as `<key>/epoch` per loader under `<logdir>/<loader>/`,
    images), plus `log_text` (markdown) and `log_pr_curve`, both at the current epoch in the current
    loader's run. `FlowRunner` adds one under `<logdir>/tensorboard` when no TensorBoard logger is given.

    Metric keys `<path>/<metric>` put every task's values in a group of their own in TensorBoard.
    """

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
        self._check_loader_key(loader_key=key)
        return self.loggers[key]
