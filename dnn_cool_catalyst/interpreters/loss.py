"""`flow.get_loss()` and `flow.get_per_sample_loss()`: masked multi-task losses.

Flow loss = sum over leaf tasks of `weight_t * sum_{S_t} loss_t / max(|S_t|, 1)`, where `S_t` holds
the available elements of samples whose precondition is not FALSE. Computed as sums selected
with `torch.where` and counts (static shapes), so an empty `S_t` adds exactly 0 and gives a zero
(not absent) gradient, and no value outside `S_t` (an infinite logit, a NaN element loss) reaches
the loss or the gradient of the logits. Sums and counts are float32 (float64 for float64 logits)
whatever the logits' dtype: half precision neither overflows nor miscounts.

Labels that index the logits (classes, tokens; `ITask.label_bound`) are checked against the
logits' width before the element loss runs: on the CPU at every batch, on an accelerator at the
first batch of each task (a `LabelError` naming the task path, the label, its position and the
width); on later batches there, without a host sync, an out-of-range label makes its task's term
NaN (the loss is then not finite; `FlowLoss.check_labels` names the label).

Under DistributedDataParallel (a `torch.distributed` process group is initialised), each rank's
loss is `sum_t weight_t * world_size * sum_t(rank) / max(count_t(all ranks), 1)`: DDP averages the
gradients over the ranks, and that average is then exactly the gradient of the loss of the global
batch on one process, however unevenly each task's samples fall on the ranks (a rank without
samples of a task contributes 0 for it). Every head is in every rank's graph (masked, not
indexed), so DDP needs no `find_unused_parameters`.

Tasks of one kind are computed together (`ITask.loss_group`): the logits, labels and masks of,
e.g., all binary tasks joined along the sample dimension, one element loss and one masked sum per
group instead of one per task (`kind_groups`, `grouped_sum_count`). Each task's `(sum, count)`
adds exactly the elements its own computation would (sums equal up to the order of float
additions, counts exactly), so DDP scaling, balancing and the metrics see the same terms.

`flow.get_loss(balancer=b)` gives a `BalancedFlowLoss`: the per-task means of the global batch
(`global_means`) are combined by a `dnn_cool_catalyst.balancing` method instead of summed; tasks
with an empty `S_t` take no part in the step. Without a balancer nothing of that runs.

A gradient method (`balancing.GradientBalancer`) acts, on training steps, through a *surrogate*
scalar (`BalancedFlowLoss.gradient_step`): its value is the plain sum of the present tasks' losses,
its backward gives the shared parameters (or features) the method's direction `d`, head `t` the
weighted gradient `h_t * d transform(L)_t` and absent heads exactly 0, so `loss.backward()`,
`loss_fn.backward(...)`, Catalyst's backward callback and DDP work unchanged.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import distributed
from ..balancing.base import present_index
from ..balancing.gradient import GradientBalancer, split_like, task_gradients
from ..errors import LabelError, capped
from ..functional import (expand_mask, grouped_sum_count, is_compiling, per_sample_masked, per_sample_mean,
                          selected_sum_count, where_selected)
from ..graph import FlowGraph
from ..keys import LOGITS, MASK
from ..tasks.base import label_position


def _labels(targets: Mapping[str, Tensor], path: str, graph: FlowGraph) -> Tensor:
    try:
        return targets[path]
    except KeyError:
        raise LabelError(f"targets have no labels for task {path!r} of flow {graph.name!r}; "
                         f"they have {sorted(targets)}") from None


def _shape_error(path: str, logits: Tensor, labels: Tensor, err: Exception) -> LabelError:
    return LabelError(f"task {path!r}: logits of shape {tuple(logits.shape)} do not fit labels of shape "
                      f"{tuple(labels.shape)} ({err})")


def check_label_bounds(path: str, labels: Tensor, bound: int) -> None:
    """`LabelError` naming the task path, the first offending label and its position, and the
    logits' width, if a label of a class-index task is `>= bound` (one reduction; the position is
    looked up only on error). Synchronises with the labels' device."""
    hi = int(labels.amax())
    if hi < bound:
        return
    bad = labels >= bound
    pos, where = label_position(bad)
    n = int(bad.sum())
    more = f"; {n - 1} more label(s) >= {bound}, the largest {hi}" if n > 1 else ""
    raise LabelError(f"task {path!r}: label {int(labels[pos])} at {where} is out of range for logits of width "
                     f"{bound} (valid: 0 to {bound - 1}){more}. Give the task's head at least {hi + 1} outputs "
                     "(or pass class_names), or fix the labels")


