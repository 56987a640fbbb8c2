"""FlowRunner end to end on CPU: TensorBoard contents, tuning, evaluation, inference order,
bad input on the first batch, resume, defaults, construction from config data."""
import json
import os
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch
from catalyst import dl
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, Dataset, TensorDataset

from dnn_cool_catalyst.callbacks import FlowMetricsCallback, InterpretationCallback, ThresholdTuningCallback
from dnn_cool_catalyst.callbacks.batch import OUTPUTS
from dnn_cool_catalyst.errors import InputError, LabelError
from dnn_cool_catalyst.runners import FlowRunner
from dnn_cool_catalyst.tuning import load_tuned


BINARY = ["camera_blocked", "door_open", "door_locked", "person_present"]


def events(logdir, run):
    ea = EventAccumulator(os.path.join(logdir, "tensorboard", run), size_guidance={"tensors": 0, "scalars": 0})
    ea.Reload()
    return ea


def test_two_epochs_of_training_reach_tensorboard(data, flow_and_model, loaders_for, tmp_path):
    flow, model = flow_and_model()
    runner = FlowRunner(flow, model=model)
    logdir = str(tmp_path / "run")
    runner.train(loaders=loaders_for(flow, data), num_epochs=2, logdir=logdir, lr=1e-2)
    valid, train = events(logdir, "valid"), events(logdir, "train")
    scalars, tensors = set(valid.Tags()["scalars"]), set(valid.Tags()["tensors"])
    metric_keys = [tm.key for tm in flow.get_metrics()]
    for run_scalars in (scalars, set(train.Tags()["scalars"])):
        for key in metric_keys + [f"{p}/loss" for p in flow.graph.paths] + ["loss"]:
            assert key in run_scalars, key  # `<path>/<metric>`, as the README says
        assert not any(tag.endswith("/epoch") for tag in run_scalars)
    assert [e.step for e in valid.Scalars("door_open/accuracy")] == [1, 2]
    assert "camera_blocked/tuned/threshold" in scalars
    assert "person_regression.face_regression.facial_characteristics/tuned/threshold/hat" in scalars
    for p in BINARY:
        assert [e.step for e in valid.Tensors(f"{p}/pr_curve")] == [1, 2]
    assert "explanations/sample_0/text_summary" in tensors
    assert "door_open/interpretation/text_summary" in tensors
    assert not any(t.endswith("pr_curve") for t in train.Tags()["tensors"])

    assert valid.Scalars("loss")[-1].value == pytest.approx(runner.epoch_metrics["valid"]["loss"], rel=1e-6)
    assert os.path.isfile(os.path.join(logdir, "checkpoints", "runner.best.pth"))
    assert set(pd.read_csv(os.path.join(logdir, "interpretation_valid.csv"))["task_path"]) == set(flow.graph.paths)
    # The file written at the last validation equals what tune gives on the same loader now.
    written = load_tuned(os.path.join(logdir, "tuned_params.json"))
    assert runner.tune(loaders_for(flow, data)["valid"], save=False) == written
    assert valid.Scalars("door_open/tuned/threshold")[-1].value == pytest.approx(written["door_open"]["threshold"])


def test_evaluate_is_the_evaluator_on_infer_output(data, flow_and_model, loaders_for, tmp_path, assert_clear_decisions):
    flow, model = flow_and_model()
    runner = FlowRunner(flow, model=model, logdir=str(tmp_path))
    loader = loaders_for(flow, data)["train"]
    table = runner.evaluate(loader)
    predictions = runner.infer(loader, preconditions="gt")
    # the loader shuffles anew on each pass: the two passes batch samples differently, so values
    # differ by rounding (assert_frame_equal's rtol 1e-5) and decisions must not be near a flip
    assert_clear_decisions(flow, predictions["activated"])
    expected = flow.get_evaluator()(predictions["activated"], predictions["targets"], preconditions="gt")
    pd.testing.assert_frame_equal(table, expected)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "evaluation.csv"), expected, check_dtype=False)
    predicted = runner.evaluate(loader, preconditions="predicted", save=False)
    assert (predicted["num_samples"] <= 96).all() and not predicted.equals(table)


