"""DataParallel memory balancing: reduce inside the replicas, gather only small tensors.

Plain `nn.DataParallel` gathers every replica's outputs onto the first device, where the loss,
the metrics and the callbacks then run: with a large output (a masked-language-modeling head over
a 30k vocabulary) the first device holds the logits of the whole batch, and runs out of memory
long before the others. `BalancedDataParallel` runs `ReplicaReducer` on each replica instead:

- the flow loss as `(sum, count)` per task (`FlowLoss.terms`), with their gradient;
- the metric states of the chunk (`FlowMetrics.states()`: sums and counts);
- the per-sample losses (`FlowPerSampleLoss`: one number per sample and task);
- the precondition masks, and the activated outputs of the `keep` tasks (by default those
  with tunable decoders: threshold tuning and precision-recall curves need them; they are
  `(N,)` or `(N, classes)`);
- with `explain > 0`, the logits of the few samples whose `X["index"]` is below `explain`
  (for the tree explanations of `InterpretationCallback`).

Only these are gathered. `merge_replicas` adds the gathered states, so the loss is
`sum_t w_t * (sum over replicas of sum_t) / max(sum over replicas of count_t, 1)`: exactly the
loss of the whole batch on one device (not a mean of replica means), and every metric is exactly
the metric of the whole batch. Per-sample tensors come back in batch order (scatter and gather
keep the order of the chunks).

Use it through `BalancedDataParallelEngine` (`runners.engines`; `FlowRunner(...,
balance_dataparallel_memory=True)` picks it), or alone in a loop of your own::

    model = BalancedDataParallel(flow.torch().cuda(), flow)
    reduced = model(x, y)              # x, y on the first device
    reduced["loss"].backward()
    metrics.merge(reduced["metric_states"])    # a FlowMetrics of the same flow

`model(x)` without labels behaves as `nn.DataParallel` (all outputs gathered). Inputs are split
as `nn.DataParallel` splits them: tensors along the first dimension, other values copied to every
replica. On a machine without several GPUs there is one replica: the same result, computed in place.
"""
from __future__ import annotations

import threading
from itertools import chain
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..interpreters.loss import FlowLoss
from ..keys import ACTIVATED, EXPLAIN, INDEX, LOGITS, LOSS_TERMS, MASK, METRIC_STATES, OUTPUTS, PER_SAMPLE_LOSS

LOSS = "loss"

Reduced = Dict[str, Any]


def default_kept_paths(flow: Any) -> tuple:
    """Paths whose activated outputs are gathered by default: tasks with tunable decoders."""
    return tuple(leaf.path for leaf in flow.graph.leaves if leaf.task.decoder.params())


class ReplicaReducer:
    """`reducer(module, x, y)` -> the reduced parts of one chunk (see the module docstring).

    Every tensor it returns has the chunk's samples (or a single row, for sums, counts and metric
    states) along its first dimension, so that `nn.parallel.gather` concatenates them and
    `merge_replicas` adds the states. Thread-safe: `nn.DataParallel` runs it in one thread per
    device.

    Args:
        flow: the `TaskFlow` whose loss, metrics and per-sample losses are reduced.
        keep: task paths whose activated outputs are gathered (default: `default_kept_paths`).
        explain: keep the logits of samples with `X["index"] < explain` (0: none).
    """

    def __init__(self, flow: Any, keep: Optional[Iterable[str]] = None, explain: int = 0):
        self.graph = flow.graph
        self._tasks = {leaf.path: leaf.task for leaf in self.graph.leaves}
        self.keep = tuple(keep) if keep is not None else default_kept_paths(flow)
        unknown = [p for p in self.keep if p not in self._tasks]
        if unknown:
            raise KeyError(f"keep: unknown task path(s) {unknown} of flow {self.graph.name!r}; known: {list(self._tasks)}")
        self.explain = int(explain)
        self._loss = flow.get_loss(distributed=False)  # terms only: the loss is combined after merging
        self._per_sample = flow.get_per_sample_loss()
        self._flow = flow
        self._metrics: Dict[Any, Any] = {}  # one FlowMetrics per device (one thread per device)
        self._lock = threading.Lock()

    def __call__(self, module: nn.Module, x: Mapping[str, Any], y: Mapping[str, Tensor]) -> Reduced:
        return self.reduce(module(x), x, y)

    def _fresh_metrics(self, device: torch.device) -> Any:
        with self._lock:
            metrics = self._metrics.get(device)
            if metrics is None:
                metrics = self._metrics[device] = self._flow.get_metrics()
        metrics.reset()
        return metrics

    def reduce(self, outputs: Mapping[str, Any], x: Mapping[str, Any], y: Mapping[str, Tensor]) -> Reduced:
        """The reduced parts of the model's `outputs` for the chunk `(x, y)`."""
        # (1,)-shaped, with their gradient, so that gather stacks them without a warning
        terms = {p: (s.reshape(1), c.reshape(1)) for p, (s, c) in self._loss.terms(outputs, y).items()}
        logits, masks = outputs[LOGITS], outputs[MASK]
        first = next(iter(logits.values()))
        with torch.no_grad():
            metrics = self._fresh_metrics(first.device)
            metrics.update(outputs, y)
            states = {k: v.unsqueeze(0) for k, v in metrics.states().items()}
            per_sample = {k: v.detach() for k, v in self._per_sample(outputs, y).items()}
            activated = outputs.get(ACTIVATED) or {}
            kept = {p: (activated[p] if p in activated else self._tasks[p].activate(logits[p].detach())).detach()
                    for p in self.keep}
            reduced: Reduced = {
                LOSS_TERMS: terms,
                METRIC_STATES: states,
                PER_SAMPLE_LOSS: per_sample,
                OUTPUTS: {MASK: dict(masks), ACTIVATED: kept},
            }
            index = x.get(INDEX) if isinstance(x, Mapping) else None
            if self.explain > 0 and isinstance(index, Tensor):
                rows = index.reshape(-1) < self.explain
                reduced[EXPLAIN] = {INDEX: index.reshape(-1)[rows],
                                    LOGITS: {p: z.detach()[rows] for p, z in logits.items()}}
        return reduced


