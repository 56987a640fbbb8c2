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
