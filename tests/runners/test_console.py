"""Console output: one line per epoch (loss per loader, the validation metric), the per-task lines of
the best epoch at the end (every epoch with verbose), a progress bar by default on a terminal."""
import re
import sys

import pytest
import torch

from dnn_cool_catalyst.runners import FlowRunner
from dnn_cool_catalyst.runners.console import FlowConsoleLogger, FlowProgressBar, format_by_task, format_epoch


def test_one_line_for_overall_metrics_then_one_per_task():
    text = format_by_task({"loss": 6.12345, "a.b/accuracy": 0.5, "a.b/loss": 0.25, "c/tuned/threshold/hat": 0.4,
                           "lr": 0.001}, "valid (1/2) ")
    assert text.splitlines() == ["valid (1/2) loss: 6.123 | lr: 0.001", "  a.b: accuracy 0.5 | loss 0.25",
                                 "  c: tuned/threshold/hat 0.4"]


def test_an_epoch_is_one_line_with_each_loss_the_valid_metric_and_the_lr():
    metrics = {"_epoch_": {}, "train": {"loss": 0.5, "lr": 0.003, "t/f1_score": 0.7},
               "valid": {"loss": 0.25, "lr": 0.003, "t/f1_score": 0.8, "t/loss": 0.1}, "infer": {"lr": 0.003}}
    assert (format_epoch(metrics, 2, 3, 1.25, "valid", "t/f1_score", best=True)
            == "Epoch 2/3 (1.2 s) | train loss 0.5 | valid loss 0.25, t/f1_score 0.8 | lr 0.003 | best so far")
    assert format_epoch({"_epoch_": {"x": 1.0}, "valid": {"loss": 0.25}}, 1, 1) == "Epoch 1/1 | valid loss 0.25 | x 1"
    scheduled = {"_epoch_": {"lr": 0.0015, "momentum": 0.9}, "train": {"loss": 0.5, "lr": 0.003}}  # the next epoch's
    assert format_epoch(scheduled, 1, 2) == "Epoch 1/2 | train loss 0.5 | lr 0.003"
    assert format_epoch({"_epoch_": {"lr": 0.0015}, "valid": {"loss": 0.5}}, 1, 2) == "Epoch 1/2 | valid loss 0.5 | lr 0.0015"


class _Runner:
    _valid_loader, _valid_metric, _minimize_valid_metric = "valid", "t/f1_score", False

    def __init__(self, epoch, num_epochs=3, loader_key="valid"):
        self.epoch_step, self.num_epochs, self.loader_key = epoch, num_epochs, loader_key


def _epochs(logger, scores):
    logger.log_hparams({}, runner=_Runner(0))
    for epoch, score in enumerate(scores, start=1):
        valid = {"loss": 1.0 / epoch, "t/f1_score": score, "t/loss": 0.5}
        logger.log_metrics({"loss": 2.0, "t/f1_score": 0.1}, scope="loader", runner=_Runner(epoch, loader_key="train"))
        logger.log_metrics(valid, scope="loader", runner=_Runner(epoch))
        logger.log_metrics({"_epoch_": {}, "train": {"loss": 2.0, "t/f1_score": 0.1}, "valid": valid}, scope="epoch",
                           runner=_Runner(epoch, num_epochs=len(scores)))
    logger.close_log()


def test_per_task_lines_come_once_at_the_end_for_the_best_epoch(capsys):
    _epochs(FlowConsoleLogger(), [0.5, 0.9, 0.7])
    lines = capsys.readouterr().out.splitlines()
    assert [re.sub(r" \(\d+\.\d s\)", "", line) for line in lines] == [
        "Epoch 1/3 | train loss 2 | valid loss 1, t/f1_score 0.5 | best so far",
        "Epoch 2/3 | train loss 2 | valid loss 0.5, t/f1_score 0.9 | best so far",
        "Epoch 3/3 | train loss 2 | valid loss 0.3333, t/f1_score 0.7",
        "valid at the best epoch 2/3 (by t/f1_score): loss: 0.5",  # maximised: the runner said so
        "  t: f1_score 0.9 | loss 0.5"]
    assert not any(line.startswith("* Epoch") for line in lines)  # Catalyst's empty epoch line


def test_verbose_prints_every_loaders_tasks_every_epoch(capsys):
    _epochs(FlowConsoleLogger(verbose=True), [0.5, 0.9])
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("  t: ") for line in lines) == 4 and lines[0] == "train (1/3) loss: 2"
    assert sum(line.startswith("Epoch ") for line in lines) == 2 and "best epoch" not in "".join(lines)


def test_training_prints_a_short_summary_and_no_momentum_for_adamw(data, flow_and_model, loaders_for, capsys):
    flow, model = flow_and_model()
    runner = FlowRunner(flow, model=model)
    runner.train(loaders=loaders_for(flow, data), num_epochs=3, valid_metric="door_open/f1_score",
                 minimize_valid_metric=False, scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))
    out = capsys.readouterr().out
    epochs = [line for line in out.splitlines() if line.startswith("Epoch ")]
    assert len(epochs) == 3 and all(re.match(r"Epoch \d/3 \(\d+\.\d s\) \| train loss [\d.]+ \| valid loss [\d.]+, "
                                              r"door_open/f1_score [\d.]+ \| lr [\d.e-]+(?: \| best so far)?$", line)
                                     for line in epochs)
    assert [line.split("| lr ")[1].split(" ")[0] for line in epochs] == ["0.001", "0.0005", "0.00025"]  # this epoch's
    assert out.count("  door_open: ") == 1 and "valid at the best epoch" in out  # once, at the end
    assert "momentum" not in out and "* Epoch" not in out
    assert set(runner.epoch_metrics["_epoch_"]) == {"lr"}  # the scheduler's step: no AdamW betas as momentum


@pytest.mark.parametrize("verbose, tty, bar", [(None, True, True), (None, False, False), (False, True, False),
                                               (True, False, True)])
def test_progress_bar_by_default_on_a_terminal(data, flow_and_model, loaders_for, monkeypatch, verbose, tty, bar):
    flow, model = flow_and_model()
    monkeypatch.setattr(sys.stdout, "isatty", lambda: tty)
    runner = FlowRunner(flow, model=model)
    runner.train(loaders=loaders_for(flow, data), num_epochs=1, verbose=verbose)
    assert any(isinstance(c, FlowProgressBar) for c in runner.callbacks.values()) == bar