def stack_terms(terms: Mapping[str, Tuple[Tensor, Tensor]]) -> Tensor:
    """`(tasks, 2)`: each task's `(sum, count)` as a row, in the order of `terms` (one `torch.stack`,
    through which the sums keep their gradient; dtypes are promoted to a common one)."""
    return torch.stack([t for pair in terms.values() for t in pair]).reshape(len(terms), 2)


def global_stacked(stacked: Tensor, group: Any = None) -> Tensor:
    """`stack_terms(terms)` rows turned into `(world_size * sum, count summed over the ranks)`: the
    rows from which `FlowLoss.combine_stacked` gives a loss whose DDP-averaged gradient is the
    gradient of the global batch (the module docstring). The one home of the DDP scaling.

    One `all_reduce` of all counts together (no gradient flows through counts); the sums keep
    their gradient. With one process the rows are returned as they are.
    """
    world = distributed.world_size(group)
    if world <= 1:
        return stacked
    # float64: counts stay exact whatever the loss dtype (half precision counts only to 2048)
    counts = stacked[:, 1].detach().to(torch.float64)
    dist.all_reduce(counts, group=group)
    return torch.stack([stacked[:, 0] * world, counts.to(stacked.dtype)], dim=1)


def kind_groups(leaves: Sequence[Tuple[str, Any]]) -> Tuple[Tuple[Tuple[int, ...], ...], Tuple[int, ...]]:
    """`(groups, alone)`: the positions in `leaves` (`(path, task)` pairs) of tasks that share a
    `loss_group` key with at least one other task, one tuple per key in flow order, and the
    positions of the others."""
    keyed: Dict[Any, List[int]] = {}
    for i, (_, task) in enumerate(leaves):
        group = getattr(task, "loss_group", None)  # a duck-typed task without it: alone
        key = group() if callable(group) else None
        if key is not None:
            keyed.setdefault(key, []).append(i)
    groups = tuple(tuple(ix) for ix in keyed.values() if len(ix) > 1)
    grouped = {i for ix in groups for i in ix}
    return groups, tuple(i for i in range(len(leaves)) if i not in grouped)


def _joinable(z: Tensor, y: Tensor, m: Tensor) -> Optional[Tuple[Any, ...]]:
    """What must be equal for tasks of one loss group to be joined along the samples (shapes,
    dtypes, devices: a different dtype would be promoted by `torch.cat` and change the task's
    loss); None when the tensors do not have one row per sample (computed alone, where a bad
    shape gets its error naming the task)."""
    if z.dim() == 0 or y.dim() == 0 or m.dim() != 1 or m.dtype != torch.bool or not (
            z.shape[0] == y.shape[0] == m.shape[0]):
        return None
    return z.shape, y.shape, z.dtype, y.dtype, z.device, y.device, m.device


