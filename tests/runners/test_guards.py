"""FlowRunner's guards: a non-finite loss stops the run at its batch (or the batch is skipped,
counted and logged), a misspelled `valid_metric` fails before training, every documented switch
of `train` trains with a logdir, and an empty loader is named."""
import math
import os
import re

import numpy as np
import pytest
import torch
from catalyst.core.callback import Callback, CallbackOrder
from torch.utils.data import DataLoader

from dnn_cool_catalyst.callbacks.batch import INPUTS, LOSS_TERMS, TARGETS, StackedLossTerms
from dnn_cool_catalyst.errors import NonFiniteLossError
from dnn_cool_catalyst.runners import FlowRunner
from dnn_cool_catalyst.runners.guards import NONFINITE_METRIC, NonFiniteLossGuard

BAD_ROW = 21  # in the second batch (rows 16-31) of an unshuffled loader of batches of 16, at row 5


def with_nan(data, row=BAD_ROW):
    inputs, labels = data
    raw = inputs["raw"].copy()
    raw[row, 2] = np.nan
    return {"raw": raw}, labels


def without_rows(data, start, stop):
    inputs, labels = data
    keep = np.r_[0:start, stop:len(inputs["raw"])]
    return {"raw": inputs["raw"][keep]}, {p: np.asarray(v)[keep] for p, v in labels.items()}


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# Non-finite loss ----------------------------------------------------------------------------------


def test_a_nan_input_stops_training_at_its_batch_naming_loader_tasks_and_inputs(data, flow_and_model, loaders_for):
    flow, model = flow_and_model()
    forwards = []
    model.register_forward_hook(lambda *args: forwards.append(1))
    runner = FlowRunner(flow, model=model)
    with pytest.raises(NonFiniteLossError) as info:
        runner.train(loaders=loaders_for(flow, with_nan(data), shuffle=False), num_epochs=2)
    message = str(info.value)
    assert "batch 2 of loader 'train'" in message and "epoch 1" in message
    assert "X['raw']" in message and "row(s) [5]" in message and f"dataset index [{BAD_ROW}]" in message
    named = re.search(r"task\(s\) whose loss terms are not finite: \[([^\]]*)\]", message).group(1)
    assert named and all(p.strip(" '") in flow.graph.paths for p in named.split(","))
    assert "nonfinite='skip'" in message
    assert len(forwards) == 2  # stopped at the bad batch, before any other
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad batch took no step


def test_skip_mode_trains_on_the_other_batches_and_counts_the_skipped(data, flow_and_model, loaders_for, tmp_path):
    flow, model = flow_and_model()
    runner = FlowRunner(flow, model=model)
    with pytest.warns(UserWarning, match=r"skipped 1 batch\(es\) of loader 'train'.*batch 2.*X\['raw'\]"), \
            pytest.warns(UserWarning, match=r"skipped 1 batch\(es\) of loader 'valid'"):
        runner.train(loaders=loaders_for(flow, with_nan(data), shuffle=False), num_epochs=1,
                     logdir=str(tmp_path / "run"), nonfinite="skip")
    assert runner.epoch_metrics["train"][NONFINITE_METRIC] == 1
    assert runner.epoch_metrics["valid"][NONFINITE_METRIC] == 1  # the valid loader holds the row too
    assert math.isfinite(runner.epoch_metrics["valid"]["loss"])
    assert os.path.isfile(tmp_path / "run" / "checkpoints" / "runner.best.pth")
    trained = weights(model)
    assert all(torch.isfinite(v).all() for v in trained.values())

    # The same run on the data without the bad batch gives exactly the same weights: the skipped
    # batch reached neither the backward pass nor the optimizer (same batches in the same order on
    # the same device, no randomness in training: bit-identical, no tolerance needed).
    flow2, model2 = flow_and_model()
    FlowRunner(flow2, model=model2).train(loaders=loaders_for(flow2, without_rows(data, 16, 32), shuffle=False),
                                          num_epochs=1, threshold_tuning=False, interpretation=False)
    for key, value in weights(model2).items():
        assert torch.equal(trained[key], value), key


def test_skip_mode_refuses_a_loader_whose_every_batch_is_bad(data, flow_and_model, loaders_for):
    flow, model = flow_and_model()
    inputs, labels = data
    bad = ({"raw": np.full_like(inputs["raw"], np.inf)}, labels)
    with pytest.raises(NonFiniteLossError, match=r"every batch \(6\) of loader 'train'"):
        FlowRunner(flow, model=model).train(loaders=loaders_for(flow, bad), num_epochs=1, nonfinite="skip")


