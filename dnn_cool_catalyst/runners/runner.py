"""`FlowRunner`: Catalyst's `Runner` for a task flow, with flow-aware defaults.

The runner orchestrates: it feeds batches to the model, computes the flow loss, and adds the
callbacks, optimizer, checkpointing and loggers a flow needs where the user gave none. Metrics,
tuning, interpretation, evaluation and persistence live in the callbacks, the flow's
interpreters and `runners.export`.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import pandas as pd
import torch
from catalyst import dl
from catalyst.core.callback import (
    Callback,
    IBackwardCallback,
    ICheckpointCallback,
    IOptimizerCallback,
    ISchedulerCallback,
)
from catalyst.core.misc import callback_isinstance, sort_callbacks_by_order
from catalyst.callbacks.misc import TqdmCallback
from catalyst.loggers.console import ConsoleLogger
from catalyst.loggers.csv import CSVLogger
from catalyst.loggers.tensorboard import TensorboardLogger
from torch import Tensor, nn
from torch.utils.data import BatchSampler

from ..callbacks import FlowMetricsCallback, InterpretationCallback, ThresholdTuningCallback
from ..callbacks.batch import (
    EXPLAIN,
    INDEX,
    INPUTS,
    LOSS_TERMS,
    METRIC_STATES,
    OUTPUTS,
    PER_SAMPLE_LOSS,
    TARGETS,
    StackedLossTerms,
    batch_size_of,
)
from ..callbacks.common import import_object, resolve_flow
from ..callbacks.files import write_csv
from ..callbacks.tuning import TUNED_PARAMS_FILE
from ..distributed import is_main_process, unwrap
from ..errors import InputError, LabelError
from ..interpreters.loss import stack_terms
from ..summary import summary, where_logs_are
from . import checkpoints, compat
from .balance import BalancedDataParallel
from .console import FlowConsoleLogger, FlowProgressBar, stdout_is_terminal
from .engines import BalancedDataParallelEngine, available_engine, launched_by_torchrun, unshare_tensors
from .export import export_model, load_model
from .guards import LoaderLossCallback, RunGuards, require_batches
from .tensorboard import FlowTensorboardLogger

_MODE_WORDS = {"gt": "the labels", "predicted": "the predictions"}
LAST_CHECKPOINT = os.path.join("checkpoints", "runner.last.pth")
BEST_CHECKPOINT = os.path.join("checkpoints", "runner.best.pth")
EVALUATION_FILE = "evaluation.csv"


# Building the runner from objects or dotted paths (YAML) -------------------------------------------


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


# Batches ------------------------------------------------------------------------------------------


def split_batch(batch: Any, loader_key: Optional[str], allow_inputs_only: bool = False) -> Tuple[Mapping, Optional[Mapping]]:
    """`(X, y)` from a batch; a `TypeError` naming the loader and what it yielded otherwise."""
    if isinstance(batch, Mapping) and allow_inputs_only:
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], Mapping) and isinstance(batch[1], Mapping):
        return batch[0], batch[1]
    if isinstance(batch, (tuple, list)):
        got = f"a {type(batch).__name__} of {len(batch)} item(s): ({', '.join(type(b).__name__ for b in batch[:4])})"
    else:
        got = f"a {type(batch).__name__}"
    raise TypeError(f"loader {loader_key!r} yielded {got}; FlowRunner needs (X, y) pairs: X a mapping of input "
                    f"features (with X['gt'] for the precondition tasks), y a mapping task path -> labels, "
                    f"as flow.get_dataset(inputs, labels) produces")


def check_first_batch(flow: Any, x: Mapping, y: Optional[Mapping], loader_key: Optional[str],
                      reads_inputs: bool) -> None:
    """Errors naming the task or key when a batch cannot feed the flow: labels missing for a task,
    no ground truth for a precondition task in a labelled batch, or (when the model is the flow
    module itself) a feature the flow reads missing from X."""
    from ..interpreters.module import read_input

    graph = flow.graph
    where = f"loader {loader_key!r}: the first batch"
    if y is not None:
        missing = [p for p in graph.paths if p not in y]
        if missing:
            raise LabelError(f"{where} has no labels (y) for task(s) {missing} of flow {graph.name!r}; y has {sorted(y)}")
    conditions = graph.condition_paths
    if conditions and y is not None:  # without labels (inference) masks come from the predictions
        gt = x.get("gt")
        if not isinstance(gt, Mapping):
            raise InputError(f"{where} has no X['gt'] (the labels of the precondition tasks {list(conditions)}); "
                             f"X has {sorted(x)}. Build it with flow.get_dataset(inputs, labels)")
        missing = [p for p in conditions if p not in gt]
        if missing:
            raise InputError(f"{where}: X['gt'] has no labels for precondition task(s) {missing}; it has {sorted(gt)}")
    if reads_inputs:
        problems = []
        for leaf in graph.leaves:
            try:
                read_input(x, leaf.input_key, leaf.path)
            except InputError as e:
                problems.append(str(e))
        if problems:
            raise InputError(f"{where} lacks inputs the flow reads: " + "; ".join(dict.fromkeys(problems)))


def to_device(tree: Any, device: torch.device) -> Any:
    """Nested mappings/sequences with every tensor moved to `device`."""
    if isinstance(tree, Tensor):
        return tree.to(device, non_blocking=True)
    if isinstance(tree, Mapping):
        return {k: to_device(v, device) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_device(v, device) for v in tree)
    return tree


def _concat(chunks: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
    return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]} if chunks else {}


def take_rows(tree: Any, n: int, batch: int) -> Any:
    """The first `n` samples of a batch of `batch` samples: tensors (and lists) of length `batch`
    are cut along the first dimension, mappings recursively, anything else kept."""
    if isinstance(tree, Tensor):
        return tree[:n] if tree.dim() > 0 and tree.shape[0] == batch else tree
    if isinstance(tree, Mapping):
        return {k: take_rows(v, n, batch) for k, v in tree.items()}
    if isinstance(tree, list) and len(tree) == batch:
        return tree[:n]
    return tree


# DDP: the duplicated samples with which accelerate evens out the shards ----------------------------


@dataclass(frozen=True)
class PaddingLayout:
    """Where one process's batches sit in the epoch's stream of samples (accelerate's
    `BatchSamplerShard` with `even_batches`): the stream is cut into batches of `batch_size` and
    dealt to the processes in turn (or each batch split among them, `split`); the last ones are
    completed with samples from the start of the epoch. Positions from `total` on are those copies."""

    world: int
    rank: int
    batch_size: int
    total: int
    split: bool

    def real_rows(self, step: int, n: int) -> int:
        """How many of the `n` samples of this process's batch number `step` (from 0) are not copies
        (the copies come last in a batch)."""
        if self.split:
            start = step * self.batch_size + self.rank * (self.batch_size // self.world)
        else:
            start = (step * self.world + self.rank) * self.batch_size
        return max(0, min(n, self.total - start))


def ddp_padding_layout(loader: Any) -> Optional[PaddingLayout]:
    """The `PaddingLayout` of a loader prepared by accelerate for several processes, when it pads
    (even batches, no `drop_last`) over a standard `BatchSampler`; None otherwise."""
    try:
        from accelerate.data_loader import BatchSamplerShard
    except ImportError:  # pragma: no cover - accelerate is a dependency of Catalyst
        return None
    shard = getattr(loader, "batch_sampler", None)
    if not isinstance(shard, BatchSamplerShard) or shard.num_processes <= 1 or not shard.even_batches or shard.drop_last:
        return None
    inner = shard.batch_sampler
    if not isinstance(inner, BatchSampler) or not inner.batch_size or inner.drop_last:
        return None
    try:
        total = len(inner.sampler)
    except TypeError:
        return None
    return PaddingLayout(world=shard.num_processes, rank=shard.process_index, batch_size=int(inner.batch_size),
                         total=int(total), split=bool(shard.split_batches))


# The runner ---------------------------------------------------------------------------------------


class FlowRunner(dl.Runner):
    """Catalyst's `Runner` for a task flow.

    `FlowRunner(flow, model=None)`: `flow` is a `TaskFlow`, a `Tasks` registry (its full flow), a
    factory of one or its dotted path (for YAML); `model` defaults to `flow.torch()`, or is any
    module (e.g. a backbone computing the features the heads read, then calling the flow module
    with `gt` passed through) or a factory `model(flow)` / its dotted path.

    `handle_batch` feeds `X` (with `X["gt"]`) to the model and leaves `inputs`, `targets`, `outputs`
    and the loss terms in `runner.batch` (see `dnn_cool_catalyst.callbacks.batch`), the flow loss
    in `runner.batch_metrics["loss"]`. The first batch of each loader is checked: a loader that does
    not yield `(X, y)`, labels missing for a task or a missing key fail there, naming it.

    Several devices:

    - `balance_dataparallel_memory=True`: DataParallel over all GPUs with the loss terms, metric
      states and per-sample losses reduced inside each replica (`BalancedDataParallelEngine`,
      `runners.balance`); only small tensors reach the first GPU, and losses and metrics are
      exactly those of the whole batch. Also used when the engine given is a
      `BalancedDataParallelEngine`.
    - DDP (`engines.DistributedDataParallelEngine`, or Catalyst's): the flow loss scales itself
      so that DDP's averaged gradients are those of the global batch; loader metrics sum their
      states over the processes; tuning and interpretation run on the outputs of all processes;
      only the main process writes files. The copies of samples with which accelerate evens out
      the shards are dropped from each batch (`drop_ddp_padding`), so that training, metrics and
      tuning see every sample exactly once. When the engine spawned the processes, `train`
      loads the trained weights (`runner.best.pth` with `load_best_on_end`, else `runner.last.pth`)
      and the tuned parameters back from the logdir into this process's model and flow (the
      loader metrics are in `<logdir>/csv_logger` and TensorBoard; `epoch_metrics` stays empty).

    Example::

        runner = FlowRunner(flow)
        runner.train(loaders={"train": ..., "valid": ...}, num_epochs=10, logdir="logs/run1")
        predictions = runner.infer(test_loader)
        table = runner.evaluate(test_loader)
        runner.export("exported/")
        runner = FlowRunner.load("exported/", flow)
    """

    def __init__(self, flow: Any, model: Any = None, engine: Any = None, logdir: Optional[str] = None,
                 balance_dataparallel_memory: bool = False, drop_ddp_padding: bool = True):
        flow = resolve_flow(flow)
        super().__init__(model=resolve_model(model, flow), engine=engine)
        self.balance_dataparallel_memory = bool(balance_dataparallel_memory)
        self.drop_ddp_padding = bool(drop_ddp_padding)
        self._padding: Optional[PaddingLayout] = None
        self._loader_step = 0
        self.flow = flow
        self.flow_loss = flow.get_loss()
        self._kept_criterion: Any = self.flow_loss
        self._logdir = os.fspath(logdir) if logdir is not None else None
        self._evaluating = False
        self._lr = 1e-3
        self._default_callbacks = {"flow_metrics": True, "interpretation": True, "threshold_tuning": True}
        self._resume_path: Optional[str] = None
        self._guards = RunGuards()

    # Where things are -----------------------------------------------------------------------------
    @property
    def logdir(self) -> Optional[str]:
        """The logdir of the last `train` (or the one given to the constructor); None when there is none."""
        return self._logdir

    @property
    def valid_loader(self) -> Optional[str]:
        """The loader whose metrics select the best checkpoint."""
        return self._valid_loader

    # Training -------------------------------------------------------------------------------------
    def train(self, *, loaders: "OrderedDict[str, Any]", model: Any = None, engine: Any = None,
              criterion: Any = None, optimizer: Any = None, scheduler: Any = None,
              callbacks: Union[List[Callback], Mapping[str, Callback], None] = None,
              loggers: Optional[Mapping[str, Any]] = None, seed: int = 42, hparams: Optional[Dict[str, Any]] = None,
              num_epochs: int = 1, logdir: Optional[str] = None, resume: Union[str, bool, None] = None,
              valid_loader: Optional[str] = None, valid_metric: Optional[str] = None,
              minimize_valid_metric: Optional[bool] = None, verbose: Optional[bool] = None, timeit: bool = False,
              check: bool = False, overfit: bool = False, profile: bool = False, load_best_on_end: bool = False,
              cpu: bool = False, fp16: bool = False, ddp: bool = False,
              lr: float = 1e-3, flow_metrics: bool = True, interpretation: bool = True,
              threshold_tuning: bool = True, nonfinite: str = "raise", overwrite: bool = False) -> None:
        """Catalyst's `train` (every one of its arguments), with defaults added only where none was given:

        - `criterion`: the flow loss (kept across calls, also for `evaluate_loader`);
        - `optimizer`: `AdamW(lr=lr)` when a loader trains; an optimizer may also be a factory
          `optimizer(params)` and a scheduler a factory `scheduler(optimizer)` (YAML partials);
        - callbacks: `FlowMetricsCallback`, `InterpretationCallback`, `ThresholdTuningCallback`
          (each unless one of its type is given or its flag is false), backward and optimizer
          steps, a scheduler step, and with a `logdir` a runner checkpoint (`<logdir>/checkpoints`)
          keeping the best epoch by `valid_metric` ("loss", minimised) on `valid_loader` (the first
          loader whose name starts with "valid", else the first loader);
        - loggers: a `FlowTensorboardLogger` in `<logdir>/tensorboard` (with the run's hyperparameters:
          `hparams` and what the runner knows), a console logger (`FlowConsoleLogger`: one line per
          epoch with each loader's loss and the `valid_metric`, the per-task metrics of the best
          epoch at the end), Catalyst's CSV logger;
        - `verbose`: None (default) shows a progress bar of the overall batch metrics
          (`FlowProgressBar`) when standard output is a terminal; True shows it always and prints
          every loader's per-task metrics at every epoch; False shows no bar;
        - `resume`: True (or "last") continues from `<logdir>/checkpoints/runner.last.pth`, a path
          from that checkpoint: model, optimizer, scheduler, epoch and tuned thresholds; give the
          total `num_epochs` and fresh loaders. The best-so-far bookkeeping continues (`runner.best.pth`
          changes only when an epoch beats every earlier one) and the CSV logs keep one header;
        - a `logdir` that holds a run's files (checkpoints, logs, tuned parameters) is an error unless
          `resume` continues that run or `overwrite=True` removes those files first (two runs never mix);
        - `load_best_on_end`: the best epoch's weights and the decoder parameters (thresholds) it had.

        Extra arguments: `lr` of the default optimizer; `flow_metrics`, `interpretation`,
        `threshold_tuning` switch the default callbacks off (without `FlowMetricsCallback` the loader
        `loss` is the batch-size-weighted mean of the batch losses). `nonfinite`: "raise" (default)
        stops at the first batch whose loss is NaN or infinite, naming the loader, batch, tasks and
        inputs; "skip" leaves such batches out (no backward pass, optimizer step or metrics),
        counts them in the loader metric `nonfinite_batches` and warns (see `runners.guards`).
        `valid_metric` is checked before the first batch against the metrics the callbacks produce
        (when all callbacks are known; else when the loader ends). `overwrite`: see `logdir` above.
        `evaluate_loader` runs through here without tuning, interpretation, default optimizer or files.
        """
        if not isinstance(loaders, Mapping) or not loaders:
            raise TypeError(f"loaders must be a non-empty mapping name -> DataLoader, got {type(loaders).__name__}")
        if self._evaluating:
            logdir = None
        else:
            logdir = os.fspath(logdir) if logdir is not None else self._logdir
            self._logdir = logdir
        if criterion is not None:
            self._kept_criterion = criterion
        trains = any(str(k).startswith("train") for k in loaders)
        self._lr = lr
        self._make_default_optimizer = optimizer is None and trains and not self._evaluating
        self._default_callbacks = {"flow_metrics": flow_metrics, "interpretation": interpretation and not self._evaluating,
                                   "threshold_tuning": threshold_tuning and not self._evaluating}
        if valid_loader is None:
            valid_loader = next((k for k in loaders if str(k).startswith("valid")), next(iter(loaders)))
        elif valid_loader not in loaders:
            raise KeyError(f"valid_loader {valid_loader!r} is not one of the loaders {list(loaders)}")
        self._guards = RunGuards(nonfinite, valid_loader, valid_metric)  # valid_metric as given (None: the default)
        if valid_metric is None:
            valid_metric = "loss"
        if minimize_valid_metric is None:
            minimize_valid_metric = True
        if logdir is not None and not self._evaluating and is_main_process():
            checkpoints.claim_logdir(logdir, resume=resume, overwrite=overwrite)
        self._resume_path = self._resume_checkpoint(resume, logdir, callbacks)
        engine = self._choose_engine(engine, cpu=cpu, fp16=fp16, ddp=ddp)
        self._verbose_metrics = verbose is True  # per-task lines every epoch (the default console logger)
        if verbose is None:
            verbose = stdout_is_terminal()  # the progress bar
        spawns = isinstance(engine, dl.DistributedDataParallelEngine)  # also Catalyst's own engine
        with compat.generators_across_processes() if spawns else contextlib.nullcontext():
            super().train(loaders=loaders, model=model, engine=engine, criterion=self._kept_criterion,
                          optimizer=optimizer, scheduler=scheduler, callbacks=callbacks, loggers=loggers, seed=seed,
                          hparams=hparams, num_epochs=num_epochs, logdir=logdir, resume=self._resume_path,
                          valid_loader=valid_loader, valid_metric=valid_metric,
                          minimize_valid_metric=minimize_valid_metric, verbose=verbose, timeit=timeit, check=check,
                          overfit=overfit, profile=profile, load_best_on_end=load_best_on_end, cpu=cpu, fp16=fp16,
                          ddp=ddp)
        if self._ran_in_spawned_workers():
            self._restore_from_logdir(load_best_on_end)
        if not self._evaluating and is_main_process():
            print(where_logs_are(self._logdir))

    def _choose_engine(self, engine: Any, cpu: bool, fp16: bool, ddp: bool) -> Any:
        chosen = engine if engine is not None else self.engine
        if self.balance_dataparallel_memory:
            if chosen is None:
                chosen = BalancedDataParallelEngine(flow=self.flow, **({"fp16": True} if fp16 else {}))
            elif isinstance(chosen, dl.DistributedDataParallelEngine):
                raise ValueError("balance_dataparallel_memory=True is for DataParallel (one process, several GPUs); "
                                 "under DistributedDataParallel each process reduces its own batch already: "
                                 "drop the flag")
            elif not isinstance(chosen, BalancedDataParallelEngine):
                raise ValueError(f"balance_dataparallel_memory=True needs a BalancedDataParallelEngine (or no engine: "
                                 f"FlowRunner makes one); got {type(chosen).__name__}")
        elif chosen is None:
            chosen = available_engine(cpu=cpu, fp16=fp16, ddp=ddp)
        if isinstance(chosen, BalancedDataParallelEngine):
            if chosen.flow is None:
                chosen.flow = self.flow
            if not hasattr(self._kept_criterion, "terms"):
                raise ValueError(f"DataParallel memory balancing reduces the flow loss inside the replicas; it cannot "
                                 f"use the criterion {type(self._kept_criterion).__name__} (no .terms): leave "
                                 f"criterion=None")
        return chosen

    def _ran_in_spawned_workers(self) -> bool:
        """Whether the last run happened in worker processes spawned by a DDP engine (this process
        is their parent and holds neither the trained weights nor the metrics)."""
        import torch.distributed as dist

        engine = self.engine
        if not isinstance(engine, dl.DistributedDataParallelEngine) or launched_by_torchrun():
            return False
        if dist.is_available() and dist.is_initialized():
            return False
        return bool(getattr(engine, "spawned", True))

    def _restore_from_logdir(self, load_best_on_end: bool) -> None:
        """Load what the DDP workers left in the logdir: weights and tuned decoder parameters."""
        if self._logdir is None:
            warnings.warn("FlowRunner: training ran in spawned DDP workers and there is no logdir to read the "
                          "trained weights back from: the model in this process is untrained. Give a logdir.",
                          stacklevel=3)
            return
        path = os.path.join(self._logdir, BEST_CHECKPOINT if load_best_on_end else LAST_CHECKPOINT)
        if not os.path.isfile(path):
            warnings.warn(f"FlowRunner: training ran in spawned DDP workers but there is no checkpoint {path!r} "
                          f"(a CheckpointCallback of your own?): the model in this process is untrained", stacklevel=3)
            return
        checkpoint = checkpoints.load_checkpoint(path)
        unwrap(self.model).load_state_dict(checkpoint["model_state_dict"])
        if checkpoints.restore_decoder_params(self.flow, checkpoint, path):  # the thresholds of that epoch
            return
        tuned = os.path.join(self._logdir, TUNED_PARAMS_FILE)
        if os.path.isfile(tuned):
            from ..tuning import load_tuned

            self.flow.get_decoder().load_tuned(load_tuned(tuned), source=tuned)

    @staticmethod
    def _resume_checkpoint(resume: Any, logdir: Optional[str], callbacks: Any) -> Optional[str]:
        if resume is None or resume is False:
            return None
        if resume is True or resume == "last":
            if logdir is None:
                raise ValueError("resume=True continues from <logdir>/checkpoints/runner.last.pth: give a logdir")
            path = os.path.join(logdir, LAST_CHECKPOINT)
        else:
            path = os.fspath(resume)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"cannot resume: no checkpoint {path!r}")
        given = sort_callbacks_by_order(callbacks).values()
        if any(callback_isinstance(c, ICheckpointCallback) for c in given):
            raise ValueError("resume= works with FlowRunner's own checkpointing; with a CheckpointCallback of your own, "
                             "give it resume_runner=... instead")
        return path

    def evaluate_loader(self, loader: Any, callbacks: Any = None, model: Any = None, engine: Any = None,
                        seed: int = 42, verbose: bool = False) -> Dict[str, Any]:
        """Catalyst's `evaluate_loader`: one pass over `loader` (as "valid") with the flow loss and
        `FlowMetricsCallback`; returns the loader metrics. Tunes nothing and writes no files."""
        self._evaluating = True
        try:
            return super().evaluate_loader(loader, callbacks=callbacks, model=model, engine=engine, seed=seed,
                                           verbose=verbose)
        finally:
            self._evaluating = False

    # Catalyst's hooks -----------------------------------------------------------------------------
    def get_loaders(self) -> "OrderedDict[str, Any]":
        return OrderedDict((k, compat.batch_fetching_loader(v)) for k, v in self._loaders.items())

    def get_model(self) -> Any:
        model = super().get_model()
        if isinstance(model, nn.Module) and isinstance(self.engine, dl.DistributedDataParallelEngine):
            # A spawned worker received the model through torch.multiprocessing (shared CPU memory):
            # without its own copy, every worker's optimizer would step the same weights.
            unshare_tensors(model)
        return model

    def get_criterion(self) -> Any:
        return self._kept_criterion

    def get_optimizer(self, model: Any) -> Any:
        optimizer = self._optimizer
        if optimizer is None and self._make_default_optimizer:
            return torch.optim.AdamW(model.parameters(), lr=self._lr)
        if callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
            return optimizer(model.parameters())
        return optimizer

    def get_scheduler(self, optimizer: Any) -> Any:
        scheduler = self._scheduler
        if scheduler is not None and callable(scheduler) and not hasattr(scheduler, "step"):
            return scheduler(optimizer)
        return scheduler

    def get_loggers(self) -> Dict[str, Any]:
        loggers = dict(self._loggers or {})
        if not any(isinstance(lg, ConsoleLogger) for lg in loggers.values()):
            loggers["_console"] = FlowConsoleLogger(verbose=getattr(self, "_verbose_metrics", False))
        if self._logdir is not None and not any(isinstance(lg, CSVLogger) for lg in loggers.values()):
            loggers["_csv"] = compat.CSVLogger(logdir=self._logdir, use_logdir_postfix=True)  # one header on resume
        if self._logdir is not None and not any(isinstance(lg, TensorboardLogger) for lg in loggers.values()):
            loggers["_tensorboard"] = FlowTensorboardLogger(logdir=os.path.join(self._logdir, "tensorboard"))
        self._loggers = loggers
        return super().get_loggers()

    def get_callbacks(self) -> "OrderedDict[str, Callback]":
        callbacks = sort_callbacks_by_order(self._callbacks)

        def exists(kind) -> bool:
            return any(callback_isinstance(c, kind) for c in callbacks.values())

        flags = self._default_callbacks
        if flags["flow_metrics"] and not exists(FlowMetricsCallback):
            callbacks["_flow_metrics"] = FlowMetricsCallback()
        if not exists(FlowMetricsCallback) and not exists(LoaderLossCallback):  # a loader loss for the checkpoint
            callbacks["_loader_loss"] = LoaderLossCallback()
        if flags["interpretation"] and not exists(InterpretationCallback):
            callbacks["_interpretation"] = InterpretationCallback()
        if flags["threshold_tuning"] and not exists(ThresholdTuningCallback):
            callbacks["_threshold_tuning"] = ThresholdTuningCallback()
        trains = any(str(k).startswith("train") for k in self._loaders)
        if trains and self.optimizer is not None:
            if not exists(IBackwardCallback):
                callbacks["_backward"] = compat.BackwardCallback(metric_key="loss")
            if not exists(IOptimizerCallback):
                callbacks["_optimizer"] = compat.OptimizerCallback(metric_key="loss")  # no betas as momentum
        if self.scheduler is not None and not exists(ISchedulerCallback):
            plateau = isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
            callbacks["_scheduler"] = (compat.SchedulerCallback(loader_key=self._valid_loader, metric_key=self._valid_metric)
                                       if plateau else compat.SchedulerCallback())  # no betas as momentum
        if self._verbose and not exists(TqdmCallback):
            callbacks["_verbose"] = FlowProgressBar()
        if self._logdir is not None and not exists(ICheckpointCallback):
            callbacks["_checkpoint"] = compat.CheckpointCallback(
                logdir=os.path.join(self._logdir, "checkpoints"), loader_key=self._valid_loader,
                metric_key=self._valid_metric, minimize=self._minimize_valid_metric, mode="runner",
                resume_runner=self._resume_path, load_best_on_end=self._load_best_on_end)
        self._callbacks = callbacks
        return super().get_callbacks()

    def _setup_callbacks(self) -> None:
        # The loss is computed in handle_batch and the step callbacks are added above.
        with compat.quiet_step_callback_check():
            super()._setup_callbacks()

    def _run_event(self, event: str) -> None:
        # Catalyst 22.4 (IRunner._run_loader) runs a batch as on_batch_start, handle_batch,
        # on_batch_end: the guards look at the loss before any callback, so that a skipped batch
        # reaches none (no backward pass, optimizer step or metrics). Tested in test_guards.py.
        if self._guards.before(event, self):
            super()._run_event(event)
            self._guards.after(event, self)

    def on_experiment_start(self, runner: Any) -> None:
        super().on_experiment_start(runner)
        if isinstance(self.model, BalancedDataParallel):
            # the replicas keep the logits of the samples the interpretation callbacks explain
            explain = [getattr(c, "explain", 0) for c in self.callbacks.values()
                       if callback_isinstance(c, InterpretationCallback)]
            self.model.reducer.explain = max([self.model.reducer.explain, *explain])

    def on_experiment_end(self, runner: Any) -> None:
        super().on_experiment_end(runner)
        # After the callbacks (Catalyst runs the runner's *_end handlers last): with
        # load_best_on_end the checkpoint callback has just restored the best epoch's weights and
        # thresholds; the tuned_params.json written at the last epoch would contradict them.
        tuned = os.path.join(self._logdir, TUNED_PARAMS_FILE) if self._logdir is not None else None
        if self._load_best_on_end and tuned and os.path.isfile(tuned) and is_main_process() and not self._evaluating:
            from ..tuning import save_tuned

            save_tuned(tuned, self.flow.get_decoder().params())

    def on_loader_start(self, runner: Any) -> None:
        super().on_loader_start(runner)
        self._padding = ddp_padding_layout(self.loader) if self.drop_ddp_padding else None
        self._loader_step = 0

    def on_batch_start(self, runner: Any) -> None:
        # Catalyst takes len(batch[0]) as the batch size, which is the number of keys of X here.
        x, y = split_batch(self.batch, self.loader_key, allow_inputs_only=self.is_infer_loader)
        if self._padding is not None:
            n = batch_size_of(y, x) if y is not None else _inputs_batch_size(x)
            real = self._padding.real_rows(self._loader_step, n)
            if real < n:  # the copies with which accelerate evened out the shards: every sample counts once
                x, y = take_rows(x, real, n), (take_rows(y, real, n) if y is not None else None)
                self.batch = (x, y) if y is not None else x
        self._loader_step += 1
        if self.loader_batch_step == 0:
            check_first_batch(self.flow, x, y, self.loader_key, reads_inputs=self._model_is_flow_module())
        self.batch_size = batch_size_of(y, x) if y is not None else _inputs_batch_size(x)
        steps = self.engine.num_processes
        self.batch_step += steps
        self.loader_batch_step += steps
        self.sample_step += self.batch_size * steps
        self.loader_sample_step += self.batch_size * steps
        self.batch_metrics = {}

    def _model_is_flow_module(self) -> bool:
        return unwrap(self.model) is self.flow.torch()

    def handle_batch(self, batch: Any) -> None:
        x, y = split_batch(batch, self.loader_key, allow_inputs_only=self.is_infer_loader)
        outputs, parts = self.forward_flow(x, y)
        self.batch = {INPUTS: x, TARGETS: y if y is not None else {}, OUTPUTS: outputs}
        if y is None:
            return
        criterion = self.criterion if self.criterion is not None else self._kept_criterion
        terms = parts
        if isinstance(parts, Mapping) and LOSS_TERMS in parts:  # reduced inside the model (balanced replicas)
            terms = parts[LOSS_TERMS]
            for key in (METRIC_STATES, PER_SAMPLE_LOSS, EXPLAIN):
                if key in parts:
                    self.batch[key] = parts[key]
        if terms is None and hasattr(criterion, "terms") and hasattr(criterion, "combine"):
            terms = criterion.terms(outputs, y)
        if terms is not None and hasattr(criterion, "from_stacked"):
            # one stack for the loss and the callbacks; FlowLoss scales for DDP under a process group
            paths = tuple(terms)
            stacked = stack_terms(terms)
            loss = criterion.from_stacked(stacked, paths)
            self.batch[LOSS_TERMS] = StackedLossTerms(paths, stacked.detach())
        elif terms is not None:
            loss = (criterion.from_terms(terms) if hasattr(criterion, "from_terms")
                    else criterion.combine(terms, criterion.weights))
            self.batch[LOSS_TERMS] = {p: (s.detach(), c.detach()) for p, (s, c) in terms.items()}
        else:
            loss = criterion(outputs, y)
        self.batch_metrics["loss"] = loss

    def forward_flow(self, x: Mapping[str, Any], y: Optional[Mapping[str, Tensor]]) -> Tuple[Mapping[str, Any], Any]:
        """`(outputs, parts)` for the batch: the model's outputs for `x`, and what the model
        computed itself: None (the criterion computes the loss terms from the outputs), the loss
        terms `{path: (sum, count)}`, or a mapping with `"loss_terms"` and any of
        `"metric_states"`, `"per_sample_loss"`, `"explain"` (see `callbacks.batch`), as a
        `BalancedDataParallel` model returns them (its outputs then hold only masks and the
        activated outputs of the kept tasks)."""
        if y is not None and isinstance(self.model, BalancedDataParallel):
            reduced = self.model(x, y)
            return reduced[OUTPUTS], reduced
        return self.model(x), None

    @torch.no_grad()
    def predict_batch(self, batch: Any, **kwargs) -> Mapping[str, Any]:
        """The model's outputs for a batch `(X, y)` or `X` (Catalyst's `predict_loader` uses it)."""
        x, _ = split_batch(batch, self.loader_key, allow_inputs_only=True)
        return self.model(x)

    # After training ------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, loader: Any, preconditions: str = "predicted") -> Dict[str, Any]:
        """Like `infer`, with torch tensors on the CPU instead of numpy arrays."""
        return self._predict(loader, preconditions, "predict")

    @torch.no_grad()
    def _predict(self, loader: Any, preconditions: str, what: str) -> Dict[str, Any]:
        if preconditions not in ("predicted", "gt"):
            raise ValueError(f"preconditions must be 'predicted' or 'gt', got {preconditions!r}")
        model = self.model
        if model is None:
            raise ValueError("FlowRunner has no model")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            # each process predicts alone (after training under torchrun the process group is gone)
            model = model.module
        was_training = model.training
        model.eval()
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        parts: Dict[str, List[Dict[str, Tensor]]] = {k: [] for k in ("logits", "activated", "decoded", "mask")}
        targets: List[Dict[str, Tensor]] = []
        indices: List[Tensor] = []
        first = True
        try:
            for batch in loader:
                x, y = split_batch(batch, "infer", allow_inputs_only=True)
                if first and preconditions == "gt":
                    check_first_batch(self.flow, x, y, "infer", reads_inputs=self._model_is_flow_module())
                first = False
                if preconditions == "predicted":
                    x = {k: v for k, v in x.items() if k != "gt"}
                out = model(to_device(x, device))
                activated = out.get("activated") or self.flow.get_activation()(out["logits"])
                decoded = out.get("decoded") or self.flow.get_decoder()(activated)
                for key, value in (("logits", out["logits"]), ("activated", activated), ("decoded", decoded),
                                   ("mask", out["mask"])):
                    parts[key].append({p: t.detach().cpu() for p, t in value.items()})
                if y is not None:
                    targets.append({p: t.detach().cpu() for p, t in y.items()})
                if isinstance(x.get(INDEX), Tensor):
                    indices.append(x[INDEX].detach().cpu().reshape(-1))
        finally:
            model.train(was_training)
        result: Dict[str, Any] = {k: _concat(v) for k, v in parts.items()}
        require_batches(result, what)
        result["targets"] = _concat(targets) if targets else None
        n = next(iter(result["logits"].values())).shape[0] if result["logits"] else 0
        index = torch.cat(indices) if indices else torch.arange(n)
        if indices and index.numel() == n:
            order = torch.argsort(index, stable=True)
            for key in ("logits", "activated", "decoded", "mask", "targets"):
                if result[key] is not None:
                    result[key] = {p: t[order] for p, t in result[key].items()}
            index = index[order]
        result["index"] = index
        return result

    def infer(self, loader: Any, preconditions: str = "predicted") -> Dict[str, Any]:
        """Predictions over a loader, in dataset order (by `X["index"]` when batches carry it).

        Returns `{"logits", "activated", "decoded", "mask", "targets"}`, each `{path: numpy array}`
        (`targets` None when the loader yields only `X`), and `"index"` (dataset indices).
        `preconditions="predicted"` (default) computes masks from the decoded predictions, as at
        inference (`X["gt"]` is dropped); `"gt"` from `X["gt"]`.
        """
        result = self._predict(loader, preconditions, "infer")
        out: Dict[str, Any] = {}
        for key, value in result.items():
            if isinstance(value, Mapping):
                out[key] = {p: t.numpy() for p, t in value.items()}
            elif isinstance(value, Tensor):
                out[key] = value.numpy()
            else:
                out[key] = value
        return out

    def tune(self, loader: Any, metric: Any = "accuracy", apply: bool = True, save: bool = True) -> Dict[str, Dict[str, Any]]:
        """Tune every tunable decoder on `loader` (samples in `S_t`, from `X["gt"]`) for `metric`;
        returns `{path: params}`. `apply` keeps them in the decoders; `save` writes
        `tuned_params.json` into the logdir (when there is one; under torchrun, rank 0 only).
        The decoders are the tasks', shared by every runner of flows from one `Tasks` (`FlowDecoder`)."""
        from ..interpreters.decoding import merge_report

        result = self._predict_with_targets(loader, "tune")
        decoder = self.flow.get_decoder()
        paths = list(decoder.params())
        params, report = decoder.fit({p: result["activated"][p] for p in paths},
                                     {p: result["targets"][p] for p in paths},
                                     masks={p: result["mask"][p] for p in paths}, metric=metric)
        if apply:
            decoder.load_tuned(params)
        tuned = merge_report(params, report)
        if save and self._logdir is not None and is_main_process():
            from ..tuning import save_tuned

            save_tuned(os.path.join(self._logdir, TUNED_PARAMS_FILE), tuned)
        return tuned

    def evaluate(self, loader: Any, preconditions: str = "gt", save: bool = True, verbose: bool = True) -> pd.DataFrame:
        """The flow's evaluation table on `loader` (`task_path, metric_name, metric_res,
        num_samples`; `flow.get_evaluator()` on activated predictions); also written as
        `evaluation.csv` into the logdir when there is one and `save` is true (under torchrun,
        rank 0 only). `verbose` prints it in full, one line per task (`summary.format_table`),
        and where the logs are."""
        result = self._predict_with_targets(loader, "evaluate")
        table = self.flow.get_evaluator()(result["activated"], result["targets"], preconditions=preconditions)
        if save and self._logdir is not None and is_main_process():
            write_csv(os.path.join(self._logdir, EVALUATION_FILE), table)
        if verbose and is_main_process():
            print(summary(table, self._logdir, title=f"Evaluation (preconditions from {_MODE_WORDS[preconditions]})"))
        return table

    def _predict_with_targets(self, loader: Any, what: str) -> Dict[str, Any]:
        result = self._predict(loader, "gt", what)
        if result["targets"] is None:
            raise TypeError(f"{what} needs labels: the loader must yield (X, y) pairs")
        return result

    # Persistence ---------------------------------------------------------------------------------
    def export(self, directory: Union[str, os.PathLike]) -> str:
        """Write the model's weights, the tuned decoder parameters and a manifest into `directory`
        (see `dnn_cool_catalyst.runners.export`); returns the directory."""
        return export_model(directory, self.flow, self.model)

    @classmethod
    def load(cls, directory: Union[str, os.PathLike], flow: Any, model: Any = None, map_location: Any = "cpu",
             **kwargs) -> "FlowRunner":
        """A runner for `flow` (and `model`, built as in the constructor) with the weights
        (`weights_only=True`) and tuned parameters exported to `directory`."""
        runner = cls(flow, model=model, **kwargs)
        load_model(directory, runner.flow, runner.model, map_location=map_location)
        return runner


def _inputs_batch_size(x: Mapping[str, Any]) -> int:
    for value in x.values():
        if isinstance(value, Tensor):
            return int(value.shape[0])
        if isinstance(value, Mapping):
            return _inputs_batch_size(value)
    raise ValueError("cannot tell the batch size of an X without tensors")
