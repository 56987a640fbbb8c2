"""`flow.get_metrics()`: per-task metrics accumulated over a whole loader."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Collection, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .. import distributed
from ..errors import LabelError
from ..functional import element_dims, element_rows
from ..graph import FlowGraph
from ..keys import ACTIVATED, DECODED, LOGITS, MASK
from ..metrics import Metric


@dataclass
class TaskMetric:
    """One metric of one task: `path`, `name`, the metric object and its task."""

    path: str
    name: str
    metric: Metric
    task: Any

    @property
    def key(self) -> str:
        return f"{self.path}/{self.name}"


@dataclass(frozen=True)
class StateGroup:
    """Metrics of one task that count the same states (equal `Metric.state_key`; a metric whose
    key is None is a group of its own). `members[0]`, the owner, holds the states and is the only
    one updated, merged and reduced; every member computes from them."""

    path: str
    members: Tuple[TaskMetric, ...]

    @property
    def owner(self) -> TaskMetric:
        """The member that holds the states: the group's first metric."""
        return self.members[0]

    @property
    def uses(self) -> str:
        """"activated" or "decoded": the predictions `update` takes."""
        return self.owner.metric.uses

    @property
    def key(self) -> str:
        """`<path>/<metric>` of the owner: the prefix of the group's states in `FlowMetrics.states()`."""
        return self.owner.key

    def update(self, preds: Tensor, targets: Tensor, mask: Tensor) -> None:
        """Add one batch to the group's states (once for all its members)."""
        self.owner.metric.update(preds, targets, mask)


def group_metrics(metrics: List[TaskMetric]) -> List[StateGroup]:
    """The `StateGroup`s of a list of task metrics, in order of their first member; members after
    the first of a group are linked to its states (`Metric.share_states`)."""
    groups: Dict[Any, List[TaskMetric]] = {}
    for i, tm in enumerate(metrics):
        key = tm.metric.state_key
        ident = (tm.path, tm.metric.uses, key) if key is not None else i
        groups.setdefault(ident, []).append(tm)
    for members in groups.values():
        for tm in members[1:]:
            tm.metric.share_states(members[0].metric)
    return [StateGroup(members[0].path, tuple(members)) for members in groups.values()]


def _stackable(metric: Metric) -> bool:
    """Whether `metric` counts with its class's own `stacked_increments` kernel: a subclass that
    overrides `update` without it is updated alone."""
    cls = type(metric)
    if cls.stacked_increments is Metric.stacked_increments:
        return False
    kernel = next(k for k in cls.__mro__ if "stacked_increments" in vars(k))
    return cls.update is kernel.update