def test_nonfinite_mode_is_checked():
    with pytest.raises(ValueError, match=r"nonfinite must be 'raise' or 'skip', got 'ignore'"):
        NonFiniteLossGuard("ignore")



def _features_flow(n, bad_rows=(), drop=slice(0, 0)):
    """A flow whose heads read `features` directly (everything from the package: picklable for
    DDP workers), and its dataset with NaN in `bad_rows` and the rows `drop` left out."""
    from dnn_cool_catalyst.story import security_labels, security_tasks

    torch.manual_seed(0)
    flow = security_tasks(features=8).get_full_flow()
    features = np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32)
    features[list(bad_rows), 3] = np.nan
    labels = security_labels(n, seed=1, missing_rate=0.1)
    keep = np.setdiff1d(np.arange(n), np.arange(n)[drop])
    return flow, flow.get_dataset({"features": features[keep]}, {p: np.asarray(v)[keep] for p, v in labels.items()},
                                  with_index=True)


def test_skip_mode_under_ddp_skips_the_batch_in_every_process(tmp_path):
    """Rank 1's first batch holds a NaN: both processes skip that step (else rank 0 would wait in
    DDP's gradient all-reduce for ever), and the result is the one-process run without that
    global batch."""
    from datetime import timedelta

    from catalyst import dl

    from dnn_cool_catalyst.runners import DistributedDataParallelEngine

    # 64 samples, batches of 8 dealt to 2 processes in turn: rank 1's first batch is rows 8-15
    flow, ds = _features_flow(64, bad_rows=[12])
    ddp = FlowRunner(flow)
    engine = DistributedDataParallelEngine(num_node_workers=2, process_group_kwargs={
        "backend": "gloo", "timeout": timedelta(seconds=120)})  # a hang becomes an error
    ddp.train(loaders={"train": ds.loader(batch_size=8)}, engine=engine, num_epochs=1, logdir=str(tmp_path / "ddp"),
              nonfinite="skip", threshold_tuning=False, interpretation=False)
    assert engine.spawned
    logged = np.genfromtxt(tmp_path / "ddp" / "csv_logger" / "train.csv", delimiter=",", names=True)
    assert float(logged[NONFINITE_METRIC]) == 1.0  # rank 0 logs the step it skipped for rank 1

    # one process, global batches of 16 without rows 0-15 (the skipped global batch)
    one_flow, one_ds = _features_flow(64, drop=slice(0, 16))
    one = FlowRunner(one_flow)
    one.train(loaders={"train": one_ds.loader(batch_size=16)}, engine=dl.CPUEngine(), num_epochs=1,
              threshold_tuning=False, interpretation=False)
    for (name, a), b in zip(ddp.model.named_parameters(), one.model.parameters()):
        # DDP sums the gradients of two processes, one process sums the batch in another order:
        # float32 rounding of a few steps, as in test_ddp.py
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_error_comes_one_batch_late_naming_the_bad_batch(data, flow_and_model, loaders_for):
    flow, model = flow_and_model()
    forwards = []
    model.register_forward_hook(lambda *args: forwards.append(1))
    with pytest.raises(NonFiniteLossError, match=r"batch 2 of loader 'train'.*X\['raw'\].*one batch late"):
        FlowRunner(flow, model=model).train(loaders=loaders_for(flow, with_nan(data), shuffle=False), num_epochs=1)
    assert len(forwards) == 3


class FakeRunner:
    """What the guard reads of a runner after `handle_batch`."""

    def __init__(self, loss, paths, sums, x=None, y=None, loader_key="valid"):
        self.loader_key, self.epoch_step, self.is_train_loader = loader_key, 3, False
        self.batch_metrics = {"loss": loss}
        self.batch = {INPUTS: x if x is not None else {"raw": torch.zeros(4, 2)}, TARGETS: y or {},
                      LOSS_TERMS: StackedLossTerms(paths, torch.tensor([[s, 4.0] for s in sums]))}
        self.loader_metrics = {}
        self.model = torch.nn.Linear(2, 1)


