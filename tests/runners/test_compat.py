"""The Catalyst 22.4 workarounds: each fixes what it says and changes nothing else."""
import warnings

import pytest
import torch
from catalyst.core.misc import check_callbacks
from torch import nn

from dnn_cool_catalyst.runners.compat import (
    BackwardCallback,
    DataParallelEngine,
    batch_fetching_loader,
    generators_across_processes,
    quiet_step_callback_check,
)
from dnn_cool_catalyst.runners.engines import available_engine


def test_batch_fetching_loader_yields_the_same_batches(data, flow_and_model):
    flow, _ = flow_and_model()
    ds = flow.get_dataset(*data, with_index=True, computed=["features"])
    original = ds.loader(batch_size=10, shuffle=True, generator=torch.Generator().manual_seed(1))
    rebuilt = batch_fetching_loader(ds.loader(batch_size=10, shuffle=True, generator=torch.Generator().manual_seed(1)))
    assert rebuilt is not original and rebuilt.batch_sampler.batch_size == 10
    for (xa, ya), (xb, yb) in zip(original, rebuilt, strict=True):
        assert torch.equal(xa["index"], xb["index"]) and torch.equal(xa["raw"], xb["raw"])
        for p in ya:  # the same labels, missing ones (NaN) in the same places
            torch.testing.assert_close(ya[p], yb[p], rtol=0, atol=0, equal_nan=True)
    plain = torch.utils.data.DataLoader(ds, batch_size=4)
    assert batch_fetching_loader(plain) is plain


def test_rebuilt_loader_can_be_prepared_by_accelerate(data, flow_and_model):
    flow, _ = flow_and_model()
    ds = flow.get_dataset(*data, computed=["features"])
    engine = available_engine(cpu=True)
    with pytest.raises(TypeError, match="multiple values for keyword argument 'batch_size'"):
        engine.prepare(ds.loader(batch_size=16))  # the accelerate bug worked around
    prepared = engine.prepare(batch_fetching_loader(ds.loader(batch_size=16)))
    assert sum(len(x["raw"]) for x, _ in prepared) == len(ds)


def test_data_parallel_engine_prepares_a_model():
    engine = DataParallelEngine()
    model = engine.prepare(nn.Linear(3, 2))
    assert model(torch.zeros(4, 3)).shape == (4, 2)


class _Runner:
    is_train_loader = True

    def __init__(self, model, loss):
        self.model, self.batch_metrics = model, {"loss": loss}
        self.engine = available_engine(cpu=True)


def test_backward_callback_clips_and_detaches():
    model = nn.Linear(3, 1)
    loss = (model(torch.full((8, 3), 100.0)) ** 2).mean()
    runner = _Runner(model, loss)
    BackwardCallback(metric_key="loss", grad_clip_fn=nn.utils.clip_grad_norm_, grad_clip_params={"max_norm": 1.0},
                     log_gradient=True).on_batch_end(runner)
    norm = torch.norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert norm == pytest.approx(1.0, rel=1e-4) and float(runner.batch_metrics["gradient/loss/norm"]) > 1.0
    assert not runner.batch_metrics["loss"].requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        float(runner.batch_metrics["loss"])


def test_only_the_three_step_callback_warnings_are_silenced():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_step_callback_check():
            check_callbacks({}, criterion=object(), optimizer=object())
            check_callbacks({}, scheduler=object())  # the scheduler one is not silenced
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "ISchedulerCallback" in messages[0]


def test_training_with_the_data_parallel_engine(data, flow_and_model, loaders_for):
    from dnn_cool_catalyst.runners import FlowRunner

    flow, model = flow_and_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runner = FlowRunner(flow, model=model)
    runner.train(loaders=loaders_for(flow, data), num_epochs=1, engine=DataParallelEngine(), interpretation=False)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # it trained the model
    # the valid loss is the flow loss of the trained model over the whole valid set (the loader's
    # sums and counts recombined); rel 1e-5: float32 sums over 3 batches against one of 96 samples
    ds = flow.get_dataset(*data, computed=["features"])  # the valid loader's samples, as one batch
    x, y = ds[list(range(len(ds)))]
    model.eval()
    with torch.no_grad():
        expected = float(flow.get_loss()(model(x), y))
    assert runner.epoch_metrics["valid"]["loss"] == pytest.approx(expected, rel=1e-5)


class _OptimizerRunner:
    is_train_loader = False

    def __init__(self, optimizer):
        self.optimizer, self.batch_metrics, self.loader_metrics = optimizer, {}, {}


@pytest.mark.parametrize("make, momentum", [
    (lambda p: torch.optim.AdamW(p, lr=0.01), None),  # Catalyst logged betas[0] = 0.9 as momentum
    (lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.5, 0.9)), None),
    (lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.7), 0.7),
    (lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.3), 0.3),
])
def test_optimizer_callback_logs_momentum_only_for_optimizers_that_have_one(make, momentum):
    from dnn_cool_catalyst.runners.compat import OptimizerCallback, logs_momentum_metric

    runner = _OptimizerRunner(make(nn.Linear(2, 1).parameters()))
    callback = OptimizerCallback(metric_key="loss")
    callback.on_experiment_start(runner)
    callback.on_batch_end(runner)
    callback.on_loader_end(runner)
    expected = {"lr": 0.01} if momentum is None else {"lr": 0.01, "momentum": momentum}
    assert runner.batch_metrics == expected and runner.loader_metrics == expected
    assert logs_momentum_metric(callback, runner) == (momentum is not None)  # what the valid_metric check knows


