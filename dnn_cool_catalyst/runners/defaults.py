"""What `FlowRunner` adds to a run where the user gave none: the model, Catalyst's `train`
arguments, the optimizer and scheduler, the callbacks and the loggers.

Plain functions over what the runner knows; the runner's Catalyst hooks (`get_optimizer`,
`get_callbacks`, `get_loggers`, ...) call them. This module may import Catalyst, the callbacks
and the other runner modules; it never imports `runners.runner`.
"""
from __future__ import annotations

import inspect
import os
from collections import OrderedDict
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
from catalyst import dl
from catalyst.callbacks.misc import TqdmCallback
from catalyst.core.callback import (Callback, IBackwardCallback, ICheckpointCallback, IOptimizerCallback,
                                    ISchedulerCallback)
from catalyst.core.misc import callback_isinstance, sort_callbacks_by_order
from catalyst.loggers.console import ConsoleLogger
from catalyst.loggers.csv import CSVLogger
from catalyst.loggers.tensorboard import TensorboardLogger
from torch import nn

from ..callbacks import BalancerCallback, FlowMetricsCallback, InterpretationCallback, ThresholdTuningCallback
from ..callbacks.common import import_object
from ..errors import capped, did_you_mean
from . import compat
from .console import FlowConsoleLogger, FlowProgressBar
from .guards import LoaderLossCallback
from .tensorboard import FlowTensorboardLogger

# Catalyst's own `train` arguments, which `FlowRunner.train` passes on (all but `loaders`).
CATALYST_TRAIN_ARGS = {name: p.default for name, p in inspect.signature(dl.Runner.train).parameters.items()
                       if name not in ("self", "loaders")}


def resolve_model(model: Any, flow: Any) -> nn.Module:
    """The model: `flow.torch()` when None, a module as it is, or `factory(flow)` for a factory
    (or the dotted path of one), e.g. a wrapper that computes features and calls the flow module."""
    if model is None:
        return flow.torch()
    if isinstance(model, str):
        model = import_object(model)
    if isinstance(model, nn.Module):
        return model
    if callable(model):
        built = model(flow)
        if not isinstance(built, nn.Module):
            raise TypeError(f"the model factory {model!r} returned {type(built).__name__}, not an nn.Module")
        return built
    raise TypeError(f"model must be an nn.Module, a factory model(flow) or its dotted path, got {type(model).__name__}")


def catalyst_train_args(given: Mapping[str, Any], own: Sequence[str]) -> Dict[str, Any]:
    """Every argument of Catalyst's `train` but `loaders`: those `given`, else Catalyst's defaults.
    An unknown name is an error listing Catalyst's arguments and the flow's `own`."""
    unknown = [name for name in given if name not in CATALYST_TRAIN_ARGS]
    if unknown:
        raise TypeError(f"FlowRunner.train got unknown argument(s) {capped(unknown)}"
                        f"{did_you_mean(unknown[0], [*CATALYST_TRAIN_ARGS, *own], listed=0)}; it takes Catalyst's "
                        f"train arguments ({capped(CATALYST_TRAIN_ARGS, 30)}) and the flow's ({capped(own)})")
    return {**CATALYST_TRAIN_ARGS, **given}


def valid_loader_of(loaders: Mapping[str, Any], given: Optional[str]) -> str:
    """The loader that selects the best checkpoint: `given`, else the first whose name starts with
    "valid", else the first loader."""
    if given is None:
        return next((k for k in loaders if str(k).startswith("valid")), next(iter(loaders)))
    if given not in loaders:
        raise KeyError(f"valid_loader {given!r} is not one of the loaders {list(loaders)}")
    return given


def any_trains(loaders: Mapping[str, Any]) -> bool:
    """Whether a loader trains (Catalyst's convention: its name starts with "train")."""
    return any(str(k).startswith("train") for k in loaders)


def optimizer_for(optimizer: Any, model: nn.Module, lr: float, make_default: bool,
                  criterion_parameters: Sequence[nn.Parameter] = ()) -> Any:
    """The optimizer given, built when it is a factory `optimizer(params)` (YAML partials), or
    `AdamW(lr=lr)` when none was given and `make_default`.

    `criterion_parameters` (a balancer's learnable parameters, `FlowRunner(balancer=...)`) join
    the default optimizer and a factory's as a second parameter group without weight decay (a
    decay would pull e.g. uncertainty log-variances towards 0, which the papers do not do). An
    optimizer instance given without them is an error: they would never be learned."""
    params: Any = model.parameters()
    if criterion_parameters:
        params = [{"params": list(model.parameters())},
                  {"params": list(criterion_parameters), "weight_decay": 0.0}]
    if optimizer is None and make_default:
        return torch.optim.AdamW(params, lr=lr)
    if callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
        return optimizer(params)
    if isinstance(optimizer, torch.optim.Optimizer) and criterion_parameters:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [i for i, p in enumerate(criterion_parameters) if id(p) not in held]
        if missing:
            raise ValueError(f"the optimizer given does not hold {len(missing)} of the balancer's "
                             f"{len(criterion_parameters)} learnable parameters, which would then never be "
                             f"learned: add runner.flow_loss.parameters() to it, or give a factory "
                             f"optimizer(params) (it receives them), or leave optimizer=None")
    return optimizer


