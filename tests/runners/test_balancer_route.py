"""`FlowRunner(flow, model, balancer=...)`: the balanced loss as the default criterion, its
learnable parameters in the default optimizer, and the balancer's per-epoch hooks and logs."""
from functools import partial

import pytest
import torch

from dnn_cool_catalyst import balancing
from dnn_cool_catalyst.runners import FlowRunner

QUIET = dict(flow_metrics=False, interpretation=False, threshold_tuning=False, verbose=False)


def test_uncertainty_log_variances_are_learned_by_the_default_optimizer(data, flow_and_model, loaders_for):
    flow, model = flow_and_model()
    runner = FlowRunner(flow, model=model, balancer=balancing.UncertaintyWeighting())
    assert runner.flow_loss.balancer is runner.balancer
    before = [p.detach().clone() for p in runner.flow_loss.parameters()]
    runner.train(loaders=loaders_for(flow, data), num_epochs=1, lr=0.05, **QUIET)
    assert runner.criterion is runner.flow_loss
    after = list(runner.flow_loss.parameters())
    assert [p.shape for p in after] == [(len(flow.get_loss()._leaves),)]  # one (T,) vector
    assert all(p.device == runner.engine.device for p in after)
    assert any(not torch.equal(b, a.detach()) for b, a in zip(before, after))
    groups = runner.optimizer.param_groups
    assert groups[1]["weight_decay"] == 0.0 and {id(p) for p in groups[1]["params"]} == {id(p) for p in after}


def test_a_factory_optimizer_receives_the_balancers_parameters(data, flow_and_model, loaders_for):
    flow, model = flow_and_model()
    runner = FlowRunner(flow, model=model, balancer=balancing.UncertaintyWeighting())
    before = [p.detach().clone() for p in runner.flow_loss.parameters()]
    runner.train(loaders=loaders_for(flow, data), num_epochs=1, optimizer=partial(torch.optim.SGD, lr=0.5), **QUIET)
    assert any(not torch.equal(b, a.detach()) for b, a in zip(before, runner.flow_loss.parameters()))


def test_an_optimizer_without_the_balancers_parameters_is_an_error(data, flow_and_model, loaders_for):
    flow, model = flow_and_model()
    runner = FlowRunner(flow, model=model, balancer=balancing.UncertaintyWeighting())
    with pytest.raises(ValueError, match="balancer's .* learnable parameters"):
        runner.train(loaders=loaders_for(flow, data), num_epochs=1,
                     optimizer=torch.optim.SGD(model.parameters(), lr=0.1), **QUIET)


def test_a_criterion_and_a_balancer_together_are_an_error(data, flow_and_model, loaders_for):
    flow, model = flow_and_model()
    runner = FlowRunner(flow, model=model, balancer=balancing.EqualWeighting())
    with pytest.raises(ValueError, match="balancer=EqualWeighting.*criterion=FlowLoss.*give one of them"):
        runner.train(loaders=loaders_for(flow, data), num_epochs=1, criterion=flow.get_loss(), **QUIET)


def test_without_a_balancer_the_criterion_and_optimizer_are_as_before(data, flow_and_model, loaders_for):
    flow, model = flow_and_model()
    runner = FlowRunner(flow, model=model)
    runner.train(loaders=loaders_for(flow, data), num_epochs=1, **QUIET)
    assert runner.balancer is None and type(runner.criterion).__name__ == "FlowLoss"
    assert len(runner.optimizer.param_groups) == 1


def test_optimizer_for_puts_criterion_parameters_in_a_group_without_decay():
    from torch import nn

    from dnn_cool_catalyst.runners import defaults

    model, extra = nn.Linear(2, 2), [nn.Parameter(torch.zeros(()))]
    built = defaults.optimizer_for(None, model, 0.1, True, extra)
    assert [len(g["params"]) for g in built.param_groups] == [2, 1] and built.param_groups[1]["weight_decay"] == 0.0
    assert len(defaults.optimizer_for(None, model, 0.1, True).param_groups) == 1
    given = torch.optim.SGD([*model.parameters(), *extra], lr=0.1)
    assert defaults.optimizer_for(given, model, 0.1, False, extra) is given


def test_dwa_closes_a_period_per_epoch_and_weights_are_logged_per_epoch(data, flow_and_model, loaders_for, tmp_path):
    import os

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    flow, model = flow_and_model()
    dwa = balancing.DynamicWeightAverage()
    runner = FlowRunner(flow, model=model, balancer=dwa)
    logdir = str(tmp_path / "run")
    runner.train(loaders=loaders_for(flow, data), num_epochs=3, logdir=logdir, **QUIET)
    assert type(runner.callbacks["_balancer"]).__name__ == "BalancerCallback"
    # every task appears in the training data: three epochs, three closed periods (not one per step)
    assert dwa.seen.tolist() == [3] * len(dwa.paths) and int(dwa.steps.sum()) == 0
    train = runner.epoch_metrics["train"]
    keys = [f"{p}/balance/weight" for p in dwa.paths]
    assert all(k in train for k in keys) and not any(k in runner.epoch_metrics["valid"] for k in keys)
    acc = EventAccumulator(os.path.join(logdir, "tensorboard", "train")).Reload()
    for key in keys:
        logged = acc.Scalars(key)
        assert [e.step for e in logged] == [1, 2, 3]
        # the paper's w = 1 while a task has fewer than two closed periods; then the loss ratios decide
        assert [e.value for e in logged[:2]] == [1.0, 1.0] and logged[2].value == pytest.approx(train[key])
    assert any(train[k] != 1.0 for k in keys)


