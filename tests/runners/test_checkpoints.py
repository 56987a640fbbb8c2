"""Checkpoints and logdirs: atomic writes, safe loads, best-so-far across resumes, the best epoch's
thresholds, one run per logdir, one CSV header (`runners.checkpoints`, `compat.CheckpointCallback`,
`compat.CSVLogger`)."""
import hashlib
import inspect
import json
import os
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from catalyst import dl
from catalyst.core.callback import Callback

from dnn_cool_catalyst.callbacks.metrics import METRICS_ORDER
from dnn_cool_catalyst.errors import CheckpointError
from dnn_cool_catalyst.runners import FlowRunner, checkpoints, compat
from dnn_cool_catalyst.runners.restore import restore_from_logdir

#: A valid "loss" per epoch (minimised): best at epoch 2 until epoch 6.
SCORES = {1: 0.9, 2: 0.2, 3: 0.5, 4: 0.6, 5: 0.4, 6: 0.1}


class ScriptedValidLoss(Callback):
    """Replaces the valid loader's loss by `SCORES[epoch]` (after FlowMetricsCallback computed it)."""

    def __init__(self):
        super().__init__(order=METRICS_ORDER + 1)

    def on_loader_end(self, runner):
        if runner.loader_key == "valid":
            runner.loader_metrics["loss"] = SCORES[runner.epoch_step]


class DiskFull:
    """Pickling it fails the way a full disk fails a write."""

    def __reduce__(self):
        raise OSError(28, "No space left on device")


class FailingStepLR(torch.optim.lr_scheduler.StepLR):
    """A scheduler whose state cannot be written once `fail` is set."""

    fail = False

    def state_dict(self):
        state = super().state_dict()
        if self.fail:
            state["big"] = torch.zeros(1 << 16)  # written before the failure
            state["disk"] = DiskFull()
        return state


class FailFrom(Callback):
    """At the start of epoch `epoch`: remember the checkpoint files' bytes, then make saving fail."""

    def __init__(self, epoch, directory):
        super().__init__(order=0)
        self.epoch, self.directory, self.before = epoch, directory, None

    def on_epoch_start(self, runner):
        if runner.epoch_step == self.epoch:
            self.before = {n: (self.directory / n).read_bytes() for n in os.listdir(self.directory)}
            runner.scheduler.fail = True


