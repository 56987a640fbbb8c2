"""Engines for more than one device: balanced DataParallel and DistributedDataParallel.

- `BalancedDataParallelEngine`: Catalyst's DataParallel engine (the working one of `compat`)
  whose `prepare_model` wraps the model in `BalancedDataParallel`: losses, metric states and
  per-sample losses are reduced inside each replica, only small tensors reach the first device.
- `DistributedDataParallelEngine`: Catalyst's DDP engine, plus what it lacks:

  * under `torchrun` (the environment has `RANK`, `WORLD_SIZE`, `LOCAL_RANK`) it runs in the
    process torchrun started instead of spawning more (Catalyst's spawns `num_node_workers`
    processes per torchrun process), and joins torchrun's rendezvous (`MASTER_ADDR`/`MASTER_PORT`);
  * `port=None` (default) takes a free port when it spawns all the processes on this machine, so
    two runs on one machine do not collide (`MASTER_PORT`, when set, wins, as in Catalyst; with
    processes on other machines the port is Catalyst's 2112 unless given);
  * the backend defaults to NCCL with CUDA and gloo without (Catalyst's always asks for NCCL);
  * loaders with a seeded `torch.Generator` (shuffling) can be sent to the workers
    (`compat.generators_across_processes`, around the spawn only);
  * each worker gets its own copy of the model's CPU tensors (`unshare_tensors`): the runner
    reaches the workers through `torch.multiprocessing`, which puts CPU tensors in shared memory,
    so on the CPU every process's optimizer stepped the same weights (with 2 workers, two updates
    per step). On GPUs the model is copied to each device anyway.

  The parent process of a spawned run gets back nothing (the runner was pickled into the
  workers); `FlowRunner.train` reads the trained weights and tuned parameters back from the logdir.
- `choose_engine`: the engine `FlowRunner.train` runs a flow with.
"""
from __future__ import annotations

import os
import socket
from itertools import chain
from typing import Any, Callable, Dict, Iterable, Optional, Union

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from catalyst import dl
from catalyst.core.engine import Engine
from catalyst.utils.torch import get_available_engine
from torch import nn

from ..distributed import unwrap
from .balance import BalancedDataParallel
from .compat import DataParallelEngine, generators_across_processes
from .criterion import FlowCriterion

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """Whether this process was started by `torchrun` (or another launcher setting the same variables)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or all(v in os.environ for v in TORCHRUN_VARIABLES)


def default_backend() -> str:
    """NCCL where CUDA is available, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port free on `address` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address if address not in ("localhost", "") else "127.0.0.1", 0))
        return int(s.getsockname()[1])


def unshare_tensors(module: nn.Module) -> nn.Module:
    """Give `module` its own copy of every parameter and buffer in shared CPU memory (in place;
    the parameter objects, which an optimizer may already hold, stay the same)."""
    with torch.no_grad():
        for t in chain(module.parameters(), module.buffers()):
            if t.device.type == "cpu" and t.is_shared():
                t.data = t.data.clone()
    return module