def test_the_error_names_exactly_the_tasks_whose_terms_are_not_finite_and_infinite_labels():
    guard = NonFiniteLossGuard("raise")
    guard.before("on_loader_start", None)
    ok = FakeRunner(torch.tensor(1.0), ["a", "b", "c"], [1.0, 2.0, 3.0])
    assert guard.before("on_batch_end", ok)
    bad = FakeRunner(torch.tensor(math.inf), ["a", "b", "c"], [1.0, math.inf, 3.0],
                     y={"b": torch.tensor([0.0, math.inf, math.nan, 1.0])})
    with pytest.raises(NonFiniteLossError) as info:
        guard.before("on_batch_end", bad)
    message = str(info.value)
    assert "batch 2 of loader 'valid' (epoch 3)" in message and "loss inf" in message
    assert "task(s) whose loss terms are not finite: ['b']" in message
    assert "the inputs (X) are finite" in message
    assert "labels (y) of 'b' are infinite in row(s) [1]" in message  # NaN marks a missing label: not named


def test_lagged_check_raises_at_the_next_batch_naming_the_bad_one():
    """On an accelerator the check runs one batch late (no wait for the device at every batch)."""
    guard = NonFiniteLossGuard("raise", lagged=True)
    guard.before("on_loader_start", None)
    bad = FakeRunner(torch.tensor(math.nan), ["a"], [math.nan], x={"raw": torch.tensor([[0.0, math.nan]])})
    assert guard.before("on_batch_end", bad)  # not yet looked at
    with pytest.raises(NonFiniteLossError, match=r"batch 1 of loader 'valid'.*X\['raw'\] in row\(s\) \[0\]"):
        guard.before("on_batch_end", FakeRunner(torch.tensor(1.0), ["a"], [1.0]))
    guard.before("on_loader_start", None)
    assert guard.before("on_batch_end", bad)
    with pytest.raises(NonFiniteLossError, match=r"batch 1 of loader 'valid'.*one batch late"):
        guard.before("on_loader_end", bad)  # the last batch is looked at before the loader's end


# valid_metric -------------------------------------------------------------------------------------


def test_a_misspelled_valid_metric_fails_before_training_with_suggestions(data, flow_and_model, loaders_for, tmp_path):
    flow, model = flow_and_model()
    forwards = []
    model.register_forward_hook(lambda *args: forwards.append(1))
    with pytest.raises(ValueError, match=r"valid_metric 'door_open/acuracy'.*did you mean 'door_open/accuracy'") as info:
        FlowRunner(flow, model=model).train(loaders=loaders_for(flow, data), num_epochs=1, logdir=str(tmp_path),
                                            valid_metric="door_open/acuracy", minimize_valid_metric=False)
    assert "'loss'" in str(info.value) and "'camera_blocked/loss'" in str(info.value)
    assert forwards == []


def test_momentum_is_a_valid_metric_only_for_an_optimizer_with_momentum(data, flow_and_model, loaders_for, tmp_path):
    flow, model = flow_and_model()
    with pytest.raises(ValueError, match=r"valid_metric 'momentum'"):  # AdamW: no momentum is logged
        FlowRunner(flow, model=model).train(loaders=loaders_for(flow, data), num_epochs=1, logdir=str(tmp_path / "a"),
                                            valid_metric="momentum", minimize_valid_metric=False)
    runner = FlowRunner(flow, model=model)
    runner.train(loaders=loaders_for(flow, data), num_epochs=1, logdir=str(tmp_path / "b"), valid_metric="momentum",
                 minimize_valid_metric=False, optimizer=torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5))
    assert runner.epoch_metrics["valid"]["momentum"] == 0.5


class ScoreCallback(Callback):
    """A metric callback of the user's: its names cannot be known before it runs."""

    def __init__(self):
        super().__init__(order=CallbackOrder.Metric)

    def on_loader_end(self, runner):
        runner.loader_metrics["my/score"] = float(runner.epoch_step)


def test_valid_metrics_of_unknown_callbacks_are_checked_when_the_valid_loader_ends(data, flow_and_model, loaders_for,
                                                                                  tmp_path):
    flow, model = flow_and_model()
    runner = FlowRunner(flow, model=model)
    runner.train(loaders=loaders_for(flow, data), num_epochs=1, logdir=str(tmp_path / "ok"), callbacks=[ScoreCallback()],
                 valid_metric="my/score", minimize_valid_metric=False)
    assert runner.epoch_metrics["valid"]["my/score"] == 1.0
    with pytest.raises(ValueError, match=r"loader 'valid' produced no metric 'my/scor'.*did you mean 'my/score'"):
        runner.train(loaders=loaders_for(flow, data), num_epochs=1, logdir=str(tmp_path / "bad"),
                     callbacks=[ScoreCallback()], valid_metric="my/scor", minimize_valid_metric=False)
    assert not os.path.exists(tmp_path / "bad" / "checkpoints" / "runner.best.pth")


