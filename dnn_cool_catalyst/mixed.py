"""`MixedDataset`: several sources of one flow, each labelled for some of its tasks, mixed in a
chosen ratio (the seed's "classifier on ImageNet, detector on COCO").

Each source is a `FlowDataset` of the same flow (`flow.get_dataset(inputs, labels, partial=True)`
for one labelled for some tasks only); the masked loss already leaves a task's missing labels out,
so a batch may hold samples of every source.

How an epoch is drawn (all from `torch.Generator`s seeded by a hash of `(seed, purpose, ...)`,
never the global RNG, so every process of a DDP run draws the same epoch):

- the number of samples of each source is `epoch_size * p_i`, rounded so that the counts add up to
  `epoch_size` and each count is, on average over epochs, exactly `epoch_size * p_i` (systematic
  randomized rounding of the fractions);
- within a source, samples come from an endless stream of permutations (without replacement until
  the source is exhausted, then reshuffled); each epoch continues the stream where the previous
  one stopped, so a large source shows every sample before any repeats, over several epochs
  (and a smaller share of it per epoch never favours the same samples);
- the sources' samples are interleaved in a random order (a new one each epoch).

With `sampling="proportional"` and the default `epoch_size` an epoch is thus every sample of every
source exactly once, in a random order.

Keys: the dataset is indexed by a flat key, `offset of the source + index within it` (as
`torch.utils.data.ConcatDataset`). A batch of keys is gathered from one table of all sources'
labels, and of their tensor inputs (`join_inputs`); lazy inputs are read from each source present
in the batch and joined.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from . import distributed as dist_info
from .errors import InputError, LabelError, capped, did_you_mean
from .graph import FlowGraph
from .interpreters.dataset import FlowDataset, _take
from .keys import GT, INDEX, SOURCE

SAMPLING_MODES = ("proportional", "uniform", "temperature")
Sampling = Union[str, Mapping[str, float]]

# the purposes of the generators, so that no two draws of one seed share a stream
_ROUNDING, _PERMUTATION, _INTERLEAVE = 1, 2, 3
_MASK64 = (1 << 64) - 1


def _generator(*values: int) -> torch.Generator:
    """A CPU `torch.Generator` seeded by a hash of `values` (SplitMix64 steps): one cheap,
    reproducible stream per `(seed, purpose, ...)`. (numpy's `default_rng([...])` costs several
    times more to build, and an epoch builds a few per source.)"""
    h = 0
    for v in values:
        h = (h + 0x9E3779B97F4A7C15 + (int(v) & _MASK64)) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return torch.Generator().manual_seed(h >> 1)


class MixedDataset(Dataset):
    """Several `FlowDataset`s of one flow mixed in a chosen ratio.

    `sources`: name -> `FlowDataset`, every one built by the same flow with the same inputs keys
    and per-sample shapes. `sampling`: `"proportional"` (a source as often as it has samples: each
    sample once per epoch), `"uniform"` (each source equally often), `"temperature"` with
    `temperature=T` (p_i proportional to n_i^(1/T): T=1 is proportional, large T tends to uniform),
    or a mapping name -> weight (p_i proportional to the weight; 0 leaves a source out).
    `epoch_size`: samples per epoch (default: all samples of all sources). `seed`: the default seed
    of `loader`. See the module docstring for how an epoch is drawn.
    `join_inputs=True` copies each tensor input of all sources into one table (and the labels
    always: they are small), so a batch costs one gather per input, as `FlowDataset.loader`;
    `join_inputs=False` keeps a single copy of the inputs, read from each source present in a
    batch and joined (one gather per source and input). Lazy inputs (a sequence read item by
    item, such as image files) are always read from their source.

    Items and batches are those of the sources plus `X["source"]` (the position of the source in
    `source_names`, int64) and `X["index"]` (the index within the source, int64); `y` holds every
    task (missing markers where a source does not label it).

    Example::

        a = flow.get_dataset(inputs_a, labels_a, partial=True)   # labels for some tasks
        b = flow.get_dataset(inputs_b, labels_b, partial=True)   # labels for the others
        mixed = dcc.MixedDataset({"imagenet": a, "coco": b}, sampling="temperature", temperature=2.0)
        loader = mixed.loader(batch_size=256, seed=0)
    """

    def __init__(self, sources: Mapping[str, FlowDataset], sampling: Sampling = "proportional",
                 temperature: Optional[float] = None, epoch_size: Optional[int] = None, seed: int = 0,
                 join_inputs: bool = True):
        if not isinstance(sources, Mapping) or not sources:
            raise TypeError("MixedDataset(sources) takes a non-empty mapping: source name -> flow.get_dataset(...)")
        for name, ds in sources.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"MixedDataset: source names must be non-empty strings, got {name!r}")
            if not isinstance(ds, FlowDataset):
                raise TypeError(f"MixedDataset: source {name!r} is a {type(ds).__name__}; each source must be a "
                                "dataset from flow.get_dataset(inputs, labels[, partial=True])")
            if len(ds) == 0:
                raise InputError(f"MixedDataset: source {name!r} has no samples; leave it out of the mixture")
        self.sources: Dict[str, FlowDataset] = dict(sources)
        self.source_names: Tuple[str, ...] = tuple(self.sources)
        _check_same_flow(self.sources)
        _check_inputs(self.sources)
        _check_labels(self.sources)
        self.graph: FlowGraph = next(iter(self.sources.values())).graph
        self.sizes = np.array([len(ds) for ds in self.sources.values()], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        # Every source's labels in one table, indexed by key: one gather per task and batch, whatever
        # the number of sources in it (labels are small next to the inputs, which stay with their source).
        self._labels: Dict[str, Tensor] = {p: torch.cat([ds.labels[p] for ds in self.sources.values()])
                                           for p in self.graph.paths}
        self._gt_paths = tuple(self.graph.condition_paths)
        # Tensor inputs likewise (`join_inputs`): one gather per input and batch, as fast as
        # FlowDataset.loader, at the price of a second copy of them; lazy inputs (files) are read
        # from each source present in a batch and joined.
        self._inputs = _plan([ds.inputs for ds in self.sources.values()], bool(join_inputs))
        self._has_split = _has_per_source(self._inputs)
        self.sampling = sampling if isinstance(sampling, str) else dict(sampling)
        self.temperature = temperature
        self._weights = _weights(self.source_names, self.sizes, sampling, temperature)
        p = self._weights / self._weights.sum()
        self.probabilities: Dict[str, float] = dict(zip(self.source_names, p.tolist()))  # p_i of each source
        self.epoch_size = int(self.offsets[-1]) if epoch_size is None else _positive_int(epoch_size, "epoch_size")
        self.seed = _seed(seed)
        self._starts: Dict[int, List[np.ndarray]] = {}  # seed -> each epoch's start in every source's stream

    def __len__(self) -> int:
        """Samples per epoch."""
        return self.epoch_size

    def labelled_paths(self, source_name: str) -> frozenset:
        """The task paths that source `source_name` labels (`FlowDataset.labelled_paths`)."""
        return self.sources[self._name(source_name)].labelled_paths

    def describe(self, source_position: int, index: int) -> Dict[str, Any]:
        """Names sample `index` of the source at `source_position` (the values of `X["source"]`,
        `X["index"]`): the source's own `describe` plus `{"source": name}`."""
        name = self.source_names[int(source_position)]
        return {**self.sources[name].describe(int(index)), "source": name}

    def key(self, source_position: int, index: int) -> int:
        """The flat key of sample `index` of the source at `source_position` (`ds[key]` is that sample)."""
        pos, i = int(source_position), int(index)
        if not 0 <= pos < len(self.source_names) or not 0 <= i < self.sizes[pos]:
            sizes = dict(zip(self.source_names, self.sizes.tolist()))
            raise IndexError(f"no sample {i} in the source at position {pos} (sources and their sizes: {sizes})")
        return int(self.offsets[pos]) + i

    # Fetching ---------------------------------------------------------------------------------------
    def __getitem__(self, key: Any):
        """One sample for an int key; a batch for a sequence of keys (what the loader's batch
        sampler gives): the keys of each source fetched in one gather, in the order asked."""
        if isinstance(key, (int, np.integer)):
            pos, i = self._locate_one(int(key))
            x, y = self.sources[self.source_names[pos]][i]
            x[INDEX], x[SOURCE] = torch.tensor(i, dtype=torch.int64), torch.tensor(pos, dtype=torch.int64)
            return x, y
        keys = key.detach().cpu().numpy() if isinstance(key, Tensor) else np.asarray(key)
        if keys.ndim != 1 or not (keys.dtype.kind in "iu" or keys.size == 0):
            raise IndexError(f"MixedDataset takes an int key or a 1-D sequence of int keys, got {keys.dtype} of "
                             f"shape {keys.shape}")
        return self._batch(keys.astype(np.int64, copy=False))

    def _locate_one(self, key: int) -> Tuple[int, int]:
        if not 0 <= key < self.offsets[-1]:
            raise IndexError(f"key {key} out of range for a mixture of {int(self.offsets[-1])} samples")
        pos = int(np.searchsorted(self.offsets, key, side="right")) - 1
        return pos, key - int(self.offsets[pos])

    def _batch(self, keys: np.ndarray):
        # The bookkeeping on a batch's 256 keys is done in numpy (microseconds, where a torch op
        # on so small a tensor costs tens): only the gathers are torch ops.
        if keys.size and (keys.min() < 0 or keys.max() >= self.offsets[-1]):
            raise IndexError(f"keys from {keys.min()} to {keys.max()} out of range for a mixture of "
                             f"{int(self.offsets[-1])} samples")
        pos = np.searchsorted(self.offsets[1:], keys, side="right")
        local = keys - self.offsets[pos]
        flat = torch.from_numpy(keys)
        split = None
        if self._has_split:  # inputs read per source: which rows of which source, in which order
            counts = np.bincount(pos, minlength=len(self.source_names)).tolist()
            present = [p for p, c in enumerate(counts) if c]
            grouped = bool(np.all(pos[1:] >= pos[:-1]))  # the loader's batches are (sorted keys)
            order = None if grouped else np.argsort(pos, kind="stable")
            rows = local if order is None else local[order]
            chunks, start = [], 0
            for p in present:
                chunks.append((p, torch.from_numpy(np.ascontiguousarray(rows[start:start + counts[p]]))))
                start += counts[p]
            back = None
            if order is not None:
                back = np.empty_like(order)
                back[order] = np.arange(len(order))  # where each asked key sits among the joined rows
                back = torch.from_numpy(back)
            split = (chunks, back)
        x = _fetch(self._inputs, flat, split, self.source_names)
        # labels (small) from one table over all sources: one gather per task, as FlowDataset
        x[GT] = {p: self._labels[p].index_select(0, flat) for p in self._gt_paths}
        x[INDEX], x[SOURCE] = torch.from_numpy(local), torch.from_numpy(pos.astype(np.int64, copy=False))
        y = {p: t.index_select(0, flat) for p, t in self._labels.items()}
        return x, y

    # Sampling ---------------------------------------------------------------------------------------
    def source_counts(self, epoch: int, seed: Optional[int] = None) -> Dict[str, int]:
        """How many samples of each source epoch `epoch` draws (they add up to `len(self)`)."""
        return dict(zip(self.source_names, self._counts(int(epoch), self._seed_or_default(seed)).tolist()))

    def epoch_keys(self, epoch: int, seed: Optional[int] = None) -> Tensor:
        """The keys of epoch `epoch` in order (int64, `len(self)` of them): the same on every
        process for the same `seed` (default: the dataset's) and epoch."""
        seed = self._seed_or_default(seed)
        epoch = int(epoch)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        counts = self._counts(epoch, seed)
        starts = self._stream_starts(epoch, seed)
        drawn = [self.offsets[s] + self._stream(s, seed, start, start + count)
                 for s, (count, start) in enumerate(zip(counts.tolist(), starts.tolist())) if count]
        # one random order of all the epoch's draws: the sources interleaved at random (and each
        # source's draws, already a random part of its stream, in a random order among themselves)
        keys = torch.from_numpy(np.concatenate(drawn))
        return keys.index_select(0, torch.randperm(len(keys), generator=_generator(seed, _INTERLEAVE, epoch)))

    def _seed_or_default(self, seed: Optional[int]) -> int:
        return self.seed if seed is None else _seed(seed)

    def _counts(self, epoch: int, seed: int) -> np.ndarray:
        """Samples per source in `epoch`: floor(epoch_size * p_i) plus one for some of them, chosen
        by systematic sampling on the fractions, so that each source gets its fraction on average."""
        w, e = self._weights, self.epoch_size
        if w.dtype.kind == "i":  # integer weights (proportional, uniform): exact fractions
            total = int(w.sum())
            base, rest = (e * w) // total, ((e * w) % total) / total
        else:
            expected = e * (w / w.sum())
            base = np.floor(expected).astype(np.int64)
            rest = expected - base  # in [0, 1)
        left = e - int(base.sum())
        if left <= 0:
            return base.astype(np.int64)
        u = float(torch.rand((), generator=_generator(seed, _ROUNDING, epoch), dtype=torch.float64))
        edges = np.cumsum(rest)
        picks = np.searchsorted(edges, u + np.arange(left), side="right").clip(0, len(w) - 1)
        extra = np.zeros(len(w), dtype=np.int64)
        extra[picks] = 1  # at most one per source: each fraction is below 1
        counts = base.astype(np.int64) + extra
        # float rounding in `edges` could in theory pick one source twice: top up the largest fractions
        short = e - int(counts.sum())
        if short:
            counts[np.argsort(-(rest - extra))[:short]] += 1
        return counts

    def _stream_starts(self, epoch: int, seed: int) -> np.ndarray:
        """Where epoch `epoch` starts in each source's stream: the sum of the counts of the epochs
        before it (memoised per seed, so that consecutive epochs cost one step)."""
        known = self._starts.setdefault(seed, [np.zeros(len(self.source_names), dtype=np.int64)])
        while len(known) <= epoch:
            e = len(known) - 1
            known.append(known[e] + self._counts(e, seed))
        return known[epoch]

    def _stream(self, s: int, seed: int, start: int, stop: int) -> np.ndarray:
        """Positions `[start, stop)` of source `s`'s endless stream of permutations of its indices:
        without replacement until exhausted, then reshuffled. The permutations come in blocks of
        `_cycles_per_block(n)` (block b: one generator seeded by `(seed, s, b)`, one permutation
        after the other), so that a small source drawn many times per epoch costs one generator
        per block, not one per permutation."""
        n = int(self.sizes[s])
        cycles = _cycles_per_block(n)
        per_block = cycles * n
        out = []
        for block in range(start // per_block, (stop - 1) // per_block + 1):
            g = _generator(seed, _PERMUTATION, s, block)
            lo, hi = max(start - block * per_block, 0), min(stop - block * per_block, per_block)
            perms = torch.cat([torch.randperm(n, generator=g) for _ in range(-(-hi // n))])  # those it reaches
            out.append(perms[lo:hi].numpy())
        return np.concatenate(out)

    # Loading ----------------------------------------------------------------------------------------
    def loader(self, batch_size: int = 32, seed: Optional[int] = None, drop_last: bool = False,
               distributed: bool = False, **kwargs) -> DataLoader:
        """A `DataLoader` over the mixture (batched fetching: `batch_size=None` + a `BatchSampler`
        over a `MixedSampler`, as `FlowDataset.loader`); its `.dataset` is this dataset.

        `seed` (default: the dataset's) fixes every epoch; each pass over the loader is the next
        epoch (the sampler counts them; `loader.sampler.sampler.set_epoch(e)` sets it).

        Several processes: with `FlowRunner` on Catalyst's DDP engine keep `distributed=False`:
        accelerate deals the batches of the (same) epoch to the processes, evens out their
        number and `FlowRunner` drops the padded copies. In a plain `torch.distributed` loop pass
        `distributed=True`: under an initialised process group each rank takes every `world`-th
        sample of the epoch (as `DistributedSampler`, the epoch padded with its first samples to a
        multiple of the world size, or cut with `drop_last`), so the ranks draw disjoint samples of
        the same mixture and have the same number of steps. Never both: that would shard twice.
        """
        sampler = MixedSampler(self, seed=seed, distributed=distributed, drop_last=drop_last)
        return DataLoader(self, sampler=_SortedBatchSampler(sampler, batch_size, drop_last), batch_size=None, **kwargs)

    def _name(self, source_name: str) -> str:
        if source_name not in self.sources:
            raise KeyError(f"no source {source_name!r}{did_you_mean(str(source_name), self.source_names)}")
        return source_name


class MixedSampler(Sampler):
    """The keys of a `MixedDataset`, one epoch per pass (`MixedDataset.epoch_keys`).

    Each `__iter__` yields epoch `self.epoch` and then advances it (as accelerate's
    `SeedableRandomSampler`); `set_epoch(e)` sets the next one (as `DistributedSampler`).
    `distributed=True`: under a `torch.distributed` process group, only this rank's share (see
    `MixedDataset.loader`).
    """

    def __init__(self, dataset: MixedDataset, seed: Optional[int] = None, distributed: bool = False,
                 drop_last: bool = False):
        self.dataset = dataset
        self.seed = dataset.seed if seed is None else _seed(seed)
        self.distributed, self.drop_last = bool(distributed), bool(drop_last)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next pass draws."""
        self.epoch = int(epoch)

    def _world(self) -> Tuple[int, int]:
        return (dist_info.world_size(), dist_info.rank()) if self.distributed else (1, 0)

    def __len__(self) -> int:
        world, _ = self._world()
        n = len(self.dataset)
        return n // world if self.drop_last else -(-n // world)

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_keys().tolist())

    def epoch_keys(self) -> Tensor:
        """The keys of this pass (this rank's share with `distributed`), advancing the epoch:
        what `__iter__` yields, as one tensor."""
        keys = self.dataset.epoch_keys(self.epoch, self.seed)
        self.epoch += 1
        world, rank = self._world()
        if world > 1:
            if self.drop_last:
                keys = keys[: len(keys) - len(keys) % world]
            elif len(keys) % world:
                pad = world - len(keys) % world
                keys = torch.cat([keys, keys.repeat(-(-pad // len(keys)))[:pad]])
            keys = keys[rank::world]
        return keys


class _SortedBatchSampler(BatchSampler):
    """`BatchSampler` whose batches list their keys in increasing order: grouped by source (and
    ascending within one, kinder to memory), so that `MixedDataset` joins the per-source fetches
    without reordering them. A batch is still a contiguous run of the epoch's keys, which is what
    accelerate's sharding and `FlowRunner`'s padding layout rely on."""

    def __iter__(self) -> Iterator[List[int]]:
        if not isinstance(self.sampler, MixedSampler):
            for batch in super().__iter__():
                yield sorted(batch)
            return
        # the whole pass at once, cut and sorted in numpy (torch's BatchSampler pulls one int at a time)
        keys = self.sampler.epoch_keys().numpy()
        stop = len(keys) - len(keys) % self.batch_size if self.drop_last else len(keys)
        for start in range(0, stop, self.batch_size):
            yield np.sort(keys[start:start + self.batch_size]).tolist()  # a list: accelerate extends batches with +


# Validation ---------------------------------------------------------------------------------------------

def _check_same_flow(sources: Mapping[str, FlowDataset]) -> None:
    names = list(sources)
    first = sources[names[0]].graph
    for name in names[1:]:
        graph = sources[name].graph
        if graph is not first:
            same = "another flow object of the same name" if graph.name == first.name else f"flow {graph.name!r}"
            raise InputError(f"MixedDataset: source {name!r} was built by {same}, source {names[0]!r} by flow "
                             f"{first.name!r}; build every source with the same flow's get_dataset(...)")


def _structure(value: Any, prefix: str) -> Dict[str, Tuple[str, Any, Any]]:
    """key path -> (kind, per-sample shape, dtype) of an input tree."""
    if isinstance(value, Mapping):
        out: Dict[str, Tuple[str, Any, Any]] = {}
        for k, v in value.items():
            out.update(_structure(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, Tensor):
        return {prefix: ("tensor", tuple(value.shape[1:]), value.dtype)}
    if isinstance(value, np.ndarray):  # object arrays stay numpy
        return {prefix: ("array", tuple(value.shape[1:]), value.dtype)}
    return {prefix: ("sequence", None, None)}


def _check_inputs(sources: Mapping[str, FlowDataset]) -> None:
    names = list(sources)
    ref = _structure(sources[names[0]].inputs, "")
    for name in names[1:]:
        got = _structure(sources[name].inputs, "")
        lacks, extra = sorted(set(ref) - set(got)), sorted(set(got) - set(ref))
        if lacks or extra:
            what = "; ".join(s for s in (f"it lacks {capped(lacks)}" if lacks else "",
                                         f"it has {capped(extra)} besides" if extra else "") if s)
            raise InputError(f"MixedDataset: source {name!r} has other inputs keys than source {names[0]!r}: {what}; "
                             "every source must give the same inputs (a batch holds samples of several)")
        for key, (kind, shape, dtype) in ref.items():
            g_kind, g_shape, g_dtype = got[key]
            if kind != g_kind:
                raise InputError(f"MixedDataset: input {key!r} is a {g_kind} in source {name!r} but a {kind} in source "
                                 f"{names[0]!r}; give it the same form in every source")
            if kind != "sequence" and (shape != g_shape or dtype != g_dtype):
                raise InputError(f"MixedDataset: input {key!r} has per-sample shape {g_shape} ({g_dtype}) in source "
                                 f"{name!r} but {shape} ({dtype}) in source {names[0]!r}; every source must give "
                                 "one shape and dtype per input (resize or convert one of them)")


def _check_labels(sources: Mapping[str, FlowDataset]) -> None:
    names = list(sources)
    ref = sources[names[0]].labels
    for name in names[1:]:
        for path, t in sources[name].labels.items():
            r = ref[path]
            if t.shape[1:] != r.shape[1:] or t.dtype != r.dtype:
                raise LabelError(f"MixedDataset: task {path!r} has labels of shape {_batch_shape(t)} {t.dtype} in "
                                 f"source {name!r} but {_batch_shape(r)} {r.dtype} in source {names[0]!r}; the "
                                 "task's head has one output size, so every source's labels of a task must have one "
                                 "per-sample shape (e.g. the same number of classes)")


def _batch_shape(t: Tensor) -> str:
    """`(N,)`, `(N, 5)`: a label tensor's shape with the batch dimension named."""
    return "(" + ", ".join(["N", *map(str, t.shape[1:])]) + ("," if t.dim() == 1 else "") + ")"


def _weights(names: Sequence[str], sizes: np.ndarray, sampling: Sampling, temperature: Optional[float]) -> np.ndarray:
    """Unnormalised sampling weights per source (int64 where exact: proportional, uniform)."""
    if isinstance(sampling, str):
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"MixedDataset: unknown sampling {sampling!r}{did_you_mean(sampling, SAMPLING_MODES, 0)}; "
                             f"use one of {list(SAMPLING_MODES)} or a mapping source name -> weight")
        if sampling == "temperature":
            if temperature is None or isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
                    or not math.isfinite(temperature) or temperature <= 0:
                raise ValueError(f"MixedDataset: sampling='temperature' needs temperature=T, a finite number > 0 "
                                 f"(p_i proportional to n_i^(1/T)), got {temperature!r}")
            log_w = np.log(sizes.astype(np.float64)) / float(temperature)
            return np.exp(log_w - log_w.max())  # in log space: n^(1/T) overflows for small T
    elif not isinstance(sampling, Mapping):
        raise TypeError(f"MixedDataset: sampling must be one of {list(SAMPLING_MODES)} or a mapping source name -> "
                        f"weight, got {type(sampling).__name__}")
    if temperature is not None:
        raise ValueError(f"MixedDataset: temperature={temperature!r} applies only to sampling='temperature' "
                         f"(sampling is {sampling!r})")
    if sampling == "proportional":
        return sizes.astype(np.int64)
    if sampling == "uniform":
        return np.ones(len(names), dtype=np.int64)
    unknown = [k for k in sampling if k not in names]
    if unknown:
        raise ValueError(f"MixedDataset: sampling weight for unknown source {unknown[0]!r}"
                         f"{did_you_mean(str(unknown[0]), names)}")
    lacking = [n for n in names if n not in sampling]
    if lacking:
        raise ValueError(f"MixedDataset: sampling weights lack source(s) {capped(lacking)}; give a weight to every "
                         "source (0 leaves one out)")
    w = []
    for name in names:
        v = sampling[name]
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
            raise ValueError(f"MixedDataset: the sampling weight of source {name!r} must be a finite number >= 0, "
                             f"got {v!r}")
        w.append(float(v))
    if sum(w) <= 0:
        raise ValueError("MixedDataset: every sampling weight is 0; give at least one source a positive weight")
    return np.array(w, dtype=np.float64)


def _cycles_per_block(n: int) -> int:
    """Permutations of an `n`-sample source drawn from one generator: about 4096 indices a block
    (a few for a small source drawn many times per epoch; one for a source of 4096 or more, whose
    epoch then never permutes more than it takes)."""
    return max(1, 4096 // n)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"MixedDataset: {name} must be a whole number >= 1, got {value!r}")
    return int(value)


def _seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"MixedDataset: seed must be a whole number >= 0, got {value!r}")
    return int(value)


class _PerSource(NamedTuple):
    """An input read from each source (lazy sequences, or any input with `join_inputs=False`)."""

    values: List[Any]
    where: str


def _plan(trees: Sequence[Any], join: bool, where: str = "") -> Any:
    """How each input is fetched: the sources' tensors of an input joined into one table (indexed
    by key), or a `_PerSource` leaf."""
    first = trees[0]
    if isinstance(first, Mapping):
        return {k: _plan([t[k] for t in trees], join, f"{where}.{k}" if where else str(k)) for k in first}
    if join and all(isinstance(t, Tensor) for t in trees):
        return torch.cat(list(trees))  # one shape and dtype: `_check_inputs`
    return _PerSource(list(trees), where)


def _has_per_source(plan: Any) -> bool:
    if isinstance(plan, Mapping):
        return any(_has_per_source(v) for v in plan.values())
    return isinstance(plan, _PerSource)


def _fetch(plan: Any, keys: Tensor, split: Any, names: Sequence[str]) -> Any:
    """A batch's inputs: a joined table gathered by key; a `_PerSource` input taken from each
    source present (`split` = `(chunks, back)`: per source its position and rows, and the order
    to put the joined rows back in, None when already in order), then joined."""
    if isinstance(plan, Mapping):
        return {k: _fetch(v, keys, split, names) for k, v in plan.items()}
    if isinstance(plan, Tensor):
        return plan.index_select(0, keys)
    chunks, back = split
    parts = [_take(plan.values[p], rows, plan.where) for p, rows in chunks]
    if len(parts) == 1:
        joined = parts[0]
    elif all(isinstance(p, Tensor) for p in parts):
        try:
            joined = torch.cat(parts)
        except RuntimeError:
            shapes = ", ".join(f"{names[p]}: {tuple(t.shape[1:])}" for (p, _), t in zip(chunks, parts))
            raise InputError(f"MixedDataset: input {plan.where!r} differs in per-sample shape between sources "
                             f"({shapes}); every source must give one shape (resize the images or other items to "
                             "one size)") from None
    else:
        joined = [v for part in parts for v in (part if isinstance(part, list) else list(part))]
    if back is None:
        return joined
    return joined.index_select(0, back) if isinstance(joined, Tensor) else [joined[j] for j in back.tolist()]