def test_epoch_end_is_a_no_op_by_default():
    balancer = balancing.UncertaintyWeighting().bind(["a", "b"])
    state = {k: v.clone() for k, v in balancer.state_dict().items()}
    balancer.epoch_end()
    assert all(torch.equal(state[k], v) for k, v in balancer.state_dict().items())


def _every_method():
    """Every concrete method of `balancing.__all__`, gradient methods also in their representation
    variant where they have one."""
    found = []
    for name in balancing.__all__:
        cls = getattr(balancing, name)
        if cls in (balancing.Balancer, balancing.GradientBalancer):
            continue
        found.append(pytest.param(cls, {}, id=name))
        if issubclass(cls, balancing.GradientBalancer) and cls.supports_representation:
            found.append(pytest.param(cls, {"representation": True}, id=f"{name}-representation"))
    return found


@pytest.mark.parametrize("cls, options", _every_method())
def test_every_method_trains_through_the_runner(cls, options, data, flow_and_model, loaders_for):
    flow, model = flow_and_model()
    runner = FlowRunner(flow, model=model, balancer=cls(**options))
    before = [p.detach().clone() for p in model.parameters()]
    runner.train(loaders=loaders_for(flow, data), num_epochs=2, **QUIET)
    train = runner.epoch_metrics["train"]
    weights = {k: v for k, v in train.items() if k.endswith("/balance/weight")}
    assert len(weights) == len(runner.balancer.paths) and all(abs(v) < float("inf") for v in weights.values())
    if not isinstance(runner.balancer, balancing.GradientBalancer):  # gradient methods may weigh a task 0 (MGDA)
        assert all(v > 0 for v in weights.values())
    else:  # the default shared parameters: every parameter outside the flow module
        assert [id(p) for p in runner.flow_loss.shared_parameters] == [id(p) for p in model.backbone.parameters()]
    assert abs(train["loss"]) < float("inf")  # FAMO sums log-losses: may be negative
    assert any(not torch.equal(b, a.detach()) for b, a in zip(before, model.parameters()))


def test_given_shared_parameters_are_the_ones_balanced(data, flow_and_model, loaders_for):
    flow, model = flow_and_model()
    runner = FlowRunner(flow, model=model, balancer=balancing.PCGrad(),
                        shared_parameters=lambda m: [m.backbone[0].weight])
    before = model.backbone[0].weight.detach().clone()
    runner.train(loaders=loaders_for(flow, data), num_epochs=1, **QUIET)
    assert [id(p) for p in runner.flow_loss.shared_parameters] == [id(model.backbone[0].weight)]
    assert not torch.equal(before, model.backbone[0].weight.detach())


def test_a_gradient_method_without_shared_parameters_is_an_error_at_the_start(data, loaders_for):
    from dnn_cool_catalyst.story import security_tasks

    flow = security_tasks(features=6).get_full_flow()
    runner = FlowRunner(flow, balancer=balancing.MGDA())  # the flow module alone: every parameter a head's
    with pytest.raises(ValueError, match="MGDA balances the parameters the tasks share.*shared_parameters="):
        runner.train(loaders={"train": flow.get_dataset(*data).loader(batch_size=16)}, num_epochs=1, **QUIET)


def test_memory_balanced_dataparallel_takes_the_parameters_variant_only(data, flow_and_model, loaders_for):
    flow, model = flow_and_model()
    runner = FlowRunner(flow, model=model, balancer=balancing.MGDA(representation=True),
                        balance_dataparallel_memory=True)
    with pytest.raises(ValueError, match="representation=True.*memory-balanced DataParallel keeps inside its "
                                         "replicas.*representation=False"):
        runner.train(loaders=loaders_for(flow, data), num_epochs=1, **QUIET)
    flow, model = flow_and_model()
    runner = FlowRunner(flow, model=model, balancer=balancing.PCGrad(), balance_dataparallel_memory=True)
    before = model.backbone[0].weight.detach().clone()
    runner.train(loaders=loaders_for(flow, data), num_epochs=1, **QUIET)
    assert not torch.equal(before, model.backbone[0].weight.detach())


@pytest.mark.parametrize("name", ["UncertaintyWeighting", "DynamicWeightAverage"])
def test_resume_continues_the_balancer_as_if_uninterrupted(name, data, flow_and_model, loaders_for, tmp_path):
    from catalyst import dl

    class Stop(dl.Callback):
        def __init__(self):
            super().__init__(order=dl.CallbackOrder.External)

        def on_batch_end(self, runner):
            if runner.epoch_step == 3 and runner.loader_batch_step == 2:
                raise KeyboardInterrupt

    def run(logdir, callbacks=None, resume=None):
        flow, model = flow_and_model()
        runner = FlowRunner(flow, model=model, balancer=getattr(balancing, name)())
        runner.train(loaders=loaders_for(flow, data), num_epochs=4, logdir=logdir, seed=3, lr=1e-2,
                     callbacks=callbacks, resume=resume, interpretation=False, verbose=False)
        return runner

    whole = run(str(tmp_path / "whole"))
    with pytest.raises(KeyboardInterrupt):
        run(str(tmp_path / "cut"), callbacks=[Stop()])
    resumed = run(str(tmp_path / "cut"), resume=True)
    for a, b in [(whole.model.state_dict(), resumed.model.state_dict()),
                 (whole.flow_loss.state_dict(), resumed.flow_loss.state_dict())]:
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(whole.flow_loss.state_dict()) > 0  # the balancer's parameters or history were compared
