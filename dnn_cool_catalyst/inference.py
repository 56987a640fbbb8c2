"""Predict, infer, tune and evaluate over a loader: plain functions of `(model, flow, loader)`.

Core (torch, numpy, pandas; never Catalyst): usable from a plain PyTorch loop, e.g.

    predictions = inference.infer(model, flow, test_loader)        # {part: {path: numpy array}}
    table = inference.evaluate(model, flow, valid_loader)           # the flow's evaluation table
    tuned = inference.tune(model, flow, valid_loader, metric="f1")  # {path: params}, kept in the decoders

`FlowRunner.predict` / `infer` / `tune` / `evaluate` call these with the runner's model and flow.
`model` is anything that maps `X` to the flow module's outputs (`{"logits", "mask", ...}`):
`flow.torch()` itself, or a module that computes features and calls it. The loader yields `(X, y)`
pairs as `flow.get_dataset(inputs, labels)` builds them, or `X` alone (`predict`/`infer` only).
`name` (keyword) is how errors name the caller, e.g. `"FlowRunner.infer"`.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Tuple

import pandas as pd
import torch
from torch import Tensor, nn

from .batches import check_first_batch, concat_rows, split_batch, to_device
from .distributed import unwrap
from .errors import capped
from .functional import element_dims, per_element_mask
from .keys import ACTIVATED, DECODED, GT, INDEX, LOGITS, MASK, SOURCE

PARTS = (LOGITS, ACTIVATED, DECODED, MASK)
PRECONDITIONS = ("predicted", "gt")

#: `((source name, task paths it labels), ...)` in the order of the sources' positions (`X["source"]`).
SourceLayout = Tuple[Tuple[str, FrozenSet[str]], ...]


def mixed_dataset(loader: Any) -> Optional[Any]:
    """The dataset that mixes sources behind `loader` (a `MixedDataset`, told by its
    `source_names`), looked up through wrappers that keep their dataset in `.dataset` (accelerate's
    loaders, the runner's batch fetching); None for any other loader."""
    obj, seen = getattr(loader, "dataset", None), set()
    while obj is not None and id(obj) not in seen:
        seen.add(id(obj))
        if getattr(obj, "source_names", None) is not None:
            return obj
        obj = getattr(obj, "dataset", None)
    return None


def mixed_sources(loader: Any) -> Optional[SourceLayout]:
    """The sources of a loader whose dataset mixes several (`mixed_dataset`):
    `((name, frozenset of the task paths the source labels), ...)`, position order, so that
    `layout[X["source"][i]]` is sample i's source. None for any other loader (a plain dataset, a
    list of batches): per-source results then cost nothing."""
    dataset = mixed_dataset(loader)
    if dataset is None:
        return None
    return tuple((str(name), frozenset(dataset.labelled_paths(name))) for name in dataset.source_names)


UNCERTAINTY = "uncertainty"


def missing_marker(task: Any, dtype: torch.dtype) -> Any:
    """The value that marks a label element missing for `task` in `dtype` (NaN for float labels,
    else the task's `missing`, e.g. -1 for classes): what padding positions of its labels get."""
    if dtype.is_floating_point:
        return float("nan")
    marker = getattr(task, "missing", None)
    if marker is None or marker != marker:  # NaN: not representable in an integer dtype
        raise ValueError(f"task {getattr(task, 'name', task)!r}: integer labels ({dtype}) but no integer missing marker "
                         "to pad them with; give its labels padded to the same length in every batch")
    return marker


def join_batches(chunks: List[Dict[str, Tensor]], graph: Any, what: str, name: str,
                 fill: Any = 0) -> Dict[str, Tensor]:
    """`{path: tensor}` of the batches joined along the first dimension (`batches.concat_rows`);
    the tasks with element dimensions (`ITask.element_dims`) whose batches have different lengths
    (batches padded each to its longest sequence) are padded to the longest, with `fill` (a value,
    or `fill(task, dtype)`). Padding positions are masked out (`fill=False` for the masks) and their
    labels are missing (`missing_marker`), so nothing downstream counts them. Any other shape
    mismatch between batches raises `ValueError` naming the task and `what` (logits, targets...)."""
    if not chunks:
        return {}
    padded = []
    for p in chunks[0]:
        tensors = [c[p] for c in chunks]
        shapes = list(dict.fromkeys(tuple(t.shape[1:]) for t in tensors))
        if len(shapes) == 1:
            continue
        task = graph.leaf(p).task if p in graph.paths else None
        k = element_dims(task) if task is not None else 0
        trailing = {s[k:] for s in shapes}
        if not k or len({len(s) for s in shapes}) > 1 or len(trailing) > 1:
            raise ValueError(f"{name}: the {what} of task {p!r} have different shapes in different batches "
                             f"({capped(shapes)} after the batch dimension)"
                             + (": only its element dimensions may differ, each batch padded to its own longest"
                                if k else "; batches must agree on every dimension but the first"))
        longest = tuple(max(s[j] for s in shapes) for j in range(k))
        value = fill(task, tensors[0].dtype) if callable(fill) else fill
        out = []
        for t in tensors:
            if tuple(t.shape[1:1 + k]) == longest:
                out.append(t)
                continue
            full = t.new_full((t.shape[0], *longest, *t.shape[1 + k:]), value)
            full[(slice(None), *(slice(0, d) for d in t.shape[1:1 + k]))] = t
            out.append(full)
        padded.append((p, out))
    if not padded:
        return concat_rows(chunks)
    chunks = [dict(c) for c in chunks]
    for p, out in padded:
        for c, t in zip(chunks, out):
            c[p] = t
    return concat_rows(chunks)


@torch.no_grad()
def predict(model: nn.Module, flow: Any, loader: Any, preconditions: str = "predicted", *,
            name: str = "predict", mc_samples: Optional[int] = None, mc_seed: Optional[int] = None) -> Dict[str, Any]:
    """Predictions over `loader`, in dataset order (by `X["index"]` when batches carry it).

    Returns `{"logits", "activated", "decoded", "mask", "targets"}`, each `{path: tensor}` on the
    CPU (`targets` None when the loader yields only `X`), and `"index"` (dataset indices). From a
    loader that mixes sources (batches with `X["source"]`, as `MixedDataset.loader` gives them)
    also `"source"` (each sample's source position), the order then by source, then index.
    `preconditions="predicted"` (default) computes masks from the decoded predictions, as at
    inference (`X["gt"]` is dropped); `"gt"` from `X["gt"]`.

    Tasks with element dimensions (`element_dims=1`: one output per token) give `(N, T, ...)`
    outputs and `(N, T)` masks (a per-sample precondition broadcast over the tokens; padding
    positions, `X["elements"]` False, never apply). Batches padded each to its own longest
    sequence are padded to the longest of the loader: outputs with 0, masks with False, labels
    with the task's missing marker (`join_batches`), so padding is never scored. The model runs in eval mode and gets
    its training mode back afterwards; a `DistributedDataParallel` wrapper is bypassed (each
    process predicts alone).

    `mc_samples=n` also samples `n` MC-dropout passes of each batch (`uncertainty.mc_dropout`,
    preconditions from each pass's decisions whatever `preconditions` says; `mc_seed` seeds them
    without touching the global random state) and adds `"uncertainty"`: `{path: {"mean",
    "variance", "entropy", "mutual_information", "applied", "applies", "decoded"}}` (entropy and
    mutual information for classifiers only), in the same sample order. The predictions themselves
    stay those of the model in eval mode.
    """
    if preconditions not in PRECONDITIONS:
        raise ValueError(f"preconditions must be 'predicted' or 'gt', got {preconditions!r}")
    if model is None:
        raise ValueError(f"{name}: there is no model")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module  # after training under torchrun the process group is gone
    reads_inputs = unwrap(model) is flow.torch()

    if mc_samples is not None:
        from .uncertainty import check_dropout, dropout_mode, sample_passes, seeded_rng

        check_dropout(model)  # before any batch: a model without dropout is refused at once
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    parts: Dict[str, List[Dict[str, Tensor]]] = {k: [] for k in PARTS}
    targets: List[Dict[str, Tensor]] = []
    indices: List[Tensor] = []
    sources: List[Tensor] = []
    uncertain: List[Dict[str, Dict[str, Tensor]]] = []
    first = True
    rng = seeded_rng(model, mc_seed) if mc_samples is not None else contextlib.nullcontext()
    try:
        with rng:  # one seeded stream for the whole loader: batches get different masks
            for batch in loader:
                x, y = split_batch(batch, "infer", allow_inputs_only=True)
                if first and preconditions == "gt":
                    check_first_batch(flow, x, y, "infer", reads_inputs=reads_inputs)
                first = False
                if preconditions == "predicted":
                    x = {k: v for k, v in x.items() if k != GT}
                xd = to_device(x, device)
                out = model(xd)
                if mc_samples is not None:
                    with dropout_mode(model):
                        uncertain.append(sample_passes(model, xd, mc_samples, flow.graph))
                activated = out.get(ACTIVATED) or flow.get_activation()(out[LOGITS])
                decoded = out.get(DECODED) or flow.get_decoder()(activated)
                # a per-element task's mask per element (N, *E), also where its precondition is per sample
                masks = {leaf.path: per_element_mask(leaf.task, out[MASK][leaf.path], activated[leaf.path])
                         for leaf in flow.graph.leaves}
                for key, value in ((LOGITS, out[LOGITS]), (ACTIVATED, activated), (DECODED, decoded), (MASK, masks)):
                    parts[key].append({p: t.detach().cpu() for p, t in value.items()})
                if y is not None:
                    targets.append({p: t.detach().cpu() for p, t in y.items()})
                if isinstance(x.get(INDEX), Tensor):
                    indices.append(x[INDEX].detach().cpu().reshape(-1))
                if isinstance(x.get(SOURCE), Tensor):
                    sources.append(x[SOURCE].detach().cpu().reshape(-1).long())
    finally:
        model.train(was_training)
    graph = flow.graph
    # batches padded each to its own longest sequence: per-element tasks padded to the longest of all
    result: Dict[str, Any] = {k: join_batches(v, graph, k, name, fill=False if k == MASK else 0)
                              for k, v in parts.items()}
    if not result[LOGITS]:
        raise ValueError(f"{name}: the loader yielded no batches (an empty dataset, or a sampler or "
                         f"drop_last=True leaving none): give it a loader with samples")
    result["targets"] = join_batches(targets, graph, "targets", name, fill=missing_marker) if targets else None
    if uncertain:
        result[UNCERTAINTY] = {}
        for p in uncertain[0]:
            joined = {k: join_batches([{p: u[p][k]} for u in uncertain], graph, f"uncertainty[{k!r}]", name,
                                      fill=False if k == "applies" else 0)[p] for k in uncertain[0][p]}
            result[UNCERTAINTY][p] = joined
    n = next(iter(result[LOGITS].values())).shape[0]
    index = torch.cat(indices) if indices else torch.arange(n)
    source = torch.cat(sources) if sources else None
    if source is not None and source.numel() != n:
        raise ValueError(f"{name}: only some batches of the loader carry X[{SOURCE!r}] ({source.numel()} of {n} "
                         f"samples): a loader that mixes sources must give it in every batch")
    if indices and index.numel() == n:
        order = torch.argsort(index, stable=True)
        if source is not None:  # indices count within each source: by source, then index
            order = order[torch.argsort(source[order], stable=True)]
        for key in (*PARTS, "targets"):
            if result[key] is not None:
                result[key] = {p: t[order] for p, t in result[key].items()}
        if UNCERTAINTY in result:
            result[UNCERTAINTY] = {p: {k: t[order] for k, t in u.items()} for p, u in result[UNCERTAINTY].items()}
        index = index[order]
        source = source[order] if source is not None else None
    result[INDEX] = index
    if source is not None:
        result[SOURCE] = source
    return result


def infer(model: nn.Module, flow: Any, loader: Any, preconditions: str = "predicted", *,
          name: str = "infer", mc_samples: Optional[int] = None, mc_seed: Optional[int] = None) -> Dict[str, Any]:
    """`predict` with numpy arrays instead of tensors: `{"logits", "activated", "decoded", "mask",
    "targets"}`, each `{path: numpy array}` (`targets` None without labels), and `"index"`
    (and `"uncertainty"`, `{path: {statistic: numpy array}}`, with `mc_samples`)."""
    result = predict(model, flow, loader, preconditions, name=name, mc_samples=mc_samples, mc_seed=mc_seed)
    out: Dict[str, Any] = {}
    for key, value in result.items():
        if key == UNCERTAINTY:
            out[key] = {p: {k: t.numpy() for k, t in u.items()} for p, u in value.items()}
        elif isinstance(value, Mapping):
            out[key] = {p: t.numpy() for p, t in value.items()}
        elif isinstance(value, Tensor):
            out[key] = value.numpy()
        else:
            out[key] = value
    return out


def predict_labelled(model: nn.Module, flow: Any, loader: Any, *, name: str, mc_samples: Optional[int] = None,
                     mc_seed: Optional[int] = None) -> Dict[str, Any]:
    """`predict` with preconditions from `X["gt"]`, for a loader that must yield `(X, y)` pairs."""
    result = predict(model, flow, loader, "gt", name=name, mc_samples=mc_samples, mc_seed=mc_seed)
    if result["targets"] is None:
        raise TypeError(f"{name} needs labels: the loader must yield (X, y) pairs")
    return result


def tune(model: nn.Module, flow: Any, loader: Any, metric: Any = "accuracy", apply: bool = True, *,
         name: str = "tune") -> Dict[str, Dict[str, Any]]:
    """Tune every tunable decoder of `flow` on `loader` (samples in `S_t`, from `X["gt"]`) for
    `metric`; returns `{path: params}`. `apply` keeps them in the decoders (else they are left as
    they were). The decoders are the tasks', shared by every flow of one `Tasks`
    (`FlowDecoder`)."""
    from .interpreters.decoding import merge_report

    result = predict_labelled(model, flow, loader, name=name)
    decoder = flow.get_decoder()
    paths = list(decoder.params())
    params, report = decoder.fit({p: result[ACTIVATED][p] for p in paths}, {p: result["targets"][p] for p in paths},
                                 masks={p: result[MASK][p] for p in paths}, metric=metric)
    if apply:  # fitting is pure: applying is this function's act
        decoder.load_tuned(params)
    return merge_report(params, report)


def evaluate(model: nn.Module, flow: Any, loader: Any, preconditions: str = "gt", *,
             name: str = "evaluate", mc_samples: Optional[int] = None, mc_seed: Optional[int] = None) -> pd.DataFrame:
    """The flow's evaluation table on `loader` (`task_path, metric_name, metric_res, num_samples`):
    `flow.get_evaluator()` on the activated predictions (made with masks from `X["gt"]`), with
    the evaluator's preconditions from the labels (`"gt"`) or from the predictions (`"predicted"`).

    On a loader that mixes sources (its dataset has `source_names`, e.g. a `MixedDataset`) the
    table gains a first column `source`: the rows over all samples keep it empty (`""`), and
    below them each source has the rows of the tasks it labels, computed on its samples alone.

    `mc_samples=n` adds the columns `entropy` (classifiers) and `variance` (other tasks): their
    mean over the samples scored, from `n` MC-dropout passes (`predict`; `FlowEvaluator`)."""
    result = predict_labelled(model, flow, loader, name=name, mc_samples=mc_samples, mc_seed=mc_seed)
    evaluator = flow.get_evaluator()
    uncertainty = result.get(UNCERTAINTY)
    table = evaluator(result[ACTIVATED], result["targets"], preconditions=preconditions, uncertainty=uncertainty)
    layout = mixed_sources(loader)
    if layout is None:
        return table
    if SOURCE not in result:
        raise ValueError(f"{name}: the loader's dataset mixes sources {[s for s, _ in layout]} but its batches carry "
                         f"no X[{SOURCE!r}]; use the MixedDataset's own loader (MixedDataset.loader)")
    tables = [table.assign(source="")]
    for position, (source, labelled) in enumerate(layout):
        rows = torch.nonzero(result[SOURCE] == position).reshape(-1)
        paths = [p for p in flow.graph.paths if p in labelled]
        if not rows.numel() or not paths:
            continue
        pick = lambda parts: {p: t[rows] for p, t in parts.items()}  # noqa: E731
        part = evaluator(pick(result[ACTIVATED]), pick(result["targets"]), preconditions=preconditions,
                         uncertainty={p: pick(u) for p, u in uncertainty.items()} if uncertainty else None)
        tables.append(part[part["task_path"].isin(paths)].assign(source=source))
    out = pd.concat(tables, ignore_index=True)
    return out[["source", *table.columns]]
