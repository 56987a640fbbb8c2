"""The demo (`dnn_cool_catalyst.demo`) on a tiny dataset."""
import contextlib
import io

import pandas as pd
import torch

from dnn_cool_catalyst import demo


def test_the_demo_runs_twice_in_a_row_with_the_same_table(tmp_path):
    """Each run starts afresh in its logdir (`overwrite=True`) instead of refusing a used one, and
    the same seed gives the same evaluation table to the last digit, whatever the global random
    state was before (issue 9: reproducibility)."""
    args = ["--project-dir", str(tmp_path / "project"), "--n", "120", "--epochs", "1", "--batch-size", "32",
            "--features", "16", "--threads", "1"]
    logdir = tmp_path / "project" / "demo"
    tables = []
    threads = torch.get_num_threads()
    try:
        for seed in (123, 7):
            torch.manual_seed(seed)  # the global generator is somewhere else at each start
            with contextlib.redirect_stdout(io.StringIO()):
                demo.main(args)  # the quality bar is not met on 120 images: the return code is ignored
            tables.append((logdir / "evaluation.csv").read_text())
    finally:
        torch.set_num_threads(threads)
    assert tables[0] == tables[1]
    assert len(pd.read_csv(io.StringIO(tables[0]))) > 10
    assert pd.read_csv(logdir / "csv_logger" / "valid.csv")["step"].tolist() == [1]
    assert sorted(p.name for p in (logdir / "checkpoints").iterdir()) == [
        "runner.0001.pth", "runner.best.pth", "runner.last.pth", "runner.storage.json"]