def merge_replicas(gathered: Reduced) -> Reduced:
    """Add the gathered per-replica states (first dimension: one row per replica) and combine the
    loss: the result is what one device would have computed for the whole batch.

    Returns the gathered dict with `loss_terms` `{path: (sum, count)}` and `metric_states`
    `{key: state}` summed, and `"loss"`, the flow loss (weighted masked means).
    """
    terms = {p: (s.sum(0), c.sum(0)) for p, (s, c) in gathered[LOSS_TERMS].items()}
    merged = dict(gathered)
    merged[LOSS_TERMS] = terms
    merged[METRIC_STATES] = {k: v.sum(0) for k, v in gathered[METRIC_STATES].items()}
    return merged


class _ReplicaStep:
    """What `parallel_apply` calls on one device: the replica's forward, then the reducer."""

    def __init__(self, reducer: ReplicaReducer, module: nn.Module):
        self.reducer, self.module = reducer, module

    def __call__(self, x: Any, y: Any) -> Reduced:
        return self.reducer(self.module, x, y)


class BalancedDataParallel(nn.DataParallel):
    """`nn.DataParallel` whose replicas reduce the flow's loss, metrics and per-sample losses.

    `forward(x, y)` returns `merge_replicas` of the gathered reduced parts (with `"loss"`, the flow
    loss of the whole batch, and `loss_terms`, `metric_states`, `per_sample_loss`, `outputs` with
    `mask` and the kept `activated`, and `explain`); `forward(x)` is plain `nn.DataParallel`. The
    flow loss is combined here from the merged terms, without DDP scaling (`DataParallel` is one
    process). State dicts are those of `nn.DataParallel` (`module.` prefixes), so checkpoints load
    into either.

    Args:
        module: the model (`flow.torch()` or a model calling it).
        flow: the `TaskFlow`.
        device_ids, output_device, dim: as `nn.DataParallel`; `device_ids=[]` runs the module in
            place (one replica) even where GPUs exist.
        keep, explain: see `ReplicaReducer`.
    """

    def __init__(self, module: nn.Module, flow: Any, device_ids: Optional[Sequence[Any]] = None,
                 output_device: Any = None, dim: int = 0, keep: Optional[Iterable[str]] = None, explain: int = 0):
        super().__init__(module, device_ids=device_ids, output_device=output_device, dim=dim)
        if device_ids is not None and len(device_ids) == 0:
            self.device_ids = []
        if dim != 0:
            raise ValueError(f"BalancedDataParallel splits batches along dim 0 (samples); got dim={dim}")
        self.reducer = ReplicaReducer(flow, keep=keep, explain=explain)
        self._weights = flow.get_loss().weights

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        if len(inputs) == 2 and not kwargs and inputs[1] is not None:
            return self.reduced(inputs[0], inputs[1])
        if len(inputs) == 2 and inputs[1] is None:
            inputs = inputs[:1]
        return super().forward(*inputs, **kwargs)

    def reduced(self, x: Mapping[str, Any], y: Mapping[str, Tensor]) -> Reduced:
        """The merged reduced parts of the batch `(x, y)`, with `"loss"`."""
        with torch.autograd.profiler.record_function("BalancedDataParallel.forward"):
            merged = merge_replicas(self._gathered(x, y))
        merged[LOSS] = FlowLoss.combine(merged[LOSS_TERMS], self._weights)
        return merged

    def _gathered(self, x: Mapping[str, Any], y: Mapping[str, Tensor]) -> Reduced:
        if not self.device_ids:
            return self.reducer(self.module, x, y)
        for t in chain(self.module.parameters(), self.module.buffers()):
            if t.device != self.src_device_obj:
                raise RuntimeError(f"BalancedDataParallel: the module must have its parameters and buffers on "
                                   f"{self.src_device_obj} (device_ids[0]), found one on {t.device}")
        inputs, kwargs = self.scatter((x, y), {}, self.device_ids)
        if len(inputs) == 1:
            return self.reducer(self.module, *inputs[0])
        replicas = self.replicate(self.module, self.device_ids[: len(inputs)])
        steps = [_ReplicaStep(self.reducer, r) for r in replicas]
        results = self.parallel_apply(steps, inputs, kwargs)
        return self.gather(results, self.output_device)
