"""Process-group facts in one place (core: imports torch only, never Catalyst).

Every module that asks "how many processes", "am I rank 0", "where must a tensor be for a
collective" or "what is inside this DataParallel wrapper" asks here, so that the answer cannot
differ between the loss, the metrics, the callbacks and the checkpoints.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn


def initialized() -> bool:
    """Whether a default `torch.distributed` process group is initialised in this process."""
    return dist.is_available() and dist.is_initialized()


def world_size(group: Any = None) -> int:
    """The number of processes of `group` (default: the initialised default group); 1 without one.
    (`torch.compile(fullgraph=True)` traces it as a constant.)"""
    if group is not None:
        return dist.get_world_size(group)
    return dist.get_world_size() if initialized() else 1


def rank() -> int:
    """This process's rank in the default group; without one, `RANK` (set by torchrun) or 0."""
    if initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Rank 0 (the process that writes files and prints); true in a single process."""
    return rank() == 0


def collective_device(device: Optional[Any] = None) -> torch.device:
    """Where tensors must be for a collective of the default group: the CUDA device under NCCL
    (`device` when given, else the current CUDA device), the CPU for gloo and without a group."""
    if initialized() and dist.get_backend() == "nccl":
        return torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside `DataParallel` / `DistributedDataParallel` wrappers (any depth)."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model