def test_infer_returns_dataset_order_with_inference_masks(data, flow_and_model, loaders_for, assert_clear_decisions):
    flow, model = flow_and_model()
    runner = FlowRunner(flow, model=model)
    shuffled = runner.infer(loaders_for(flow, data, shuffle=True)["train"])
    ordered = runner.infer(loaders_for(flow, data)["valid"])
    assert shuffled["index"].tolist() == list(range(96))
    # The same sample in a batch of another composition: float32 matmuls sum in another order
    # (1.5e-8 measured near zero; bound ~ fan-in 8 x 2^-24 x |x||w| ~ 1e-6 for these unit-scale
    # values), so numbers get rtol 1e-5 / atol 1e-6; decisions are compared exactly once no
    # activation lies within 1e-5 of flipping.
    assert_clear_decisions(flow, ordered["activated"])
    for part in ("logits", "activated", "decoded", "mask", "targets"):
        for p in flow.graph.paths:
            a, b = shuffled[part][p], ordered[part][p]
            if a.dtype.kind == "f":
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"{part}/{p}")
            else:
                np.testing.assert_array_equal(a, b, err_msg=f"{part}/{p}")
    # "predicted": door_locked applies where the camera is not blocked and the door is decoded closed
    expected = ~shuffled["decoded"]["camera_blocked"].reshape(-1) & ~shuffled["decoded"]["door_open"].reshape(-1)
    np.testing.assert_array_equal(shuffled["mask"]["door_locked"], expected)
    with_gt = runner.infer(loaders_for(flow, data)["valid"], preconditions="gt")
    assert not np.array_equal(with_gt["mask"]["door_locked"], shuffled["mask"]["door_locked"])
    inputs_only = DataLoader(InputsOnly(flow.get_dataset(*data, computed=["features"])), batch_size=40)
    unlabelled = runner.infer(inputs_only)
    assert unlabelled["targets"] is None
    np.testing.assert_array_equal(unlabelled["decoded"]["door_open"], ordered["decoded"]["door_open"])


def test_an_inference_loader_without_labels_runs_beside_training(data, flow_and_model, loaders_for):
    flow, model = flow_and_model()
    loaders = loaders_for(flow, data)
    loaders["infer"] = DataLoader(InputsOnly(flow.get_dataset(*data, computed=["features"])), batch_size=32)
    runner = FlowRunner(flow, model=model)
    runner.train(loaders=loaders, num_epochs=1)
    assert "door_open/accuracy" in runner.epoch_metrics["valid"]
    assert set(runner.epoch_metrics["infer"]) == {"lr"}  # no flow metrics without labels; AdamW has no momentum
    assert set(runner.batch[OUTPUTS]["decoded"]) == set(flow.graph.paths)


