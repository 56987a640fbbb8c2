"""Workarounds for Catalyst 22.4 with today's torch and accelerate, through Catalyst's own seams.

Each piece names the problem it works around (measured; see CATALYST.md of the project):

- `DataParallelEngine`: Catalyst's raises `prepare_model() got an unexpected keyword argument
  'device_placement'` with accelerate 0.25-0.27; this one has accelerate's signature.
- `BackwardCallback`: Catalyst's `BackwardCallback(grad_clip_fn=...)` raises `AttributeError`
  (it reads `self.model`); this one clips `runner.model`'s gradients. It also replaces the loss in
  `runner.batch_metrics` by its detached value once the backward pass is done, so that loggers and
  the progress bar, which call `float()` on batch metrics, do not warn about tensors requiring grad.
- `batch_fetching_loader`: accelerate 0.27 fails on a `DataLoader(batch_size=None,
  sampler=BatchSampler(...))` (`DataLoaderShard() got multiple values for keyword argument
  'batch_size'`), the form `FlowDataset.loader()` uses to fetch whole batches at once. The loader is
  rebuilt with `batch_sampler=` over a dataset whose `__getitems__` fetches the whole batch in one
  call, which accelerate prepares correctly and which yields the same batches.
- `quiet_step_callback_check`: Catalyst warns "No ICriterionCallback/IBackwardCallback/
  IOptimizerCallback" whenever a criterion or optimizer is set without those callbacks. `FlowRunner`
  computes the loss in `handle_batch` and adds the backward and optimizer callbacks itself where a
  loader trains, so exactly these three messages are silenced while the callbacks are checked.
- `OptimizerCallback`: Catalyst's logs the first Adam-style beta (`betas[0]`) as `momentum`
  (`catalyst.utils.get_optimizer_momentum_list`), so an AdamW run reports `momentum: 0.9`, a value
  no one set. This one logs `momentum` only for optimizers that have that hyperparameter (SGD,
  RMSprop); `lr` always. `SchedulerCallback`: the same for the values Catalyst's writes after a
  scheduler step (batch metrics, or the epoch-scope `runner.epoch_metrics["_epoch_"]`).
- `CheckpointCallback`: Catalyst's writes checkpoints with `torch.save` straight onto the final
  path (a kill or a full disk leaves a truncated `runner.last.pth`), from every DDP process at once, and
  rewrites `runner.best.pth` at every epoch from the live model; it loads them with `torch.load`
  without `weights_only` (unsafe before torch 2.6) into the wrapped model (`DistributedDataParallel`,
  `DataParallel`: "Missing key(s) module...."), and starts its best-so-far bookkeeping empty on a
  resumed run. This one writes atomically from the main process only, loads with
  `weights_only=True` into the unwrapped model, and keeps the bookkeeping and the decoder
  parameters inside each runner checkpoint (see `runners.checkpoints`). It is written on Catalyst's
  public `ICheckpointCallback`, overriding none of `dl.CheckpointCallback`'s private methods.
- `CSVLogger`: Catalyst's writes a second header row into `<loader>.csv` when a run resumes; this
  one keeps one header and the earlier epochs' rows.
- `generators_across_processes`: a `torch.Generator` (e.g. the seeded generator of a
  shuffling loader's `RandomSampler`) cannot be sent through `torch.multiprocessing` to spawned
  DDP workers: the child fails with "unable to resize file <filename not specified> to the right
  size" (its state tensor goes through shared memory). Inside this context manager, a reduction
  registered with multiprocessing's own `ForkingPickler.register` sends the device, seed and state
  as bytes; the registration ends with the block.

This module imports nothing from `runners.engines` (which builds on `DataParallelEngine` here).
"""
from __future__ import annotations

import contextlib
import csv
import os
import warnings
from multiprocessing.reduction import ForkingPickler
from typing import Any, Iterator, List, Optional

import torch
from catalyst import dl
from catalyst.callbacks.checkpoint import Checkpoint
from catalyst.core.engine import Engine
from catalyst.core.misc import callback_isinstance
from catalyst.utils import pack_checkpoint, unpack_checkpoint
from torch.utils.data import BatchSampler, DataLoader, Dataset

