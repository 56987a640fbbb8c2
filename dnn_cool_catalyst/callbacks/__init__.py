"""Catalyst callbacks for task flows (import as `dnn_cool_catalyst.callbacks`; needs Catalyst).

- `FlowMetricsCallback`: per-task losses and metrics over whole loaders, as `<path>/<metric>`.
- `InterpretationCallback`: the best and worst samples of each task by per-sample loss.
- `ThresholdTuningCallback`: tunes the decoders at the end of each validation loader.
- `BalancerCallback`: a loss balancer's per-epoch hook and its effective weights per task.
- publishers (`ImagePublisher`, `TextPublisher`, ...) choose how inputs are shown in TensorBoard.
"""
from .balance import BalancerCallback
from .interpretation import InterpretationCallback, rank_samples
from .metrics import FlowMetricsCallback
from .publishers import (ImagePublisher, TensorSummaryPublisher, TextPublisher, confusion_matrix_image, default_publishers,
                         log_confusion_matrix, log_pr_curve, log_text)
from .tuning import ThresholdTuningCallback

__all__ = [
    "BalancerCallback", "FlowMetricsCallback", "ImagePublisher", "InterpretationCallback", "TensorSummaryPublisher", "TextPublisher",
    "ThresholdTuningCallback", "confusion_matrix_image", "default_publishers", "log_confusion_matrix", "log_pr_curve",
    "log_text", "rank_samples",
]
