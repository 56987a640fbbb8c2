"""`flow.get_dataset(inputs, labels)`: `(X, y)` items whose `X["gt"]` carries precondition labels
and `X["index"]` the samples' dataset indices.

Labels are validated and converted once (per task: dtype, shape, missing marker). Items can be
fetched one at a time (`ds[i]`, works with a plain `DataLoader`) or a whole batch at once
(`ds[[i, j, ...]]`), which `ds.loader(batch_size=...)` uses through a `BatchSampler` so that a
batch of 256 costs one tensor gather per key instead of collating 256 small dicts.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from ..errors import InputError, LabelError, capped, did_you_mean
from ..graph import FlowGraph, lookup
from ..keys import GT, INDEX
from .module import read_input


# what callbacks already show for each ranked sample: a sample's names must not take these columns
RESERVED_SAMPLE_NAMES = ("task_path", "rank", "dataset_index", "loss", "label", "prediction")


def _to_tensor_tree(value: Any, name: str) -> Any:
    if isinstance(value, Mapping):
        return {k: _to_tensor_tree(v, f"{name}.{k}") for k, v in value.items()}
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            return value
        return torch.from_numpy(np.ascontiguousarray(value))
    if hasattr(value, "__len__") and hasattr(value, "__getitem__"):
        return value  # a lazy sequence (e.g. images read from disk): indexed item by item
    raise InputError(f"input {name!r} must be an array, a tensor, a mapping or a sequence, got {type(value).__name__}")


def _length(value: Any) -> int:
    if isinstance(value, Mapping):
        lengths = {_length(v) for v in value.values()}
        if len(lengths) != 1:
            raise InputError(f"nested inputs have different lengths: {sorted(lengths)}")
        return lengths.pop()
    return len(value)


def _take(value: Any, index: Any, name: str = "") -> Any:
    if isinstance(value, Mapping):
        return {k: _take(v, index, f"{name}.{k}") for k, v in value.items()}
    if isinstance(value, Tensor):
        if isinstance(index, Tensor) and index.dim() == 1:
            # a batch of rows: index_select is several times faster than advanced indexing
            return value.index_select(0, index if index.device == value.device else index.to(value.device))
        return value[index]
    if isinstance(index, Tensor):
        rows = index.tolist()
        items = [value[i] for i in rows]
        if not (items and _stackable(items[0])):
            return items
        tensors = [torch.as_tensor(v) for v in items]
        try:
            return torch.stack(tensors)
        except RuntimeError:
            raise _mixed_shapes(value, rows, tensors, name) from None
    return value[index]


def _mixed_shapes(value: Any, rows: Sequence[int], tensors: Sequence[Tensor], name: str) -> InputError:
    """torch.stack's own message names no sample: name the first one whose shape differs from the
    batch's first, and its file where the sequence reads files (`ImageFiles.paths`)."""
    paths = getattr(value, "paths", None)

    def sample(j: int) -> str:
        where = f" ({paths[rows[j]]!r})" if paths is not None else ""
        return f"sample {rows[j]}{where} is {tuple(tensors[j].shape)}"

    odd = [j for j, t in enumerate(tensors) if t.shape != tensors[0].shape]
    if not odd:  # not a shape mismatch: torch's error stands
        return InputError(f"input {name!r}: cannot stack a batch of {len(tensors)} samples")
    return InputError(f"input {name!r}: samples of one batch differ in shape: {sample(odd[0])}, but {sample(0)} "
                      f"({len(odd)} of {len(tensors)} samples differ from it); a batch stacks them, so they must "
                      f"share one shape: resize the images (or other items) to one size")


def _index_tensor(index: Any) -> Tensor:
    """Sample indices as an int64 CPU tensor. Lists (what a `BatchSampler` yields) go through
    numpy, which converts a list of ints several times faster than `torch.as_tensor`."""
    if isinstance(index, list):
        return torch.from_numpy(np.asarray(index, dtype=np.int64))
    return torch.as_tensor(index, dtype=torch.int64).cpu()


def _stackable(v: Any) -> bool:
    return isinstance(v, (Tensor, np.ndarray, int, float))


def _shape(value: Any) -> str:
    return str(tuple(value.shape)) if hasattr(value, "shape") else f"(len {len(value)})"


