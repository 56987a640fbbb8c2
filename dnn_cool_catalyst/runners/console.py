"""Console output that stays readable with many tasks: metrics grouped by task."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, List

from catalyst.callbacks.misc import TqdmCallback
from catalyst.loggers.console import ConsoleLogger


def _number(value: Any) -> str:
    return f"{float(value):.4g}"


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


class FlowConsoleLogger(ConsoleLogger):
    """Catalyst's console logger with each loader's metrics grouped by task, one line per task."""

    def log_metrics(self, metrics: Dict[str, Any], scope: str, runner: Any) -> None:
        if scope == "loader":
            print(format_by_task(metrics, f"{runner.loader_key} ({runner.epoch_step}/{runner.num_epochs}) "))
        else:
            super().log_metrics(metrics, scope, runner)


class FlowProgressBar(TqdmCallback):
    """Catalyst's progress bar showing only the batch metrics without a task (`loss`, `lr`, ...):
    per-task values of many tasks do not fit on a line (they reach the loggers all the same)."""

    def on_batch_end(self, runner: Any) -> None:
        if runner.engine.process_index > 0:
            return
        shown = {k: float(v) for k, v in runner.batch_metrics.items() if "/" not in k or k.startswith("_timer/")}
        self.tqdm.set_postfix(**{k: f"{v:3.3f}" if abs(v) > 1e-3 else f"{v:1.3e}" for k, v in sorted(shown.items())})
        self.tqdm.update()
