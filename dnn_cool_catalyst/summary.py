"""Readable text for people: an evaluation table as one line per task, and where a run's logs are.

`format_table(table)` turns the long evaluation table (`task_path, metric_name, metric_res,
num_samples`, one row per task and metric) into blocks of tasks that share their metrics, one
line per task and one column per metric, so that the whole table fits a terminal of `width`
columns (pandas truncates the long table to `task_path ... num_samples`)::

    task                  n  accuracy  f1_score  precision   recall
    camera_blocked      386    1.0000    1.0000     1.0000   1.0000
    door_open           312    0.9968    0.9959     1.0000   0.9918

Per-class rows (`metric_name` with a `/`, such as `f1_score/hoodie`) are left to the table itself.
A table with a `source` column (from a loader that mixes sources) shows each source's rows as
tasks `<source>/<path>` after the overall ones.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import pandas as pd

TENSORBOARD = "tensorboard"


def _number(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    value = float(value)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3g}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def _shorten(path: str, width: int) -> str:
    """`path` in at most `width` characters, its outer flows dropped first
    ("...face_regression.face_x1"): the task's own name, at the end, is what a reader looks for."""
    parts = path.split(".")
    for start in range(len(parts)):
        short = ("..." if start else "") + ".".join(parts[start:])
        if len(short) <= width:
            return short
    return "..." + path[-(width - 3):]


#: Per-task columns of an evaluation with `mc_samples=` (`inference.evaluate`), shown after the metrics.
UNCERTAINTY_COLUMNS = ("entropy", "variance")


def format_table(table: pd.DataFrame, width: int = 100) -> str:
    """The evaluation table as text: tasks with the same metrics in one block, one line per task
    (its path, the number of samples scored and one column per metric, then its MC-dropout
    `entropy` or `variance` where the table has them), at most `width` characters a line (long
    task paths are cut from the left)."""
    missing = [c for c in ("task_path", "metric_name", "metric_res", "num_samples") if c not in table.columns]
    if missing:
        raise ValueError(f"format_table takes an evaluation table; it has no column(s) {missing}")
    overall = table[~table["metric_name"].astype(str).str.contains("/")]
    tasks: Dict[str, Tuple[int, Dict[str, float]]] = {}
    sources = overall["source"].astype(str).tolist() if "source" in overall.columns else None
    for i, row in enumerate(overall.itertuples(index=False)):
        path = f"{sources[i]}/{row.task_path}" if sources and sources[i] else row.task_path
        n, values = tasks.setdefault(path, (int(row.num_samples), {}))
        values[str(row.metric_name)] = row.metric_res
    for column in UNCERTAINTY_COLUMNS:  # MC-dropout (`mc_samples=`): one value per task, after its metrics
        if column in overall.columns:
            for i, (path_, value) in enumerate(zip(overall["task_path"], overall[column])):
                path = f"{sources[i]}/{path_}" if sources and sources[i] else path_
                if pd.notna(value):
                    tasks[path][1].setdefault(column, value)
    blocks: Dict[Tuple[str, ...], List[str]] = {}
    for path, (_, values) in tasks.items():
        blocks.setdefault(tuple(values), []).append(path)
    lines: List[str] = []
    for metrics, paths in blocks.items():
        columns = [max(len(m), 7) for m in metrics]
        room = width - sum(c + 2 for c in columns) - 8
        name_width = max(12, min(max(len(p) for p in paths), room))
        header = f"{'task':<{name_width}} {'n':>6}" + "".join(f"  {m:>{c}}" for m, c in zip(metrics, columns))
        lines.append(header)
        for path in paths:
            n, values = tasks[path]
            lines.append(f"{_shorten(path, name_width):<{name_width}} {n:>6}"
                         + "".join(f"  {_number(values[m]):>{c}}" for m, c in zip(metrics, columns)))
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def where_logs_are(logdir: Optional[str], tensorboard: str = TENSORBOARD) -> str:
    """Two lines: the logdir and the command that shows its TensorBoard logs."""
    if logdir is None:
        return "No logdir: nothing was written (give logdir= to keep checkpoints, logs and tuned thresholds)."
    board = os.path.join(logdir, tensorboard)
    return (f"Logs, checkpoints and tuned thresholds: {logdir}\n"
            f"TensorBoard: tensorboard --logdir {board}  (then open http://localhost:6006)")


def summary(table: Optional[pd.DataFrame], logdir: Optional[str], title: str = "Evaluation", width: int = 100,
            paths: Optional[Sequence[str]] = None) -> str:
    """`title`, the table as `format_table` writes it (tasks of `paths` only, when given), and
    `where_logs_are(logdir)`."""
    parts = []
    if table is not None:
        if paths is not None:
            table = table[table["task_path"].isin(list(paths))]
        parts += [f"{title}:", format_table(table, width), ""]
    parts.append(where_logs_are(logdir))
    return "\n".join(parts)


__all__ = ["format_table", "summary", "where_logs_are"]
