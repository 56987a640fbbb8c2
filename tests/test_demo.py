"""The demo (`dnn_cool_catalyst.demo`) on a tiny dataset."""
import pandas as pd

from dnn_cool_catalyst import demo


def test_the_demo_runs_twice_in_a_row(tmp_path, capsys):
    """Each run starts afresh in its logdir (`overwrite=True`) instead of refusing a used one."""
    args = ["--project-dir", str(tmp_path / "project"), "--n", "64", "--epochs", "1", "--batch-size", "16",
            "--features", "16", "--threads", "1"]
    for _ in range(2):
        demo.main(args)  # the quality bar is not met on 64 images: only that it runs counts here
    logdir = tmp_path / "project" / "demo"
    assert pd.read_csv(logdir / "csv_logger" / "valid.csv")["step"].tolist() == [1]
    assert sorted(p.name for p in (logdir / "checkpoints").iterdir()) == [
        "runner.0001.pth", "runner.best.pth", "runner.last.pth", "runner.storage.json"]