from ..distributed import is_main_process, unwrap
from ..files import write_atomic, write_json
from . import checkpoints

STEP_CALLBACK_WARNINGS = (
    r"No ``ICriterionCallback/CriterionCallback`` were found",
    r"No ``IBackwardCallback/BackwardCallback`` were found",
    r"No ``IOptimizerCallback/OptimizerCallback`` were found",
)


class DataParallelEngine(dl.DataParallelEngine):
    """`torch.nn.DataParallel` over all visible GPUs (a pass-through on a CPU-only machine).

    The natural place for memory balancing (losses and metrics reduced inside the replicas).
    """

    def prepare_model(self, model: torch.nn.Module, device_placement: Any = None, evaluation_mode: bool = False):
        if torch.cuda.is_available() and torch.cuda.device_count() > 1 and not isinstance(model, torch.nn.DataParallel):
            model = torch.nn.DataParallel(model)
        return Engine.prepare_model(self, model, device_placement=device_placement, evaluation_mode=evaluation_mode)


class BackwardCallback(dl.BackwardCallback):
    """Catalyst's backward step, with gradient clipping that works and the loss detached afterwards."""

    def on_batch_end(self, runner: Any) -> None:
        if not runner.is_train_loader:
            return
        loss = runner.batch_metrics[self.metric_key]
        runner.engine.backward(loss)
        if self.grad_clip_fn is not None:
            runner.engine.unscale_gradients()
            norm = self.grad_clip_fn(runner.model.parameters())
            if self._log_gradient:
                runner.batch_metrics[f"{self._prefix_gradient}/norm"] = norm
        runner.batch_metrics[self.metric_key] = loss.detach()


class OptimizerCallback(dl.OptimizerCallback):
    """Catalyst's optimizer step, logging `lr` and, only where the optimizer has a `momentum`
    hyperparameter (SGD, RMSprop), `momentum` (never Adam's `betas[0]`). With an `optimizer_key`
    the names are `lr/<key>` and `momentum/<key>`, as Catalyst's."""

    def _get_lr_momentum_stats(self) -> dict:
        return lr_momentum_stats(self.optimizer, self._prefix_lr, self._prefix_momentum)


class SchedulerCallback(dl.SchedulerCallback):
    """Catalyst's scheduler step, logging `momentum` only for optimizers that have one (see
    `OptimizerCallback`); same arguments and keys as Catalyst's."""

    @staticmethod
    def _scheduler_step(scheduler: Any, reduced_metric: Any = None) -> Any:
        lr_list, _ = dl.SchedulerCallback._scheduler_step(scheduler, reduced_metric)
        return lr_list, [group.get("momentum") for group in scheduler.optimizer.param_groups]  # None: not logged


def logs_momentum(optimizer: Any) -> bool:
    """Whether `OptimizerCallback` logs a `momentum` for `optimizer` (its first parameter group has one)."""
    groups = getattr(optimizer, "param_groups", None) or [{}]
    return "momentum" in groups[0]


def logs_momentum_metric(callback: Any, runner: Any) -> bool:
    """Whether an optimizer callback puts `momentum` into the metrics: Catalyst's always does (betas[0]
    for Adam), ours (`OptimizerCallback`) only for an optimizer with a `momentum` hyperparameter."""
    if not callback_isinstance(callback, OptimizerCallback):
        return True
    return logs_momentum(getattr(callback, "optimizer", None) or getattr(runner, "optimizer", None))


def lr_momentum_stats(optimizer: Any, lr_key: str = "lr", momentum_key: str = "momentum") -> dict:
    """`{lr_key: lr}` of the first parameter group, with `{momentum_key: momentum}` when it has one."""
    group = optimizer.param_groups[0]
    stats = {lr_key: group["lr"]}
    if logs_momentum(optimizer):
        stats[momentum_key] = group["momentum"]
    return stats


