"""`flow.get_metrics()`: per-task metrics accumulated over a whole loader."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import Tensor

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
    `{path: |S_t|}` (samples with a label in the task's precondition)."""

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
            avail = task.available(targets[p]).reshape(targets[p].shape[0], -1).any(1)
            self._counts[p] = self._counts[p] + (avail & masks[p]).sum().double().cpu()
        for tm in self.metrics:
            preds = cache_a[tm.path] if tm.metric.uses == "activated" else cache_d[tm.path]
            tm.metric.update(preds, targets[tm.path], masks[tm.path])

    def num_samples(self) -> Dict[str, int]:
        return {p: int(c) for p, c in self._counts.items()}

    def compute(self) -> Dict[str, float]:
        return {tm.key: tm.metric.compute() for tm in self.metrics}
