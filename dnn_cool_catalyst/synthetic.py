"""Generated many-task flows and their labels: the scale benchmarks' and tests' workload.

A flow of `n_tasks` leaves mixing the four common kinds (binary, bounded regression, 7-class
classification, 5-label multilabel), every head an `nn.Linear(features, k)` reading `x.features`,
with preconditions on earlier binary tasks (`out.b`, `~out.b`, and conjunctions of two) nested up
to depth 3; and labels for it that respect the preconditions, with some tasks labelled on a small
fraction of the samples only::

    tasks = generated_tasks(256, features=256, seed=0)
    flow = tasks.get_full_flow()
    labels = generated_labels(flow, 1024, seed=0)      # {path: labels}, missing markers included
    data = flow.get_dataset({"features": torch.randn(1024, 256)}, labels)

Everything is a function of the seed: two calls with the same arguments give the same flow (task
names, preconditions, head weights) and the same labels.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .dsl import Tasks
from .graph import FlowGraph
from .interpreters.masks import compute_masks
from .tasks import BinaryClassificationTask, BoundedRegressionTask, ClassificationTask, MultilabelClassificationTask

KINDS = ("binary", "regression", "classification", "multilabel")
KIND_WEIGHTS = (0.4, 0.2, 0.2, 0.2)  # binary tasks are the conditions, so they come more often
N_CLASSES = 7
N_LABELS = 5
MAX_DEPTH = 3
FEATURE_KEY = "features"
FLOW_NAME = "generated_flow"


def _plan(n_tasks: int, rng: np.random.Generator) -> List[Tuple[str, str, Tuple[Tuple[str, bool], ...]]]:
    """`(name, kind, ((condition task, negated), ...))` per task, in flow order: about 60% of the
    tasks are preconditioned on one earlier binary task (a quarter of those on two), chosen among
    the binary tasks whose own depth is below `MAX_DEPTH`."""
    plan = []
    depth: Dict[str, int] = {}
    for i in range(n_tasks):
        kind = "binary" if i == 0 else KINDS[int(rng.choice(len(KINDS), p=KIND_WEIGHTS))]
        name = f"t{i:03d}_{kind}"
        eligible = [n for n, k, _ in plan if k == "binary" and depth[n] < MAX_DEPTH]
        conds: Tuple[Tuple[str, bool], ...] = ()
        if eligible and rng.random() < 0.6:
            count = 2 if len(eligible) > 1 and rng.random() < 0.25 else 1
            picked = rng.choice(len(eligible), size=count, replace=False)
            conds = tuple((eligible[int(j)], bool(rng.random() < 0.3)) for j in sorted(picked))
        depth[name] = 1 + max((depth[c] for c, _ in conds), default=-1)
        plan.append((name, kind, conds))
    return plan


def _task(name: str, kind: str, features: int):
    if kind == "binary":
        return BinaryClassificationTask(name, nn.Linear(features, 1))
    if kind == "regression":
        return BoundedRegressionTask(name, nn.Linear(features, 1))
    if kind == "classification":
        return ClassificationTask(name, nn.Linear(features, N_CLASSES),
                                  class_names=[f"class_{j}" for j in range(N_CLASSES)])
    return MultilabelClassificationTask(name, nn.Linear(features, N_LABELS),
                                        class_names=[f"label_{j}" for j in range(N_LABELS)])


def generated_tasks(n_tasks: int, features: int = 256, seed: int = 0) -> Tasks:
    """`Tasks` holding `n_tasks` generated tasks and one flow over them (`get_full_flow()`, named
    `generated_flow`).

    Kinds drawn 40% binary, 20% each bounded regression, 7-class classification and 5-label
    multilabel (the first task is binary: the others may need a condition); names
    `t<index>_<kind>` (`t007_binary`); every head `nn.Linear(features, k)` reading `x.features`;
    preconditions `out.b` / `~out.b` (30% negated) on earlier binary tasks, one or two per task,
    nested at most `MAX_DEPTH` (3) deep. The head weights come from the seed as well (the global
    torch RNG is left as it was).
    """
    if n_tasks < 1:
        raise ValueError(f"generated_tasks needs at least one task, got n_tasks={n_tasks}")
    rng = np.random.default_rng(seed)
    plan = _plan(int(n_tasks), rng)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tasks = Tasks([_task(name, kind, features) for name, kind, _ in plan], inputs=[FEATURE_KEY])

    def generated_flow(flow, x, out):
        for name, _, conds in plan:
            entry = getattr(flow, name)(getattr(x, FEATURE_KEY))
            for cond_name, negated in conds:
                cond = getattr(out, cond_name)
                entry = entry | (~cond if negated else cond)
            out += entry
        return out

    tasks.add_flow(generated_flow, flow_name=FLOW_NAME)
    return tasks


def _full_labels(task, n: int, rng: np.random.Generator) -> Tensor:
    """Labels of every sample (none missing), in the task's canonical dtype and shape."""
    if isinstance(task, BinaryClassificationTask):
        return task.prepare_labels((rng.random(n) < 0.5).astype(np.float32))
    if isinstance(task, BoundedRegressionTask):
        return task.prepare_labels(rng.random(n).astype(np.float32))
    if isinstance(task, ClassificationTask) and task.class_names is not None:
        return task.prepare_labels(rng.integers(0, len(task.class_names), n))
    if isinstance(task, MultilabelClassificationTask) and task.class_names is not None:
        return task.prepare_labels((rng.random((n, len(task.class_names))) < 0.3).astype(np.float32))
    raise TypeError(f"generated_labels: task {task.name!r} is a {type(task).__name__}; it generates labels for binary, "
                    "bounded regression, and classification / multilabel tasks with class_names")


