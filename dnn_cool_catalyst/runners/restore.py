"""The logdir after and before a run: resuming from a checkpoint, and reading back what spawned
DDP workers trained (the parent process of `torch.multiprocessing.spawn` gets neither the weights
nor the metrics back; see CATALYST.md).
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Optional

from catalyst import dl
from catalyst.core.callback import ICheckpointCallback
from catalyst.core.misc import callback_isinstance, sort_callbacks_by_order
from torch import nn

from ..callbacks.tuning import TUNED_PARAMS_FILE
from ..distributed import initialized, unwrap
from . import checkpoints
from .engines import launched_by_torchrun

LAST_CHECKPOINT = os.path.join("checkpoints", "runner.last.pth")
BEST_CHECKPOINT = os.path.join("checkpoints", "runner.best.pth")


def resume_checkpoint(resume: Any, logdir: Optional[str], callbacks: Any) -> Optional[str]:
    """The runner checkpoint that `train(resume=...)` continues from: None for None/False,
    `<logdir>/checkpoints/runner.last.pth` for True or "last", else the path given. Errors when
    the file is missing, or when `callbacks` hold a checkpoint callback of the user's own (which
    takes `resume_runner=` itself)."""
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


def ran_in_spawned_workers(engine: Any) -> bool:
    """Whether the last run happened in worker processes spawned by a DDP `engine` (this process
    is their parent and holds neither the trained weights nor the metrics)."""
    if not isinstance(engine, dl.DistributedDataParallelEngine) or launched_by_torchrun():
        return False
    if initialized():
        return False
    return bool(getattr(engine, "spawned", True))


def restore_from_logdir(logdir: Optional[str], model: nn.Module, flow: Any, load_best_on_end: bool) -> None:
    """Load what the DDP workers left in `logdir` into `model` and `flow`: the weights of
    `runner.best.pth` (with `load_best_on_end`) or `runner.last.pth`, and the decoder parameters
    of that checkpoint (else those of `tuned_params.json`). Warns when there is nothing to load."""
    if logdir is None:
        warnings.warn("FlowRunner: training ran in spawned DDP workers and there is no logdir to read the "
                      "trained weights back from: the model in this process is untrained. Give a logdir.",
                      stacklevel=3)
        return
    path = os.path.join(logdir, BEST_CHECKPOINT if load_best_on_end else LAST_CHECKPOINT)
    if not os.path.isfile(path):
        warnings.warn(f"FlowRunner: training ran in spawned DDP workers but there is no checkpoint {path!r} "
                      f"(a CheckpointCallback of your own?): the model in this process is untrained", stacklevel=3)
        return
    checkpoint = checkpoints.load_checkpoint(path)
    unwrap(model).load_state_dict(checkpoint["model_state_dict"])
    if checkpoints.restore_decoder_params(flow, checkpoint, path):  # the thresholds of that epoch
        return
    tuned = os.path.join(logdir, TUNED_PARAMS_FILE)
    if os.path.isfile(tuned):
        from ..tuning import load_tuned

        flow.get_decoder().load_tuned(load_tuned(tuned), source=tuned)
