"""`FlowRunner`: Catalyst's `Runner` for a task flow, with flow-aware defaults.

The runner orchestrates: it feeds batches to the model, computes the flow loss, and adds the
callbacks, optimizer, checkpointing and loggers a flow needs where the user gave none (built in
`runners.defaults`; the engine is chosen by `runners.engines.choose_engine`). Batches are
checked in `dnn_cool_catalyst.batches`, predictions, tuning and evaluation over a loader are
`dnn_cool_catalyst.inference`, the loss goes through `runners.criterion`, DDP's padding copies are
found by `runners.padding`, resuming and restoring from the logdir is `runners.restore`; metrics,
tuning and interpretation during training live in the callbacks, persistence in `runners.export`.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from collections import OrderedDict
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import pandas as pd
import torch
from catalyst import dl
from catalyst.core.callback import Callback
from catalyst.core.misc import callback_isinstance, get_original_callback
from torch import Tensor, nn

from .. import inference
from ..batches import check_first_batch, inputs_batch_size, split_batch, take_rows
from ..callbacks import InterpretationCallback
from ..callbacks.batch import batch_size_of
from ..callbacks.common import resolve_flow
from ..balancing.gradient import GradientBalancer
from ..files import write_csv
from ..interpreters.module import FlowModule
from ..callbacks.tuning import TUNED_PARAMS_FILE
from ..distributed import is_main_process, unwrap
from ..keys import EXPLAIN, GT, INPUTS, LOSS_TERMS, METRIC_STATES, OUTPUTS, PER_SAMPLE_LOSS, TARGETS
from ..summary import summary, where_logs_are
from . import checkpoints, compat, defaults
from .balance import BalancedDataParallel
from .console import stdout_is_terminal
from .criterion import LossStep, loss_step
from .defaults import CATALYST_TRAIN_ARGS, resolve_model  # noqa: F401  (importable from here, as before)
from .engines import choose_engine, unshare_tensors
from .export import export_model, load_model
from .guards import RunGuards
from .padding import PaddingLayout, ddp_padding_layout
from .restore import ran_in_spawned_workers, restore_from_logdir, resume_checkpoint

_MODE_WORDS = {GT: "the labels", "predicted": "the predictions"}
EVALUATION_FILE = "evaluation.csv"


class FlowRunner(dl.Runner):
    """Catalyst's `Runner` for a task flow.

    `FlowRunner(flow, model=None)`: `flow` is a `TaskFlow`, a `Tasks` registry (its full flow), a
    factory of one or its dotted path (for YAML); `model` defaults to `flow.torch()`, or is any
    module (e.g. a backbone computing the features the heads read, then calling the flow module
    with `gt` passed through) or a factory `model(flow)` / its dotted path. `balancer` (a
    `dnn_cool_catalyst.balancing.Balancer`, e.g. `UncertaintyWeighting()`): the default criterion
    is `flow.get_loss(balancer=balancer)`, moved to the model's device, its learnable parameters
    join the default optimizer (`runners.defaults.optimizer_for`), and a `BalancerCallback` logs
    each task's effective weight per epoch (`<path>/balance/weight`) and calls the balancer's
    `epoch_end()`; with a criterion given to `train` it is an error. A gradient method
    (`balancing.GradientBalancer`, e.g. `PCGrad()`) balances `shared_parameters`: by default every
    parameter of the model that is not a task head's (not inside a flow module), or those given
    (an iterable of parameters, or a function `model -> parameters`), set on the loss at the start
    of each run (after the engine placed the model). Memory-balanced DataParallel reduces the loss
    inside its replicas, where the heads' inputs stay: it takes the parameters variant only.

    `handle_batch` feeds `X` (with `X["gt"]`) to the model and leaves `inputs`, `targets`, `outputs`
    and the loss terms in `runner.batch` (see `dnn_cool_catalyst.callbacks.batch`), the flow loss
    in `runner.batch_metrics["loss"]`. The first batch of each loader is checked: a loader that does
    not yield `(X, y)`, labels missing for a task or a missing key fail there, naming it.

    Several devices (engines in `runners.engines`): `balance_dataparallel_memory=True` (or a
    `BalancedDataParallelEngine`) reduces loss terms, metric states and per-sample losses inside
    each DataParallel replica (`runners.balance`), with the losses and metrics of the whole batch.
    Under DDP the flow loss scales itself so that the averaged gradients are the global batch's;
    metrics, tuning and interpretation see the outputs of all processes, each sample once (the
    copies accelerate pads the shards with are dropped: `drop_ddp_padding`); only the main process
    writes files. When the engine spawned the processes, `train` loads the trained weights and
    tuned parameters back from the logdir (`runners.restore`; `epoch_metrics` stays empty).

    Example::

        runner = FlowRunner(flow)
        runner.train(loaders={"train": ..., "valid": ...}, num_epochs=10, logdir="logs/run1")
        predictions = runner.infer(test_loader)
        table = runner.evaluate(test_loader)
        runner.export("exported/")
        runner = FlowRunner.load("exported/", flow)
    """

    def __init__(self, flow: Any, model: Any = None, engine: Any = None, logdir: Optional[str] = None,
                 balance_dataparallel_memory: bool = False, drop_ddp_padding: bool = True, balancer: Any = None,
                 shared_parameters: Any = None):
        flow = resolve_flow(flow)
        super().__init__(model=resolve_model(model, flow), engine=engine)
        self.balance_dataparallel_memory = bool(balance_dataparallel_memory)
        self.drop_ddp_padding = bool(drop_ddp_padding)
        self._padding: Optional[PaddingLayout] = None
        self._loader_step = 0
        self.flow = flow
        self.balancer = balancer
        self.flow_loss = flow.get_loss(balancer=balancer)
        # a function of the model, or the parameters themselves (a list: an iterator would run out)
        self._shared_parameters = (shared_parameters if shared_parameters is None or callable(shared_parameters)
                                   else list(shared_parameters))
        self._kept_criterion: Any = self.flow_loss
        self._loss_step: Optional[LossStep] = None  # the criterion of the run, adapted at its start
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
    def train(self, *, loaders: "OrderedDict[str, Any]", lr: float = 1e-3, flow_metrics: bool = True,
              interpretation: bool = True, threshold_tuning: bool = True, nonfinite: str = "raise",
              overwrite: bool = False, **catalyst_args: Any) -> None:
        """Catalyst's `train`: `catalyst_args` are Catalyst's own arguments (`criterion`, `optimizer`,
        `callbacks`, `loggers`, `num_epochs`, `logdir`, `resume`, `valid_loader`, `valid_metric`,
        `verbose`, `load_best_on_end`, ...), passed on, with defaults (`runners.defaults`) only
        where none was given:

        - `criterion`: the flow loss (kept across calls, also for `evaluate_loader`), balanced by
          the constructor's `balancer` when given (then a `criterion` here is an error);
        - `optimizer`: `AdamW(lr=lr)` when a loader trains; an optimizer may be a factory
          `optimizer(params)`, a scheduler a factory `scheduler(optimizer)` (YAML partials); a
          balancer's learnable parameters join either as a second group without weight decay;
        - callbacks: `FlowMetricsCallback`, `InterpretationCallback`, `ThresholdTuningCallback`
          (unless one of its type is given or its flag is false), backward, optimizer and scheduler
          steps, and with a `logdir` a checkpoint (`<logdir>/checkpoints`) keeping the best epoch by
          `valid_metric` ("loss", minimised) on `valid_loader` (the first "valid*" loader, else the first);
        - loggers: `FlowTensorboardLogger` (`<logdir>/tensorboard`, with the run's hyperparameters),
          `FlowConsoleLogger` (a line per epoch; the best epoch's per-task metrics at the end), CSV;
        - `verbose`: None shows a progress bar when standard output is a terminal; True always,
          with every loader's per-task metrics each epoch; False none;
        - `resume`: True (or "last") or a path continues from `<logdir>/checkpoints/runner.last.pth`
          (model, optimizer, scheduler, epoch, tuned thresholds, best-so-far); give the total
          `num_epochs` and fresh loaders. A `logdir` holding a run's files is an error unless
          `resume` continues it or `overwrite=True` removes them first (two runs never mix);
        - `load_best_on_end`: the best epoch's weights and the decoder parameters it had.

        The flow's arguments: `lr` of the default optimizer; `flow_metrics`, `interpretation`,
        `threshold_tuning` switch default callbacks off (without `FlowMetricsCallback` the loader
        `loss` is the batch-size-weighted mean of the batch losses); `nonfinite`: "raise" (default)
        stops at the first batch with a NaN/infinite loss, naming loader, batch, tasks and inputs,
        "skip" leaves such batches out and counts them as `nonfinite_batches` (`runners.guards`,
        which also checks `valid_metric` against the metrics the callbacks produce); `overwrite`.
        """
        if not isinstance(loaders, Mapping) or not loaders:
            raise TypeError(f"loaders must be a non-empty mapping name -> DataLoader, got {type(loaders).__name__}")
        own = [n for n in inspect.signature(FlowRunner.train).parameters if n not in ("self", "catalyst_args")]
        args = defaults.catalyst_train_args(catalyst_args, own)
        logdir = args["logdir"]
        if self._evaluating:
            logdir = None
        else:
            logdir = os.fspath(logdir) if logdir is not None else self._logdir
            self._logdir = logdir
        if args["criterion"] is not None and self.balancer is not None:
            raise ValueError(f"FlowRunner was given balancer={type(self.balancer).__name__}(...), which makes the "
                             f"criterion (flow.get_loss(balancer=...)), and train got criterion="
                             f"{type(args['criterion']).__name__} too: give one of them")
        if args["criterion"] is not None:
            self._kept_criterion = args["criterion"]
        self._lr = lr
        self._make_default_optimizer = args["optimizer"] is None and defaults.any_trains(loaders) and not self._evaluating
        self._default_callbacks = {"flow_metrics": flow_metrics, "interpretation": interpretation and not self._evaluating,
                                   "threshold_tuning": threshold_tuning and not self._evaluating,
                                   "balancer": self.balancer is not None and not self._evaluating}
        valid_loader = defaults.valid_loader_of(loaders, args["valid_loader"])
        self._guards = RunGuards(nonfinite, valid_loader, args["valid_metric"])  # as given (None: the default)
        if logdir is not None and not self._evaluating and is_main_process():
            checkpoints.claim_logdir(logdir, resume=args["resume"], overwrite=overwrite)
        self._resume_path = resume_checkpoint(args["resume"], logdir, args["callbacks"])
        engine = choose_engine(args["engine"] if args["engine"] is not None else self.engine, self.flow,
                               self._kept_criterion, self.balance_dataparallel_memory,
                               cpu=args["cpu"], fp16=args["fp16"], ddp=args["ddp"])
        verbose = catalyst_args.get("verbose")  # None (not given): a progress bar on a terminal
        self._verbose_metrics = verbose is True  # per-task lines every epoch (the default console logger)
        args.update(loaders=loaders, engine=engine, criterion=self._kept_criterion, logdir=logdir,
                    resume=self._resume_path, valid_loader=valid_loader,
                    valid_metric="loss" if args["valid_metric"] is None else args["valid_metric"],
                    minimize_valid_metric=True if args["minimize_valid_metric"] is None else args["minimize_valid_metric"],
                    verbose=stdout_is_terminal() if verbose is None else verbose)
        spawns = isinstance(engine, dl.DistributedDataParallelEngine)  # also Catalyst's own engine
        with compat.generators_across_processes() if spawns else contextlib.nullcontext():
            super().train(**args)
        if ran_in_spawned_workers(self.engine):
            restore_from_logdir(self._logdir, self.model, self.flow, args["load_best_on_end"])
        if not self._evaluating and is_main_process():
            print(where_logs_are(self._logdir))

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
        criterion = self._kept_criterion
        if self.balancer is not None and criterion is self.flow_loss:
            if isinstance(self.engine, dl.DistributedDataParallelEngine):
                unshare_tensors(criterion)  # as the model (get_model): each worker learns its own copy
            criterion.to(self.engine.device)  # in place: the parameter objects stay the same
        return criterion

    def get_optimizer(self, model: Any) -> Any:
        learnable = list(self.flow_loss.parameters()) if self.balancer is not None else []
        return defaults.optimizer_for(self._optimizer, model, self._lr, self._make_default_optimizer, learnable)

    def get_scheduler(self, optimizer: Any) -> Any:
        return defaults.scheduler_for(self._scheduler, optimizer)

    def get_loggers(self) -> Dict[str, Any]:
        self._loggers = defaults.default_loggers(self._loggers, self._logdir, getattr(self, "_verbose_metrics", False))
        return super().get_loggers()

    def get_callbacks(self) -> "OrderedDict[str, Callback]":
        self._callbacks = defaults.default_callbacks(
            self._callbacks, self._default_callbacks, trains=defaults.any_trains(self._loaders),
            optimizer=self.optimizer, scheduler=self.scheduler, valid_loader=self._valid_loader,
            valid_metric=self._valid_metric, minimize_valid_metric=self._minimize_valid_metric, verbose=self._verbose,
            logdir=self._logdir, resume_path=self._resume_path, load_best_on_end=self._load_best_on_end)
        return super().get_callbacks()

    def _setup_callbacks(self) -> None:
        # Catalyst 22.4 has no seam between building the callbacks and `check_callbacks`, which warns
        # "No I*Callback" because the loss is computed in handle_batch (the step callbacks are added
        # in get_callbacks): only those three warnings are silenced, around Catalyst's own method.
        # tests/runners/test_runner.py::test_catalyst_private_methods_overridden_are_as_in_22_4
        with compat.quiet_step_callback_check():
            super()._setup_callbacks()

    def _run_event(self, event: str) -> None:
        # Catalyst 22.4 (IRunner._run_loader) runs a batch as on_batch_start, handle_batch,
        # on_batch_end, each through _run_event: the guards look at the loss before any callback,
        # so that a skipped batch reaches none (no backward pass, optimizer step or metrics); no
        # public hook sits between handle_batch and the callbacks' on_batch_end. Tested in
        # test_guards.py, and by test_catalyst_private_methods_overridden_are_as_in_22_4.
        if self._guards.before(event, self):
            super()._run_event(event)
            self._guards.after(event, self)

    def on_experiment_start(self, runner: Any) -> None:
        super().on_experiment_start(runner)  # builds the components and the callbacks
        self._loss_step = loss_step(self.criterion if self.criterion is not None else self._kept_criterion)
        if isinstance(self.model, BalancedDataParallel):
            self.model.reducer.explain = max(self.model.reducer.explain, self._samples_to_explain())
        if isinstance(self.balancer, GradientBalancer) and not self._evaluating:
            self._share_parameters()

    def _share_parameters(self) -> None:
        """Give the gradient method its shared parameters (those of the model placed by the engine)."""
        name = type(self.balancer).__name__
        if isinstance(self.model, BalancedDataParallel) and self.balancer.representation:
            raise ValueError(f"{name}(representation=True) needs the inputs the heads read, which memory-balanced "
                             f"DataParallel keeps inside its replicas (it gathers only the loss terms): use "
                             f"{name}(representation=False), or balance_dataparallel_memory=False")
        model = unwrap(self.model)
        given = self._shared_parameters
        if given is None:
            heads = {id(p) for m in model.modules() if isinstance(m, FlowModule) for p in m.parameters()}
            shared = [p for p in model.parameters() if id(p) not in heads and p.requires_grad]
        else:
            shared = list(given(model) if callable(given) else given)
        if not shared and not self.balancer.representation:
            raise ValueError(f"FlowRunner: {name} balances the parameters the tasks share, but the model has none "
                             f"outside the task heads{' (among those given)' if given is not None else ''} (every "
                             f"parameter is in a flow module): give a model with a shared backbone computing the "
                             f"features the heads read, pass shared_parameters=..., or use a loss-weighting method")
        self.flow_loss.shared_parameters = shared

    def _samples_to_explain(self) -> int:
        """How many samples (the lowest dataset indices) the run's `InterpretationCallback`s explain
        as trees (their `explain` argument): memory-balanced replicas keep those samples' logits."""
        explain = [get_original_callback(c).explain for c in self.callbacks.values()
                   if callback_isinstance(c, InterpretationCallback)]
        return max(explain, default=0)

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
        x, y = split_batch(self.batch, self.loader_key, allow_inputs_only=self.is_infer_loader)
        size = batch_size_of(y, x) if y is not None else inputs_batch_size(x)
        if self._padding is not None:
            real = self._padding.real_rows(self._loader_step, size)
            if real < size:  # the copies with which accelerate evened out the shards: every sample counts once
                x, y = take_rows(x, real, size), (take_rows(y, real, size) if y is not None else None)
                self.batch, size = ((x, y) if y is not None else x), real
        self._loader_step += 1
        if self.loader_batch_step == 0:
            check_first_batch(self.flow, x, y, self.loader_key, reads_inputs=self._model_is_flow_module())
        # Catalyst's step counters, with its batch size corrected: Catalyst 22.4 takes len(batch[0]),
        # which for an (X, y) pair is the number of keys of X. Tested in test_runner.py.
        super().on_batch_start(runner)
        self.sample_step += (size - self.batch_size) * self.engine.num_processes
        self.loader_sample_step += (size - self.batch_size) * self.engine.num_processes
        self.batch_size = size

    def _model_is_flow_module(self) -> bool:
        return unwrap(self.model) is self.flow.torch()

    def handle_batch(self, batch: Any) -> None:
        x, y = split_batch(batch, self.loader_key, allow_inputs_only=self.is_infer_loader)
        outputs, reduced = self.forward_flow(x, y)
        self.batch = {INPUTS: x, TARGETS: y if y is not None else {}, OUTPUTS: outputs}
        if y is None:
            return
        for key in (METRIC_STATES, PER_SAMPLE_LOSS, EXPLAIN):  # reduced inside the model (balanced replicas)
            if key in reduced:
                self.batch[key] = reduced[key]
        # one stack of the terms for the loss and the callbacks; FlowLoss scales for DDP under a process group
        loss, terms = self._loss_step(outputs, y, reduced.get(LOSS_TERMS))
        if terms is not None:
            self.batch[LOSS_TERMS] = terms
        self.batch_metrics["loss"] = loss

    def forward_flow(self, x: Mapping[str, Any],
                     y: Optional[Mapping[str, Tensor]]) -> Tuple[Mapping[str, Any], Mapping[str, Any]]:
        """`(outputs, reduced)` for the batch: the model's outputs for `x`, and what the model
        reduced itself: `{}` (the criterion computes the loss terms from the outputs), or, as a
        `BalancedDataParallel` model returns it, a mapping with `"loss_terms"` and any of
        `"metric_states"`, `"per_sample_loss"`, `"explain"` (see `callbacks.batch`; the outputs
        then hold only masks and the activated outputs of the kept tasks)."""
        if y is not None and isinstance(self.model, BalancedDataParallel):
            reduced = self.model(x, y)
            return reduced[OUTPUTS], reduced
        return self.model(x), {}

    @torch.no_grad()
    def predict_batch(self, batch: Any, **kwargs) -> Mapping[str, Any]:
        """The model's outputs for a batch `(X, y)` or `X` (Catalyst's `predict_loader` uses it)."""
        x, _ = split_batch(batch, self.loader_key, allow_inputs_only=True)
        return self.model(x)

    # After training: `dnn_cool_catalyst.inference` over the runner's model and flow --------------
    def predict(self, loader: Any, preconditions: str = "predicted", mc_samples: Optional[int] = None,
                mc_seed: Optional[int] = None) -> Dict[str, Any]:
        """Like `infer`, with torch tensors on the CPU instead of numpy arrays."""
        return inference.predict(self.model, self.flow, loader, preconditions, name="FlowRunner.predict",
                                 mc_samples=mc_samples, mc_seed=mc_seed)

    def infer(self, loader: Any, preconditions: str = "predicted", mc_samples: Optional[int] = None,
              mc_seed: Optional[int] = None) -> Dict[str, Any]:
        """Predictions over a loader, in dataset order (by `X["index"]` when batches carry it).

        Returns `{"logits", "activated", "decoded", "mask", "targets"}`, each `{path: numpy array}`
        (`targets` None when the loader yields only `X`), and `"index"` (dataset indices).
        `preconditions="predicted"` (default) computes masks from the decoded predictions, as at
        inference (`X["gt"]` is dropped); `"gt"` from `X["gt"]`.

        `mc_samples=n` adds `"uncertainty"`: per task path the MC-dropout statistics of `n` passes
        with the model's dropout active (`dnn_cool_catalyst.uncertainty.mc_dropout`: mean, variance,
        entropy and mutual information for classifiers, the fraction of passes in which the task
        applied); `mc_seed` makes them repeatable. The model must have dropout layers.
        """
        return inference.infer(self.model, self.flow, loader, preconditions, name="FlowRunner.infer",
                               mc_samples=mc_samples, mc_seed=mc_seed)

    def tune(self, loader: Any, metric: Any = "accuracy", apply: bool = True, save: bool = True) -> Dict[str, Dict[str, Any]]:
        """Tune every tunable decoder on `loader` (samples in `S_t`, from `X["gt"]`) for `metric`;
        returns `{path: params}`. `apply` keeps them in the decoders; `save` writes
        `tuned_params.json` into the logdir (when there is one; under torchrun, rank 0 only).
        The decoders are the tasks', shared by every runner of flows from one `Tasks` (`FlowDecoder`)."""
        tuned = inference.tune(self.model, self.flow, loader, metric=metric, apply=apply, name="FlowRunner.tune")
        if save and self._logdir is not None and is_main_process():
            from ..tuning import save_tuned

            save_tuned(os.path.join(self._logdir, TUNED_PARAMS_FILE), tuned)
        return tuned

    def evaluate(self, loader: Any, preconditions: str = "gt", save: bool = True, verbose: bool = True,
                 mc_samples: Optional[int] = None, mc_seed: Optional[int] = None) -> pd.DataFrame:
        """The flow's evaluation table on `loader` (`task_path, metric_name, metric_res,
        num_samples`; `flow.get_evaluator()` on activated predictions: a per-token task, with
        `element_dims`, is scored over its tokens and its `num_samples` counts them); also written as
        `evaluation.csv` into the logdir when there is one and `save` is true (under torchrun,
        rank 0 only). `verbose` prints it in full, one line per task (`summary.format_table`),
        and where the logs are. `mc_samples=n` adds the columns `entropy` (classifiers) and
        `variance` (other tasks), means over the scored samples of `n` MC-dropout passes
        (`FlowEvaluator`; the model must have dropout layers)."""
        table = inference.evaluate(self.model, self.flow, loader, preconditions, name="FlowRunner.evaluate",
                                   mc_samples=mc_samples, mc_seed=mc_seed)
        if save and self._logdir is not None and is_main_process():
            write_csv(os.path.join(self._logdir, EVALUATION_FILE), table)
        if verbose and is_main_process():
            print(summary(table, self._logdir, title=f"Evaluation (preconditions from {_MODE_WORDS[preconditions]})"))
        return table

    # Persistence ---------------------------------------------------------------------------------
    def export(self, directory: Union[str, os.PathLike, None] = None, deployable: Any = False,
               example_inputs: Any = None, loader: Any = None) -> str:
        """Write the model's weights, the tuned decoder parameters and a manifest into `directory`
        (default: `<logdir>/export`), and with `deployable=True` (or `"onnx"`, `"pt2"`, a list of
        both) the flow as one artifact per format, `model.onnx` / `model.pt2`, with decoding, the
        tuned thresholds and precondition gating inside (`dnn_cool_catalyst.deploy`; traced on
        `example_inputs`, else the first batch of `loader`, else inputs inferred from the flow);
        see `dnn_cool_catalyst.runners.export`. Returns the directory."""
        if directory is None:
            if self.logdir is None:
                raise ValueError("FlowRunner.export: give a directory (the runner has no logdir)")
            directory = os.path.join(self.logdir, "export")
        return export_model(directory, self.flow, self.model, deployable, example_inputs, loader)

    @classmethod
    def load(cls, directory: Union[str, os.PathLike], flow: Any, model: Any = None, map_location: Any = "cpu",
             **kwargs) -> "FlowRunner":
        """A runner for `flow` (and `model`, built as in the constructor) with the weights
        (`weights_only=True`) and tuned parameters exported to `directory`."""
        runner = cls(flow, model=model, **kwargs)
        load_model(directory, runner.flow, runner.model, map_location=map_location)
        return runner
