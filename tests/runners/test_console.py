"""Console output grouped by task."""
from dnn_cool_catalyst.runners.console import FlowConsoleLogger, format_by_task


def test_one_line_for_overall_metrics_then_one_per_task():
    text = format_by_task({"loss": 6.12345, "a.b/accuracy": 0.5, "a.b/loss": 0.25, "c/tuned/threshold/hat": 0.4,
                           "lr": 0.001}, "valid (1/2) ")
    assert text.splitlines() == ["valid (1/2) loss: 6.123 | lr: 0.001", "  a.b: accuracy 0.5 | loss 0.25",
                                 "  c: tuned/threshold/hat 0.4"]


def test_loader_metrics_are_printed_grouped(capsys):
    class Runner:
        loader_key, epoch_step, num_epochs = "train", 1, 3

    FlowConsoleLogger().log_metrics({"loss": 1.0, "t/f1_score": 0.5}, scope="loader", runner=Runner())
    assert capsys.readouterr().out == "train (1/3) loss: 1\n  t: f1_score 0.5\n"
