"""`flow.get_treelib_explainer()`: one `treelib.Tree` per sample, pruned where masks are false.

A tree has a root per sample (`"inp 0"`, or `root_format.format(id)` for the ids given), and a
node per task whose mask is true, tagged `"<name> | <text>"`, the text being what the task's
`describe` says about the sample (`ITask.describe`), `"decoded: [...], activated: [...], logits: [...]"`:

- binary task: the decision with the probability and the threshold it was compared with,
  `decoded: [True (0.3068 > 0.0297)], logits: [-0.8153]` (`<=` where the probability does not
  exceed the threshold; the threshold is the decoder's when the trees are made, so a tuned one
  shows as soon as it is loaded);
- classification: the `top_k` classes by declining probability, by name when the task has
  `class_names`, with their probabilities and logits in the same order:
  `decoded: [hoodie, polo, shirt], activated: [0.61, 0.2, 0.09], logits: [2.1, 1.0, 0.2]`;
- multilabel: every class with its decision, probability and threshold (one per class once
  tuned), then the logits in class order:
  `decoded: [glasses: True (0.81 > 0.42), beard: False (0.03 <= 0.5), hat: True (0.88 > 0.5)], logits: [...]`;
- masked language modeling: the most probable token id per position (the first `max_values`),
  with its probability and logit;
- bounded regression and any other task (unless it overrides `describe`): the values,
  flattened (the first `max_values`).

Numbers are printed with `digits` significant digits. A task preconditioned on another task
of its flow hangs below that task (below the latest one when there are several), as in the seed's
README: `camera_blocked` > `door_open` > `person_present` > `person_regression` > `face_regression` >
`face_x1`. Nested flows are inner nodes, shown when any task inside them is. Node identifiers are
the task and flow paths (the root's is `"/"`), so `tree["door_open"]` finds a task's node.

Speed: tensors are converted to NumPy once per call, each task describes the whole batch at once,
each shape of tree (which nodes show, below which parent) is laid out once, and trees get
identifiers (treelib draws a uuid per tree otherwise). The trees are built with treelib's public
`Tree.add_node` only, which takes most of the time (about 10 us per node).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from treelib import Node, Tree

from ..graph import FlowGraph, Leaf, Node as GraphNode
from ..tuning import as_numpy
from .masks import compute_masks

ROOT_ID = "/"


# The plan: tree nodes in flow order ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    path: str
    tag: str  # flows: their name; leaves: unused (formatted per sample)
    leaf: Optional[int]  # index into graph.leaves, None for a flow
    leaves: Tuple[int, ...]  # leaves at or below this item
    parents: Tuple[int, ...]  # candidate parents (item indices), best first; -1 = root


def _plan(graph: FlowGraph) -> List[_Item]:
    leaf_index = {leaf.path: i for i, leaf in enumerate(graph.leaves)}
    items: List[_Item] = []
    where: Dict[str, int] = {}

    def below(node: GraphNode) -> Tuple[int, ...]:
        if not node.is_flow:
            return (leaf_index[node.path],)
        return tuple(i for c in node.children for i in below(c))

    def walk(nodes: Sequence[GraphNode], container: int) -> None:
        for node in nodes:
            conds = [where[p] for cond in node.conditions for p in cond.paths if p in where]
            parents = ((max(conds),) if conds else ()) + (container,)
            where[node.path] = len(items)
            items.append(_Item(node.path, node.name, None if node.is_flow else leaf_index[node.path],
                               below(node), parents))
            if node.is_flow:
                walk(node.children, where[node.path])

    walk(graph.nodes, -1)
    return items


def _layout(items: Sequence[_Item], shown: Sequence[bool]) -> List[Tuple[str, Optional[int], str, str]]:
    """`(node id, leaf index or None, flow tag, parent id)` of the nodes of a tree that shows the
    items where `shown` is true, parents first: below the best candidate parent that is shown."""
    out = []
    for item, here in zip(items, shown):
        if here:
            parent = next((items[c].path for c in item.parents if c >= 0 and shown[c]), ROOT_ID)
            out.append((item.path, item.leaf, item.tag, parent))
    return out


class TreeExplainer:
    """`explainer(outputs, ids=None) -> [treelib.Tree]`, one tree per sample (see the module doc).

    `outputs`: the mapping returned by `flow.torch()` in eval mode, `{"logits", "activated",
    "decoded", "mask"}` of `{path: tensor or array}`; missing `activated` / `decoded` / `mask` are
    computed from the logits with the tasks' current decoders (masks from the decoded predictions).
    `ids`: names of the samples for the roots (default `0..N-1`).

    Options: `top_k` classes shown per classification task, `digits` significant digits,
    `max_values` values shown per vector, `root_format` for the root tags.

    `uncertainty=True` (default False) adds MC-dropout statistics to each task's node, read from
    `outputs["uncertainty"]` (`runner.predict(loader, mc_samples=n)` gives it, or put
    `uncertainty.mc_dropout(model, x)` there): `| entropy 0.31, MI 0.05, applied 0.9` for a
    classifier (entropy and mutual information in nats, averaged over the classes of a multilabel
    task), `| variance 0.002, applied 1` for any other task; `applied` is the fraction of passes
    in which the task applied.
    """

    def __init__(self, graph: FlowGraph, top_k: int = 3, digits: int = 4, max_values: int = 16,
                 root_format: str = "inp {}", uncertainty: bool = False):
        self.graph = graph
        self.top_k, self.digits, self.max_values, self.root_format = int(top_k), int(digits), int(max_values), root_format
        self.uncertainty = bool(uncertainty)
        self._items = _plan(graph)

    def __call__(self, outputs: Mapping[str, Mapping[str, Any]], ids: Optional[Sequence[Any]] = None) -> List[Tree]:
        logits, activated, decoded, masks = self._complete(outputs)
        paths = self.graph.paths
        n = decoded[paths[0]].shape[0]
        if ids is not None and len(ids) != n:
            raise ValueError(f"{len(ids)} ids for {n} samples")
        leaf_mask = np.stack([masks[p].reshape(-1).astype(bool) for p in paths], axis=1)  # (N, L)
        if leaf_mask.shape[0] != n:
            raise ValueError(f"masks have {leaf_mask.shape[0]} samples, decoded outputs {n}")
        present = np.stack([leaf_mask[:, it.leaves].any(1) for it in self._items], axis=1).tolist()  # (N, items)
        tags = [self._tags(leaf, logits.get(leaf.path), activated[leaf.path], decoded[leaf.path], n)
                for leaf in self.graph.leaves]
        if self.uncertainty:
            tags = [[t + u for t, u in zip(texts, self._uncertainty_texts(outputs, leaf, n))]
                    for texts, leaf in zip(tags, self.graph.leaves)]
        fmt = self.root_format
        batch = uuid.uuid4().hex  # tree identifiers: unique, without a uuid per tree (slow)
        trees: List[Tree] = []
        layouts: Dict[Tuple[bool, ...], list] = {}  # samples share a few shapes of tree: each laid out once
        for i, name in enumerate(range(n) if ids is None else ids):
            shape = tuple(present[i])
            layout = layouts.get(shape)
            if layout is None:
                layout = layouts[shape] = _layout(self._items, shape)
            tree = Tree(identifier=f"{batch}-{i}")
            tree.add_node(Node(fmt.format(name), ROOT_ID))
            for nid, leaf, tag, parent in layout:
                tree.add_node(Node(tag if leaf is None else tags[leaf][i], nid), parent)
            trees.append(tree)
        return trees

    def _tags(self, leaf: Leaf, logits: Optional[np.ndarray], activated: np.ndarray, decoded: np.ndarray,
              n: int) -> List[str]:
        """`"<name> | <the task's description>"` for each sample."""
        texts = leaf.task.describe(decoded, activated, logits, digits=self.digits, max_values=self.max_values,
                                   top_k=self.top_k)
        if len(texts) != n:
            raise ValueError(f"task {leaf.path!r}: describe() returned {len(texts)} texts for {n} samples; "
                             "it must return one text per sample")
        prefix = f"{leaf.path.rsplit('.', 1)[-1]} | "
        return [prefix + text for text in texts]

    def _uncertainty_texts(self, outputs: Mapping[str, Any], leaf: Leaf, n: int) -> List[str]:
        """`" | entropy .., MI .., applied .."` (classifiers) or `" | variance .., applied .."` per sample."""
        from ..uncertainty import APPLIED, ENTROPY, MUTUAL_INFORMATION, VARIANCE, per_sample

        stats = outputs.get("uncertainty") if isinstance(outputs, Mapping) else None
        if not isinstance(stats, Mapping) or leaf.path not in stats:
            raise KeyError(f"the explainer shows uncertainty (uncertainty=True) but outputs['uncertainty'] has no "
                           f"statistics for task {leaf.path!r}: predict with runner.predict(loader, mc_samples=n), or "
                           "set outputs['uncertainty'] = dcc.uncertainty.mc_dropout(model, x)")
        u = stats[leaf.path]
        shown = ((ENTROPY, "entropy"), (MUTUAL_INFORMATION, "MI")) if ENTROPY in u else ((VARIANCE, "variance"),)
        columns = [(label, as_numpy(per_sample(torch.as_tensor(u[key])))) for key, label in shown + ((APPLIED, "applied"),)]
        for label, values in columns:
            if values.shape[0] != n:
                raise ValueError(f"outputs['uncertainty'] of task {leaf.path!r} has {values.shape[0]} samples "
                                 f"({label}), the outputs {n}")
        d = self.digits
        return [" | " + ", ".join(f"{label} {values[i]:.{d}g}" for label, values in columns) for i in range(n)]

    def _complete(self, outputs):
        """NumPy logits/activated/decoded/masks, computing what is missing."""
        if not isinstance(outputs, Mapping) or not any(k in outputs for k in ("logits", "activated", "decoded")):
            raise TypeError("the explainer takes the outputs of flow.torch(): a mapping with 'logits', 'activated', "
                            f"'decoded' and 'mask', got {type(outputs).__name__}"
                            + (f" with keys {sorted(outputs)}" if isinstance(outputs, Mapping) else ""))
        raw_logits = outputs.get("logits") or {}
        raw_act = outputs.get("activated") or {}
        raw_dec = outputs.get("decoded") or {}
        raw_mask = outputs.get("mask")
        logits, activated, decoded, masks = {}, {}, {}, {}
        torch_decoded = {}
        for leaf in self.graph.leaves:
            p, task = leaf.path, leaf.task
            if p not in raw_logits and p not in raw_act:
                raise KeyError(f"outputs have neither logits nor activated values for task {p!r}")
            a = raw_act.get(p)
            if a is None:
                with torch.no_grad():
                    a = task.activate(torch.as_tensor(raw_logits[p]))
            d = raw_dec.get(p)
            if d is None or raw_mask is None:
                with torch.no_grad():
                    td = task.decode(torch.as_tensor(a)) if d is None else torch.as_tensor(d)
                torch_decoded[p] = td
                d = td if d is None else d
            if p in raw_logits:
                logits[p] = as_numpy(raw_logits[p])
            activated[p], decoded[p] = as_numpy(a), as_numpy(d)
        if raw_mask is None:
            n = next(iter(torch_decoded.values())).shape[0]
            raw_mask = compute_masks(self.graph, n, torch.device("cpu"),
                                     decoded={p: t.cpu() for p, t in torch_decoded.items()})
        for p in self.graph.paths:
            if p not in raw_mask:
                raise KeyError(f"outputs['mask'] has no entry for task {p!r}")
            masks[p] = as_numpy(raw_mask[p])
        return logits, activated, decoded, masks