class StateStack:
    """State groups of several tasks whose owners count alike (same metric class, `state_key` and
    `uses`, with a `Metric.stacked_increments` kernel), counted together: each batch of theirs is
    one kernel call on the tasks' joined tensors and one in-place addition per state into `(G, ...)`
    tensors, whose rows *are* the owners' states (views). Anything that replaces an owner's state
    (`reset`, `merge`, `all_reduce`) unlinks it; the next update stacks the states anew. Where the
    tasks' tensors cannot be joined or the kernel declines, the groups are updated one by one."""

    def __init__(self, groups: Sequence[StateGroup]):
        self.groups = tuple(groups)
        self._storage: Dict[str, Tensor] = {}
        self._views: List[Dict[str, Tensor]] = []
        self._index: Dict[Tuple[Tuple[int, ...], torch.device], Tensor] = {}

    @property
    def stacked(self) -> Dict[str, Tensor]:
        """The stacked states `{state: (G, ...)}` (rows in the order of `groups`); read them only
        while `linked`."""
        return self._storage

    @property
    def linked(self) -> bool:
        """Whether every owner's states are still the rows of the stacked tensors."""
        if not self._storage:
            return False
        for g, views in zip(self.groups, self._views):
            states = g.owner.metric.states
            if len(states) != len(views) or any(states.get(k) is not v for k, v in views.items()):
                return False
        return True

    def _link(self, increments: Mapping[str, Tensor]) -> bool:
        """Stack the owners' current states into tensors shaped like `increments` and hand each
        owner its rows; False (nothing changed) where a state does not fit."""
        device = next(iter(increments.values())).device
        if device.type == "mps":  # no float64 there: states stay on the CPU (`Metric._add`)
            return False
        storage: Dict[str, Tensor] = {}
        for k, inc in increments.items():
            rows = []
            for g in self.groups:
                state = g.owner.metric.states.get(k)
                if state is None or set(g.owner.metric.states) != set(increments):
                    return False
                state = state.detach().to(device, torch.float64)
                shape = inc.shape[1:]
                if state.shape != shape:
                    if state.numel() == 0:  # a confusion matrix before its first update: nothing seen
                        state = torch.zeros(shape, dtype=torch.float64, device=device)
                    elif state.dim() == 0:  # per-class counts before their first update
                        state = state.expand(shape)
                    else:
                        return False
                rows.append(state)
            storage[k] = torch.stack(rows)
        self._storage, self._views = storage, []
        for i, g in enumerate(self.groups):
            views = {k: v[i] for k, v in storage.items()}
            g.owner.metric.states.update(views)
            self._views.append(views)
        return True

    def update(self, members: Sequence[int], preds: Sequence[Tensor], targets: Sequence[Tensor],
               masks: Sequence[Tensor]) -> None:
        """Add one batch of the groups at positions `members` (their predictions, labels and
        masks, in that order)."""
        groups = [self.groups[i] for i in members]
        if len(groups) > 1 and _joinable(preds) and _joinable(targets) and _joinable(masks):
            increments = groups[0].owner.metric.stacked_increments(
                torch.cat(list(preds)), torch.cat(list(targets)), torch.cat([m.reshape(-1) for m in masks]),
                len(groups))
            if increments is not None and self._add(members, increments):
                return
        for g, p, y, m in zip(groups, preds, targets, masks):
            g.update(p, y, m)

    def _add(self, members: Sequence[int], increments: Mapping[str, Tensor]) -> bool:
        """Add `increments` (rows for `members`) to the stacked states, (re)linking them first
        where needed; False when the states cannot be stacked (nothing added then)."""
        fits = self.linked and all(k in self._storage and self._storage[k].shape[1:] == v.shape[1:]
                                   and self._storage[k].device == v.device for k, v in increments.items())
        full = len(members) == len(self.groups)
        if not fits:
            shapes = increments if full else {k: v.new_zeros((len(self.groups), *v.shape[1:]))
                                              for k, v in increments.items()}
            if not self._link(shapes):
                return False
        for k, v in increments.items():
            target = self._storage[k]
            if full:
                target.add_(v.to(target.dtype))
                continue
            key = (tuple(members), target.device)
            index = self._index.get(key)
            if index is None:
                index = self._index[key] = torch.tensor(list(members), device=target.device)
            target.index_add_(0, index, v.to(target.dtype))
        return True


def task_rows(path: str, k: int, mask: Tensor, *values: Tensor) -> Tuple[Tensor, ...]:
    """`functional.element_rows` for task `path` with `k` element dimensions (metrics, tuning and
    the evaluator score its elements as samples), a shape that does not fit named by the task."""
    try:
        return element_rows(k, mask, *values)
    except ValueError as e:
        raise ValueError(f"task {path!r} (element_dims={k}: outputs, labels and mask must share the leading "
                         f"shape (N, T)): {e}") from None


def _joinable(tensors: Sequence[Tensor]) -> bool:
    """Whether the tensors can be joined along the first dimension into equal blocks."""
    first = tensors[0]
    return all(t.shape == first.shape and t.dtype == first.dtype and t.device == first.device for t in tensors)


