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

`flow.get_loss(balancer=b)` gives a `BalancedFlowLoss`: the per-task means of the global batch
(`global_means`) are combined by a `dnn_cool_catalyst.balancing` method instead of summed; tasks
with an empty `S_t` take no part in the step. Without a balancer nothing of that runs.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import distributed
from ..errors import LabelError, capped
from ..functional import expand_mask, per_sample_masked, selected_sum_count, where_selected
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


def _compiling() -> bool:
    """Whether torch.compile is tracing (no data-dependent Python branches then)."""
    fn = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3; torch._dynamo's before
    if fn is None:
        from torch._dynamo import is_compiling as fn
    return bool(fn())


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
    """

    def __init__(self, graph: FlowGraph, distributed: bool = True):
        super().__init__()
        self.graph = graph
        self.distributed = bool(distributed)
        self._leaves = tuple((leaf.path, leaf.task) for leaf in graph.leaves)
        self._bounds_checked: set = set()  # paths whose labels were checked synchronously once

    def terms(self, outputs: Mapping[str, Mapping[str, Tensor]], targets: Mapping[str, Tensor]) -> Dict[str, Tuple[Tensor, Tensor]]:
        """`{path: (sum, count)}` of each task's element losses over `S_t`, in at least float32.

        Logits and labels outside `S_t` never reach the sums, whatever they are (inf, NaN), and
        the gradient of those logits is exactly 0. Class-index labels are checked against the
        logits' width first (`check_label_bounds`)."""
        logits, masks = outputs[LOGITS], outputs[MASK]
        result = {}
        for path, task in self._leaves:
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
            result[path] = (s, c)
        return result

    def _label_bound_guard(self, path: str, task: Any, z: Tensor, y: Tensor) -> Optional[Tensor]:
        """Check the labels of a class-index task against the logits' width: at once (an error)
        for CPU labels and for the first batch of each task; afterwards, on an accelerator, without
        waiting for it: a boolean tensor that poisons the task's term (NaN) when a label is out of
        range, so that the non-finite loss stops training (one `amax` per batch, no host sync)."""
        bound = task.label_bound(z)
        if bound is None or y.numel() == 0:
            return None
        if not _compiling() and (y.device.type == "cpu" or path not in self._bounds_checked):
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
        terms = self.terms(outputs, targets)
        total = self.from_terms(terms)
        if return_terms:
            return total, {p: (s / c.clamp_min(1)).detach() for p, (s, c) in terms.items()}
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
    """

    def __init__(self, graph: FlowGraph, balancer: nn.Module, distributed: bool = True):
        super().__init__(graph, distributed=distributed)
        if not callable(getattr(balancer, "bind", None)) or not isinstance(balancer, nn.Module):
            raise TypeError(f"balancer must be a dnn_cool_catalyst.balancing.Balancer (e.g. "
                            f"balancing.UncertaintyWeighting()), got {type(balancer).__name__}")
        self._paths = tuple(path for path, _ in self._leaves)
        self.balancer = balancer.bind(self._paths)
        # the tasks' own `weight=`, moved with the module (`loss_fn.to(device)`): no tensor built per step
        self.register_buffer("_static", torch.tensor([float(task.weight) for _, task in self._leaves]),
                             persistent=False)

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
        return self.balancer(losses, present, update=self.training and torch.is_grad_enabled())


class FlowPerSampleLoss:
    """`(outputs, targets) -> {path: (N,), "overall": (N,)}`.

    A task's value is the mean loss over the sample's available elements, NaN where the sample is
    outside `S_t`; `"overall"` is the weighted sum with those NaNs counted as 0 (left out with
    `overall=False`, for callers that only rank the tasks' own losses).
    """

    def __init__(self, graph: FlowGraph):
        self.graph = graph
        self._leaves = tuple((leaf.path, leaf.task) for leaf in graph.leaves)

    def __call__(self, outputs, targets, overall: bool = True) -> Dict[str, Tensor]:
        logits, masks = outputs[LOGITS], outputs[MASK]
        result: Dict[str, Tensor] = {}
        total = None
        for path, task in self._leaves:
            y = _labels(targets, path, self.graph)
            z = logits[path]
            try:
                ps = per_sample_masked(task.sample_loss(z, y).reshape(-1), masks[path])
            except (RuntimeError, ValueError) as e:
                raise _shape_error(path, z, y, e) from e
            result[path] = ps
            if overall:
                # NaN (outside S_t, or no available element) counts 0; an infinite loss stays infinite
                term = float(task.weight) * torch.where(torch.isnan(ps), 0.0, ps)
                total = term if total is None else total + term
        if overall:
            result["overall"] = total
        return result