class Payload:
    """Unpickling it would create `path` (as a hostile checkpoint would run anything)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _train(flow_and_model, loaders_for, data, logdir, num_epochs, seed=0, **kwargs):
    flow, model = flow_and_model(seed)
    runner = FlowRunner(flow, model=model)
    kwargs.setdefault("interpretation", False)
    runner.train(loaders=loaders_for(flow, data), num_epochs=num_epochs, logdir=str(logdir), seed=3, lr=1e-2, **kwargs)
    return runner, flow


def _model_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model_state_dict"]


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# Atomic writes and safe loads --------------------------------------------------------------------


def test_a_failed_checkpoint_write_leaves_the_previous_files(data, flow_and_model, loaders_for, tmp_path):
    directory = tmp_path / "run" / "checkpoints"
    fail = FailFrom(epoch=3, directory=directory)
    scheduler = lambda optimizer: FailingStepLR(optimizer, step_size=1, gamma=0.9)  # noqa: E731
    with pytest.raises(OSError, match="No space left"):
        _train(flow_and_model, loaders_for, data, tmp_path / "run", 4, scheduler=scheduler, callbacks=[fail])
    assert fail.before and "runner.last.pth" in fail.before
    after = {n: (directory / n).read_bytes() for n in os.listdir(directory)}
    assert after == fail.before  # byte-identical, no temporary file, no truncated runner.0003.pth
    runner, _ = _train(flow_and_model, loaders_for, data, tmp_path / "run", 4, resume=True,
                       scheduler=lambda optimizer: FailingStepLR(optimizer, step_size=1, gamma=0.9))
    assert runner.epoch_step == 4


@pytest.mark.parametrize("damage, match", [(lambda b: b"", "is empty"), (lambda b: b[: len(b) // 2], "truncated")])
def test_resume_from_a_damaged_checkpoint_names_the_file(data, flow_and_model, loaders_for, tmp_path, damage, match):
    _train(flow_and_model, loaders_for, data, tmp_path, 1)
    last = tmp_path / "checkpoints" / "runner.last.pth"
    last.write_bytes(damage(last.read_bytes()))
    with pytest.raises(CheckpointError, match=match) as e:
        _train(flow_and_model, loaders_for, data, tmp_path, 2, resume=True)
    assert str(last) in str(e.value) and "overwrite=True" in str(e.value)


def test_a_checkpoint_carrying_a_pickled_payload_is_refused(data, flow_and_model, loaders_for, tmp_path):
    marker = tmp_path / "payload_ran"
    directory = tmp_path / "run" / "checkpoints"

    def poison(path):
        checkpoint = torch.load(path, weights_only=True)
        checkpoint["extra"] = Payload(marker)
        torch.save(checkpoint, path)

    class PoisonBest(Callback):  # before load_best_on_end reads the best epoch's file
        def __init__(self):
            super().__init__(order=0)

        def on_experiment_end(self, runner):
            poison(directory / "runner.0001.pth")

    with pytest.raises(CheckpointError, match=r"refused .*runner\.0001\.pth"):  # load_best_on_end
        _train(flow_and_model, loaders_for, data, tmp_path / "run", 1, load_best_on_end=True, callbacks=[PoisonBest()])
    last = directory / "runner.last.pth"
    poison(last)
    with pytest.raises(CheckpointError, match=r"refused .*runner\.last\.pth.*\(\w*\.?open\)"):  # resume
        _train(flow_and_model, loaders_for, data, tmp_path / "run", 2, resume=True)
    poison(directory / "runner.best.pth")
    with pytest.raises(CheckpointError, match=r"refused .*runner\.best\.pth"):  # after spawned DDP workers
        flow = flow_and_model()[0]
        restore_from_logdir(str(tmp_path / "run"), flow.torch(), flow, load_best_on_end=True)
    assert not marker.exists()


# Best-so-far bookkeeping and the best epoch's thresholds -----------------------------------------


def test_resume_keeps_the_best_checkpoint_of_earlier_epochs(data, flow_and_model, loaders_for, tmp_path):
    directory = tmp_path / "checkpoints"
    _train(flow_and_model, loaders_for, data, tmp_path, 3, callbacks=[ScriptedValidLoss()])
    best_weights = _model_state(directory / "runner.0002.pth")
    assert _same_state(_model_state(directory / "runner.best.pth"), best_weights)  # not the last epoch's weights
    for epochs, best in ((5, 2), (6, 6)):  # 4 and 5 are worse than 2; 6 beats it
        _train(flow_and_model, loaders_for, data, tmp_path, epochs, resume=True, callbacks=[ScriptedValidLoss()])
        saved = torch.load(directory / "runner.best.pth", weights_only=True)
        assert saved["epoch_step"] == best
        stored = json.loads((directory / "runner.storage.json").read_text())["storage"]
        assert [(os.path.basename(s["logpath"]), s["metric"]) for s in stored] == [(f"runner.{best:04d}.pth", SCORES[best])]
        assert sorted(n for n in os.listdir(directory) if n.endswith(".pth")) == sorted(
            ["runner.best.pth", "runner.last.pth", f"runner.{best:04d}.pth"])
        if best == 2:
            assert _same_state(saved["model_state_dict"], best_weights)


def test_load_best_on_end_restores_the_thresholds_of_the_best_epoch(data, flow_and_model, loaders_for, tmp_path):
    runner, flow = _train(flow_and_model, loaders_for, data, tmp_path, 3, callbacks=[ScriptedValidLoss()],
                          load_best_on_end=True)
    history = json.loads((tmp_path / "tuned_params_history.json").read_text())

    def thresholds(params):
        return {p: v["threshold"] for p, v in params.items() if "threshold" in v}

    assert thresholds(history["2"]) != thresholds(history["3"])  # otherwise the test shows nothing
    assert thresholds(flow.get_decoder().params()) == thresholds(history["2"])
    assert thresholds(json.loads((tmp_path / "tuned_params.json").read_text())) == thresholds(history["2"])
    assert _same_state(runner.model.state_dict(), _model_state(tmp_path / "checkpoints" / "runner.0002.pth"))
    # As after spawned DDP workers: a fresh runner reads the best epoch back from the logdir.
    flow2, model2 = flow_and_model(seed=5)
    restore_from_logdir(str(tmp_path), model2, flow2, load_best_on_end=True)
    assert thresholds(flow2.get_decoder().params()) == thresholds(history["2"])
    assert _same_state(model2.state_dict(), runner.model.state_dict())


# One run per logdir, one CSV header --------------------------------------------------------------


def test_a_new_run_into_a_used_logdir_is_refused_unless_overwritten(data, flow_and_model, loaders_for, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    _train(flow_and_model, loaders_for, data, tmp_path, 3, callbacks=[ScriptedValidLoss()])
    with pytest.raises(FileExistsError, match="resume=True.*overwrite=True") as e:
        _train(flow_and_model, loaders_for, data, tmp_path, 1)
    assert str(tmp_path) in str(e.value)
    with pytest.raises(ValueError, match="choose one"):
        _train(flow_and_model, loaders_for, data, tmp_path, 4, resume=True, overwrite=True)
    _train(flow_and_model, loaders_for, data, tmp_path, 1, overwrite=True)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["runner.0001.pth", "runner.best.pth", "runner.last.pth",
                                                             "runner.storage.json"]
    assert list(json.loads((tmp_path / "tuned_params_history.json").read_text())) == ["1"]
    assert pd.read_csv(tmp_path / "csv_logger" / "valid.csv")["step"].tolist() == [1]
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only the run's files are removed


def test_a_resumed_run_keeps_one_csv_header_and_one_history_entry_per_epoch(data, flow_and_model, loaders_for, tmp_path):
    _train(flow_and_model, loaders_for, data, tmp_path, 2)
    _train(flow_and_model, loaders_for, data, tmp_path, 3, resume=True)
    for loader in ("train", "valid"):
        table = pd.read_csv(tmp_path / "csv_logger" / f"{loader}.csv")
        assert table["step"].tolist() == [1, 2, 3]
        assert pd.api.types.is_float_dtype(table["loss"])
    assert list(json.loads((tmp_path / "tuned_params_history.json").read_text())) == ["1", "2", "3"]


def test_csv_logger_keeps_earlier_epochs_and_drops_a_cut_row(tmp_path):
    (tmp_path / "valid.csv").write_text("step,a,b\n1,0.1,0.2\n2,0.3,0.4\n3,0.5,0.6\n4,0.7")
    logger = compat.CSVLogger(logdir=str(tmp_path))
    logger.log_metrics({"valid": {"a": 1.5, "c": 2.5}}, scope="epoch", runner=SimpleNamespace(epoch_step=3))
    logger.close_log()
    table = pd.read_csv(tmp_path / "valid.csv")
    assert list(table.columns) == ["step", "a", "b", "c"] and table["step"].tolist() == [1, 2, 3]
    assert table["a"].tolist() == [0.1, 0.3, 1.5] and pd.isna(table["b"].iloc[2]) and pd.isna(table["c"].iloc[0])


# The Catalyst 22.4 code the overrides replace (DESIGN.md principle 11) ---------------------------


CATALYST_SOURCES = {
    # `compat.CSVLogger` replaces `log_metrics` and uses the file handles in `loggers`.
    (dl.CSVLogger, "__init__"): "3401123a10f04925",
    (dl.CSVLogger, "log_metrics"): "3d4daf3325c9d5d8",
    (dl.CSVLogger, "close_log"): "2c575e2f6e7140ad",
}


@pytest.mark.parametrize("owner, name", list(CATALYST_SOURCES))
def test_catalyst_csv_logger_is_the_one_overridden(owner, name):
    source = inspect.getsource(getattr(owner, name))
    assert hashlib.sha256(source.encode("utf-8")).hexdigest()[:16] == CATALYST_SOURCES[(owner, name)], (
        f"Catalyst's {owner.__name__}.{name} changed: check runners/compat.py")
