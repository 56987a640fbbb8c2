"""`runners.defaults`: what FlowRunner adds to a run where the user gave none."""
import pytest
import torch
from catalyst.loggers.console import ConsoleLogger
from torch import nn

from dnn_cool_catalyst.callbacks import FlowMetricsCallback, InterpretationCallback, ThresholdTuningCallback
from dnn_cool_catalyst.runners import FlowTensorboardLogger
from dnn_cool_catalyst.runners import defaults
from dnn_cool_catalyst.runners.console import FlowConsoleLogger
from dnn_cool_catalyst.runners.guards import LoaderLossCallback


def test_resolve_model_module_factory_and_errors(security_flow):
    assert defaults.resolve_model(None, security_flow) is security_flow.torch()
    module = nn.Linear(2, 2)
    assert defaults.resolve_model(module, security_flow) is module
    assert defaults.resolve_model(lambda flow: module, security_flow) is module
    with pytest.raises(TypeError, match="returned int, not an nn.Module"):
        defaults.resolve_model(lambda flow: 3, security_flow)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        defaults.resolve_model(3, security_flow)


def test_resolve_model_importable_from_the_runner_module():
    from dnn_cool_catalyst.runners.runner import resolve_model

    assert resolve_model is defaults.resolve_model


def test_catalyst_train_args_fill_defaults_and_name_unknown_ones():
    args = defaults.catalyst_train_args({"num_epochs": 3}, own=["lr"])
    assert args["num_epochs"] == 3 and "logdir" in args and "loaders" not in args
    with pytest.raises(TypeError, match=r"unknown argument\(s\) 'num_epoch'; did you mean 'num_epochs'"):
        defaults.catalyst_train_args({"num_epoch": 3}, own=["lr"])


def test_valid_loader_default_and_unknown():
    loaders = {"train": 1, "valid_b": 2, "valid_a": 3}
    assert defaults.valid_loader_of(loaders, None) == "valid_b"
    assert defaults.valid_loader_of({"train": 1, "test": 2}, None) == "train"
    assert defaults.valid_loader_of(loaders, "valid_a") == "valid_a"
    with pytest.raises(KeyError, match="'nope' is not one of the loaders"):
        defaults.valid_loader_of(loaders, "nope")


def test_optimizer_and_scheduler_defaults_and_factories():
    model = nn.Linear(2, 1)
    made = defaults.optimizer_for(None, model, lr=0.25, make_default=True)
    assert isinstance(made, torch.optim.AdamW) and made.param_groups[0]["lr"] == 0.25
    assert defaults.optimizer_for(None, model, lr=0.25, make_default=False) is None
    sgd = defaults.optimizer_for(lambda params: torch.optim.SGD(params, lr=0.5), model, lr=0.25, make_default=True)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["lr"] == 0.5
    step = defaults.scheduler_for(lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1), sgd)
    assert isinstance(step, torch.optim.lr_scheduler.StepLR)
    assert defaults.scheduler_for(step, sgd) is step


def test_default_loggers_added_unless_given(tmp_path):
    loggers = defaults.default_loggers(None, None, verbose_metrics=False)
    assert list(loggers) == ["_console"] and isinstance(loggers["_console"], FlowConsoleLogger)
    mine = ConsoleLogger()
    loggers = defaults.default_loggers({"mine": mine}, str(tmp_path), verbose_metrics=False)
    assert loggers["mine"] is mine and "_console" not in loggers
    assert {"_csv", "_tensorboard"} <= set(loggers)
    assert isinstance(loggers["_tensorboard"], FlowTensorboardLogger)
    loggers["_tensorboard"].close_log()


def _callbacks(given, flags=None, **kw):
    args = dict(trains=False, optimizer=None, scheduler=None, valid_loader="valid", valid_metric="loss",
                minimize_valid_metric=True, verbose=False, logdir=None, resume_path=None, load_best_on_end=False)
    args.update(kw)
    flags = flags or {"flow_metrics": True, "interpretation": True, "threshold_tuning": True}
    return defaults.default_callbacks(given, flags, **args)


def test_default_callbacks_added_by_flag_unless_given():
    made = _callbacks({})
    assert isinstance(made["_flow_metrics"], FlowMetricsCallback)
    assert isinstance(made["_interpretation"], InterpretationCallback)
    assert isinstance(made["_threshold_tuning"], ThresholdTuningCallback)
    assert not {"_backward", "_optimizer", "_scheduler", "_checkpoint", "_verbose"} & set(made)
    mine = FlowMetricsCallback()
    made = _callbacks({"m": mine}, {"flow_metrics": True, "interpretation": False, "threshold_tuning": False})
    assert made["m"] is mine and set(made) == {"m"}
    made = _callbacks({}, {"flow_metrics": False, "interpretation": False, "threshold_tuning": False})
    assert isinstance(made["_loader_loss"], LoaderLossCallback)  # a loader loss for the checkpoint


def test_default_callbacks_steps_and_checkpoint(tmp_path):
    opt = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)
    made = _callbacks({}, trains=True, optimizer=opt, scheduler=torch.optim.lr_scheduler.StepLR(opt, 1),
                      logdir=str(tmp_path))
    assert {"_backward", "_optimizer", "_scheduler", "_checkpoint"} <= set(made)
    assert "_backward" not in _callbacks({}, trains=False, optimizer=opt)