class FlowMetrics:
    """All default metrics of a flow. `update(outputs, targets)` takes the module's outputs
    (activated/decoded are computed from logits when absent, as in training mode) and the masks in
    `outputs["mask"]`; `compute()` gives `{"<path>/<metric>": value}`; `num_samples()` gives
    `{path: |S_t|}` (samples with a label in the task's precondition).

    A task with element dimensions (`ITask.element_dims`: labels `(N, T)`, one per token) is
    scored over its elements: each element of `S_t` (labelled, where the mask, `(N,)` or
    `(N, T)`, holds) counts as one sample, in its metrics and in `num_samples`
    (`functional.element_rows`: predictions `(N, T, ...)` and labels seen as `(N * T, ...)` rows).

    Everything accumulated is sums and counts: `states()` exports them as one flat dict of
    tensors, `merge(other)` adds another instance's (or such a dict: DataParallel replicas, chunks
    of a batch), `all_reduce()` sums them over the ranks of `torch.distributed`; the merged result
    is exactly that of one instance that saw all the data.

    Metrics of a task that count the same states (`Metric.state_key`: a binary task's accuracy,
    precision, recall and F1) share them: `groups` lists each set once, and `update`, `merge`,
    `all_reduce` and `reset` touch each shared state once. To update metrics yourself, update the
    groups (`StateGroup.update`), not each metric of `metrics`."""

    def __init__(self, graph: FlowGraph):
        self.graph = graph
        self.metrics: List[TaskMetric] = [
            TaskMetric(leaf.path, name, m, leaf.task) for leaf in graph.leaves for name, m in leaf.task.create_metrics()
        ]
        self.groups: List[StateGroup] = group_metrics(self.metrics)
        self.groups_by_path: Dict[str, List[StateGroup]] = {leaf.path: [] for leaf in graph.leaves}
        for g in self.groups:
            self.groups_by_path[g.path].append(g)
        # tasks with element dimensions, scored one row per element (`_rows`)
        self._element_dims: Dict[str, int] = {leaf.path: element_dims(leaf.task) for leaf in graph.leaves
                                              if element_dims(leaf.task)}
        self._units = self._stack_groups()
        self._counts: Dict[str, Tensor] = {}
        self.reset()

    def _stack_groups(self) -> List[Tuple[Any, List[StateGroup]]]:
        """The groups in update order: `(StateStack, its groups)` for groups of several tasks that
        count alike (`StateStack`), `(None, [group])` for any other, in order of first appearance."""
        keyed: Dict[Any, List[StateGroup]] = {}
        for i, g in enumerate(self.groups):
            metric = g.owner.metric
            key = (type(metric), metric.state_key, metric.uses) if _stackable(metric) else i
            keyed.setdefault(key, []).append(g)
        return [(StateStack(gs), gs) if len(gs) > 1 else (None, gs) for gs in keyed.values()]

    def __iter__(self):
        return iter(self.metrics)

    def __len__(self) -> int:
        return len(self.metrics)

    def reset(self) -> None:
        for g in self.groups:
            g.owner.metric.reset()
        zero = torch.zeros((), dtype=torch.float64)  # states are replaced, never changed in place
        self._counts = {leaf.path: zero for leaf in self.graph.leaves}

    def states(self) -> Dict[str, Tensor]:
        """All states, flat: `"<path>/<metric>/<state>"` and `"<path>/num_samples"` -> tensor.
        States shared by several metrics appear once, under the first of them (`StateGroup.key`)."""
        out = {f"{p}/num_samples": c for p, c in self._counts.items()}
        for g in self.groups:
            key = g.key
            for k, v in g.owner.metric.states.items():
                # rows of stacked states are added to in place: a copy, so the export stays as it is now
                out[f"{key}/{k}"] = v.clone() if v._base is not None else v
        return out

    def merge(self, other: Union["FlowMetrics", Mapping[str, Tensor]]) -> None:
        """Add the states of another `FlowMetrics` of the same flow, or a dict from its `states()`."""
        states = other.states() if isinstance(other, FlowMetrics) else other
        mine = self.states()
        if set(states) != set(mine):
            diff = sorted(set(states) ^ set(mine))
            raise KeyError(f"cannot merge metric states of flow {self.graph.name!r}: keys differ ({diff[:5]})")
        for p in self._counts:
            v = states[f"{p}/num_samples"]
            self._counts[p] = self._counts[p] + v.to(self._counts[p].device, torch.float64)
        for g in self.groups:
            g.owner.metric.merge({k: states[f"{g.key}/{k}"] for k in g.owner.metric.states})

    def all_reduce(self, device: Optional[torch.device] = None) -> None:
        """Sum all states over the processes of an initialised `torch.distributed` group (no-op
        otherwise); every rank then computes the global metrics.

        The sample counts and the states of every metric that reduces as `Metric.all_reduce` does
        go in one collective (concatenated in flow order, the same on every rank); metrics with a
        reduction of their own (a confusion matrix a rank saw fewer classes for) use it."""
        if not distributed.initialized():
            return
        dev = distributed.collective_device(device)
        slots: List[Tuple[Dict[str, Tensor], str]] = [(self._counts, p) for p in self._counts]
        for g in self.groups:
            metric = g.owner.metric
            if type(metric).all_reduce is Metric.all_reduce:
                slots += [(metric.states, k) for k in sorted(metric.states)]
            else:
                metric.all_reduce(dev)
        if not slots:
            return
        values = [d[k] for d, k in slots]
        flat = torch.cat([v.detach().reshape(-1).to(dev, torch.float64) for v in values])
        dist.all_reduce(flat)
        offset = 0
        for (d, k), v in zip(slots, values):
            n = v.numel()
            d[k] = flat[offset:offset + n].reshape(v.shape).to(dev, v.dtype)
            offset += n

    @torch.no_grad()
    def update(self, outputs: Mapping[str, Mapping[str, Tensor]], targets: Mapping[str, Tensor],
               masks: Optional[Mapping[str, Tensor]] = None) -> None:
        masks = outputs[MASK] if masks is None else masks
        activated = outputs.get(ACTIVATED) or {}
        decoded = outputs.get(DECODED) or {}
        cache_a: Dict[str, Tensor] = {}
        cache_d: Dict[str, Tensor] = {}
        for leaf in self.graph.leaves:
            p, task = leaf.path, leaf.task
            a = activated.get(p)
            if a is None:
                a = task.activate(outputs[LOGITS][p].detach())
            cache_a[p] = a
            d = decoded.get(p)
            cache_d[p] = task.decode(a) if d is None else d
            if p not in targets:
                raise LabelError(f"targets have no labels for task {p!r} of flow {self.graph.name!r}; "
                                 f"they have {sorted(targets)}")
            mask, avail = self._rows(p, masks[p], task.available(targets[p]))
            if avail.dim() > 1:  # label elements of a row: it counts when any of them is labelled
                avail = avail.flatten(1).any(1)
            seen = (avail & mask.reshape(-1)).sum().double()
            c = self._counts[p]
            if c.device != seen.device and seen.device.type != "mps":
                c = c.to(seen.device)
            self._counts[p] = c + seen.to(c.device)
        self.update_states({ACTIVATED: cache_a, DECODED: cache_d}, targets, masks)

    @torch.no_grad()
    def update_states(self, predictions: Mapping[str, Mapping[str, Tensor]], targets: Mapping[str, Tensor],
                      masks: Mapping[str, Tensor], paths: Optional[Collection[str]] = None) -> None:
        """Add one batch to the metrics' states (not to `num_samples`): `predictions` is
        `{"activated": {path: ...}, "decoded": {path: ...}}`; a group whose predictions are absent
        there is left out (e.g. decoded metrics that wait for tuned thresholds), and so is every
        task not in `paths` (when given). Groups that count alike for several tasks are counted
        together (`StateStack`: one kernel per kind instead of one update per task)."""
        for stack, groups in self._units:
            chosen, preds, labels, rows = [], [], [], []
            for i, g in enumerate(groups):
                p = predictions.get(g.uses, {}).get(g.path)
                if p is not None and (paths is None or g.path in paths):
                    m, p, y = self._rows(g.path, masks[g.path], p, targets[g.path])
                    chosen.append(i)
                    preds.append(p)
                    labels.append(y)
                    rows.append(m)
            if not chosen:
                continue
            if stack is None:
                groups[0].update(preds[0], labels[0], rows[0])
            else:  # per-element tasks' rows join others of the same shape only (`_joinable`)
                stack.update(chosen, preds, labels, rows)

    def _rows(self, path: str, mask: Tensor, *values: Tensor) -> Tuple[Tensor, ...]:
        """`(mask, *values)` of task `path`, one row per element for a task with element dimensions
        (`functional.element_rows`), as they are for any other; a shape that does not fit names the task."""
        k = self._element_dims.get(path, 0)
        return task_rows(path, k, mask, *values) if k else (mask, *values)

    def num_samples(self) -> Dict[str, int]:
        """`{path: |S_t|}` so far: the samples with an available label where the task applies;
        for a task with element dimensions, its elements (tokens) in `S_t`."""
        return {p: int(c) for p, c in self._counts.items()}

    def compute(self) -> Dict[str, float]:
        """`{"<path>/<metric>": value}`. Metrics of a stack whose states are still stacked compute
        all their tasks' values at once (`Metric.compute_rows`: the same values)."""
        values: Dict[int, float] = {}
        for stack, groups in self._units:
            if stack is None or not stack.linked:
                continue
            rows: Dict[Any, List[float]] = {}
            for i, g in enumerate(groups):
                for tm in g.members:
                    key = tm.metric.rows_key
                    if key is None:
                        continue
                    if key not in rows:
                        rows[key] = tm.metric.compute_rows(stack.stacked)
                    values[id(tm.metric)] = rows[key][i]
        return {tm.key: values[id(tm.metric)] if id(tm.metric) in values else tm.metric.compute()
                for tm in self.metrics}

    def per_class(self) -> List[Tuple[str, str, float, int]]:
        """Per-class results from the states, in flow order: `(path, "<kind>/<class>", value,
        support)` for each class of each metric state that has them (`per_class()` of
        `ConfusionMatrixMetric` and `MultilabelConfusionMetric`: classification and multilabel
        tasks), kinds `precision`, `recall`, `f1_score` per class. A class is named by the task's
        `class_names`, else by its index."""
        rows: List[Tuple[str, str, float, int]] = []
        for g in self.groups:
            per_class = getattr(g.owner.metric, "per_class", None)
            if not callable(per_class):
                continue
            names = g.owner.task.class_names
            for r in per_class():
                name = names[r.index] if names is not None and r.index < len(names) else str(r.index)
                rows += [(g.path, f"{kind}/{name}", value, r.support) for kind, value in r.scores.items()]
        return rows
