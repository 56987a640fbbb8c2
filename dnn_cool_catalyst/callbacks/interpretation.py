"""`InterpretationCallback`: the best and worst samples of each task by per-sample loss."""
from __future__ import annotations

import csv
import inspect
import io
import itertools
import os
import warnings
from collections import defaultdict
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
from catalyst.core.callback import Callback
from torch import Tensor
from torch.utils.data import default_collate

from .. import attribution as attr
from ..distributed import is_main_process, unwrap, world_size
from ..inference import mixed_dataset
from ..keys import ACTIVATED, EXPLAIN, GT, INDEX, LOGITS, MASK, PER_SAMPLE_LOSS, SOURCE
from .batch import ChunkBuffer, SampleIndexer, labelled_batch
from .common import loader_selected, resolve_callback_flow, resolve_logdir
from ..files import write_atomic
from .loader_outputs import LoaderOutputs, shared_outputs
from .metrics import METRICS_ORDER
from .publishers import default_publishers, log_text

CSV_COLUMNS = ("task_path", "rank", "dataset_index", "loss")


def rank_samples(losses: Tensor, indices: Tensor, k: int) -> pd.DataFrame:
    """The `k` worst and `k` best samples of one task: `rank, dataset_index, loss`.

    `losses` are per-sample losses with NaN outside `S_t` (those samples are ignored). Rank 1 is
    the highest loss and rank `n = |S_t|` the lowest; equal losses are ranked by dataset index.
    The `k` worst are ranks `1..k`, the `k` best ranks `n-k+1..n` (each sample once when they meet).
    """
    ranks, index, loss = _ranked(losses, indices, k)
    return pd.DataFrame({"rank": ranks, "dataset_index": index, "loss": loss})


