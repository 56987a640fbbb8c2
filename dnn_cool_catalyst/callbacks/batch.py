"""The layout of `runner.batch` that `FlowRunner.handle_batch` leaves for the callbacks.

After `handle_batch`, `runner.batch` is a dict:

- `"inputs"`: the input mapping `X` as the loader gave it (with `X["gt"]`, and `X["index"]`, which
  `flow.get_dataset` adds unless `with_index=False`),
- `"targets"`: `{path: labels}`,
- `"outputs"`: the model's outputs `{"logits", "mask", ...}` (`"activated"` and `"decoded"` are
  present outside training mode),
- `"loss_terms"` (only when the criterion is a `FlowLoss`): `{path: (sum, count)}`, detached; the
  states from which per-task losses over a whole loader are recombined exactly. `FlowRunner`
  leaves a `StackedLossTerms`: that mapping over one `(tasks, 2)` tensor, which the callbacks
  read without stacking the terms again.

With DataParallel memory balancing (`runners.balance`) the replicas reduce before anything is
gathered, and the batch holds instead of the full outputs:

- `"outputs"`: only `{"mask": {path: (N,)}, "activated": {path: ...}}` for the kept tasks (those
  with tunable decoders by default);
- `"metric_states"`: `{key: state}` as `FlowMetrics.states()` of the whole batch (sums, counts);
- `"per_sample_loss"`: `{path: (N,)}` as `flow.get_per_sample_loss()` gives it (NaN outside `S_t`);
- `"explain"` (when asked for): `{"index": (k,), "logits": {path: (k, ...)}}`, the logits of the
  samples whose `X["index"]` is below the interpretation callback's `explain`.

A runner of your own can feed the callbacks by leaving the same keys.
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Any, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..keys import EXPLAIN, INDEX, INPUTS, LOSS_TERMS, METRIC_STATES, OUTPUTS, PER_SAMPLE_LOSS, TARGETS  # noqa: F401


class StackedLossTerms(Mapping):
    """`{path: (sum, count)}` read from one detached `(tasks, 2)` tensor `stacked` (rows in the
    order of `paths`, as `interpreters.loss.stack_terms` builds it); the pairs are views made on
    access, so that a runner leaves the terms of every batch at the cost of one `detach`."""

    def __init__(self, paths: Sequence[str], stacked: Tensor):
        self.paths = tuple(paths)
        if stacked.shape != (len(self.paths), 2):
            raise ValueError(f"StackedLossTerms: {len(self.paths)} paths need a ({len(self.paths)}, 2) tensor, "
                             f"got {tuple(stacked.shape)}")
        self.stacked = stacked
        self._rows = {p: i for i, p in enumerate(self.paths)}

    def __getitem__(self, path: str) -> Tuple[Tensor, Tensor]:
        i = self._rows[path]
        return self.stacked[i, 0], self.stacked[i, 1]

    def __iter__(self) -> Iterator[str]:
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)


def batch_parts(runner: Any, who: str) -> Tuple[Mapping[str, Any], Mapping[str, Tensor], Mapping[str, Any]]:
    """`(inputs, targets, outputs)` of the current batch; an error naming `who` if they are absent."""
    batch = runner.batch
    if not isinstance(batch, Mapping) or OUTPUTS not in batch or TARGETS not in batch:
        have = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise KeyError(f"{who} needs runner.batch with {OUTPUTS!r} and {TARGETS!r} as FlowRunner.handle_batch "
                       f"leaves them (see dnn_cool_catalyst.callbacks.batch); runner.batch has {have}")
    return batch.get(INPUTS) or {}, batch[TARGETS], batch[OUTPUTS]


class LabelledBatch(NamedTuple):
    """The current batch's parts, as the callbacks that measure read them (`labelled_batch`)."""

    inputs: Mapping[str, Any]
    targets: Mapping[str, Tensor]
    outputs: Mapping[str, Any]

    @property
    def size(self) -> int:
        """The number of samples (`batch_size_of`)."""
        return batch_size_of(self.targets, self.inputs)


def labelled_batch(runner: Any, who: str, active: bool = True) -> Optional[LabelledBatch]:
    """The current batch's `(inputs, targets, outputs)` for a callback's `on_batch_end`; None when
    the callback is not `active` on this loader or the batch has no labels (an inference loader:
    nothing to measure). An error naming `who` when the batch lacks the parts (`batch_parts`)."""
    if not active:
        return None
    batch = LabelledBatch(*batch_parts(runner, who))
    return batch if batch.targets else None