# Every documented switch trains -------------------------------------------------------------------


@pytest.mark.parametrize("switches", [
    {"flow_metrics": False}, {"interpretation": False}, {"threshold_tuning": False},
    {"flow_metrics": False, "interpretation": False, "threshold_tuning": False},
])
def test_every_documented_switch_trains_with_a_logdir(data, flow_and_model, loaders_for, tmp_path, switches):
    flow, model = flow_and_model()
    runner = FlowRunner(flow, model=model)
    runner.train(loaders=loaders_for(flow, data), num_epochs=2, logdir=str(tmp_path), **switches)
    assert os.path.isfile(tmp_path / "checkpoints" / "runner.best.pth")
    for loader in ("train", "valid"):
        assert math.isfinite(runner.epoch_metrics[loader]["loss"])
    if switches.get("flow_metrics") is False:
        assert "door_open/accuracy" not in runner.epoch_metrics["valid"]


def test_without_flow_metrics_the_loader_loss_is_the_sample_weighted_mean_of_batch_losses(data, flow_and_model,
                                                                                         loaders_for):
    flow, model = flow_and_model()
    runner = FlowRunner(flow, model=model)
    losses = []

    class Record(Callback):
        def __init__(self):
            super().__init__(order=CallbackOrder.Internal)

        def on_batch_end(self, runner):
            if runner.loader_key == "valid":
                losses.append((float(runner.batch_metrics["loss"]), runner.batch_size))

    runner.train(loaders=loaders_for(flow, data), num_epochs=1, flow_metrics=False, callbacks=[Record()])
    expected = sum(v * n for v, n in losses) / sum(n for _, n in losses)
    # float64 accumulation of the same float32 values in another order: equal to rounding
    assert runner.epoch_metrics["valid"]["loss"] == pytest.approx(expected, rel=1e-12)


# Empty loaders ------------------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["evaluate", "tune", "infer", "predict"])
def test_an_empty_loader_is_named(flow_and_model, what):
    flow, model = flow_and_model()
    runner = FlowRunner(flow, model=model)
    with pytest.raises(ValueError, match=rf"FlowRunner.{what}: the loader yielded no batches"):
        getattr(runner, what)(DataLoader([], batch_size=4))


def test_a_misspelled_valid_metric_with_a_balancer_still_fails_before_training(data, flow_and_model, loaders_for,
                                                                               tmp_path):
    # the balancer's callback is known to the guard (it logs on the training loaders only), so the
    # valid metric is still checked before the first batch
    from dnn_cool_catalyst import balancing

    flow, model = flow_and_model()
    forwards = []
    model.register_forward_hook(lambda *args: forwards.append(1))
    with pytest.raises(ValueError, match=r"valid_metric 'door_open/acuracy'") as info:
        FlowRunner(flow, model=model, balancer=balancing.UncertaintyWeighting()).train(
            loaders=loaders_for(flow, data), num_epochs=1, logdir=str(tmp_path), valid_metric="door_open/acuracy",
            minimize_valid_metric=False)
    assert forwards == []


@pytest.mark.parametrize("fuse", [False, True])
def test_nonfinite_parameters_name_the_task_even_in_a_fused_head_group(fuse):
    from torch import nn

    from dnn_cool_catalyst import Tasks
    from dnn_cool_catalyst.runners.guards import nonfinite_parameters
    from dnn_cool_catalyst.tasks import BinaryClassificationTask

    tasks = Tasks([BinaryClassificationTask(n, nn.Linear(4, 1)) for n in ("a", "b", "c")], inputs=["features"])

    @tasks.add_flow
    def full(flow, x, out):
        out += flow.a(x.features)
        out += flow.b(x.features)
        out += flow.c(x.features)
        return out

    model = nn.Sequential(nn.BatchNorm1d(4), tasks.get_full_flow().torch(fuse=fuse))
    assert nonfinite_parameters(model) == []
    with torch.no_grad():
        model[1].b.weight[0, 2] = math.nan  # task b's row (of the group's weight when fused)
        model[0].running_var[1] = math.inf
    assert nonfinite_parameters(model) == ["0.running_var", "1.b.weight"]