class BalancedDataParallelEngine(DataParallelEngine):
    """DataParallel with memory balancing (see `runners.balance`).

    `BalancedDataParallelEngine(flow=flow)`; `FlowRunner` fills in its flow when none is given.
    Several GPUs: one replica per GPU. One GPU or none: the model runs in place, with the same
    reduced results (so a run can be checked on one device). Extra arguments go to Catalyst's engine.

    Args:
        flow: the `TaskFlow` (or anything `FlowRunner` accepts as a flow).
        keep: task paths whose activated outputs are gathered (default: tasks with tunable decoders).
        explain: logits of samples with `X["index"] < explain` are gathered for tree explanations
            (`FlowRunner` sets it from its `InterpretationCallback`).
    """

    def __init__(self, *args: Any, flow: Any = None, keep: Optional[Iterable[str]] = None, explain: int = 0,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.flow = flow
        self.keep = list(keep) if keep is not None else None
        self.explain = int(explain)

    def prepare_model(self, model: nn.Module, device_placement: Any = None, evaluation_mode: bool = False):
        if not isinstance(model, BalancedDataParallel):
            if self.flow is None:
                raise ValueError("BalancedDataParallelEngine needs the flow: BalancedDataParallelEngine(flow=...), "
                                 "or train with FlowRunner, which passes its own")
            from ..callbacks.common import resolve_flow

            model = unwrap(model)
            several = self.device.type == "cuda" and torch.cuda.device_count() > 1
            model = BalancedDataParallel(model, resolve_flow(self.flow), device_ids=None if several else [],
                                         keep=self.keep, explain=self.explain)
        return Engine.prepare_model(self, model, device_placement=device_placement, evaluation_mode=evaluation_mode)


class DistributedDataParallelEngine(dl.DistributedDataParallelEngine):
    """One process per device with `DistributedDataParallel` (see the module docstring).

    On one machine, a plain `python train.py` spawns `num_node_workers` processes (default: one
    per GPU, or 2 on a machine without CUDA); across machines, start the script with
    `torchrun --nnodes N --nproc-per-node G ...` on each and the engine joins torchrun's group.
    The script needs `if __name__ == "__main__":`, and everything the runner holds must be
    picklable (the runner is sent to the workers).

    Args:
        address, port: where rank 0 listens (spawned runs; `MASTER_ADDR`/`MASTER_PORT` win);
            `port=None` picks a free port when all processes are on this machine.
        world_size, workers_dist_rank, num_node_workers: as Catalyst's engine.
        process_group_kwargs: for `torch.distributed.init_process_group` (the backend defaults to
            NCCL with CUDA, gloo otherwise).
        Other arguments go to `accelerate.Accelerator`.
    """

    def __init__(self, *args: Any, address: str = "127.0.0.1", port: Union[str, int, None] = None,
                 world_size: Optional[int] = None, workers_dist_rank: int = 0, num_node_workers: Optional[int] = None,
                 process_group_kwargs: Optional[Dict[str, Any]] = None, **kwargs: Any):
        if num_node_workers is None:
            num_node_workers = torch.cuda.device_count() or 2
        one_machine = workers_dist_rank == 0 and world_size in (None, num_node_workers)
        super().__init__(*args, address=address, port=port if port is not None else 2112, world_size=world_size,
                         workers_dist_rank=workers_dist_rank, num_node_workers=num_node_workers,
                         process_group_kwargs=process_group_kwargs, **kwargs)
        self._pick_port = port is None and "MASTER_PORT" not in os.environ and one_machine
        self.spawned = False

    @property
    def num_node_workers(self) -> int:
        """Processes started on this machine by a spawned run."""
        return self._num_local_workers

    def spawn(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """Run `fn(local_rank, world_size)`: in this process under torchrun, else in spawned workers."""
        if launched_by_torchrun():
            return fn(int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
        if self._pick_port:
            self._port = free_port(self._address)
        with generators_across_processes():  # seeded shuffling loaders go to the workers too
            result = mp.spawn(fn, args=(self._world_size,), nprocs=self._num_local_workers, join=True)
        self.spawned = True
        return result

    def setup(self, local_rank: int, world_size: int) -> None:
        """Join the process group (torchrun's, or the one the spawned workers form) and start accelerate."""
        if launched_by_torchrun():
            rank = int(os.environ["RANK"])
        else:
            rank = self._workers_global_rank + local_rank
            # Process-wide on purpose: this runs in a worker that `spawn` started for this run only,
            # and accelerate's `PartialState` (which the engine starts next) and `init_process_group`'s
            # default `env://` rendezvous read these variables from the environment, as under torchrun.
            os.environ.update(MASTER_ADDR=str(self._address), MASTER_PORT=str(self._port), WORLD_SIZE=str(world_size),
                              RANK=str(rank), LOCAL_RANK=str(local_rank))
        kwargs = {"backend": default_backend(), "world_size": world_size, "rank": rank, **self._process_group_kwargs}
        if kwargs.get("backend") is None:
            kwargs["backend"] = default_backend()
        dist.init_process_group(**kwargs)
        Engine.__init__(self, *self._args, **self._kwargs)

    def prepare_model(self, model: nn.Module, device_placement: Any = None, evaluation_mode: bool = False):
        return super().prepare_model(unshare_tensors(model), device_placement=device_placement,
                                     evaluation_mode=evaluation_mode)


def available_engine(cpu: bool = False, fp16: bool = False, ddp: bool = False) -> Engine:
    """The engine Catalyst would choose, with a working `DataParallelEngine` for several GPUs and
    our `DistributedDataParallelEngine` (torchrun, free port) for `ddp=True` on several GPUs."""
    engine = get_available_engine(cpu=cpu, fp16=fp16, ddp=ddp)
    if type(engine) is dl.DataParallelEngine:
        return DataParallelEngine(fp16=fp16)
    if type(engine) is dl.DistributedDataParallelEngine:
        return DistributedDataParallelEngine(fp16=fp16)
    return engine


def choose_engine(engine: Any, flow: Any, criterion: Any, balance_dataparallel_memory: bool = False,
                  cpu: bool = False, fp16: bool = False, ddp: bool = False) -> Engine:
    """The engine for a run of `flow`: `engine` when given, else `available_engine(cpu, fp16, ddp)`;
    with `balance_dataparallel_memory` a `BalancedDataParallelEngine` (made when `engine` is None).
    A `BalancedDataParallelEngine` gets `flow` when it has none and needs a `FlowCriterion`
    (it reduces the flow loss inside the replicas)."""
    chosen = engine
    if balance_dataparallel_memory:
        if chosen is None:
            chosen = BalancedDataParallelEngine(flow=flow, **({"fp16": True} if fp16 else {}))
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
            chosen.flow = flow
        if not isinstance(criterion, FlowCriterion):
            raise ValueError(f"DataParallel memory balancing reduces the flow loss inside the replicas; it cannot "
                             f"use the criterion {type(criterion).__name__} (no .terms): leave criterion=None")
    return chosen
