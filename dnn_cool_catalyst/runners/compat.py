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
- `CheckpointCallback`: under DDP, Catalyst's runner checkpoints are written by every process at
  once (the same files, not atomically); this one writes them from the main process only, and
  keeps the same bookkeeping on the others (so `load_best_on_end` finds the best file). Catalyst
  also saves the unwrapped model but loads `load_best_on_end` / `resume_runner` checkpoints into
  the wrapped one (`DistributedDataParallel`, `DataParallel`: "Missing key(s) module...."); this
  one loads into the unwrapped model.
- `allow_generators_across_processes`: a `torch.Generator` (e.g. the seeded generator of a
  shuffling loader's `RandomSampler`) cannot be sent through `torch.multiprocessing` to spawned
  DDP workers: the child fails with "unable to resize file <filename not specified> to the right
  size" (its state tensor goes through shared memory). Registers, with multiprocessing's own
  `ForkingPickler.register`, a reduction that sends the device, seed and state as bytes.
- `available_engine`: `catalyst.utils.get_available_engine` with our `DataParallelEngine` and
  `engines.DistributedDataParallelEngine`.
"""
from __future__ import annotations

import contextlib
import warnings
from multiprocessing.reduction import ForkingPickler
from typing import Any, Iterator

import torch
from catalyst import dl
from catalyst.callbacks.checkpoint import Checkpoint
from catalyst.core.engine import Engine
from catalyst.utils.torch import get_available_engine
from torch.utils.data import BatchSampler, DataLoader, Dataset

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


def available_engine(cpu: bool = False, fp16: bool = False, ddp: bool = False) -> Engine:
    """The engine Catalyst would choose, with a working `DataParallelEngine` for several GPUs and
    our `DistributedDataParallelEngine` (torchrun, free port) for `ddp=True` on several GPUs."""
    engine = get_available_engine(cpu=cpu, fp16=fp16, ddp=ddp)
    if type(engine) is dl.DataParallelEngine:
        return DataParallelEngine(fp16=fp16)
    if type(engine) is dl.DistributedDataParallelEngine:
        from .engines import DistributedDataParallelEngine

        return DistributedDataParallelEngine(fp16=fp16)
    return engine


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


class CheckpointCallback(dl.CheckpointCallback):
    """Catalyst's checkpointing, with runner checkpoints written by the main process only."""

    def _save(self, runner: Any, obj: Any, logprefix: str) -> str:
        # mode="model" saves through accelerate, which already writes on the main process only
        # (after a barrier every process must reach).
        if self.mode == "model" or _is_main(runner):
            return super()._save(runner, obj, logprefix)
        return f"{logprefix}.pth"

    def _load(self, runner: Any, resume_logpath: Any = None, resume_model: Any = None, resume_runner: Any = None) -> None:
        wrapped = runner.model
        if isinstance(wrapped, torch.nn.Module):
            runner.model = _unwrap(wrapped)
        try:
            super()._load(runner, resume_logpath=resume_logpath, resume_model=resume_model, resume_runner=resume_runner)
        finally:
            runner.model = wrapped

    def _handle_epoch(self, runner: Any, score: float) -> None:
        if self.mode == "model" or _is_main(runner):
            super()._handle_epoch(runner, score)
            return
        logpath = f"{self.logdir}/{self.mode}.{runner.epoch_step:04d}.pth"
        self._storage.append(Checkpoint(obj=None, logpath=logpath, metric=score))
        self._storage = sorted(self._storage, key=lambda c: c.metric, reverse=not self._minimize)[: self.topk]


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def _is_main(runner: Any) -> bool:
    engine = getattr(runner, "engine", None)
    return bool(getattr(engine, "is_main_process", True)) if engine is not None else True


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


def allow_generators_across_processes() -> None:
    """Let `torch.Generator`s (their seed and state) reach spawned processes (idempotent)."""
    ForkingPickler.register(torch.Generator, _reduce_generator)


@contextlib.contextmanager
def quiet_step_callback_check() -> Iterator[None]:
    """Silence exactly Catalyst's three "No I*Callback" warnings inside the block."""
    with warnings.catch_warnings():
        for message in STEP_CALLBACK_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        yield