class CheckpointCallback(dl.ICheckpointCallback):
    """Catalyst's checkpointing (same arguments, same files), made safe to interrupt and to resume.

    - Every file is written atomically (`checkpoints.save_checkpoint`), by the main process only
      (under DDP Catalyst has every process write the same files); the other processes keep the
      same bookkeeping, so that `load_best_on_end` finds the best file.
    - Checkpoints are loaded with `weights_only=True` (`checkpoints.load_checkpoint`), into the
      unwrapped model (Catalyst loads into the `DistributedDataParallel` / `DataParallel` wrapper:
      "Missing key(s) module....").
    - A runner checkpoint carries the kept checkpoints with their metrics and the flow's decoder
      parameters: `resume_runner` continues the best-so-far bookkeeping (Catalyst starts it empty),
      and loading a checkpoint (resume, `load_best_on_end`) restores that epoch's thresholds.
    - `<mode>.best.pth` is written only when the epoch is the best so far (Catalyst rewrites it at
      every epoch from the live model, so it held the last epoch's weights).

    Built on Catalyst's public callback interface (`ICheckpointCallback` and its events) rather
    than on `dl.CheckpointCallback`, whose private `_save`, `_load`, `_handle_epoch` and `_storage`
    would all have to be replaced: nothing of Catalyst's checkpoint code is reused. Without
    `minimize` the `topk` last epochs are kept, as Catalyst's.
    """

    def __init__(self, logdir: str, loader_key: Optional[str] = None, metric_key: Optional[str] = None,
                 minimize: Optional[bool] = None, topk: int = 1, mode: str = "model", save_last: bool = True,
                 save_best: bool = True, resume_model: Optional[str] = None, resume_runner: Optional[str] = None,
                 load_best_on_end: bool = False):
        super().__init__()
        if topk < 1:
            raise ValueError(f"CheckpointCallback: topk must be at least 1, got {topk}")
        if mode not in ("model", "runner"):
            raise ValueError(f"CheckpointCallback: mode must be 'model' or 'runner', got {mode!r}")
        if minimize is not None and metric_key is None:
            raise ValueError("CheckpointCallback: minimize= ranks epochs by a metric: give metric_key= too")
        self.logdir, self.loader_key, self.metric_key, self.topk, self.mode = logdir, loader_key, metric_key, topk, mode
        self.by_metric = minimize is not None  # else the score is the epoch number: the last epochs are kept
        self.minimize = bool(minimize)
        self.save_last, self.save_best, self.load_best_on_end = save_last, save_best, load_best_on_end
        self.resume_model, self.resume_runner = resume_model, resume_runner
        self.storage: List[Checkpoint] = []  # best first
        os.makedirs(self.logdir, exist_ok=True)

    def on_experiment_start(self, runner: Any) -> None:
        self.storage = []
        self._load(runner, resume_runner=self.resume_runner, resume_model=self.resume_model)

    def on_epoch_end(self, runner: Any) -> None:
        if not self.by_metric:
            self._keep_epoch(runner, score=runner.epoch_step)
            return
        metrics = runner.epoch_metrics[self.loader_key] if self.loader_key is not None else runner.epoch_metrics
        self._keep_epoch(runner, score=metrics[self.metric_key])
        if self.save_best and self.storage[0].obj is not None:  # this epoch is the best so far
            self._save(runner, self.storage[0].obj, f"{self.logdir}/{self.mode}.best")

    def on_experiment_end(self, runner: Any) -> None:
        if runner.engine.process_index == 0:  # as Catalyst's
            print("Top models:\n" + "\n".join(f"{c.logpath}\t{c.metric:3.4f}" for c in self.storage))
        if self.load_best_on_end:
            self._load(runner, resume_logpath=self.storage[0].logpath)

    def _save(self, runner: Any, obj: Any, logprefix: str) -> str:
        logpath = f"{logprefix}.pth"
        if self.mode == "model" and isinstance(obj, torch.nn.Module):
            runner.engine.wait_for_everyone()  # as Catalyst: every process reaches it
            obj = unwrap(runner.engine.unwrap_model(obj)).state_dict()
        elif self.mode == "model":
            obj = pack_checkpoint(model=obj)
        else:
            obj = pack_checkpoint(**obj)
        if is_main_process():
            checkpoints.save_checkpoint(obj, logpath)
        return logpath

    def _load(self, runner: Any, resume_logpath: Any = None, resume_model: Any = None, resume_runner: Any = None) -> None:
        model = unwrap(runner.model) if isinstance(runner.model, torch.nn.Module) else runner.model
        flow = getattr(runner, "flow", None)
        if resume_logpath is not None:
            runner.engine.wait_for_everyone()
            checkpoint = checkpoints.load_checkpoint(resume_logpath)
            state = checkpoint.get("model_state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint
            model.load_state_dict(state)
            checkpoints.restore_decoder_params(flow, checkpoint, resume_logpath)
        if resume_runner is not None:
            runner.engine.wait_for_everyone()
            checkpoint = checkpoints.load_checkpoint(resume_runner)
            unpack_checkpoint(checkpoint=checkpoint, model=model, criterion=runner.criterion,
                              optimizer=runner.optimizer, scheduler=runner.scheduler)
            runner.epoch_step = checkpoint["epoch_step"]
            runner.batch_step = checkpoint["batch_step"]
            runner.sample_step = checkpoint["sample_step"]
            checkpoints.restore_decoder_params(flow, checkpoint, resume_runner)
            kept = checkpoints.storage_from(checkpoint, self.logdir, resume_runner)
            if kept is not None:
                self.storage = [Checkpoint(obj=None, logpath=p, metric=m) for p, m in kept if os.path.isfile(p)]
        if resume_model is not None:
            runner.engine.wait_for_everyone()
            checkpoint = checkpoints.load_checkpoint(resume_model)
            model.load_state_dict(checkpoint.get("model_state_dict", checkpoint) if isinstance(checkpoint, dict)
                                  else checkpoint)

    def _keep_epoch(self, runner: Any, score: float) -> None:
        if self.mode == "model":
            obj: Any = runner.model
        else:
            obj = dict(model=runner.model, criterion=runner.criterion, optimizer=runner.optimizer,
                       scheduler=runner.scheduler, epoch_step=runner.epoch_step, batch_step=runner.batch_step,
                       sample_step=runner.sample_step)
        # Only this epoch's entry holds the live objects: an older entry saved from them would
        # hold this epoch's weights.
        current = Checkpoint(obj=obj, logpath=f"{self.logdir}/{self.mode}.{runner.epoch_step:04d}.pth",
                             metric=float(score))
        ranked = checkpoints.best_first([c._replace(obj=None) for c in self.storage] + [current], self.minimize)
        self.storage, dropped = ranked[: self.topk], ranked[self.topk:]
        if self.mode == "runner":
            obj[checkpoints.STORAGE_KEY] = checkpoints.storage_entries(self.storage)
            decoder = checkpoints.decoder_params_json(runner)
            if decoder is not None:
                obj[checkpoints.DECODER_KEY] = decoder
        # An epoch outside the top k is not written (Catalyst wrote it, then removed it).
        if any(c is current for c in self.storage):
            self._save(runner, obj, f"{self.logdir}/{self.mode}.{runner.epoch_step:04d}")
        if self.save_last:
            self._save(runner, obj, f"{self.logdir}/{self.mode}.last")
        if not is_main_process():
            return
        for old in dropped:
            if old is not current and os.path.isfile(old.logpath):
                os.remove(old.logpath)
        stats = checkpoints.storage_json(self.storage, logdir=str(self.logdir), topk=self.topk,
                                         loader_key=self.loader_key, metric_key=self.metric_key,
                                         minimize=self.minimize)
        write_json(f"{self.logdir}/{self.mode}.storage.json", stats, fsync=True)


class CSVLogger(dl.CSVLogger):
    """Catalyst's CSV logger (`<logdir>/<loader>.csv`, one row per epoch), resumable.

    Catalyst's opens the file for appending and writes a header whenever a logger starts, so a
    resumed run adds a second header row (pandas then reads every column as strings). This one
    keeps the rows of the epochs before the run's first epoch (dropping later rows, which the run
    writes again, and a row cut by an interruption) and writes one header, the union of the old and
    new columns (a metric missing from a row is left empty). Only the public `log_metrics` is
    replaced; files, `log_hparams`, `flush_log` and `close_log` are Catalyst's.
    """

    def __init__(self, logdir: str, use_logdir_postfix: bool = False):
        super().__init__(logdir=logdir, use_logdir_postfix=use_logdir_postfix)
        self._columns: dict = {}

    def log_metrics(self, metrics: Any, scope: str, runner: Any) -> None:
        if scope != "epoch":
            return
        for loader_key, values in metrics.items():
            if loader_key not in self.loggers:
                self._open(loader_key, sorted(values), runner.epoch_step)
            columns = self._columns[loader_key]
            row = [str(runner.epoch_step)] + ["" if values.get(c) is None else str(values[c]) for c in columns[1:]]
            self.loggers[loader_key].write(",".join(row) + "\n")

    def _open(self, loader_key: str, names: list, first_epoch: int) -> None:
        path = os.path.join(self.logdir, f"{loader_key}.csv")
        header, rows = ["step"], []
        if os.path.isfile(path) and os.path.getsize(path) > 0:
            with open(path, newline="", encoding="utf-8") as fh:
                lines = list(csv.reader(fh))
            header = lines[0] if lines and lines[0] and lines[0][0] == "step" else ["step"]
            for line in lines[1:]:
                if len(line) == len(header) and line[0].isdigit() and int(line[0]) < first_epoch:
                    rows.append(dict(zip(header, line)))
        columns = ["step"] + sorted(set(header[1:]) | set(names))
        text = ",".join(columns) + "\n" + "".join(",".join(r.get(c, "") for c in columns) + "\n" for r in rows)
        write_atomic(path, lambda fh: fh.write(text.encode("utf-8")))
        self._columns[loader_key] = columns
        self.loggers[loader_key] = open(path, "a", encoding="utf-8")


class _BatchFetch(Dataset):
    """A dataset that hands a whole list of indices to the wrapped dataset in one call."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: Any) -> Any:
        return self.dataset[index]

    def __getitems__(self, indices: Any) -> Any:
        return self.dataset[indices]


def batch_fetching_loader(loader: Any) -> Any:
    """`loader` in a form accelerate can prepare; loaders that need no change are returned as they are."""
    if not (isinstance(loader, DataLoader) and loader.batch_size is None and isinstance(loader.sampler, BatchSampler)):
        return loader
    kwargs = dict(num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                  timeout=loader.timeout, worker_init_fn=loader.worker_init_fn, generator=loader.generator,
                  persistent_workers=loader.persistent_workers)
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
        kwargs["multiprocessing_context"] = loader.multiprocessing_context
    return DataLoader(_BatchFetch(loader.dataset), batch_sampler=loader.sampler, **kwargs)


def _rebuild_generator(device: str, seed: int, state: bytes) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
    return generator


def _reduce_generator(generator: torch.Generator) -> Any:
    return _rebuild_generator, (str(generator.device), generator.initial_seed(), generator.get_state().cpu().numpy().tobytes())


@contextlib.contextmanager
def generators_across_processes() -> Iterator[None]:
    """Inside the block, `torch.Generator`s (their device, seed and state) can be sent to processes
    that `multiprocessing` starts (`torch.multiprocessing.spawn` pickles its arguments before it
    returns); on exit the pickler is as it was.

    Scoped, not permanent: a registration would change, for the rest of the process, how every
    generator is pickled by every user of `multiprocessing`. `ForkingPickler.register` has no
    inverse, so the exit restores the table it writes (`ForkingPickler._extra_reducers`, the same
    in CPython 3.8 to 3.13; `tests/runners/test_compat.py` fails if it changes).
    """
    reducers = ForkingPickler._extra_reducers
    before = reducers.get(torch.Generator)
    ForkingPickler.register(torch.Generator, _reduce_generator)
    try:
        yield
    finally:
        if before is None:
            reducers.pop(torch.Generator, None)
        else:
            reducers[torch.Generator] = before


@contextlib.contextmanager
def quiet_step_callback_check() -> Iterator[None]:
    """Silence exactly Catalyst's three "No I*Callback" warnings inside the block."""
    with warnings.catch_warnings():
        for message in STEP_CALLBACK_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        yield
