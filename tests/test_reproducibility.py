"""Same seed, same machine: the same evaluation table to the last digit (issue 9, reproducibility).

Each run consumes the global random state differently before it starts, as a user's session does
(a notebook cell run twice, another model built first): nothing may depend on that state.
"""
import contextlib
import io
import os

import pandas as pd
import torch

from dnn_cool_catalyst import demo


def _tiny_demo(project_dir):
    args = ["--project-dir", str(project_dir), "--n", "120", "--epochs", "1", "--batch-size", "32",
            "--features", "16", "--threads", "1"]
    with contextlib.redirect_stdout(io.StringIO()):
        demo.main(args)  # the quality bar is not the point here: the return code is ignored
    return (project_dir / "demo" / "evaluation.csv").read_text()


def test_the_demo_gives_the_same_table_twice(tmp_path):
    threads = torch.get_num_threads()
    try:
        torch.manual_seed(123)
        first = _tiny_demo(tmp_path / "a")
        torch.rand(1000)  # the global generator moved on
        second = _tiny_demo(tmp_path / "b")
    finally:
        torch.set_num_threads(threads)
    assert first == second
    assert len(pd.read_csv(io.StringIO(first))) > 10