class FlowLoss(nn.Module):
    """`loss(outputs, targets) -> scalar`; `outputs` as returned by `flow.torch()`.

    `terms(outputs, targets)` gives `{path: (sum, count)}`, the states from which the loss is
    recombined exactly (across DataParallel replicas or DDP ranks); `from_terms(terms)` is the
    loss from them, `from_stacked(stack_terms(terms), paths)` the same from the stacked rows.

    `distributed` (default True): when a `torch.distributed` process group is initialised, scale
    the loss for DDP as the module docstring says (one `all_reduce` of the task counts per call,
    so every rank must call the loss equally often, as DDP's backward requires anyway). The value
    on one rank is then that rank's estimate of the global loss (their mean over ranks is exact).
    `distributed=False` keeps each rank's own masked means.

    `by_kind` (default True): compute the tasks of each loss group together (module docstring);
    False computes every task alone (the same terms, one computation per task). Which tasks form a
    group is decided when the loss is built.
    """

    def __init__(self, graph: FlowGraph, distributed: bool = True, by_kind: bool = True):
        super().__init__()
        self.graph = graph
        self.distributed = bool(distributed)
        self._leaves = tuple((leaf.path, leaf.task) for leaf in graph.leaves)
        self.paths: Tuple[str, ...] = tuple(path for path, _ in self._leaves)
        self._groups, self._alone = kind_groups(self._leaves) if by_kind else ((), tuple(range(len(self._leaves))))
        self._bounds_checked: set = set()  # paths whose labels were checked synchronously once
        self._orders: Dict[Tuple[Any, ...], Tensor] = {}  # row permutations into flow order, per device

    def terms(self, outputs: Mapping[str, Mapping[str, Tensor]], targets: Mapping[str, Tensor]) -> Dict[str, Tuple[Tensor, Tensor]]:
        """`{path: (sum, count)}` of each task's element losses over `S_t`, in at least float32.

        Logits and labels outside `S_t` never reach the sums, whatever they are (inf, NaN), and
        the gradient of those logits is exactly 0. Class-index labels are checked against the
        logits' width first (`check_label_bounds`). The pairs are rows of `stacked_terms`."""
        stacked, paths = self.stacked_terms(outputs, targets)
        return {p: (row[0], row[1]) for p, row in zip(paths, stacked.unbind(0))}

    def stacked_terms(self, outputs: Mapping[str, Mapping[str, Tensor]],
                      targets: Mapping[str, Tensor]) -> Tuple[Tensor, Tuple[str, ...]]:
        """`(stack_terms(terms), paths)`: the terms as `(tasks, 2)` rows, computed per loss group
        (module docstring) and put in flow order (`self.paths`) with one permutation. A subclass
        that overrides `terms` gets its terms stacked instead."""
        if type(self).terms is not FlowLoss.terms:
            terms = self.terms(outputs, targets)
            return stack_terms(terms), tuple(terms)
        logits, masks = outputs[LOGITS], outputs[MASK]
        blocks: List[Tensor] = []
        order: List[int] = []
        alone: List[int] = list(self._alone)
        for group in self._groups:
            for members, block in self._group_terms(group, logits, masks, targets):
                if block is None:
                    alone += members
                else:
                    blocks.append(block)
                    order += members
        if alone:
            pairs = [self._task_terms(i, logits, masks, targets) for i in alone]
            blocks.append(torch.stack([t for pair in pairs for t in pair]).reshape(len(alone), 2))
            order += alone
        if not blocks:
            return torch.zeros((0, 2)), ()
        stacked = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
        return self._in_flow_order(stacked, order), self.paths

    def _in_flow_order(self, stacked: Tensor, order: List[int]) -> Tensor:
        """`stacked` (rows for the leaves `order`) permuted into flow order."""
        if all(i == k for k, i in enumerate(order)):
            return stacked
        key = (tuple(order), stacked.device)
        index = self._orders.get(key)
        if index is None:
            inverse = [0] * len(order)
            for row, i in enumerate(order):
                inverse[i] = row
            index = self._orders[key] = torch.tensor(inverse, device=stacked.device)
        return stacked.index_select(0, index)

    def _task_terms(self, i: int, logits: Mapping[str, Tensor], masks: Mapping[str, Tensor],
                    targets: Mapping[str, Tensor]) -> Tuple[Tensor, Tensor]:
        """`(sum, count)` of the task at position `i`, computed alone."""
        path, task = self._leaves[i]
        y = _labels(targets, path, self.graph)
        z = logits[path]
        bad_index = self._label_bound_guard(path, task, z, y)
        try:
            avail = task.available(y)
            mask = masks[path]
            selected = avail & expand_mask(mask, avail)
            if z.requires_grad:
                # the backward of an element loss at an excluded non-finite logit (or label) is
                # NaN, and NaN * 0 is NaN: this `where`'s backward drops it (and its forward
                # gives the loss finite logits there)
                z = where_selected(z, selected, mask, 0.0)
            s, c = selected_sum_count(task.elementwise_loss(z, y), selected)
        except (RuntimeError, ValueError) as e:
            raise _shape_error(path, z, y, e) from e
        if bad_index is not None:  # an out-of-range label makes the term NaN, never a silent clamp
            s = torch.where(bad_index, math.nan, s)
        return s, c

    def _group_terms(self, group: Sequence[int], logits: Mapping[str, Tensor], masks: Mapping[str, Tensor],
                     targets: Mapping[str, Tensor]) -> List[Tuple[List[int], Optional[Tensor]]]:
        """The terms of one loss group: `[(positions, (k, 2) rows or None)]`, one entry per set of
        members whose tensors can be joined (`_joinable`); None for a set of one, or one whose
        joined computation failed (computed alone then, where the error names the task)."""
        sets: Dict[Any, List[int]] = {}
        parts: Dict[int, Tuple[Tensor, Tensor, Tensor]] = {}
        result: List[Tuple[List[int], Optional[Tensor]]] = []
        for i in group:
            path = self._leaves[i][0]
            z, y, m = logits[path], _labels(targets, path, self.graph), masks[path]
            key = _joinable(z, y, m)
            if key is None:
                result.append(([i], None))
                continue
            sets.setdefault(key, []).append(i)
            parts[i] = z, y, m
        for members in sets.values():
            if len(members) == 1:
                result.append((members, None))
                continue
            try:
                block = self._joined_terms(members, [parts[i] for i in members])
            except LabelError:
                raise
            except (RuntimeError, ValueError):
                block = None  # each task alone gives the error that names it
            result.append((members, block))
        return result

    def _joined_terms(self, members: Sequence[int], parts: Sequence[Tuple[Tensor, Tensor, Tensor]]) -> Tensor:
        """`(k, 2)` terms of `members` computed at once on their joined logits, labels and masks:
        the computation of `_task_terms` on `torch.cat`, summed per task (`grouped_sum_count`)."""
        task = self._leaves[members[0]][1]
        z = torch.cat([p[0] for p in parts])
        y = torch.cat([p[1] for p in parts])
        mask = torch.cat([p[2] for p in parts])
        bad_index = self._joined_bound_guard(members, task, z, y, [p[1] for p in parts])
        avail = task.available(y)
        selected = avail & expand_mask(mask, avail)
        if z.requires_grad:  # as in `_task_terms`
            z = where_selected(z, selected, mask, 0.0)
        sums, counts = grouped_sum_count(task.elementwise_loss(z, y), selected, len(members))
        if bad_index is not None:
            sums = torch.where(bad_index, math.nan, sums)
        return torch.stack([sums, counts], dim=1)

    def _joined_bound_guard(self, members: Sequence[int], task: Any, z: Tensor, y: Tensor,
                            labels: Sequence[Tensor]) -> Optional[Tensor]:
        """`_label_bound_guard` for joined tasks: one `amax` for all of them; on error (or on an
        accelerator after the first batch, per task: `(k,)` flags that poison the terms) each task's
        own labels are looked at, so the `LabelError` names the task and the position in its labels."""
        bound = task.label_bound(z)
        if bound is None or y.numel() == 0:
            return None
        paths = [self._leaves[i][0] for i in members]
        if not is_compiling() and (y.device.type == "cpu" or any(p not in self._bounds_checked for p in paths)):
            if int(y.amax()) >= bound:
                for path, labels_ in zip(paths, labels):
                    if labels_.numel():
                        check_label_bounds(path, labels_, bound)
            self._bounds_checked.update(paths)
            return None
        return y.reshape(len(members), -1).amax(1) >= bound

    def _label_bound_guard(self, path: str, task: Any, z: Tensor, y: Tensor) -> Optional[Tensor]:
        """Check the labels of a class-index task against the logits' width: at once (an error)
        for CPU labels and for the first batch of each task; afterwards, on an accelerator, without
        waiting for it: a boolean tensor that poisons the task's term (NaN) when a label is out of
        range, so that the non-finite loss stops training (one `amax` per batch, no host sync)."""
        bound = task.label_bound(z)
        if bound is None or y.numel() == 0:
            return None
        if not is_compiling() and (y.device.type == "cpu" or path not in self._bounds_checked):
            check_label_bounds(path, y, bound)
            self._bounds_checked.add(path)
            return None
        return y.amax() >= bound

    def check_labels(self, outputs: Mapping[str, Mapping[str, Tensor]], targets: Mapping[str, Tensor]) -> None:
        """Raise `LabelError` (naming the task, label and position) if a class-index label does
        not fit its task's logits; synchronises with the device. For diagnosing a batch whose
        loss is not finite."""
        for path, task in self._leaves:
            y, z = _labels(targets, path, self.graph), outputs[LOGITS][path]
            bound = task.label_bound(z)
            if bound is not None and y.numel():
                check_label_bounds(path, y, bound)

    @staticmethod
    def combine(terms: Mapping[str, Tuple[Tensor, Tensor]], weights: Mapping[str, float]) -> Tensor:
        """`sum_t weight_t * sum_t / max(count_t, 1)`.

        Computed on the stacked sums and counts (`combine_stacked`: a handful of tensor operations
        and autograd nodes instead of three or four per task)."""
        if not terms:
            return None
        return FlowLoss.combine_stacked(stack_terms(terms), [weights[p] for p in terms])

    @staticmethod
    def combine_stacked(stacked: Tensor, weights: Sequence[float]) -> Tensor:
        """`combine` on `stack_terms(terms)`, with the tasks' weights in the same order."""
        means = stacked[:, 0] / stacked[:, 1].clamp_min(1)
        w = [float(v) for v in weights]
        if any(v != 1.0 for v in w):  # skip the multiplication (and its backward) in the common case
            means = means * torch.tensor(w, dtype=means.dtype, device=means.device)
        return means.sum()

    @property
    def weights(self) -> Dict[str, float]:
        return {path: float(task.weight) for path, task in self._leaves}

    def from_terms(self, terms: Mapping[str, Tuple[Tensor, Tensor]]) -> Tensor:
        """The flow loss from `terms(...)` (or terms merged from replicas), scaled for DDP when a
        process group is initialised and `distributed` is true (`from_stacked` on the stacked terms)."""
        if not terms:
            return None
        return self.from_stacked(stack_terms(terms), list(terms))

    def from_stacked(self, stacked: Tensor, paths: Sequence[str]) -> Tensor:
        """`from_terms` on `stack_terms(terms)` (rows in the order of `paths`), with the same DDP
        scaling: the sums times the number of processes over the counts summed over them."""
        if self.distributed:
            stacked = global_stacked(stacked)
        weights = self.weights
        return self.combine_stacked(stacked, [weights[p] for p in paths])

    def forward(self, outputs, targets, return_terms: bool = False):
        """The flow loss; with `return_terms=True` also `{path: detached mean loss}` for logging
        (this rank's own masked means)."""
        stacked, paths = self.stacked_terms(outputs, targets)
        if not paths:
            return (None, {}) if return_terms else None
        total = self.from_stacked(stacked, paths)
        if return_terms:
            means = (stacked[:, 0] / stacked[:, 1].clamp_min(1)).detach()
            return total, dict(zip(paths, means.unbind()))
        return total

    def backward(self, outputs, targets, shared_parameters: Optional[Iterable[Tensor]] = None) -> Tensor:
        """Compute the loss and fill the `.grad` of every parameter it reaches (the model's and the
        balancer's, `self.parameters()`); returns the loss, detached, for logging.

        `shared_parameters` (those every task shares, e.g. `model.backbone.parameters()`) is for
        balancers that act on gradients; for the plain loss and loss-weighting balancers this is
        `loss = self(outputs, targets); loss.backward()`, and that stays equally valid."""
        loss = self(outputs, targets)
        loss.backward()
        return loss.detach()


