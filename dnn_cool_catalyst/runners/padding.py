"""DDP: the duplicated samples with which accelerate evens out the shards of a loader.

accelerate's `BatchSamplerShard` (with `even_batches`, no `drop_last`) completes the last batches
of an epoch with samples from its start, so that every process gets as many batches. `FlowRunner`
(`drop_ddp_padding=True`) cuts those copies off each batch, so that training, metrics and tuning
see every sample exactly once. Needs accelerate (a dependency of Catalyst), not Catalyst itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from torch.utils.data import BatchSampler


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