@pytest.mark.parametrize("make, momentum", [(lambda p: torch.optim.AdamW(p, lr=0.01), None),
                                            (lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.7), 0.7)])
def test_scheduler_callback_logs_momentum_only_for_optimizers_that_have_one(make, momentum):
    from dnn_cool_catalyst.runners.compat import SchedulerCallback

    runner = _OptimizerRunner(make(nn.Linear(2, 1).parameters()))
    runner.scheduler = torch.optim.lr_scheduler.StepLR(runner.optimizer, 1, gamma=0.5)
    runner.epoch_metrics = {"_epoch_": {}}
    callback = SchedulerCallback()
    callback.on_experiment_start(runner)
    runner.optimizer.step()  # as in training: the optimizer steps before the scheduler
    callback.make_epoch_step(runner)
    expected = {"lr": 0.005} if momentum is None else {"lr": 0.005, "momentum": momentum}
    assert runner.epoch_metrics["_epoch_"] == expected  # Catalyst's wrote AdamW's betas[0] = 0.9 as momentum


def test_generators_reach_spawned_processes_only_inside_the_block():
    from multiprocessing.reduction import ForkingPickler

    generator = torch.Generator().manual_seed(3)
    torch.rand(5, generator=generator)  # a state that is not the seed's
    assert torch.Generator not in ForkingPickler._extra_reducers  # the table the block restores
    with generators_across_processes():
        with generators_across_processes():  # nested (FlowRunner around the engine's spawn)
            pass
        copy = ForkingPickler.loads(bytes(ForkingPickler.dumps(generator)))
    assert torch.Generator not in ForkingPickler._extra_reducers  # nothing left process-wide
    assert copy.initial_seed() == 3 and torch.equal(torch.rand(4, generator=copy), torch.rand(4, generator=generator))


def test_compat_imports_nothing_from_engines():
    """`engines` builds on `compat` (its `DataParallelEngine`); the other way round would be a circle."""
    import ast
    import inspect

    from dnn_cool_catalyst.runners import compat

    tree = ast.parse(inspect.getsource(compat))
    imported = {(node.level, node.module) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {(node.level, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                 for alias in node.names}
    assert not any(name and name.split(".")[-1] == "engines" for _, name in imported)


def _catalyst_privates_overridden(cls):
    """The private (single-underscore) methods `cls` defines over a Catalyst base class's."""
    own = {n for n in vars(cls) if n.startswith("_") and not n.startswith("__") and callable(vars(cls)[n])}
    bases = [b for b in cls.__mro__[1:] if b.__module__.startswith("catalyst.")]
    return {n for n in own if any(n in vars(b) for b in bases)}


@pytest.mark.parametrize("name", ["CheckpointCallback", "CSVLogger", "BackwardCallback", "DataParallelEngine"])
def test_the_workarounds_override_no_private_method_of_catalyst(name):
    # Catalyst 22.4's dl.CheckpointCallback leaves no public seam, so compat.CheckpointCallback is
    # written on the public ICheckpointCallback; a Catalyst that adds `_save` (or any private
    # method we define) to a base class would be silently overridden: this fails then.
    import dnn_cool_catalyst.runners.compat as compat

    assert _catalyst_privates_overridden(getattr(compat, name)) == set()


def test_the_workaround_optimizer_callbacks_override_only_the_known_private_methods():
    # Catalyst 22.4 computes the logged lr/momentum in these private methods and nowhere public;
    # they are pinned by signature and source here (test_checkpoints.py pins CSVLogger's).
    import inspect

    from catalyst import dl

    from dnn_cool_catalyst.runners.compat import OptimizerCallback, SchedulerCallback

    assert _catalyst_privates_overridden(OptimizerCallback) == {"_get_lr_momentum_stats"}
    assert _catalyst_privates_overridden(SchedulerCallback) == {"_scheduler_step"}
    import hashlib

    for method, signature, digest in ((dl.OptimizerCallback._get_lr_momentum_stats, "(self) -> Dict", "a092f277a92bdd80"),
                                      (dl.SchedulerCallback._scheduler_step, "(scheduler, reduced_metric=None)",
                                       "0cf950f5ac48ed37")):
        assert str(inspect.signature(method)) == signature
        assert hashlib.sha256(inspect.getsource(method).encode("utf-8")).hexdigest()[:16] == digest, (
            f"Catalyst's {method.__qualname__} changed: check runners/compat.py")


def test_checkpoint_callback_keeps_the_last_epochs_without_a_metric_and_checks_its_arguments(tmp_path):
    from dnn_cool_catalyst.runners.compat import CheckpointCallback

    with pytest.raises(ValueError, match="give metric_key= too"):
        CheckpointCallback(logdir=str(tmp_path), minimize=True)
    with pytest.raises(ValueError, match="mode must be 'model' or 'runner'"):
        CheckpointCallback(logdir=str(tmp_path), mode="weights")
    callback = CheckpointCallback(logdir=str(tmp_path), topk=2)
    runner = _Runner(nn.Linear(2, 1), torch.zeros(()))
    for epoch in (1, 2, 3):
        runner.epoch_step = epoch
        callback.on_epoch_end(runner)
    assert [c.metric for c in callback.storage] == [3.0, 2.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.0002.pth", "model.0003.pth", "model.last.pth",
                                                          "model.storage.json"]