class InputsOnly(Dataset):
    """A dataset of inputs without labels (nor ground truth), as at deployment."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        x, _ = self.ds[i]
        return {"raw": x["raw"]}


class Dropping(Dataset):
    """Items of a flow dataset with a key removed; reading past the first two batches fails (the
    loader prefetches one batch ahead)."""

    def __init__(self, ds, where, key, first_batch=32):
        self.ds, self.where, self.key, self.first_batch = ds, where, key, first_batch

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        if i >= self.first_batch:
            raise RuntimeError("read past the first batch")
        x, y = self.ds[i]
        part = x if self.where == "x" else y
        part.pop(self.key)
        return x, y


@pytest.mark.parametrize("where,key,error,match", [
    ("y", "door_open", LabelError, r"loader 'train': the first batch has no labels \(y\) for task\(s\) \['door_open'\]"),
    ("x", "gt", InputError, r"loader 'train': the first batch has no X\['gt'\]"),
])
def test_bad_batches_fail_on_the_first_batch_naming_the_key(data, flow_and_model, where, key, error, match):
    flow, model = flow_and_model()
    ds = flow.get_dataset(*data, with_index=True, computed=["features"])
    loader = DataLoader(Dropping(ds, where, key), batch_size=16)
    forwards = []
    model.register_forward_hook(lambda *args: forwards.append(1))
    with pytest.raises(error, match=match):
        FlowRunner(flow, model=model).train(loaders={"train": loader}, num_epochs=1)
    assert forwards == []  # found before the model saw the first batch


def test_missing_feature_and_wrong_loader_items_are_named(data, flow_and_model):
    flow, _ = flow_and_model()
    raw, labels = data
    ds = flow.get_dataset({"pixels": raw["raw"]}, labels, computed=["features"])
    with pytest.raises(InputError, match=r"task 'camera_blocked' reads x.features.*has no key 'features'"):
        FlowRunner(flow).train(loaders={"train": ds.loader(batch_size=16)}, num_epochs=1)
    tensors = DataLoader(TensorDataset(torch.zeros(8, 6), torch.zeros(8)), batch_size=4)
    with pytest.raises(TypeError, match=r"loader 'valid' yielded a list of 2 item\(s\): \(Tensor, Tensor\)"):
        FlowRunner(flow).train(loaders={"valid": tensors}, num_epochs=1)


class StopAt(dl.Callback):
    """Interrupts a run in the middle of an epoch."""

    def __init__(self, epoch, batch):
        super().__init__(order=dl.CallbackOrder.External)
        self.epoch, self.batch = epoch, batch

    def on_batch_end(self, runner):
        if runner.epoch_step == self.epoch and runner.loader_batch_step == self.batch:
            raise KeyboardInterrupt


def test_resume_after_an_interruption_gives_the_uninterrupted_weights(data, flow_and_model, loaders_for, tmp_path):
    def run(logdir, callbacks=None, resume=None):
        flow, model = flow_and_model()
        runner = FlowRunner(flow, model=model)
        runner.train(loaders=loaders_for(flow, data), num_epochs=4, logdir=logdir, seed=3, lr=1e-2,
                     callbacks=callbacks, resume=resume, interpretation=False)
        return runner, flow

    whole, whole_flow = run(str(tmp_path / "whole"))
    with pytest.raises(KeyboardInterrupt):
        run(str(tmp_path / "cut"), callbacks=[StopAt(epoch=3, batch=2)])
    assert json.loads((tmp_path / "cut" / "checkpoints" / "runner.storage.json").read_text())["storage"]
    resumed, resumed_flow = run(str(tmp_path / "cut"), resume=True)
    assert resumed.epoch_step == 4
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole_flow.get_decoder().params() == resumed_flow.get_decoder().params()
    assert load_tuned(tmp_path / "whole" / "tuned_params.json") == load_tuned(tmp_path / "cut" / "tuned_params.json")


def test_resume_needs_a_checkpoint(data, flow_and_model, loaders_for, tmp_path):
    flow, model = flow_and_model()
    with pytest.raises(FileNotFoundError, match="runner.last.pth"):
        FlowRunner(flow, model=model).train(loaders=loaders_for(flow, data), logdir=str(tmp_path), resume=True)


def test_defaults_only_where_none_was_given(data, flow_and_model, loaders_for):
    flow, model = flow_and_model()
    runner = FlowRunner(flow, model=model)
    mine = FlowMetricsCallback(loaders=["valid"])
    runner.train(loaders=loaders_for(flow, data), num_epochs=1, callbacks={"mine": mine}, threshold_tuning=False,
                 optimizer=partial(torch.optim.SGD, lr=0.1))
    kinds = [type(c).__name__ for c in runner.callbacks.values()]
    assert kinds.count("FlowMetricsCallback") == 1 and runner.callbacks["mine"] is mine
    assert "InterpretationCallback" in kinds and "ThresholdTuningCallback" not in kinds
    assert not any(isinstance(c, dl.ICheckpointCallback) for c in runner.callbacks.values())  # no logdir
    assert isinstance(runner.optimizer.optimizer, torch.optim.SGD)  # inside accelerate's wrapper
    assert "door_open/accuracy" not in runner.epoch_metrics["train"] and "door_open/accuracy" in runner.epoch_metrics["valid"]
    before = flow.get_decoder().params()
    metrics = runner.evaluate_loader(loaders_for(flow, data)["valid"])
    assert metrics["loss"] == pytest.approx(runner.epoch_metrics["valid"]["loss"])
    assert flow.get_decoder().params() == before  # evaluation tunes nothing
    assert not any(isinstance(c, (ThresholdTuningCallback, InterpretationCallback)) for c in runner.callbacks.values())


def test_constructible_from_config_data():
    from catalyst.registry import REGISTRY

    built = REGISTRY.get_from_params(**{
        "runner": {"_target_": "dnn_cool_catalyst.runners.FlowRunner", "flow": "dnn_cool_catalyst.story.security_tasks"},
        "callbacks": {"interpretation": {"_target_": "dnn_cool_catalyst.callbacks.InterpretationCallback", "top_k": 2,
                                         "publishers": {"img": {"_target_": "dnn_cool_catalyst.callbacks.ImagePublisher"}}},
                      "tuning": {"_target_": "dnn_cool_catalyst.callbacks.ThresholdTuningCallback", "metric": "f1"}},
    })
    assert isinstance(built["runner"], FlowRunner) and built["runner"].flow.name == "full_flow"
    assert built["runner"].model is built["runner"].flow.torch()
    assert built["callbacks"]["interpretation"].top_k == 2 and built["callbacks"]["tuning"].metric == "f1"


def test_bad_construction_is_named():
    with pytest.raises(ImportError, match="no 'nope'"):
        FlowRunner("dnn_cool_catalyst.story.nope")
    with pytest.raises(TypeError, match="a flow must be a TaskFlow"):
        FlowRunner(42)
    runner = FlowRunner("dnn_cool_catalyst.story.security_tasks", balance_dataparallel_memory=True)
    with pytest.raises(ValueError, match="needs a BalancedDataParallelEngine"):
        runner.train(loaders={"train": []}, engine=dl.CPUEngine())


def test_train_and_evaluate_say_where_the_logs_are_and_print_the_table(data, flow_and_model, loaders_for, tmp_path,
                                                                       capsys):
    flow, model = flow_and_model()
    runner = FlowRunner(flow, model=model)
    runner.train(loaders=loaders_for(flow, data), num_epochs=1, logdir=str(tmp_path / "run"))
    assert f"TensorBoard: tensorboard --logdir {tmp_path / 'run' / 'tensorboard'}" in capsys.readouterr().out
    table = runner.evaluate(loaders_for(flow, data)["valid"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Evaluation (preconditions from the labels):"
    for path in flow.graph.paths:  # every task on a line of its own, within 100 columns
        assert sum(line.split()[0].endswith(path.rsplit(".", 1)[-1]) for line in lines if line.strip()) == 1, path
    assert max(len(line) for line in lines if not line.startswith(("Logs", "TensorBoard"))) <= 100
    runner.evaluate(loaders_for(flow, data)["valid"], verbose=False)
    assert capsys.readouterr().out == "" and len(table) > 0


def test_step_counters_count_samples_not_keys(data, flow_and_model, loaders_for):
    flow, model = flow_and_model()
    loaders = loaders_for(flow, data)
    loaders["valid"] = flow.get_dataset(*data, with_index=True, computed=["features"]).loader(batch_size=40)
    runner = FlowRunner(flow, model=model)
    runner.train(loaders=loaders, num_epochs=1, interpretation=False, threshold_tuning=False)
    # Catalyst's counters, with the batch size corrected: Catalyst 22.4 would count len(X) = 3 keys per batch
    assert (runner.batch_step, runner.sample_step) == (6 + 3, 96 + 96)
    assert (runner.loader_batch_step, runner.loader_sample_step, runner.batch_size) == (3, 96, 16)  # 40, 40, 16


def test_unknown_train_arguments_are_named_with_the_closest_one(data, flow_and_model, loaders_for):
    flow, model = flow_and_model()
    runner = FlowRunner(flow, model=model)
    with pytest.raises(TypeError, match=r"unknown argument\(s\) 'num_epoch'; did you mean 'num_epochs'"):
        runner.train(loaders=loaders_for(flow, data), num_epoch=1)
    with pytest.raises(TypeError, match=r"'treshold_tuning'; did you mean 'threshold_tuning'"):
        runner.train(loaders=loaders_for(flow, data), treshold_tuning=False)


def test_a_plain_criterion_trains_without_loss_terms(data, flow_and_model, loaders_for):
    flow, model = flow_and_model()
    runner = FlowRunner(flow, model=model)
    runner.train(loaders=loaders_for(flow, data), num_epochs=1, criterion=PlainLoss(flow.get_loss()),
                 flow_metrics=False, interpretation=False, threshold_tuning=False)
    assert runner.epoch_metrics["valid"]["loss"] > 0 and "loss_terms" not in runner.batch


class PlainLoss:
    """A criterion(outputs, targets) -> loss that is no FlowLoss."""

    def __init__(self, flow_loss):
        self.flow_loss = flow_loss

    def __call__(self, outputs, targets):
        return self.flow_loss(outputs, targets)


def test_balanced_replicas_keep_the_samples_a_wrapped_interpretation_callback_explains(data, flow_and_model,
                                                                                     loaders_for):
    flow, model = flow_and_model()
    runner = FlowRunner(flow, model=model, balance_dataparallel_memory=True)
    wrapped = dl.ControlFlowCallbackWrapper(InterpretationCallback(explain=5), loaders=["valid"])
    runner.train(loaders=loaders_for(flow, data), num_epochs=1, callbacks={"interpretation": wrapped},
                 threshold_tuning=False)
    assert runner.model.reducer.explain == 5  # the wrapper hid the callback's `explain` before


# The Catalyst 22.4 code FlowRunner relies on (DESIGN.md principle 11) ---------------------------

CATALYST_RUNNER_SOURCES = {
    # `_setup_callbacks` is wrapped to silence check_callbacks' three "No I*Callback" warnings;
    # `_run_event` is wrapped by the guards, which rely on `_run_loader` running on_batch_start,
    # handle_batch, on_batch_end through it; `on_batch_start` is called, then its batch size
    # (len(batch[0])) corrected. A new hash means: re-read Catalyst's code, check the override
    # still fits, then update the hash.
    "_setup_callbacks": ("(self)", "09c07a9b6f22f78b"),
    "_run_event": ("(self, event: str) -> None", "a8f1d67e36a69e84"),
    "_run_loader": ("(self) -> None", "180bb2c17cea4e5a"),
    "on_batch_start": ("(self, runner: 'IRunner')", "2ab2af3cdef453b2"),
}


@pytest.mark.parametrize("name", list(CATALYST_RUNNER_SOURCES))
def test_catalyst_private_methods_overridden_are_as_in_22_4(name):
    import hashlib
    import inspect

    from catalyst.core.runner import IRunner

    signature, digest = CATALYST_RUNNER_SOURCES[name]
    method = getattr(super(FlowRunner, FlowRunner), name)
    assert method is getattr(IRunner, name), f"Catalyst's Runner now overrides IRunner.{name}: check runners/runner.py"
    assert str(inspect.signature(method)) == signature
    source = inspect.getsource(method)
    assert hashlib.sha256(source.encode("utf-8")).hexdigest()[:16] == digest, (
        f"Catalyst's IRunner.{name} changed: check FlowRunner.{name} in runners/runner.py")


def test_flow_runner_overrides_only_the_known_private_methods_of_catalyst():
    own = {n for n, v in vars(FlowRunner).items() if n.startswith("_") and not n.startswith("__") and callable(v)}
    bases = [b for b in FlowRunner.__mro__[1:] if b.__module__.startswith("catalyst.")]
    assert {n for n in own if any(n in vars(b) for b in bases)} == {"_setup_callbacks", "_run_event"}
