"""The evaluation table as text: every task on one line, every line within the width."""
import math

import pandas as pd
import pytest

from dnn_cool_catalyst.summary import _shorten, format_table, summary, where_logs_are


def _table():
    rows = []
    for path in ("camera_blocked", "door_open"):
        for name, value in (("accuracy", 0.91), ("f1_score", 0.5), ("precision", math.nan), ("recall", 1.0)):
            rows.append((path, name, value, 12))
    rows.append(("person_regression.face_regression.face_x1", "mean_absolute_error", 0.0123, 7))
    rows.append(("person_regression.body_regression.shirt_type", "accuracy_1", 0.75, 4))
    rows.append(("person_regression.body_regression.shirt_type", "f1_score/hoodie", 0.5, 4))
    return pd.DataFrame(rows, columns=["task_path", "metric_name", "metric_res", "num_samples"])


@pytest.mark.parametrize("width", [60, 100])
def test_one_line_per_task_within_the_width(width):
    text = format_table(_table(), width=width)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width
    door = next(line for line in lines if line.startswith("door_open"))
    assert door.split() == ["door_open", "12", "0.9100", "0.5000", "-", "1.0000"]
    assert any(line.rstrip().endswith("0.0123") and "face_x1" in line for line in lines)
    assert "hoodie" not in text  # per-class rows stay in the table
    assert sum("shirt_type" in line for line in lines) == 1


def test_long_paths_lose_their_outer_flows_first():
    assert _shorten("person_regression.body_regression.shirt_type", 30) == "...body_regression.shirt_type"
    assert _shorten("camera_blocked", 30) == "camera_blocked"
    assert len(_shorten("a_very_long_single_task_name_indeed", 12)) == 12


def test_summary_says_where_the_logs_are():
    text = summary(_table(), "runs/first")
    assert text.startswith("Evaluation:") and "tensorboard --logdir runs/first/tensorboard" in text
    assert "nothing was written" in where_logs_are(None)
    with pytest.raises(ValueError, match="metric_res"):
        format_table(pd.DataFrame({"task_path": [], "metric_name": [], "num_samples": []}))


def test_a_summary_shows_each_source_s_rows_apart():
    table = pd.DataFrame({"source": ["", "a", "b"], "task_path": ["t", "t", "t"], "metric_name": ["accuracy"] * 3,
                          "metric_res": [0.5, 1.0, 0.0], "num_samples": [4, 2, 2]})
    lines = format_table(table).splitlines()
    assert [line.split()[:3] for line in lines[1:]] == [["t", "4", "0.5000"], ["a/t", "2", "1.0000"],
                                                        ["b/t", "2", "0.0000"]]


def test_mc_dropout_columns_are_shown_after_each_task_s_metrics():
    table = _table()
    entropy = table["task_path"].map({"camera_blocked": 0.25, "door_open": 0.125,
                                      "person_regression.body_regression.shirt_type": 0.5})
    table["entropy"] = entropy
    table["variance"] = table["task_path"].map({"person_regression.face_regression.face_x1": 0.0042})
    lines = format_table(table).splitlines()
    door = next(line for line in lines if line.startswith("door_open"))
    assert door.split() == ["door_open", "12", "0.9100", "0.5000", "-", "1.0000", "0.1250"]
    assert "entropy" in lines[lines.index(door) - 2]  # the block's header names the column
    assert any("face_x1" in line and line.split()[-2:] == ["0.0123", "0.0042"] for line in lines)
    assert any("shirt_type" in line and line.split()[-1] == "0.5000" for line in lines)