def gather_kept(kept: Mapping[str, list]) -> Dict[str, list]:
    """`{path: [chunks]}` of every rank of the initialised process group, concatenated in rank
    order (`all_gather_object`: every rank must call it, also with nothing kept)."""
    import torch.distributed as dist

    gathered: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(kept))
    merged: Dict[str, list] = defaultdict(list)
    for part in gathered:
        for p, chunks in part.items():
            merged[p].extend(chunks)
    return merged


def batch_size_of(targets: Mapping[str, Tensor], inputs: Optional[Mapping[str, Any]] = None) -> int:
    """The number of samples in a batch, from its labels (or its dataset indices)."""
    for value in targets.values():
        return int(value.shape[0])
    if inputs is not None and isinstance(inputs.get(INDEX), Tensor):
        return int(inputs[INDEX].shape[0])
    raise ValueError("cannot tell the batch size: the batch has no labels and no X['index']")


class SampleIndexer:
    """Dataset indices of the samples of each batch of one loader.

    They come from `X["index"]` (right under shuffling). Without it they are positions in the
    loader's order, counted from the start of the loader, and a warning (once per callback) says
    so, because positions are wrong for a shuffled loader.
    """

    def __init__(self, who: str):
        self.who = who
        self._position = 0
        self._warned = False

    def reset(self) -> None:
        self._position = 0

    def __call__(self, inputs: Mapping[str, Any], n: int, loader_key: str) -> Tensor:
        index = inputs.get(INDEX) if isinstance(inputs, Mapping) else None
        self._position += n
        if isinstance(index, Tensor):
            return index.detach().reshape(-1).to("cpu", torch.int64)
        if not self._warned:
            self._warned = True
            warnings.warn(f"{self.who}: batches of loader {loader_key!r} carry no X['index']; using positions in the "
                          f"loader as dataset indices, which is wrong if the loader shuffles. Datasets of "
                          f"flow.get_dataset(...) carry it (unless built with with_index=False); a dataset of your own "
                          f"should put each sample's dataset index in X['index'].", stacklevel=3)
        return torch.arange(self._position - n, self._position, dtype=torch.int64)


class ChunkBuffer:
    """Tensors of several batches, kept as they are (detached, on their device) and concatenated
    on `take()`: a callback's per-batch work shrinks to keeping references, and its real work
    runs once per chunk instead of once per batch (dozens of small tensor operations per task
    cost more than the training step of a small model). `full` once the kept tensors hold
    `max_elements` elements, so that memory stays bounded (e.g. for vocabulary-sized outputs).

    Every batch must bring the same names and keys (rows of different keys must line up).
    """

    def __init__(self, max_elements: int = 2 ** 24):
        self.max_elements = int(max_elements)
        self.clear()

    def clear(self) -> None:
        self._batches: List[Dict[str, Dict[str, Tensor]]] = []
        self._per_sample: Optional[float] = None
        self.elements = 0.0
        self.samples = 0

    def add(self, n: int, parts: Mapping[str, Mapping[str, Tensor]]) -> None:
        """Keep one batch of `n` samples: `parts` is `{name: {key: tensor (n, ...)}}`."""
        kept = {name: {k: t.detach() if t.requires_grad else t for k, t in tensors.items()}
                for name, tensors in parts.items()}
        self._batches.append(kept)
        if self._per_sample is None and n > 0:  # counted once: outputs have a fixed size per sample
            self._per_sample = sum(t.numel() for tensors in kept.values() for t in tensors.values()) / n
        self.elements += n * (self._per_sample or 0)
        self.samples += n

    @property
    def full(self) -> bool:
        return self.elements >= self.max_elements

    def __len__(self) -> int:
        return self.samples

    def take(self) -> Dict[str, Dict[str, Tensor]]:
        """Everything kept, concatenated along the batch dimension; the buffer is emptied."""
        batches = self._batches
        self.clear()
        if not batches:
            return {}
        if len(batches) == 1:
            return batches[0]
        first = batches[0]
        try:
            return {name: {k: torch.cat([b[name][k] for b in batches]) for k in slot} for name, slot in first.items()}
        except KeyError as e:
            have = [sorted((name, k) for name, slot in b.items() for k in slot) for b in (first, batches[-1])]
            raise KeyError(f"ChunkBuffer: the kept batches differ in their parts ({e.args[0]!r} is missing from one); "
                           f"first batch {have[0][:6]}, last batch {have[1][:6]}") from None
