"""`flow.get_metrics()`: per-task metrics accumulated over a whole loader."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
from torch import Tensor

from ..errors import LabelError
from ..graph import FlowGraph
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


class FlowMetrics:
    """All default metrics of a flow. `update(outputs, targets)` takes the module's outputs
    (activated/decoded are computed from logits when absent, as in training mode) and the masks in
    `outputs["mask"]`; `compute()` gives `{"<path>/<metric>": value}`; `num_samples()` gives
    `{path: |S_t|}` (samples with a label in the task's precondition).

    Everything accumulated is sums and counts: `states()` exports them as one flat dict of
    tensors, `merge(other)` adds another instance's (or such a dict: DataParallel replicas, chunks
    of a batch), `all_reduce()` sums them over the ranks of `torch.distributed`; the merged result
    is exactly that of one instance that saw all the data."""

    def __init__(self, graph: FlowGraph):
        self.graph = graph
        self.metrics: List[TaskMetric] = [
            TaskMetric(leaf.path, name, m, leaf.task) for leaf in graph.leaves for name, m in leaf.task.create_metrics()
        ]
        self._counts: Dict[str, Tensor] = {}
        self.reset()

    def __iter__(self):
        return iter(self.metrics)

    def __len__(self) -> int:
        return len(self.metrics)

    def reset(self) -> None:
        for tm in self.metrics:
            tm.metric.reset()
        self._counts = {leaf.path: torch.zeros((), dtype=torch.float64) for leaf in self.graph.leaves}

    def states(self) -> Dict[str, Tensor]:
        """All states, flat: `"<path>/<metric>/<state>"` and `"<path>/num_samples"` -> tensor."""
        out = {f"{p}/num_samples": c for p, c in self._counts.items()}
        for tm in self.metrics:
            for k, v in tm.metric.states.items():
                out[f"{tm.key}/{k}"] = v
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
        for tm in self.metrics:
            tm.metric.merge({k: states[f"{tm.key}/{k}"] for k in tm.metric.states})

    def all_reduce(self, device: Optional[torch.device] = None) -> None:
        """Sum all states over the processes of an initialised `torch.distributed` group (no-op
        otherwise); every rank then computes the global metrics."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        from ..metrics import _reduce_device

        dev = _reduce_device(device)
        for p in sorted(self._counts):
            t = self._counts[p].to(dev).clone() if dev is not None else self._counts[p].clone()
            dist.all_reduce(t)
            self._counts[p] = t
        for tm in self.metrics:
            tm.metric.all_reduce(dev)

    @torch.no_grad()
    def update(self, outputs: Mapping[str, Mapping[str, Tensor]], targets: Mapping[str, Tensor],
               masks: Optional[Mapping[str, Tensor]] = None) -> None:
        masks = outputs["mask"] if masks is None else masks
        activated = outputs.get("activated") or {}
        decoded = outputs.get("decoded") or {}
        cache_a: Dict[str, Tensor] = {}
        cache_d: Dict[str, Tensor] = {}
        for leaf in self.graph.leaves:
            p, task = leaf.path, leaf.task
            a = activated.get(p)
            if a is None:
                a = task.activate(outputs["logits"][p].detach())
            cache_a[p] = a
            d = decoded.get(p)
            cache_d[p] = task.decode(a) if d is None else d
            if p not in targets:
                raise LabelError(f"targets have no labels for task {p!r} of flow {self.graph.name!r}; "
                                 f"they have {sorted(targets)}")
            avail = task.available(targets[p])
            if avail.dim() > 1:  # per element: a sample counts when any of its elements is labelled
                avail = avail.flatten(1).any(1)
            seen = (avail & masks[p].reshape(-1)).sum().double()
            c = self._counts[p]
            if c.device != seen.device and seen.device.type != "mps":
                c = c.to(seen.device)
            self._counts[p] = c + seen.to(c.device)
        for tm in self.metrics:
            preds = cache_a[tm.path] if tm.metric.uses == "activated" else cache_d[tm.path]
            tm.metric.update(preds, targets[tm.path], masks[tm.path])

    def num_samples(self) -> Dict[str, int]:
        return {p: int(c) for p, c in self._counts.items()}

    def compute(self) -> Dict[str, float]:
        return {tm.key: tm.metric.compute() for tm in self.metrics}