def local_means(stacked: Tensor) -> Tuple[Tensor, Tensor]:
    """`(sum / max(count, 1), count)` per task of `stack_terms(terms)` rows (this process only)."""
    return stacked[:, 0] / stacked[:, 1].clamp_min(1), stacked[:, 1]


def global_means(stacked: Tensor, group: Any = None) -> Tuple[Tensor, Tensor]:
    """`(means, counts)` per task of the global batch from `stack_terms(terms)` rows, for a balancer.

    With one process: `sum / max(count, 1)` and the counts. Under DDP, one `all_reduce` of the
    detached sums and counts together; `counts` are then global and the *value* of `means` is the
    global mean, the same on every rank (so every rank's balancer computes and updates its state
    from the same numbers), while its *gradient* is this rank's share
    `world_size * d sum_t(rank) / count_t(all ranks)` (the value `share - share.detach() + global`).
    For any combination `f(means)` DDP's average of the model's gradients over the ranks is then
    `sum_t df/dL_t * dL_t`, the gradient of the global batch on one process (`df/dL_t` is taken at
    the global values, equal on every rank), and the balancer's own parameters, which DDP does not
    average, get that same global gradient on every rank. The balanced counterpart of
    `global_stacked`."""
    world = distributed.world_size(group)
    if world <= 1:
        return local_means(stacked)
    # float64: counts stay exact whatever the loss dtype
    total = stacked.detach().to(torch.float64)
    dist.all_reduce(total, group=group)
    counts = total[:, 1].clamp_min(1)
    share = stacked[:, 0] * world / counts.to(stacked.dtype)
    exact = (total[:, 0] / counts).to(stacked.dtype)
    return share - share.detach() + exact, total[:, 1].to(stacked.dtype)