class FlowDataset(Dataset):
    """`(X, y)` items for a flow: `X` = the inputs of the sample(s) plus `X["gt"]` = labels of the
    precondition tasks and `X["index"]` = the dataset indices of the samples (int64); `y` =
    `{path: label}` for every task.

    `inputs`: feature name -> array/tensor `(N, ...)` (or nested mappings, or lazy sequences):
    what the loader yields, not necessarily what the flow reads. A model that computes features
    itself (a backbone turning `x["raw"]` into `x["features"]`, as `BackboneModel` does) needs no
    such feature here; a feature that nobody computes fails at the model's first forward, naming
    the task and the keys `X` has.
    `labels`: task path -> labels in the task's format (missing marker where unannotated).
    `partial=True`: a source labelled for some of the flow's tasks only (one of several sources
    that `MixedDataset` mixes): every task without an entry in `labels` is missing for all samples
    (`task.missing_labels`), in `y` and in `X["gt"]` alike; an unknown task path is still an error.
    `labelled_paths` is the frozenset of the paths whose labels were given (every path without
    `partial`).
    `X["index"]` lets callbacks and `FlowRunner.predict` name samples correctly under shuffling;
    `with_index=False` leaves it out (for a model that cannot ignore the extra key).
    `computed` is accepted for compatibility and not needed any more: inputs are never checked
    against the features the flow reads.
    """

    def __init__(self, graph: FlowGraph, inputs: Mapping[str, Any], labels: Mapping[str, Any],
                 with_index: bool = True, computed: Sequence[str] = (), partial: bool = False):
        if not isinstance(inputs, Mapping) or not isinstance(labels, Mapping):
            raise TypeError("get_dataset(inputs, labels) takes two mappings: feature -> array, task path -> labels")
        reserved = {GT, INDEX} & set(inputs)
        if reserved:
            raise InputError(f"inputs must not contain the reserved key(s) {sorted(reserved)}")
        self.with_index = bool(with_index)
        self.graph = graph
        self.inputs = {k: _to_tensor_tree(v, k) for k, v in inputs.items()}
        for key in graph.input_keys:
            # Features the dataset lacks are the model's business (it may compute them; the module's
            # first forward names a missing one). Only a feature read *through a single feature*
            # is refused here: a sub-flow called with `x.f` (a tensor) whose task reads another
            # name (see `graph.lookup`), so that a feature passed to a sub-flow is never ignored.
            if key and key[0] in computed:
                continue
            i, node = lookup(self.inputs, key)
            if i < len(key) and i > 0 and not isinstance(node, Mapping) and not hasattr(node, "keys"):
                users = [leaf.path for leaf in graph.leaves if leaf.input_key[: i + 1] == key[: i + 1]]
                read_input(self.inputs, key, users[0])
        lengths = {k: _length(v) for k, v in self.inputs.items()}
        if len(set(lengths.values())) > 1:
            raise InputError(f"inputs have different lengths: {lengths}")
        n = next(iter(lengths.values())) if lengths else None
        extra = sorted(set(labels) - set(graph.paths))
        if extra:
            raise LabelError(f"labels for unknown task path(s) {capped(extra)}"
                             f"{did_you_mean(extra[0], graph.paths, listed=0)}; flow {graph.name!r} has "
                             f"{capped(graph.paths)}")
        missing = [p for p in graph.paths if p not in labels]
        if missing and not partial:
            raise LabelError(f"labels have no entry for task(s) {capped(missing)} of flow {graph.name!r}; they have "
                             f"{capped(sorted(labels))}. For a source labelled for some tasks only, pass "
                             "partial=True (the others are then missing for every sample), or pass an all-missing "
                             "array for each unannotated task")
        self.labelled_paths = frozenset(p for p in graph.paths if p in labels)
        self.labels: Dict[str, Tensor] = {}
        for leaf in graph.leaves:
            if leaf.path not in labels:
                continue  # partial: all missing, made below once the number of samples is known
            try:
                t = leaf.task.prepare_labels(labels[leaf.path])
            except LabelError as e:
                if leaf.path == leaf.task.name:
                    raise
                # the task names itself; in a sub-flow the path tells which labels are meant
                raise LabelError(f"labels of task path {leaf.path!r}: {e}") from None
            if n is None:
                n = t.shape[0]
            if t.shape[0] != n:
                raise LabelError(f"task {leaf.path!r}: {t.shape[0]} labels of shape {tuple(t.shape)} for "
                                 f"{n} samples (inputs: {', '.join(f'{k} {_shape(v)}' for k, v in self.inputs.items())})")
            self.labels[leaf.path] = t
        if n is None:
            raise LabelError(f"get_dataset(partial=True) without inputs or labels cannot tell the number of samples "
                             f"of flow {graph.name!r}: give the inputs, or the labels of at least one task")
        for leaf in graph.leaves:
            if leaf.path not in labels:
                try:
                    self.labels[leaf.path] = leaf.task.missing_labels(n)
                except LabelError as e:
                    raise LabelError(f"task path {leaf.path!r} has no labels (partial=True) and cannot be left "
                                     f"missing by itself: {e}") from None
        self.labels = {leaf.path: self.labels[leaf.path] for leaf in graph.leaves}  # the flow's order
        self.n = int(n)
        self.gt_paths = graph.condition_paths

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: Any):
        """One sample for an int index; a collated batch for a sequence of indices (a list, an
        array or a 1-D tensor, as a `BatchSampler` gives them: one `index_select` per tensor)."""
        if not isinstance(index, (int, np.integer)):
            index = _index_tensor(index)
            if index.dim() == 1:
                return self._batch(index)
        elif not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for a dataset of {self.n} samples")
        x = {k: _take(v, index, k) for k, v in self.inputs.items()}
        x[GT] = {p: self.labels[p][index] for p in self.gt_paths}
        if self.with_index:
            x[INDEX] = torch.as_tensor(index, dtype=torch.int64) % self.n
        y = {p: t[index] for p, t in self.labels.items()}
        return x, y

    def _batch(self, index: Tensor):
        if index.numel():
            lo, hi = (int(v) for v in torch.aminmax(index))
            if lo < -self.n or hi >= self.n:
                raise IndexError(f"indices from {lo} to {hi} out of range for a dataset of {self.n} samples")
            if lo < 0:
                index = torch.where(index < 0, index + self.n, index)
        x = {k: _take(v, index, k) for k, v in self.inputs.items()}
        x[GT] = {p: self.labels[p].index_select(0, index) for p in self.gt_paths}
        if self.with_index:
            x[INDEX] = index % self.n
        y = {p: t.index_select(0, index) for p, t in self.labels.items()}
        return x, y

    # Naming samples for people (an optional, additive description; `Project` fills it) --------
    sample_info: Optional[Dict[str, List[Any]]] = None

    def name_samples(self, **columns: Sequence[Any]) -> "FlowDataset":
        """Name the samples for people: `columns` maps a name (`row`, `file`, ...) to one value per
        sample, e.g. the DataFrame index labels of the rows and the image files read. Callbacks
        show them beside the dataset index (`describe`). Returns the dataset."""
        for name, values in columns.items():
            if not name or name in RESERVED_SAMPLE_NAMES:
                raise InputError(f"name_samples: {name!r} cannot name a sample column: use a name other "
                                 f"than {list(RESERVED_SAMPLE_NAMES)}")
            if len(values) != self.n:
                raise InputError(f"name_samples: column {name!r} has {len(values)} values for {self.n} samples")
        self.sample_info = {**(self.sample_info or {}), **{k: list(v) for k, v in columns.items()}}
        return self

    def describe(self, index: int) -> Dict[str, Any]:
        """`{name: value}` naming sample `index` (see `name_samples`); `{}` when the samples are unnamed."""
        info = self.sample_info
        if not info:
            return {}
        i = int(index)
        return {k: v[i] for k, v in info.items()}

    def loader(self, batch_size: int = 32, shuffle: bool = False, drop_last: bool = False,
               generator: Optional[torch.Generator] = None, **kwargs) -> DataLoader:
        """A `DataLoader` that fetches whole batches at once (`batch_size=None` + a `BatchSampler`)."""
        base = RandomSampler(self, generator=generator) if shuffle else SequentialSampler(self)
        return DataLoader(self, sampler=BatchSampler(base, batch_size, drop_last), batch_size=None, **kwargs)
