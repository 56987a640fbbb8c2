"""`FlowMetricsCallback`: per-task losses and metrics over a whole loader, as `<path>/<metric>`."""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
from catalyst.core.callback import Callback, CallbackOrder
from torch import Tensor

from ..distributed import collective_device, world_size
from ..functional import and_masks, element_dims, element_rows
from ..inference import SourceLayout, mixed_sources
from ..keys import ACTIVATED, DECODED, LOGITS, LOSS_TERMS, MASK, METRIC_STATES, SOURCE
from ..metrics import ConfusionMatrixMetric
from .batch import ChunkBuffer, StackedLossTerms, gather_kept, labelled_batch
from .common import loader_selected, resolve_callback_flow
from .loader_outputs import LoaderOutputs, shared_outputs
from .publishers import log_confusion_matrix, log_pr_curve

#: The order of the flow callbacks (metrics, tuning, interpretation). Among themselves they may run
#: in any order: thresholds tuned on a loader are in place before any of them decodes at its end
#: (`LoaderOutputs.before_decoding`), whichever comes first.
METRICS_ORDER = CallbackOrder.Metric

#: With metric states computed inside DataParallel replicas, they are added up every this many batches.
STATES_PER_MERGE = 64


class FlowMetricsCallback(Callback):
    """Per-task losses and every default metric of the flow, exact over the whole loader.

    Losses are accumulated from the `(sum, count)` terms of the flow loss and metrics from their
    sum/count states, so the loader values are what one batch holding the whole loader would give
    (not a mean of batch means). At each loader's end `runner.loader_metrics` receives:

    - `loss`: the flow loss over the loader (`sum_t weight_t * sum_t / max(count_t, 1)`),
    - `<path>/loss`: each task's mean loss over its `S_t` (NaN when no sample was in `S_t`),
    - `<path>/<metric>`: each default metric of each task,

    so that Catalyst's loggers, checkpoint selection and early stopping can use them. Per batch,
    `runner.batch_metrics` gets `<path>/loss` (`log_batch_losses`).

    A per-token task (`ITask.element_dims`, labels `(N, T)`) is measured over its tokens: each
    token of `S_t` counts as one sample in its metrics and PR curve (`FlowMetrics`), with masks per
    token `(N, T)` or per sample; batches may have different numbers of tokens (a collate padding
    each batch to its longest sample): the chunks of batches kept here never join two of them.

    Several sources: when the loader's dataset mixes sources (`dcc.MixedDataset`, whose batches
    carry `X["source"]`), each metric is also computed over each source's samples alone, as
    `<source>/<path>/<metric>`, for the tasks that source labels (`labelled_paths`): the value one
    batch holding all of that source's samples of the loader would give, exact under DDP as the
    overall ones. They are updated with the chunks of batches (a source's mask is the task's mask
    and the source's rows), so a plain loader pays nothing and a mixed one one comparison per source
    and chunk. On loaders that do not train each task's loss is logged per source too,
    `<source>/<path>/loss` (the flow loss's terms over the source's rows: one more loss evaluation
    per source and batch). Not with DataParallel memory balancing (the replicas reduce the states
    of the whole batch): a warning says so once and only the overall values are logged.

    Batches whose metric states were computed inside DataParallel replicas (`"metric_states"` in
    `runner.batch`, see `runners.balance`) are merged as they are; only the decoded metrics of
    tunable tasks on loaders that do not train are computed here, from the gathered activated
    outputs. Under DDP, loss terms and metric states are summed over the processes at each
    loader's end (every process then holds the global values; only rank 0 logs them).

    Args:
        flow: the `TaskFlow` (default: `runner.flow`).
        loaders: loader keys to measure (default: all).
        log_batch_losses: also put per-task losses of each batch into `runner.batch_metrics`.
        deferred_decoding: on loaders that do not train, decoded metrics of tasks with tunable
            decoders (thresholds) are computed at the loader's end from the kept activated outputs,
            with the decoder as it is then, so thresholds tuned on that loader apply to its metrics.
        pr_curves: log a precision-recall curve per thresholded task and loader that does not train,
            to the loggers that have `log_pr_curve` (e.g. `FlowTensorboardLogger`): `<path>/pr_curve`
            for a binary task, `<path>/pr_curve/<class>` per class of a multilabel task (the class's
            name from `class_names`, else its index), each over the available labels of `S_t` (the
            tokens of `S_t` for a per-token task, `ITask.element_dims`).
        confusion_matrices: log a confusion-matrix image per classification task and loader that
            does not train, `<path>/confusion_matrix` (rows = truth, columns = top-1 prediction,
            `callbacks.publishers.confusion_matrix_image`), through `runner.log_image`. It is drawn
            from the metrics' confusion-matrix state at the loader's end: no work per batch.
        buffer_elements: metrics are updated once per chunk of batches holding about this many
            output elements (the result is the same; per-batch updates of many small tasks cost
            more than a small model's training step).
        per_source: on a loader that mixes sources, also log `<source>/<path>/<metric>`.
    """

    def __init__(self, flow: Any = None, loaders: Optional[Sequence[str]] = None, log_batch_losses: bool = True,
                 deferred_decoding: bool = True, pr_curves: bool = True, buffer_elements: int = 2 ** 24,
                 confusion_matrices: bool = True, per_source: bool = True):
        super().__init__(order=METRICS_ORDER)
        self.flow = flow
        self.loaders = list(loaders) if loaders is not None else None
        self.log_batch_losses = log_batch_losses
        self.deferred_decoding = deferred_decoding
        self.pr_curves = pr_curves
        self.confusion_matrices = confusion_matrices
        self.buffer_elements = int(buffer_elements)
        self.per_source = per_source
        # set at the experiment's start
        self._flow: Any = None
        self._leaves: Sequence[Any] = ()
        self._paths: List[str] = []
        self._paths_tuple: Tuple[str, ...] = ()
        self._loss_keys: List[str] = []
        self._loss: Any = None
        self._weights: Dict[str, float] = {}
        self._metrics: Any = None
        self._groups: Dict[str, Any] = {}
        self._decoded_paths: Set[str] = set()  # tasks with metrics of decoded predictions
        self._tunable: Set[str] = set()
        self._binary: Set[str] = set()
        self._curved: Set[str] = set()
        self._buffer = ChunkBuffer(self.buffer_elements)
        self._source_metrics: Dict[str, Any] = {}  # per source name: a FlowMetrics, made on first use
        self._elements: Dict[str, int] = {}  # tasks with element dimensions: their element_dims
        self._warned_reduced = False
        # set at each loader's start
        self._reset_loader(active=False)

    def _reset_loader(self, active: bool, defer: Set[str] = frozenset(), keep: Set[str] = frozenset()) -> None:
        self._active = active
        self._buffer.clear()
        self._states: List[Tensor] = []  # per batch: (tasks, 2) loss sums and counts, in flow order
        self._sums: Optional[Tensor] = None
        self._counts: Optional[Tensor] = None
        self._user_loss = [0.0, 0]  # sum of batch losses * batch size, samples (criterion without terms)
        self._pending_states: List[Dict[str, Tensor]] = []  # metric states reduced in DataParallel replicas
        self._reduced = False
        self._defer: Set[str] = set(defer)  # tasks whose decoded metrics wait for the loader's end
        self._keep: Set[str] = set(keep)  # tasks whose activated outputs are kept over the loader
        self._shared: Optional[LoaderOutputs] = None
        # several sources: (position, name, labelled paths, FlowMetrics) per source, or () for a plain loader
        self._per_source: Tuple[Tuple[int, str, frozenset, Any], ...] = ()
        self._kept_sources: List[Tensor] = []  # X["source"] of each batch, for the deferred decoded metrics
        self._source_terms: Dict[int, List[Tensor]] = {}  # per source position: (tasks, 2) loss terms per batch
        self._element_shapes: Optional[Tuple[Any, ...]] = None  # per-token tasks' in the buffer

    # Setup ---------------------------------------------------------------------------------------
    def on_experiment_start(self, runner: Any) -> None:
        self._flow = resolve_callback_flow(self.flow, runner, type(self).__name__)  # the given flow, else the runner's
        self._leaves = self._flow.graph.leaves
        self._paths = [leaf.path for leaf in self._leaves]
        self._paths_tuple = tuple(self._paths)
        self._loss_keys = [f"{p}/loss" for p in self._paths]
        self._loss = self._flow.get_loss()
        self._weights = self._loss.weights
        self._metrics = self._flow.get_metrics()
        self._groups = self._metrics.groups_by_path  # metrics counting the same states are updated once
        self._decoded_paths = {p for p, groups in self._groups.items() if any(g.uses != "activated" for g in groups)}
        self._tunable = {leaf.path for leaf in self._leaves if leaf.task.decoder.params()}
        self._binary = {leaf.path for leaf in self._leaves if leaf.task.can_condition}
        # PR curves: binary tasks, and per class the thresholded tasks with several classes (multilabel)
        self._curved = self._binary | {leaf.path for leaf in self._leaves if leaf.task.decides_by_threshold}
        self._buffer = ChunkBuffer(self.buffer_elements)
        self._source_metrics = {}
        self._elements = {leaf.path: element_dims(leaf.task) for leaf in self._leaves if element_dims(leaf.task)}
        self._reset_loader(active=False)

    def on_loader_start(self, runner: Any) -> None:
        if not loader_selected(runner, self.loaders, "all"):
            self._reset_loader(active=False)
            return
        evaluating = not runner.is_train_loader
        defer = self._tunable if self.deferred_decoding and evaluating else set()
        keep = set(defer) | (self._curved & self._tunable if self.pr_curves and evaluating else set())
        self._reset_loader(active=True, defer=defer, keep=keep)
        self._metrics.reset()
        layout = mixed_sources(runner.loader) if self.per_source else None
        if layout:
            self._start_sources(layout)
        # the activated outputs kept over the loader are shared with the tuning callback
        self._shared = shared_outputs(runner, self._flow)
        self._shared.start(self, [p for p in self._paths if p in keep], self.buffer_elements)

    def _start_sources(self, layout: SourceLayout) -> None:
        """Per-source metrics for this loader, reset (only for the task paths of this flow)."""
        paths = set(self._paths)
        per_source = []
        for position, (name, labelled) in enumerate(layout):
            metrics = self._source_metrics.get(name)
            if metrics is None:
                metrics = self._source_metrics[name] = self._flow.get_metrics()
            metrics.reset()
            per_source.append((position, name, frozenset(labelled) & paths, metrics))
        self._per_source = tuple(per_source)

    # Per batch: losses now, metrics per chunk of batches -------------------------------------------
    # No `torch.no_grad()` around the per-batch handler: switching the grad mode off and on costs
    # more than the rest of it in a training loop, and nothing here records a graph (loss terms
    # come detached, kept tensors are detached, the rest runs under no_grad where it computes).
    def on_batch_end(self, runner: Any) -> None:
        batch = labelled_batch(runner, type(self).__name__, self._active)
        if batch is None:  # not measured here, or an inference loader without labels
            return
        _, targets, outputs = batch
        n = batch.size
        terms = runner.batch.get(LOSS_TERMS)
        if terms is None:
            with torch.no_grad():
                terms = self._loss.terms(outputs, targets)
            loss = runner.batch_metrics.get("loss")
            if loss is not None:
                self._user_loss[0] += float(loss.detach() if isinstance(loss, Tensor) else loss) * n
                self._user_loss[1] += n
        # (tasks, 2): sums and counts; a task's batch mean is NaN where its count is 0 (its sum is 0 then)
        if isinstance(terms, StackedLossTerms) and terms.paths == self._paths_tuple:
            states = terms.stacked  # FlowRunner's, already stacked in flow order
        else:
            states = torch.stack([t for p in self._paths for t in terms[p]]).detach().view(len(self._paths), 2)
        self._states.append(states)
        if self.log_batch_losses:
            means = states[:, 0] / states[:, 1]
            # on the CPU as numbers (one conversion instead of a tensor per task); elsewhere as
            # tensors, so that a GPU is not waited for at every batch
            runner.batch_metrics.update(zip(self._loss_keys, means.tolist() if means.device.type == "cpu"
                                            else means.unbind()))
        reduced = runner.batch.get(METRIC_STATES)
        if reduced is not None:
            if self._per_source:
                self._no_sources_with_reduced_states(runner)
            self._add_reduced(runner, reduced, outputs)
            return
        if self._keep:
            self._shared.add(self, runner)
        source = ACTIVATED if outputs.get(ACTIVATED) else LOGITS
        parts = {source: outputs[source], "targets": targets, MASK: outputs[MASK]}
        if outputs.get(DECODED):  # decisions as taken now, by the decoders of this batch
            parts[DECODED] = {p: d for p, d in outputs[DECODED].items() if p not in self._defer}
        if self._per_source:
            src = self._batch_sources(runner, batch.inputs, n)
            parts[SOURCE] = {SOURCE: src}
            if not runner.is_train_loader:
                self._add_source_losses(outputs, targets, src)
        if self._elements:  # another number of tokens, or masks per sample after masks per token:
            # the buffer joins batches of equal shapes only
            masks = outputs[MASK]
            shapes = tuple((tuple(targets[p].shape[1:1 + k]), masks[p].dim()) for p, k in self._elements.items()
                           if p in targets and p in masks)
            if shapes != self._element_shapes:
                self._flush()
                self._element_shapes = shapes
        self._buffer.add(n, parts)
        if self._buffer.full:
            self._flush()

    def _batch_sources(self, runner: Any, inputs: Any, n: int) -> Tensor:
        """`X["source"]` of the current batch, `(n,)`; kept on the CPU too when deferred decoded
        metrics will need it at the loader's end."""
        src = inputs.get(SOURCE) if hasattr(inputs, "get") else None
        if not isinstance(src, Tensor) or src.numel() != n:
            raise KeyError(f"FlowMetricsCallback: the dataset of loader {runner.loader_key!r} mixes sources "
                           f"({[name for _, name, _, _ in self._per_source]}) but a batch of {n} samples carries "
                           f"{'no' if not isinstance(src, Tensor) else f'{src.numel()} values in'} X[{SOURCE!r}]; "
                           f"use the loader of the MixedDataset (MixedDataset.loader), which adds it")
        src = src.detach().reshape(-1)
        if self._defer:
            self._kept_sources.append(src.cpu())
        return src

    @torch.no_grad()
    def _add_source_losses(self, outputs: Dict[str, Any], targets: Any, src: Tensor) -> None:
        """Each source's loss terms of the batch: the flow loss's `(sum, count)` per task over the
        source's rows (the task's mask and `X["source"] == position`), for `<source>/<path>/loss`
        on loaders that do not train (one more loss evaluation per source and batch there)."""
        logits, masks = outputs[LOGITS], outputs[MASK]
        for position, _, _, _ in self._per_source:
            rows = src == position
            terms = self._loss.terms({LOGITS: logits, MASK: {p: and_masks(masks[p], rows) for p in self._paths}},
                                     targets)
            stacked = torch.stack([t for p in self._paths for t in terms[p]]).view(len(self._paths), 2)
            self._source_terms.setdefault(position, []).append(stacked)

    def _source_losses(self, runner: Any) -> Dict[str, float]:
        """`<source>/<path>/loss` over the loader for each task the source labels: the sum of its
        element losses over the source's samples in `S_t` divided by their count, summed over the
        processes under DDP (every process holds the same sources, in the same order)."""
        if runner.is_train_loader or not self._per_source:
            return {}
        tasks = len(self._paths)
        totals = torch.stack([torch.stack(self._source_terms[position]).double().sum(0).cpu()
                              if self._source_terms.get(position) else torch.zeros(tasks, 2, dtype=torch.float64)
                              for position, _, _, _ in self._per_source])
        if world_size() > 1:
            import torch.distributed as dist

            device = collective_device(getattr(getattr(runner, "engine", None), "device", None))
            totals = totals.to(device)
            dist.all_reduce(totals)
            totals = totals.cpu()
        out = {}
        for (_, name, labelled, _), per_task in zip(self._per_source, totals.tolist()):
            for p, (s, c) in zip(self._paths, per_task):
                if p in labelled:
                    out[f"{name}/{p}/loss"] = s / c if c > 0 else math.nan
        return out

    def _no_sources_with_reduced_states(self, runner: Any) -> None:
        self._per_source = ()
        if not self._warned_reduced:
            self._warned_reduced = True
            warnings.warn(f"FlowMetricsCallback: loader {runner.loader_key!r} mixes sources, but its metric states "
                          f"were reduced inside DataParallel replicas (balance_dataparallel_memory=True), over whole "
                          f"batches: only the overall metrics are logged, not <source>/<path>/<metric>",
                          stacklevel=3)

    def _add_reduced(self, runner: Any, states: Dict[str, Tensor], outputs: Dict[str, Any]) -> None:
        """A batch reduced inside DataParallel replicas: its metric states, and the activated
        outputs of the tasks whose decoded metrics wait for tuning (or get a PR curve)."""
        activated = outputs.get(ACTIVATED) or {}
        if not self._reduced:  # tasks whose activated outputs were not gathered keep their batch-time metrics
            self._reduced = True
            self._defer = {p for p in self._defer if p in activated}
            self._keep = {p for p in self._keep if p in activated}
        self._pending_states.append(states)
        if len(self._pending_states) >= STATES_PER_MERGE:
            self._merge_states()
        if self._keep:
            self._shared.add(self, runner)

    @torch.no_grad()
    def _merge_states(self) -> None:
        """Add the pending reduced metric states to the metrics (deferred decoded metrics excepted)."""
        if not self._pending_states:
            return
        pending, self._pending_states = self._pending_states, []
        summed = {k: torch.stack([d[k] for d in pending]).sum(0) for k in pending[0]}
        for g in self._metrics.groups:
            if g.uses != "activated" and g.path in self._defer:
                continue
            metric = g.owner.metric
            missing = [k for k in metric.states if f"{g.key}/{k}" not in summed]
            if missing:
                raise KeyError(f"FlowMetricsCallback: the reduced metric states have no {g.key}/{missing[0]}; "
                               f"they come from a different flow than the callback's {self._flow.name!r}")
            metric.merge({k: summed[f"{g.key}/{k}"] for k in metric.states})

    @torch.no_grad()
    def _flush(self) -> None:
        """Update the metrics with the kept batches (decoded metrics of deferred tasks wait)."""
        if not len(self._buffer):
            return
        chunk = self._buffer.take()
        activated, logits, decoded = chunk.get(ACTIVATED), chunk.get(LOGITS), chunk.get(DECODED) or {}
        sources = self._source_rows(chunk[SOURCE][SOURCE]) if SOURCE in chunk else ()
        acts: Dict[str, Tensor] = {}
        decs: Dict[str, Tensor] = {}
        for leaf in self._leaves:
            p = leaf.path
            a = activated[p] if activated is not None else leaf.task.activate(logits[p])
            acts[p] = a
            if p not in self._defer and p in self._decoded_paths:
                d = decoded.get(p)
                decs[p] = leaf.task.decode(a) if d is None else d
        predictions = {ACTIVATED: acts, DECODED: decs}  # decoded metrics of deferred tasks wait
        targets, masks = chunk["targets"], chunk[MASK]
        self._metrics.update_states(predictions, targets, masks)  # one kernel per kind (StateStack)
        for labelled, metrics, rows in sources:  # the source's own metrics, on its rows only
            metrics.update_states(predictions, targets, {p: and_masks(masks[p], rows) for p in labelled}, labelled)

    def _source_rows(self, src: Tensor) -> List[Tuple[frozenset, Any, Tensor]]:
        """`(labelled paths, metrics, rows (N,) bool)` of each source, for a chunk's `X["source"]`."""
        return [(labelled, metrics, src == position) for position, _, labelled, metrics in self._per_source]

    # Loader end ----------------------------------------------------------------------------------
    @torch.no_grad()
    def on_loader_end(self, runner: Any) -> None:
        if not self._active:
            return
        try:
            self._shared.before_decoding(runner)  # thresholds tuned on this loader are in place from here on
            if self._states or len(self._buffer):
                self._measure(runner)
        finally:
            self._shared.done(self)

    def _measure(self, runner: Any) -> None:
        """The loader's losses and metrics into `runner.loader_metrics`; PR curves, confusion matrices."""
        self._flush()
        self._merge_states()
        if self._states:
            totals = torch.stack(self._states).double().sum(0)
            self._sums, self._counts = totals[:, 0], totals[:, 1]
        self._reduce_across_processes(runner)
        kept = self._shared.outputs() if self._keep else {}
        sources = self._deferred_source_rows(kept)
        deferred = [leaf for leaf in self._leaves if leaf.path in self._defer and leaf.path in kept]
        if deferred:
            # with the decoders as they are now: thresholds tuned on this loader apply
            decs = {leaf.path: leaf.task.decode(kept[leaf.path][0]) for leaf in deferred}
            targets = {p: kept[p][1] for p in decs}
            masks = {p: kept[p][2] for p in decs}
            self._metrics.update_states({DECODED: decs}, targets, masks)
            for labelled, metrics, rows in sources:
                paths = labelled & decs.keys()
                metrics.update_states({DECODED: decs}, targets, {p: and_masks(masks[p], rows) for p in paths}, paths)
        metrics: Dict[str, float] = {}
        if self._sums is not None:
            for p, s, c in zip(self._paths, self._sums.tolist(), self._counts.tolist()):
                metrics[f"{p}/loss"] = s / c if c > 0 else math.nan
            # the flow loss over the loader, from the loader's (global) terms: the loss's own formula
            terms = {p: (s, c) for p, s, c in zip(self._paths, self._sums, self._counts)}
            metrics["loss"] = float(self._loss.combine(terms, self._weights))
        if self._user_loss[1] > 0:  # a criterion of the user's: the loader loss is its sample-weighted mean
            metrics["loss"] = self._user_loss[0] / self._user_loss[1]
        metrics.update(self._metrics.compute())
        for _, name, labelled, source_metrics in self._per_source:
            metrics.update({f"{name}/{tm.key}": tm.metric.compute() for tm in source_metrics if tm.path in labelled})
        metrics.update(self._source_losses(runner))
        runner.loader_metrics.update(metrics)
        if self.pr_curves and not runner.is_train_loader:
            self._log_pr_curves(runner, kept)
        if self.confusion_matrices and not runner.is_train_loader:
            self._log_confusion_matrices(runner)

    def _deferred_source_rows(self, kept: Dict[str, Tuple[Tensor, Tensor, Tensor]]) -> List[Tuple[frozenset, Any, Tensor]]:
        """`_source_rows` for the kept outputs of the whole loader (every process's, in rank order
        as `LoaderOutputs.outputs` joins them); empty without deferred tasks or sources."""
        if not self._per_source or not any(p in kept for p in self._defer):
            return []
        if world_size() > 1:  # every process calls this (same loader, same sources), as for the outputs
            parts = gather_kept({SOURCE: self._kept_sources})[SOURCE]
        else:
            parts = self._kept_sources
        src = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
        n = next(kept[p][0].shape[0] for p in self._defer if p in kept)
        if src.shape[0] != n:
            raise RuntimeError(f"FlowMetricsCallback: {src.shape[0]} sources kept for {n} kept outputs; the batches "
                               f"offered to LoaderOutputs and to this callback differ")
        return self._source_rows(src)

    def _log_pr_curves(self, runner: Any, kept: Dict[str, Tuple[Tensor, Tensor, Tensor]]) -> None:
        for leaf in self._leaves:
            if leaf.path not in self._curved or leaf.path not in kept:
                continue
            a, y, m = kept[leaf.path]  # on the CPU: selected in numpy, cheaper than tensor indexing
            # a per-token task's curve runs over its tokens: one row per element
            m, a, y = element_rows(element_dims(leaf.task), m, a, y)
            a, y = a.reshape(a.shape[0], -1), y.reshape(y.shape[0], -1)
            if leaf.path in self._binary or y.shape[1] == 1:
                a, y = a[:, :1], y[:, :1]
            available = (leaf.task.available(y).reshape(y.shape) & m.reshape(-1, 1)).numpy()
            labels, scores = y.double().numpy() > 0.5, a.double().numpy()
            names = leaf.task.class_names
            for k in range(y.shape[1]):
                sel = available[:, k]
                if not sel.any():
                    continue
                tag = f"{leaf.path}/pr_curve"
                if y.shape[1] > 1:
                    tag += f"/{names[k] if names is not None and k < len(names) else k}"
                log_pr_curve(runner, tag, labels=labels[sel, k], scores=scores[sel, k])

    def _log_confusion_matrices(self, runner: Any) -> None:
        """One image per classification task, from its confusion-matrix state over the whole loader."""
        for g in self._metrics.groups:
            metric = g.owner.metric
            if not isinstance(metric, ConfusionMatrixMetric):
                continue
            matrix = metric.states["matrix"].detach().cpu().numpy()
            if matrix.size and matrix.sum() > 0:
                log_confusion_matrix(runner, f"{g.path}/confusion_matrix", matrix, g.owner.task.class_names)

    def _reduce_across_processes(self, runner: Any) -> None:
        """Sum the loss terms and metric states of every process (DDP); a no-op in one process.

        Sums and counts are added exactly (`Metric.all_reduce`, which also evens out confusion
        matrices a process saw fewer classes for); the kept activated outputs are gathered by
        `LoaderOutputs.outputs`.
        """
        import torch.distributed as dist

        if world_size() <= 1:
            return
        device = collective_device(getattr(getattr(runner, "engine", None), "device", None))
        if self._sums is not None:
            t = torch.stack([self._sums, self._counts]).to(device)
            dist.all_reduce(t)
            self._sums, self._counts = t[0].cpu(), t[1].cpu()
        user = torch.tensor(self._user_loss, dtype=torch.float64, device=device)
        dist.all_reduce(user)
        self._user_loss = [float(user[0]), int(user[1])]
        self._metrics.all_reduce(device)  # each shared state once; one collective for the scalar states
        for _, _, _, source_metrics in self._per_source:  # the same sources on every process
            source_metrics.all_reduce(device)