def _blank(labels: Tensor, task, missing: Tensor) -> Tensor:
    """`labels` with the task's missing marker on the samples where `missing` is true."""
    marker = task.missing_labels(labels.shape[0])
    keep = ~missing if labels.dim() == 1 else (~missing).unsqueeze(-1)
    return torch.where(keep, labels, marker)


def generated_labels(flow, n: int, seed: int = 0, rare_fraction: float = 0.1) -> Dict[str, Tensor]:
    """`{path: labels}` of `n` samples for every task of `flow` (a `TaskFlow`, e.g. from
    `generated_tasks`), in each task's canonical dtype with its missing markers (NaN, -1).

    The labels follow the preconditions: a task is labelled only where its precondition holds on
    the (hidden) full labels of the condition tasks, as a dataset annotated by a decision tree
    would be. On top, about a quarter of the tasks (chosen by the seed) are *rare*: labelled on
    `rare_fraction` of the samples only; the others miss 5% of their labels at random, so that
    conditions are also UNKNOWN on some samples. A multilabel task misses a few single elements too.
    """
    if not 0.0 < rare_fraction <= 1.0:
        raise ValueError(f"generated_labels: rare_fraction must be in (0, 1], got {rare_fraction}")
    graph: FlowGraph = flow.graph
    rng = np.random.default_rng([seed, 1])  # not the stream of generated_tasks(seed)
    full = {leaf.path: _full_labels(leaf.task, int(n), rng) for leaf in graph.leaves}
    # where each precondition holds on complete labels (nothing UNKNOWN): the one formula, compute_masks
    applies = compute_masks(graph, int(n), torch.device("cpu"), gt={p: full[p] for p in graph.condition_paths})
    labels = {}
    for leaf in graph.leaves:
        rare = rng.random() < 0.25
        present = torch.from_numpy(rng.random(int(n)) < (rare_fraction if rare else 0.95))
        out = _blank(full[leaf.path], leaf.task, ~(applies[leaf.path] & present))
        if out.dim() == 2:
            out = torch.where(torch.from_numpy(rng.random(tuple(out.shape)) < 0.02), torch.nan, out)
        labels[leaf.path] = out
    return labels


__all__ = ["generated_labels", "generated_tasks"]