class HeadInputs:
    """Forward hooks on the heads that keep, for the representation variant of a gradient method,
    the tensors each head read (those requiring a gradient) with the output it gave: `find(logits)`
    returns the inputs of the head call that produced `logits` (matched by identity, so that only
    this step's own head calls count). Registered by `BalancedFlowLoss` on its flow's heads only
    when its balancer is a `GradientBalancer(representation=True)`; nothing is kept while gradients
    are disabled, and at most one entry per task (the oldest dropped), so memory stays one step's."""

    def __init__(self, size: int):
        self.size = max(int(size), 1)
        self.seen: "OrderedDict[int, Tuple[Tensor, Tuple[Tensor, ...]]]" = OrderedDict()

    def __call__(self, module: nn.Module, args: Tuple[Any, ...], output: Any) -> None:
        if not torch.is_grad_enabled() or not isinstance(output, Tensor):
            return
        inputs = tuple(a for a in args if isinstance(a, Tensor) and a.requires_grad)
        self.seen[id(output)] = (output, inputs)
        while len(self.seen) > self.size:
            self.seen.popitem(last=False)

    def find(self, logits: Tensor) -> Optional[Tuple[Tensor, ...]]:
        entry = self.seen.get(id(logits))
        return entry[1] if entry is not None and entry[0] is logits else None

    def clear(self) -> None:
        self.seen.clear()