def scheduler_for(scheduler: Any, optimizer: Any) -> Any:
    """The scheduler given, built when it is a factory `scheduler(optimizer)` (it has no `step`)."""
    if scheduler is not None and callable(scheduler) and not hasattr(scheduler, "step"):
        return scheduler(optimizer)
    return scheduler


def default_loggers(loggers: Optional[Mapping[str, Any]], logdir: Optional[str], verbose_metrics: bool) -> Dict[str, Any]:
    """`loggers` with a `FlowConsoleLogger` and, with a `logdir`, a CSV logger and a
    `FlowTensorboardLogger` added, each unless one of its kind is given."""
    loggers = dict(loggers or {})

    def exists(kind) -> bool:
        return any(isinstance(lg, kind) for lg in loggers.values())

    if not exists(ConsoleLogger):
        loggers["_console"] = FlowConsoleLogger(verbose=verbose_metrics)
    if logdir is not None and not exists(CSVLogger):
        loggers["_csv"] = compat.CSVLogger(logdir=logdir, use_logdir_postfix=True)  # one header on resume
    if logdir is not None and not exists(TensorboardLogger):
        loggers["_tensorboard"] = FlowTensorboardLogger(logdir=os.path.join(logdir, "tensorboard"))
    return loggers


def default_callbacks(callbacks: Mapping[str, Callback], flags: Mapping[str, bool], *, trains: bool, optimizer: Any,
                      scheduler: Any, valid_loader: str, valid_metric: str, minimize_valid_metric: bool,
                      verbose: bool, logdir: Optional[str], resume_path: Optional[str],
                      load_best_on_end: bool) -> "OrderedDict[str, Callback]":
    """`callbacks` (sorted by order) with the flow's defaults added, each unless one of its kind is
    given: the callbacks `flags` switch on (`flow_metrics`, `interpretation`, `threshold_tuning`,
    `balancer`: a `BalancerCallback` for a balanced criterion),
    a loader loss without `FlowMetricsCallback`, backward and optimizer steps when a loader `trains`
    with an optimizer, a scheduler step, a progress bar when `verbose`, and with a `logdir` a runner
    checkpoint keeping the best epoch by `valid_metric` on `valid_loader` (see `FlowRunner.train`)."""
    callbacks = sort_callbacks_by_order(callbacks)

    def exists(kind) -> bool:
        return any(callback_isinstance(c, kind) for c in callbacks.values())

    if flags["flow_metrics"] and not exists(FlowMetricsCallback):
        callbacks["_flow_metrics"] = FlowMetricsCallback()
    if not exists(FlowMetricsCallback) and not exists(LoaderLossCallback):  # a loader loss for the checkpoint
        callbacks["_loader_loss"] = LoaderLossCallback()
    if flags["interpretation"] and not exists(InterpretationCallback):
        callbacks["_interpretation"] = InterpretationCallback()
    if flags["threshold_tuning"] and not exists(ThresholdTuningCallback):
        callbacks["_threshold_tuning"] = ThresholdTuningCallback()
    if flags.get("balancer", False) and not exists(BalancerCallback):
        callbacks["_balancer"] = BalancerCallback()
    if trains and optimizer is not None:
        if not exists(IBackwardCallback):
            callbacks["_backward"] = compat.BackwardCallback(metric_key="loss")
        if not exists(IOptimizerCallback):
            callbacks["_optimizer"] = compat.OptimizerCallback(metric_key="loss")  # no betas as momentum
    if scheduler is not None and not exists(ISchedulerCallback):
        plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        callbacks["_scheduler"] = (compat.SchedulerCallback(loader_key=valid_loader, metric_key=valid_metric)
                                   if plateau else compat.SchedulerCallback())  # no betas as momentum
    if verbose and not exists(TqdmCallback):
        callbacks["_verbose"] = FlowProgressBar()
    if logdir is not None and not exists(ICheckpointCallback):
        callbacks["_checkpoint"] = compat.CheckpointCallback(
            logdir=os.path.join(logdir, "checkpoints"), loader_key=valid_loader, metric_key=valid_metric,
            minimize=minimize_valid_metric, mode="runner", resume_runner=resume_path, load_best_on_end=load_best_on_end)
    return callbacks