def _ranked(losses: Tensor, indices: Tensor, k: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    loss = losses.reshape(-1).double().numpy()
    index = indices.reshape(-1).to(torch.int64).numpy()
    keep = ~np.isnan(loss)
    if not keep.all():
        loss, index = loss[keep], index[keep]
    chosen, ranks = _chosen(loss, index, k)
    return ranks, index[chosen], loss[chosen]


def _ranked_rows(losses: np.ndarray, indices: np.ndarray, k: int) -> List[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`_ranked` of every row of `losses` `(T, N)` (one task a row, NaN outside its `S_t`), all
    tasks at once (`_chosen_rows`): the same ranks, indices and losses."""
    loss = np.asarray(losses, dtype=np.float64)
    index = np.asarray(indices, dtype=np.int64).reshape(-1)
    return [(ranks, index[pos], loss[t, pos]) for t, (pos, ranks) in enumerate(_chosen_rows(loss, index, k))]


def _chosen_rows(loss: np.ndarray, index: np.ndarray, k: int) -> List[Tuple[np.ndarray, np.ndarray]]:
    """`_chosen` of every row of `loss` `(T, N)`, NaN where a sample is not in the row's `S_t`:
    per row, the positions (into the row) of its `k` worst and `k` best and their ranks.

    As `_chosen` does for one task, only the samples that can be among a row's `k` highest or `k`
    lowest losses (ties included) are sorted, here found for all rows by one partition each way,
    and sorted by one `lexsort` of all rows' candidates (row, then loss descending, then index)."""
    t, n = loss.shape
    if t == 0:
        return []
    known = ~np.isnan(loss)
    counts = known.sum(1)
    if n > 4 * k:
        # NaN as -inf / +inf: never above a row's k-th highest or below its k-th lowest known loss
        # (a known infinite loss at the bound takes every known sample in: more candidates, same result)
        high = np.partition(np.where(known, loss, -np.inf), n - k, axis=1)[:, n - k:n - k + 1]
        low = np.partition(np.where(known, loss, np.inf), k - 1, axis=1)[:, k - 1:k]
        candidates = known & ((loss >= high) | (loss <= low) | (counts <= 4 * k)[:, None])
    else:
        candidates = known
    rows, cols = np.nonzero(candidates)
    order = np.lexsort((index[cols], -loss[rows, cols], rows))
    cols = cols[order]
    ends = np.cumsum(np.bincount(rows, minlength=t)).tolist()
    out, start = [], 0
    for end, c in zip(ends, counts.tolist()):
        sorted_cols, start = cols[start:end], end
        if c <= 2 * k:  # every known sample (a row with at most 4k has all of them as candidates)
            out.append((sorted_cols, np.arange(1, c + 1, dtype=np.int64)))
        elif c <= 4 * k:
            ranks = np.concatenate([np.arange(k), np.arange(c - k, c)])
            out.append((sorted_cols[ranks], ranks.astype(np.int64) + 1))
        else:
            out.append((np.concatenate([sorted_cols[:k], sorted_cols[len(sorted_cols) - k:]]),
                        np.concatenate([np.arange(1, k + 1), np.arange(c - k + 1, c + 1)]).astype(np.int64)))
    return out


def _chosen(loss: np.ndarray, index: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Positions of the `k` worst and `k` best of `loss` (no NaN) by loss descending, then index,
    and their ranks (1 = the highest loss)."""
    n = loss.size
    if n <= 4 * k:
        order = np.lexsort((index, -loss))  # by loss descending, then by index
        ranks = np.union1d(np.arange(min(k, n)), np.arange(max(n - k, 0), n)).astype(np.int64)
        return order[ranks], ranks + 1
    # Only the samples that can be among the k highest or k lowest losses are sorted: those at
    # least as high as the k-th highest (ties included) and at most as low as the k-th lowest.
    bounds = np.partition(loss, (k - 1, n - k))
    worst = np.flatnonzero(loss >= bounds[n - k])
    best = np.flatnonzero(loss <= bounds[k - 1])
    worst = worst[np.lexsort((index[worst], -loss[worst]))][:k]
    best = best[np.lexsort((index[best], -loss[best]))][-k:]
    ranks = np.concatenate([np.arange(1, k + 1), np.arange(n - k + 1, n + 1)]).astype(np.int64)
    return np.concatenate([worst, best]), ranks


class _Extremes:
    """The labels and activated outputs of the samples of one task that can still be among its
    `k` worst or `k` best (the same order as `_ranked`, so the final ranked samples are always
    here), to caption them without keeping every sample's outputs: `rows[dataset index]`."""

    def __init__(self, k: int):
        self.k = k
        self.loss = np.empty(0, dtype=np.float64)
        self.index = np.empty(0, dtype=np.int64)
        self.rows: Dict[int, Tuple[Tensor, Optional[Tensor]]] = {}

    def add(self, losses: Tensor, indices: Tensor, labels: Tensor, values: Optional[Tensor],
            activate: Any = None) -> None:
        """A chunk's per-sample losses (NaN outside `S_t`), dataset indices, labels and outputs
        (`activate(values)` gives the activated outputs; None: `values` are activated already)."""
        loss = losses.reshape(-1).numpy()  # float32 orders as its exact float64 values in `_ranked` do
        index = indices.reshape(-1).to(torch.int64).numpy()
        keep = np.flatnonzero(~np.isnan(loss))
        self.add_chosen(keep[_chosen(loss[keep], index[keep], self.k)[0]], loss, index, labels, values, activate)

    def add_chosen(self, pos: np.ndarray, loss: np.ndarray, index: np.ndarray, labels: Tensor,
                   values: Optional[Tensor], activate: Any = None) -> None:
        """`add`, with the chunk's candidates already chosen: `pos`, the positions in the chunk of
        its `k` worst and `k` best (`_chosen`, `_chosen_rows`); `loss` and `index` as numpy arrays."""
        if not pos.size:
            return
        rows = torch.from_numpy(pos)
        label_rows = labels.index_select(0, rows.to(labels.device)).cpu()
        act_rows = None
        if values is not None:
            picked = values.index_select(0, rows.to(values.device))
            act_rows = (activate(picked) if activate is not None else picked).detach().cpu()
        for j, i in enumerate(index[pos].tolist()):
            self.rows[i] = (label_rows[j], act_rows[j] if act_rows is not None else None)
        if not self.loss.size:  # the first chunk: its candidates are already the chosen ones
            self.loss, self.index = loss[pos], index[pos]
        else:
            loss, index = np.concatenate([self.loss, loss[pos]]), np.concatenate([self.index, index[pos]])
            chosen = _chosen(loss, index, self.k)[0]
            self.loss, self.index = loss[chosen], index[chosen]
        self.rows = {i: self.rows[i] for i in self.index.tolist()}


def _write_ranked_csv(path: str, ranked: Dict[str, Tuple[np.ndarray, np.ndarray, np.ndarray]],
                      names: Sequence[str] = (), named: Optional[Mapping[str, Sequence[Sequence[Any]]]] = None) -> None:
    """The ranked samples as `write_csv` writes their table (the same bytes as pandas' `to_csv`,
    which costs more than the ranking itself), atomically; `names` are further columns, whose values
    are `named[task_path]` (one sequence per column)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(tuple(CSV_COLUMNS) + tuple(names))
    for task_path, (ranks, indices, losses) in ranked.items():
        columns = (named or {}).get(task_path, ())
        writer.writerows(zip(itertools.repeat(task_path), ranks.tolist(), indices.tolist(), losses.tolist(), *columns))
    data = buf.getvalue().encode("utf-8")
    write_atomic(path, lambda fh: fh.write(data))


# Naming and captioning samples ------------------------------------------------------------------

def _no_names(index: int) -> Dict[str, Any]:
    """No names for any sample (before a loader's samples can be described)."""
    return {}


def sample_describer(loader: Any) -> Optional[Any]:
    """`describe(index) -> {name: value}` of the dataset behind `loader` (`FlowDataset.describe`,
    filled by `Project`: the DataFrame's index label `row` and the image `file`), looked up through
    wrappers that keep the dataset in `.dataset` (accelerate's loaders, `_BatchFetch`); None when
    no dataset names its samples."""
    obj, seen = getattr(loader, "dataset", None), set()
    while obj is not None and id(obj) not in seen:
        seen.add(id(obj))
        describe = getattr(obj, "describe", None)
        if callable(describe):
            return describe
        obj = getattr(obj, "dataset", None)
    return None


def label_and_prediction(task: Any, label: Tensor, activated: Optional[Tensor], digits: int = 4) -> Tuple[str, str]:
    """One sample's label and prediction as short texts, in the task's terms (`ITask.describe_sample`:
    class names for classification, `True`/`False` with the probability for a binary task, the
    classes set for a multilabel task, decoded values otherwise). The prediction is `"?"` when the
    outputs are unknown; the raw values when the task cannot describe them."""
    try:
        return task.describe_sample(label, activated, digits=digits)
    except Exception:  # a task of the user's own whose decoder takes other shapes: the raw values
        label = torch.as_tensor(label).detach().cpu()
        return _numbers(label, digits), _numbers(activated.detach().cpu(), digits) if activated is not None else "?"


def _numbers(t: Tensor, digits: int, limit: int = 8) -> str:
    values = t.reshape(-1).tolist()
    shown = ", ".join(f"{v:.{digits}g}" if isinstance(v, float) else str(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


def sample_caption(label: str, prediction: str, loss: float, info: Optional[Mapping[str, Any]] = None) -> str:
    """The caption of a ranked sample: label, prediction and loss, then what names it (`row`,
    `file`), one per line."""
    lines = [f"label: {label}", f"prediction: {prediction}", f"loss: {loss:.6g}"]
    lines += [f"{k}: {v}" for k, v in (info or {}).items()]
    return "\n".join(lines)


def _sample_name(index: int, info: Mapping[str, Any]) -> str:
    """`12 (row 'r12', file images/012.png)`: a sample's dataset index and what names it."""
    if not info:
        return str(index)
    return f"{index} (" + ", ".join(f"{k} {v!r}" if isinstance(v, str) and k == "row" else f"{k} {v}"
                                    for k, v in info.items()) + ")"


def _cell(v: Any) -> str:
    """A markdown table cell: `|` escaped, line breaks as spaces."""
    return str(v).replace("|", "\\|").replace("\n", " ")


def _takes_caption(publisher: Any) -> bool:
    try:
        return "caption" in inspect.signature(publisher.publish).parameters
    except (TypeError, ValueError):
        return False


def _flatten(x: Any, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    if isinstance(x, Mapping):
        for k, v in x.items():
            if not prefix and k in (GT, INDEX):
                continue
            yield from _flatten(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], x


class MixedIds:
    """Sample ids of a loader that mixes sources (`MixedDataset`): `X["index"]` counts within each
    source, so samples are told apart by a global id, the sum of the sizes of the sources before
    theirs plus their index (`ids`). `split(id)` gives back `(source position, index)`; `describe`
    and `[id]` reach the sample through the mixed dataset (its `describe(position, index)`, which
    adds `source`, and `sources[name][index]`)."""

    def __init__(self, dataset: Any):
        self.dataset = dataset
        self.names = tuple(dataset.source_names)
        sizes = np.array([len(dataset.sources[name]) for name in self.names], dtype=np.int64)
        self.ends = np.cumsum(sizes)
        self.offsets = torch.from_numpy(self.ends - sizes)

    @classmethod
    def of(cls, loader: Any) -> Optional["MixedIds"]:
        """For a loader over a dataset that mixes sources (`inference.mixed_dataset`); None for any other."""
        dataset = mixed_dataset(loader)
        return cls(dataset) if dataset is not None else None

    def ids(self, sources: Any, index: Tensor, loader_key: str) -> Tensor:
        """Global ids of a batch's samples from its `X["source"]` and dataset indices."""
        if not isinstance(sources, Tensor) or sources.numel() != index.numel():
            raise KeyError(f"InterpretationCallback: the dataset of loader {loader_key!r} mixes sources "
                           f"{list(self.names)} but a batch carries no X[{SOURCE!r}] for each sample; use the "
                           f"loader of the MixedDataset (MixedDataset.loader), which adds it")
        return self.offsets[sources.detach().reshape(-1).cpu().long()] + index

    def split(self, ids: Any) -> Tuple[np.ndarray, np.ndarray]:
        """`(source positions, indices within the source)` of global ids (arrays)."""
        ids = np.asarray(ids, dtype=np.int64)
        position = np.searchsorted(self.ends, ids, side="right")
        return position, ids - self.offsets.numpy()[np.minimum(position, len(self.names) - 1)]

    def local(self, ids: Tensor) -> Tensor:
        """Indices within their sources of global ids (a tensor)."""
        return torch.from_numpy(self.split(ids.numpy())[1])

    def describe(self, gid: int) -> Dict[str, Any]:
        position, index = self.split(gid)
        return dict(self.dataset.describe(int(position), int(index)))

    def __getitem__(self, gid: int) -> Any:
        position, index = self.split(gid)
        return self.dataset.sources[self.names[int(position)]][int(index)]


class _InputReader:
    """`reader(index)` -> `[(key, value, publisher)]` for the inputs of `dataset[index]` that have a
    publisher. Once a sample shows that no input has one, no other sample is read."""

    def __init__(self, dataset: Any, choose: Any, warn: Any):
        self.dataset, self.choose, self.warn = dataset, choose, warn
        self.cache: Dict[int, List[Tuple[str, Any, Any]]] = {}
        self.nothing_to_publish = dataset is None or not hasattr(dataset, "__getitem__")
        if self.nothing_to_publish:
            warn("the loader's dataset cannot be indexed")

    def __call__(self, index: int) -> List[Tuple[str, Any, Any]]:
        if self.nothing_to_publish:
            return []
        if index not in self.cache:
            try:
                item = self.dataset[index]
            except Exception as e:  # an iterable or otherwise unindexable dataset: publish no inputs
                self.warn(f"reading dataset[{index}] failed ({type(e).__name__}: {e})")
                self.nothing_to_publish = True
                return []
            x = item[0] if isinstance(item, (tuple, list)) else item
            found = [(k, v, self.choose(k, v)) for k, v in _flatten(x)]
            self.cache[index] = [(k, v, p) for k, v, p in found if p is not None]
            self.nothing_to_publish = not self.cache[index]
        return self.cache[index]


class InterpretationCallback(Callback):
    """Per-sample losses of every task over a loader (only samples in `S_t`), and the `top_k`
    worst and best samples of each task by that loss.

    At each selected loader's end it writes `interpretation_<loader>.csv` into the logdir
    (`task_path, rank, dataset_index, loss`; see `rank_samples`; then the columns that name the
    samples when the dataset does, see below), keeps the table in `self.results[loader]`, and
    publishes to the loggers, grouped by task: a table of the ranked samples
    (`<path>/interpretation`: rank, dataset index, names, label, prediction, loss), and each input
    of each ranked sample through a publisher (`<path>/worst/<i>/<input key>`,
    `<path>/best/<i>/<input key>`; `i` = 1 for the worst and for the best), captioned with its
    label, prediction and loss (images get a caption strip below them). The inputs are read back
    from `runner.loader.dataset[dataset_index]`.

    Naming samples: a dataset with `describe(index) -> {name: value}` (`FlowDataset.name_samples`;
    a `Project`'s datasets carry `row`, the DataFrame's index label, and `file`, the image read)
    adds those columns to the CSV and the tables, and names the explanation roots; it is found
    through loader wrappers that keep it in `.dataset`.

    It also publishes the tree explanations (`flow.get_treelib_explainer()`) of the samples with
    dataset index below `explain` as text (`explanations/sample_<index>`, root
    `inp <index> (row ..., file ...)`), with preconditions decided from the decoded predictions, as
    at inference. Captions and trees decode with the thresholds tuned on the same loader
    (`ThresholdTuningCallback` with `apply=True`), whatever the callbacks' order
    (`callbacks.loader_outputs`).

    Dataset indices come from `X["index"]` (`flow.get_dataset` adds it by default), so they
    are right for shuffled loaders; without it they are positions in the loader, with a warning.

    A loader that mixes sources (`MixedDataset`, batches with `X["source"]`): the samples of all
    sources are ranked together (a sample is its source and its index there, `MixedIds`),
    `dataset_index` is the index within the source and the mixed dataset's `describe` adds the
    `source` column (CSV, tables, captions); the first `explain` samples of each source are
    explained as `explanations/<source>/sample_<index>`, inputs read from the source's dataset.

    Batches reduced inside DataParallel replicas (`runners.balance`) bring their per-sample
    losses (`"per_sample_loss"`) and the logits of the samples to explain (`"explain"`, only with
    `X["index"]`) instead of full outputs. Under DDP, the losses of all processes are ranked
    together and only the main process writes the CSV.

    Args:
        flow: the `TaskFlow` (default: `runner.flow`).
        top_k: how many worst and best samples per task.
        loaders: loader keys to interpret (default: every loader that does not train).
        publishers: input key (dotted for nested inputs) -> publisher, or None to never publish
            that input; keys not listed are offered to `default_publishers` in turn.
        default_publishers: publishers chosen by the input's type (default: images, then text).
        explain: how many samples (the lowest dataset indices) to explain as trees; 0 for none.
        logdir: where to write the CSV (default: `runner.logdir`; no file when neither is set).
        buffer_elements: per-sample losses are computed once per chunk of batches holding about
            this many elements (the same values, fewer small tensor operations).
        attribution: None (default), or `"saliency"`, `"integrated_gradients"` or `"gradcam"`: for
            each ranked (best/worst) sample of each task, a heat map of that task's per-sample loss
            (the value the samples are ranked by; why the loss and not a logit:
            `dnn_cool_catalyst.attribution`) with respect to each image input (saliency, integrated
            gradients) or to a layer (GradCAM), computed with captum (`pip install
            'dnn_cool_catalyst[attribution]'`) on the model in eval mode and published, blended
            over the image, beside it as `<path>/worst/<i>/attribution` (`.../attribution/<input
            key>` when a sample has several images), through the image's publisher and captioned
            like it. Only the `2 * top_k` ranked samples per task are attributed, in one batch per
            task (one backward; `n_steps` scaled copies for integrated gradients), on the main
            process, at each interpreted loader's end.
        attribution_layer: GradCAM's layer, by its name in `model.named_modules()` (e.g.
            `"backbone.3.0"`); default: the last `nn.Conv2d` of the model outside the flow module.
            Checked at the experiment's start (a model without one is an error there).
        attribution_options: keyword arguments for captum's `attribute`, e.g. `{"n_steps": 16}`.
    """

    def __init__(self, flow: Any = None, top_k: int = 5, loaders: Optional[Sequence[str]] = None,
                 publishers: Optional[Mapping[str, Any]] = None, default_publishers: Optional[Sequence[Any]] = None,
                 explain: int = 3, logdir: Optional[str] = None, buffer_elements: int = 2 ** 24,
                 attribution: Optional[str] = None, attribution_layer: Optional[str] = None,
                 attribution_options: Optional[Mapping[str, Any]] = None):
        super().__init__(order=METRICS_ORDER)
        if top_k < 1:
            raise ValueError(f"InterpretationCallback: top_k must be at least 1, got {top_k}")
        if attribution is not None:
            attr.check_method(attribution)
            attr.captum_attr()  # missing captum: an error now, naming the extra, not after an epoch
        self.attribution = attribution
        self.attribution_layer = attribution_layer
        self.attribution_options = dict(attribution_options or {})
        self.flow = flow
        self.top_k = int(top_k)
        self.loaders = list(loaders) if loaders is not None else None
        self.publishers = dict(publishers or {})
        self.default_publishers = list(default_publishers) if default_publishers is not None else None
        self.explain = int(explain)
        self.logdir = logdir
        self.buffer_elements = int(buffer_elements)
        self.results: Dict[str, pd.DataFrame] = {}
        self._indexer = SampleIndexer(type(self).__name__)
        self._warned_inputs = False
        self._warned_attribution = False
        # set at the experiment's start
        self._flow: Any = None
        self._graph: Any = None
        self._per_sample: Any = None
        self._logdir: Optional[str] = None
        self._explainer: Any = None
        self._buffer = ChunkBuffer(self.buffer_elements)
        # set at each loader's start
        self._reset_loader(active=False)

    def _reset_loader(self, active: bool) -> None:
        self._active = active
        self._indexer.reset()
        self._buffer.clear()
        self._losses: Dict[str, List[Tensor]] = defaultdict(list)
        self._indices: List[Tensor] = []
        self._extremes: Dict[str, _Extremes] = ({leaf.path: _Extremes(self.top_k) for leaf in self._graph.leaves}
                                                if self._graph is not None else {})
        self._explained: List[Tuple[int, Dict[str, Dict[str, Tensor]]]] = []
        self._describe: Any = _no_names  # a function, not a lambda: DDP's spawn pickles given callbacks
        self._shared: Optional[LoaderOutputs] = None
        self._mixed: Optional[MixedIds] = None  # a loader mixing sources: samples go by global ids

    def on_experiment_start(self, runner: Any) -> None:
        self._flow = resolve_callback_flow(self.flow, runner, type(self).__name__)  # the given flow, else the runner's
        self._graph = self._flow.graph
        self._per_sample = self._flow.get_per_sample_loss()
        self._logdir = resolve_logdir(self.logdir, runner)
        if self.default_publishers is None:
            self.default_publishers = list(default_publishers())
        self._explainer = None
        self._buffer = ChunkBuffer(self.buffer_elements)
        self._reset_loader(active=False)
        if self.attribution == "gradcam":  # a model without the layer: an error before training
            model = unwrap(runner.model)
            if self.attribution_layer is None:
                attr.default_layer(model)
            else:
                attr.find_layer(model, self.attribution_layer)

    def on_loader_start(self, runner: Any) -> None:
        self._reset_loader(active=loader_selected(runner, self.loaders, "eval"))
        if self._active:  # captions and trees decode at the loader's end, after any tuning on it
            self._shared = shared_outputs(runner, self._flow)
            self._shared.start(self)
            self._mixed = MixedIds.of(runner.loader)

    def on_batch_end(self, runner: Any) -> None:  # no grad-mode switch per batch: see FlowMetricsCallback
        batch = labelled_batch(runner, type(self).__name__, self._active)
        if batch is None:
            return
        inputs, targets, outputs = batch
        n = batch.size
        index = self._indexer(inputs, n, runner.loader_key)
        if self._mixed is not None:
            index = self._mixed.ids(inputs.get(SOURCE), index, runner.loader_key)
        per_sample = runner.batch.get(PER_SAMPLE_LOSS)
        if per_sample is not None:
            self._add_reduced(index, per_sample, runner.batch.get(EXPLAIN), targets, outputs)
            return
        self._buffer.add(n, {LOGITS: outputs[LOGITS], MASK: outputs[MASK], "targets": targets,
                             INDEX: {INDEX: index}})
        if self._buffer.full:
            self._flush()

    @torch.no_grad()
    def _add_reduced(self, index: Tensor, per_sample: Dict[str, Tensor], explain: Any,
                     targets: Mapping[str, Tensor], outputs: Mapping[str, Any]) -> None:
        """A batch whose per-sample losses were computed inside DataParallel replicas (activated
        outputs only of the kept tasks: the others' captions show no prediction)."""
        activated = outputs.get(ACTIVATED) or {}
        for leaf in self._graph.leaves:
            losses = per_sample[leaf.path].float().cpu()
            self._losses[leaf.path].append(losses)
            self._extremes[leaf.path].add(losses, index, targets[leaf.path], activated.get(leaf.path))
        self._indices.append(index)
        if self.explain > 0 and explain is not None:
            ids = explain[INDEX].reshape(-1).cpu()
            if self._mixed is not None:  # the explained rows are the batch's rows below `explain`, in order
                rows = torch.nonzero(self._mixed.local(index) < self.explain).reshape(-1)
                if rows.numel() != ids.numel():
                    return  # explained for another `explain` than this callback's: nothing to match them by
                ids = index[rows]
            for r in torch.nonzero(self._local(ids) < self.explain).reshape(-1).tolist():
                logits = {p: z[r: r + 1].cpu() for p, z in explain[LOGITS].items()}
                activated = {leaf.path: leaf.task.activate(logits[leaf.path]) for leaf in self._graph.leaves}
                self._explained.append((int(ids[r]), {LOGITS: logits, ACTIVATED: activated}))

    @torch.no_grad()
    def _flush(self) -> None:
        """Per-sample losses of the kept batches, and the samples to explain among them."""
        if not len(self._buffer):
            return
        chunk = self._buffer.take()
        index = chunk[INDEX][INDEX]
        per_sample = self._per_sample({LOGITS: chunk[LOGITS], MASK: chunk[MASK]}, chunk["targets"], overall=False)
        leaves = self._graph.leaves
        # all tasks' candidates at once: one (tasks, N) matrix, one sort (`_chosen_rows`)
        stacked = torch.stack([per_sample[leaf.path].reshape(-1).float() for leaf in leaves]).cpu()
        rows = stacked.numpy()  # float32 orders as its exact float64 values in `_ranked` do
        ids = index.reshape(-1).to(torch.int64).cpu().numpy()
        for leaf, losses, row, (pos, _) in zip(leaves, stacked.unbind(), rows, _chosen_rows(rows, ids, self.top_k)):
            # a row of its own: a view would keep (and pickle, in the DDP gather) the whole matrix
            self._losses[leaf.path].append(losses.clone())
            self._extremes[leaf.path].add_chosen(pos, row, ids, chunk["targets"][leaf.path], chunk[LOGITS][leaf.path],
                                                 leaf.task.activate)
        self._indices.append(index)
        if self.explain > 0:
            rows = torch.nonzero(self._local(index) < self.explain).reshape(-1)
            if rows.numel():  # the few samples to explain, activated together
                logits = {p: z[rows].cpu() for p, z in chunk[LOGITS].items()}
                activated = {leaf.path: leaf.task.activate(logits[leaf.path]) for leaf in self._graph.leaves}
                for i, r in enumerate(rows.tolist()):
                    self._explained.append((int(index[r]), {part: {p: t[i: i + 1] for p, t in values.items()}
                                                            for part, values in ((LOGITS, logits),
                                                                                 (ACTIVATED, activated))}))

    def _local(self, ids: Tensor) -> Tensor:
        """Indices within their dataset (their source's, for a mixed loader) of sample ids."""
        return self._mixed.local(ids) if self._mixed is not None else ids

    def on_loader_end(self, runner: Any) -> None:
        if not self._active:
            return
        try:
            self._shared.before_decoding(runner)  # thresholds tuned on this loader decode the captions and trees
            self._interpret(runner)
        finally:
            self._shared.done(self)

    def _interpret(self, runner: Any) -> None:
        """Rank the loader's samples per task; write, keep and publish them."""
        self._flush()
        self._gather_across_processes()  # every process takes part, also one without samples
        if not self._indices:
            return
        indices = torch.cat(self._indices)
        paths = [leaf.path for leaf in self._graph.leaves]
        losses = torch.stack([torch.cat(self._losses[p]).reshape(-1) for p in paths]).double().numpy()
        ranked = dict(zip(paths, _ranked_rows(losses, indices.reshape(-1).to(torch.int64).cpu().numpy(), self.top_k)))
        self._describe = self._sample_names(runner)
        names = list(dict.fromkeys(k for r in ranked.values() for i in r[1].tolist() for k in self._describe(i)))
        named = {path: [[self._describe(i).get(k) for i in r[1].tolist()] for k in names] for path, r in ranked.items()}
        # as shown: indices within the dataset (a mixed loader's: within the source, named by `source`)
        shown = ranked if self._mixed is None else {
            path: (r[0], self._mixed.split(r[1])[1], r[2]) for path, r in ranked.items()}
        table = pd.DataFrame({
            "task_path": np.repeat(np.array(list(ranked), dtype=object), [len(r[0]) for r in ranked.values()]),
            "rank": np.concatenate([r[0] for r in ranked.values()]),
            "dataset_index": np.concatenate([r[1] for r in shown.values()]),
            "loss": np.concatenate([r[2] for r in ranked.values()]),
            **{k: np.array([v for columns in named.values() for v in columns[j]], dtype=object)
               for j, k in enumerate(names)}}, columns=list(CSV_COLUMNS) + names)
        self.results[runner.loader_key] = table
        if is_main_process():  # DDP: loggers live on rank 0
            if self._logdir is not None:
                _write_ranked_csv(os.path.join(self._logdir, f"interpretation_{runner.loader_key}.csv"), shown,
                                  names, named)
            self._publish(runner, ranked)
            if self._explained:
                self._publish_explanations(runner)
        self._losses, self._indices, self._explained = defaultdict(list), [], []
        self._extremes = {leaf.path: _Extremes(self.top_k) for leaf in self._graph.leaves}

    def _sample_names(self, runner: Any) -> Any:
        """`describe(index) -> {name: value}` for the loader's dataset, cached per index; `{}` for all
        samples when the dataset does not name them (or naming one fails, with a warning)."""
        describe, cache = sample_describer(getattr(runner, "loader", None)), {}
        if self._mixed is not None:  # global ids: the mixed dataset names the source and the sample in it
            describe = self._mixed.describe

        def names(index: int) -> Dict[str, Any]:
            nonlocal describe
            if describe is None:
                return {}
            if index not in cache:
                try:
                    cache[index] = dict(describe(index))
                except Exception as e:  # naming is a courtesy: a dataset that cannot do it still gets ranked
                    warnings.warn(f"InterpretationCallback: the samples are shown by dataset index only: naming "
                                  f"sample {index} failed ({type(e).__name__}: {e})", stacklevel=2)
                    describe = None
                    return {}
            return cache[index]

        return names

    # Publishing ----------------------------------------------------------------------------------
    def _publish(self, runner: Any, ranked: Dict[str, Tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
        """Per task: a table of the ranked samples (rank, dataset index, what names them, label,
        prediction, loss), and their inputs, captioned with label, prediction and loss where the
        publisher takes a `caption` (images get a caption strip)."""
        dataset = getattr(getattr(runner, "loader", None), "dataset", None)
        inputs = _InputReader(dataset if self._mixed is None else self._mixed, self._publisher, self._warn_inputs)
        tasks = {leaf.path: leaf.task for leaf in self._graph.leaves}
        for path, (ranks, indices, losses) in ranked.items():
            ranks, indices, losses = ranks.tolist(), indices.tolist(), losses.tolist()
            infos = [self._describe(i) for i in indices]
            names = list(dict.fromkeys(k for info in infos for k in info))
            texts = [self._label_and_prediction(tasks[path], path, i) for i in indices]
            lines = ["| " + " | ".join(["rank", "dataset index", *names, "label", "prediction", "loss"]) + " |",
                     "|---:|---:|" + "---|" * (len(names) + 2) + "---:|"]
            shown = self._local(torch.tensor(indices, dtype=torch.int64)).tolist() if indices else []
            lines += ["| " + " | ".join([str(r), str(i), *(_cell(info.get(k, "")) for k in names), _cell(label),
                                         _cell(prediction), f"{loss:.6g}"]) + " |"
                      for r, i, info, (label, prediction), loss in zip(ranks, shown, infos, texts, losses)]
            log_text(runner, f"{path}/interpretation", "\n".join(lines))
            n = ranks[-1] if ranks else 0
            heats = self._heat_maps(runner, inputs, path, [int(i) for i in indices]) if self.attribution else {}
            for r, i, info, (label, prediction), loss in zip(ranks, indices, infos, texts, losses):
                position = f"worst/{r}" if r <= self.top_k else f"best/{n - r + 1}"
                caption = sample_caption(label, prediction, loss, info)
                found = inputs(int(i))
                for key, value, publisher in found:
                    if _takes_caption(publisher):
                        publisher.publish(runner, f"{path}/{position}/{key}", value, caption=caption)
                    else:
                        publisher.publish(runner, f"{path}/{position}/{key}", value)
                if heats:
                    self._publish_attribution(runner, heats, int(i), f"{path}/{position}", found, caption)

    def _heat_maps(self, runner: Any, inputs: "_InputReader", path: str,
                   indices: Sequence[int]) -> Dict[Tuple[int, str], Tensor]:
        """`{(sample index, image key): heat map (H, W)}` of task `path`'s loss on its ranked samples,
        over each image input (those whose publisher draws images, `to_hwc_uint8`), all samples
        attributed in one batch."""
        keys = [key for key, _, publisher in (inputs(indices[0]) if indices else []) if hasattr(publisher, "to_hwc_uint8")]
        if not keys:
            if indices and not self._warned_attribution:
                self._warned_attribution = True
                warnings.warn(f"InterpretationCallback: attribution={self.attribution!r} found no image input to draw "
                              f"the heat map over (task {path!r}); nothing attributed", stacklevel=3)
            return {}
        xs, ys = [], []
        for i in indices:
            item = inputs.dataset[i]
            x, y = (item[0], item[1]) if isinstance(item, (tuple, list)) and len(item) > 1 else (item, None)
            if not isinstance(y, Mapping) or path not in y:
                raise KeyError(f"InterpretationCallback: attribution of task {path!r} needs the label of sample {i}, "
                               f"but dataset[{i}] gives no label for it (a dataset of (X, y) pairs, as "
                               "flow.get_dataset builds them, has it)")
            xs.append(x)
            ys.append(y[path])
        x, labels = default_collate(xs), default_collate(ys)
        out = {}
        for key in keys:
            try:
                heat = attr.attribute(unwrap(runner.model), x, labels, path, key, self.attribution,
                                      self.attribution_layer, flow=self._flow, options=self.attribution_options)
            except Exception as e:
                raise RuntimeError(f"InterpretationCallback: attribution={self.attribution!r} of task {path!r} on "
                                   f"samples {list(indices)}, input {key!r} failed: {type(e).__name__}: {e}") from e
            out.update({(i, key): heat[j] for j, i in enumerate(indices)})
        return out

    def _publish_attribution(self, runner: Any, heats: Mapping[Tuple[int, str], Tensor], index: int, where: str,
                             found: Sequence[Tuple[str, Any, Any]], caption: str) -> None:
        """The sample's heat maps blended over its images, as `<where>/attribution` (one image) or
        `<where>/attribution/<key>` (several)."""
        images = [(key, value, publisher) for key, value, publisher in found if (index, key) in heats]
        for key, value, publisher in images:
            picture = attr.overlay(publisher.to_hwc_uint8(value), heats[(index, key)])
            tag = f"{where}/attribution" + (f"/{key}" if len(images) > 1 else "")
            note = f"{caption}\nattribution: {self.attribution} of the loss"
            if _takes_caption(publisher):
                publisher.publish(runner, tag, picture, caption=note)
            else:
                publisher.publish(runner, tag, picture)

    def _label_and_prediction(self, task: Any, path: str, index: int) -> Tuple[str, str]:
        row = self._extremes[path].rows.get(int(index))
        if row is None:  # not kept (cannot happen for a ranked sample; a guard, not a path)
            return "?", "?"
        return label_and_prediction(task, row[0], row[1])

    def _publisher(self, key: str, value: Any) -> Any:
        if key in self.publishers:
            return self.publishers[key]
        for publisher in self.default_publishers:
            if publisher.accepts(value):
                return publisher
        return None

    def _warn_inputs(self, why: str) -> None:
        if not self._warned_inputs:
            self._warned_inputs = True
            warnings.warn(f"InterpretationCallback: inputs of the ranked samples are not published: {why}", stacklevel=3)

    def _publish_explanations(self, runner: Any) -> None:
        if self._explainer is None:
            self._explainer = self._flow.get_treelib_explainer()
        samples = sorted(self._explained, key=lambda s: s[0])
        # No decoded values nor masks: the explainer decodes with the decoders as they are now
        # (thresholds tuned on this loader included) and takes preconditions from those decisions.
        outputs = {part: {leaf.path: torch.cat([s[1][part][leaf.path] for s in samples]) for leaf in self._graph.leaves}
                   for part in (LOGITS, ACTIVATED)}
        ids = [s[0] for s in samples]
        local = self._local(torch.tensor(ids, dtype=torch.int64)).tolist()
        # roots: "inp 3 (row 'r3', file a/3.png)"; from a mixed loader "inp 3 (source 'coco', row ...)"
        names = [_sample_name(i, self._describe(g)) for g, i in zip(ids, local)]
        for gid, index, tree in zip(ids, local, self._explainer(outputs, ids=names)):
            text = tree.show(stdout=False, sorting=False)
            where = f"{self._mixed.names[int(self._mixed.split(gid)[0])]}/" if self._mixed is not None else ""
            log_text(runner, f"explanations/{where}sample_{index}", "```\n" + text + "\n```")

    def _gather_across_processes(self) -> None:
        """Under DDP, every process ranks the losses of all processes (a no-op in one process)."""
        import torch.distributed as dist

        if world_size() <= 1:
            return
        gathered: List[Any] = [None] * dist.get_world_size()
        extremes = {p: e.rows for p, e in self._extremes.items()}
        dist.all_gather_object(gathered, (dict(self._losses), self._indices, self._explained, extremes))
        losses: Dict[str, List[Tensor]] = defaultdict(list)
        indices: List[Tensor] = []
        explained: List[Any] = []
        for part_losses, part_indices, part_explained, part_extremes in gathered:
            for p, chunks in part_losses.items():
                losses[p].extend(chunks)
            indices.extend(part_indices)
            explained.extend(part_explained)
            for p, rows in part_extremes.items():  # each process kept its own candidates: the ranked are among them
                self._extremes[p].rows.update(rows)
        self._losses, self._indices, self._explained = losses, indices, explained