class BalancedFlowLoss(FlowLoss):
    """A `FlowLoss` whose task losses `L_t = weight_t * mean_{S_t} loss_t` are combined by a
    balancer (`flow.get_loss(balancer=...)`, see `dnn_cool_catalyst.balancing`) instead of summed.

    The balancer is bound to the flow's leaf paths and is a submodule: its learnable parameters are
    `loss_fn.parameters()` (give them to the optimizer; move `loss_fn` to the model's device) and
    its state is in `loss_fn.state_dict()`. A task is present in a step when its `S_t` is not empty
    over the whole batch (all ranks); absent tasks take no part (`balancing.base`). Deciding that
    reads the counts on the host once per step. Under DDP the balancer sees the global means
    (`global_means`), so its update is the one-process update on the global batch. The balancer's
    state advances only in training mode with gradients enabled.

    Gradient methods (`balancing.GradientBalancer`) on training steps: see `gradient_step`. The
    parameters variant needs the shared parameters: `loss_fn.backward(outputs, targets,
    shared_parameters=...)` (for that call) or `loss_fn.shared_parameters = ...` (kept; `FlowRunner`
    sets every model parameter that is not a task head). The representation variant registers
    forward hooks on the flow's heads (`HeadInputs`) that keep what each head read; only then.
    """

    def __init__(self, graph: FlowGraph, balancer: nn.Module, distributed: bool = True, by_kind: bool = True):
        super().__init__(graph, distributed=distributed, by_kind=by_kind)
        if not callable(getattr(balancer, "bind", None)) or not isinstance(balancer, nn.Module):
            raise TypeError(f"balancer must be a dnn_cool_catalyst.balancing.Balancer (e.g. "
                            f"balancing.UncertaintyWeighting()), got {type(balancer).__name__}")
        self._paths = tuple(path for path, _ in self._leaves)
        self.balancer = balancer.bind(self._paths)
        # the tasks' own `weight=`, moved with the module (`loss_fn.to(device)`): no tensor built per step
        self.register_buffer("_static", torch.tensor([float(task.weight) for _, task in self._leaves]),
                             persistent=False)
        self._shared: Optional[List[Tensor]] = None  # the kept shared parameters (parameters variant)
        self._call_shared: Optional[List[Tensor]] = None  # those given to the current `backward` call
        self._heads: Optional[HeadInputs] = None  # representation variant only
        self._step_logits: Optional[Dict[str, Tensor]] = None
        if self.is_gradient_method and balancer.representation:
            self._heads = HeadInputs(len(self._leaves))
            for module in {id(task.module): task.module for _, task in self._leaves}.values():
                module.register_forward_hook(self._heads)

    @property
    def is_gradient_method(self) -> bool:
        """Whether the balancer acts on the tasks' gradients (`balancing.GradientBalancer`)."""
        return isinstance(self.balancer, GradientBalancer)

    @property
    def shared_parameters(self) -> Optional[List[Tensor]]:
        """The parameters every task shares, for the parameters variant of a gradient method (None:
        not set). Set with any iterable of parameters; those not requiring a gradient are left out."""
        return self._shared

    @shared_parameters.setter
    def shared_parameters(self, parameters: Optional[Iterable[Tensor]]) -> None:
        self._shared = None if parameters is None else _trainable(parameters)

    def stacked_terms(self, outputs, targets):
        """`FlowLoss.stacked_terms` (which `terms` reads); with a representation-variant gradient
        method it also notes this step's logits, to find the inputs of the head calls that
        produced them."""
        result = super().stacked_terms(outputs, targets)
        if self._heads is not None:
            self._step_logits = dict(outputs[LOGITS])
        return result

    def backward(self, outputs, targets, shared_parameters: Optional[Iterable[Tensor]] = None) -> Tensor:
        """`FlowLoss.backward`; `shared_parameters` (for this call; else `self.shared_parameters`)
        are the parameters a gradient method's parameters variant balances."""
        self._call_shared = None if shared_parameters is None else _trainable(shared_parameters)
        try:
            return super().backward(outputs, targets)
        finally:
            self._call_shared = None

    def from_stacked(self, stacked: Tensor, paths: Sequence[str]) -> Tensor:
        """The balanced loss from `stack_terms(terms)` rows in the order of `paths`."""
        if tuple(paths) != self._paths:
            missing, extra = sorted(set(self._paths) - set(paths)), sorted(set(paths) - set(self._paths))
            if missing or extra:
                raise ValueError(f"flow {self.graph.name!r}: the balanced loss needs the terms of exactly its "
                                 f"{len(self._paths)} tasks; missing: {capped(missing) or 'none'}; not tasks of "
                                 f"the flow: {capped(extra) or 'none'}")
            stacked = stacked[[list(paths).index(p) for p in self._paths]]
        means, counts = global_means(stacked) if self.distributed else local_means(stacked)
        losses = means * self._static.to(dtype=means.dtype, device=means.device)
        present = (counts > 0).tolist()
        update = self.training and torch.is_grad_enabled()
        if update and self.is_gradient_method:
            return self.gradient_step(losses, present)
        return self.balancer(losses, present, update=update)

    def gradient_step(self, losses: Tensor, present: Sequence[bool]) -> Tensor:
        """The surrogate loss of a gradient method's training step, from the tasks' losses `(T,)`
        (global values, this rank's gradient share: `global_means`) and which are present.

        With `T' = balancer.transform(L_present)` and the gradients `G` `(P, D)` of `T'` with
        respect to the shared parameters (parameters variant; under DDP `all_reduce(G) / world`,
        the global batch's) or the Gram matrix of the gradients `R` with respect to the heads'
        inputs (representation variant; under DDP `all_reduce(R R^T) / world^2`), the method gives
        `(d, h)` (`direction`) or `(c, h)` (`weigh`; then `d = c @ R` on the features). The value is
        `sum_present L_t`; the gradient is that of

            sum_t h_t T'_t + sum_x <x, delta_x> + auxiliary + 0 * sum_all L_t

        with `delta = d - h @ G` on the shared parameters (the same on every rank, so DDP's
        average leaves it; the heads' term supplies `h @ G`) or `delta = (c - h) @ R_rank` on the
        features (each rank's own rows, which backpropagate through the backbone as any loss's):
        the shared parameters receive exactly `d` (their gradient from the heads' term plus
        `delta`), head `t` `h_t dT'_t`, the method's parameters their `transform`/`auxiliary_loss`
        gradients, and absent heads exactly 0 while staying in the graph (DDP needs no
        `find_unused_parameters`). A parameter neither shared nor a head's (left out of
        `shared_parameters`) gets the heads' weighting, `sum_t h_t dT'_t`. A step without any
        present task is exactly 0."""
        balancer = self.balancer
        where, idx = present_index(present, losses.device)
        if not where:
            return balancer(losses, present, update=True)
        inputs, representation = self._gradient_inputs(where)
        transformed = balancer.transform(losses[idx], idx)
        grads = task_gradients(transformed, inputs)
        detached = losses[idx].detach()
        world = distributed.world_size() if self.distributed else 1
        if representation:
            gram = grads.double() @ grads.double().T
            if world > 1:
                dist.all_reduce(gram)
                gram = gram / world ** 2
            c, h = balancer.weigh(gram, detached, idx, True)
            delta = (c - h).to(grads.dtype) @ grads
        else:
            if world > 1:
                dist.all_reduce(grads)
                grads = grads / world
            d, h = balancer.direction(grads, detached, idx, True)
            delta = d.to(grads.dtype) - h.to(grads.dtype) @ grads
        total = (h.detach().to(transformed.dtype) * transformed).sum() + losses.sum() * 0.0
        for x, dx in zip(inputs, split_like(delta.detach(), inputs)):
            total = total + (x * dx).sum()
        auxiliary = balancer.auxiliary_loss()
        if auxiliary is not None:
            total = total + auxiliary
        return total - total.detach() + detached.sum()

    def _gradient_inputs(self, where: Sequence[int]) -> Tuple[List[Tensor], bool]:
        """What the method's gradients are taken with respect to: `(tensors, representation)`."""
        name = type(self.balancer).__name__
        if not self.balancer.representation:
            shared = self._call_shared if self._call_shared is not None else self._shared
            if not shared:
                raise ValueError(
                    f"{name} is a gradient method and needs the parameters every task shares: pass "
                    f"loss_fn.backward(outputs, targets, shared_parameters=model.backbone.parameters()) or set "
                    f"loss_fn.shared_parameters = ... once (FlowRunner sets every parameter that is not a task "
                    f"head){' (those given do not require a gradient)' if shared is not None else ''}; or use "
                    f"{name}(representation=True) where the method has that variant")
            return list(shared), False
        logits, self._step_logits = self._step_logits, None
        features: Dict[int, Tensor] = {}
        unseen, constant = [], []
        for i in where:
            path = self._paths[i]
            found = self._heads.find(logits[path]) if logits is not None and path in logits else None
            if found is None:
                unseen.append(path)
            elif not found:
                constant.append(path)
            for x in found or ():
                features.setdefault(id(x), x)
        self._heads.clear()
        name = type(self.balancer).__name__
        if unseen:
            raise RuntimeError(
                f"{name}(representation=True) needs the inputs the heads read in this step, but the logits of "
                f"task(s) {capped(unseen)} are not the outputs of a head call seen in this process (the loss got "
                f"terms reduced elsewhere, e.g. by DataParallel replicas, or logits not returned by the flow's "
                f"heads as they are): compute the loss from the outputs of flow.torch() in this process, or use "
                f"{name}(representation=False) with shared parameters")
        if not features:
            raise ValueError(
                f"{name}(representation=True): the heads of task(s) {capped(constant)} read inputs that do not "
                f"require a gradient (no shared network before the heads), so there is no shared representation "
                f"to balance")
        return list(features.values()), True


def _trainable(parameters: Iterable[Tensor]) -> List[Tensor]:
    """The parameters of `parameters` that require a gradient, each once, in order."""
    seen: Dict[int, Tensor] = {}
    for p in parameters:
        if not isinstance(p, Tensor):
            raise TypeError(f"shared_parameters must be tensors (e.g. model.backbone.parameters()), got "
                            f"{type(p).__name__}")
        if p.requires_grad:
            seen.setdefault(id(p), p)
    return list(seen.values())


class FlowPerSampleLoss:
    """`(outputs, targets) -> {path: (N,), "overall": (N,)}`.

    A task's value is the mean loss over the sample's available elements, NaN where the sample is
    outside `S_t`; `"overall"` is the weighted sum with those NaNs counted as 0 (left out with
    `overall=False`, for callers that only rank the tasks' own losses). Tasks of one loss group
    (`ITask.loss_group`) are computed together, as in `FlowLoss` (`by_kind=False`: each alone).
    """

    def __init__(self, graph: FlowGraph, by_kind: bool = True):
        self.graph = graph
        self._leaves = tuple((leaf.path, leaf.task) for leaf in graph.leaves)
        self._groups = kind_groups(self._leaves)[0] if by_kind else ()

    def __call__(self, outputs, targets, overall: bool = True) -> Dict[str, Tensor]:
        logits, masks = outputs[LOGITS], outputs[MASK]
        values: Dict[int, Tensor] = {}
        totals: List[Tensor] = []
        for group in self._groups:
            sets: Dict[Any, List[int]] = {}
            for i in group:
                path = self._leaves[i][0]
                key = _joinable(logits[path], _labels(targets, path, self.graph), masks[path])
                if key is not None:
                    sets.setdefault(key, []).append(i)
            for members in sets.values():
                if len(members) > 1:
                    self._joined(members, logits, masks, targets, values, totals if overall else None)
        for i, (path, task) in enumerate(self._leaves):
            if i in values:
                continue
            y = _labels(targets, path, self.graph)
            z = logits[path]
            try:
                m = masks[path]
                if m.dim() > 1:  # per element (a task preconditioned per token): its selected elements' mean
                    avail = task.available(y)
                    selected = avail & expand_mask(m, avail)
                    ps = per_sample_mean(task.elementwise_loss(where_selected(z, selected, m, 0.0), y), selected)
                else:
                    ps = per_sample_masked(task.sample_loss(z, y).reshape(-1), m)
            except (RuntimeError, ValueError) as e:
                raise _shape_error(path, z, y, e) from e
            values[i] = ps
            if overall:
                # NaN (outside S_t, or no available element) counts 0; an infinite loss stays infinite
                totals.append(float(task.weight) * torch.where(torch.isnan(ps), 0.0, ps))
        result = {path: values[i] for i, (path, _) in enumerate(self._leaves)}
        if overall:
            total = totals[0] if totals else None
            for t in totals[1:]:
                total = total + t
            result["overall"] = total
        return result

    def _joined(self, members: Sequence[int], logits: Mapping[str, Tensor], masks: Mapping[str, Tensor],
                targets: Mapping[str, Tensor], values: Dict[int, Tensor], totals: Optional[List[Tensor]]) -> None:
        """The per-sample losses of `members` at once, on their joined logits, labels and masks, into
        `values` (and their weighted sum into `totals`); nothing when that fails (the tasks are
        then computed alone, where an error names the task)."""
        paths = [self._leaves[i][0] for i in members]
        task = self._leaves[members[0]][1]
        try:
            z = torch.cat([logits[p] for p in paths])
            y = torch.cat([targets[p] for p in paths])
            ps = per_sample_masked(task.sample_loss(z, y).reshape(-1), torch.cat([masks[p] for p in paths]))
            rows = ps.reshape(len(members), ps.shape[0] // len(members))  # not -1: an empty batch
        except (RuntimeError, ValueError):
            return
        values.update(zip(members, rows.unbind(0)))
        if totals is not None:
            weights = [float(self._leaves[i][1].weight) for i in members]
            kept = torch.where(torch.isnan(rows), 0.0, rows)
            if any(w != 1.0 for w in weights):
                kept = kept * torch.tensor(weights, dtype=kept.dtype, device=kept.device).unsqueeze(1)
            totals.append(kept.sum(0))
