"""`flow.get_treelib_explainer()`: one `treelib.Tree` per sample, pruned where masks are false.

A tree has a root per sample (`"inp 0"`, or `root_format.format(id)` for the ids given), and a
node per task whose mask is true, tagged `"<name> | decoded: [...], activated: [...], logits: [...]"`:

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
- bounded regression and any other task: the values, flattened (the first `max_values`).

Numbers are printed with `digits` significant digits. A task preconditioned on another task
of its flow hangs below that task (below the latest one when there are several), as in the seed's
README: `camera_blocked` > `door_open` > `person_present` > `person_regression` > `face_regression` >
`face_x1`. Nested flows are inner nodes, shown when any task inside them is. Node identifiers are
the task and flow paths (the root's is `"/"`), so `tree["door_open"]` finds a task's node.

Speed: tensors are converted to NumPy once per call and each task's tags are formatted for the
whole batch at once; nodes are linked directly into treelib's node tables when a self-check at
import shows that this gives trees identical to `Tree.add_node` (otherwise `add_node` is used).
"""
from __future__ import annotations

import gc
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from treelib import Node, Tree

from ..graph import FlowGraph, Node as GraphNode
from ..tasks.base import SortDecoder, ThresholdDecoder
from ..tuning import as_numpy
from .masks import compute_masks

ROOT_ID = "/"


# Building trees quickly --------------------------------------------------------------------------------------------


def _fill_fast(tree: Tree, entries: Sequence[Tuple[str, str, Optional[str]]]) -> None:
    """What `tree.add_node(Node(tag, nid), parent)` does for each `(nid, tag, parent)` (parents
    first), minus its checks and indirections."""
    tid = tree._identifier
    nodes = tree._nodes
    for nid, tag, parent in entries:
        node = Node(tag, nid)
        node._predecessor[tid] = parent
        node._initial_tree_id = tid
        nodes[nid] = node
        if parent is None:
            tree.root = nid
        else:
            nodes[parent]._successors.setdefault(tid, []).append(nid)


def _fill_public(tree: Tree, entries: Sequence[Tuple[str, str, Optional[str]]]) -> None:
    for nid, tag, parent in entries:
        tree.add_node(Node(tag, nid), parent=parent)


def _same_trees(a: Tree, b: Tree) -> bool:
    def state(t: Tree):
        tid = t.identifier
        return {nid: (n.tag, n.predecessor(tid), list(n.successors(tid)), n.is_leaf(tid), n.is_root(tid),
                      {k: v for k, v in vars(n).items() if k not in ("_predecessor", "_successors", "_initial_tree_id")},
                      n._initial_tree_id == tid)
                for nid, n in t.nodes.items()}

    return (state(a) == state(b) and a.root == b.root and a.depth() == b.depth()
            and a.paths_to_leaves() == b.paths_to_leaves() and a.show(stdout=False) == b.show(stdout=False)
            and [c.identifier for c in a.children(ROOT_ID)] == [c.identifier for c in b.children(ROOT_ID)]
            and a.parent("y").identifier == b.parent("y").identifier == "x")


def _fast_path_works() -> bool:
    """Whether `_fill_fast` builds the same trees as `Tree.add_node` with the installed treelib."""
    entries = [(ROOT_ID, "root", None), ("x", "x tag", ROOT_ID), ("y", "y tag", "x"), ("z", "z tag", ROOT_ID),
               ("w", "w tag", "x")]
    try:
        trees = []
        for fill in (_fill_public, _fill_fast):
            t = Tree()
            fill(t, entries)
            trees.append(t)
        return _same_trees(*trees)
    except Exception:  # any change of treelib's internals: use the public API
        return False


_FILL = _fill_fast if _fast_path_works() else _fill_public


# Formatting one task for a whole batch -------------------------------------------------------------------------------


def _values(row, digits: int, limit: int) -> str:
    vals = row[:limit]
    text = ", ".join(f"{v:.{digits}g}" if isinstance(v, float) else str(v) for v in vals)
    return text + (f", ... ({len(row)} values)" if len(row) > limit else "")


def _rows(x: Optional[np.ndarray], n: int) -> List[list]:
    if x is None or n == 0:
        return [[] for _ in range(n)]
    return x.reshape(n, -1).tolist()


def _joined(count: int, spec: str) -> str:
    return ", ".join([spec] * count)


def _format_scalar(name, logits, activated, decoded, digits, limit) -> List[str]:
    """One value per sample (binary, bounded regression): `name | decoded: [v], activated: [v], logits: [v]`."""
    n = decoded.shape[0]
    if not (decoded.size == n and activated.size == n and (logits is None or logits.size == n)):
        return _format_values(name, logits, activated, decoded, digits, limit)
    g = f"%.{digits}g"
    dspec = "%s" if decoded.dtype == np.bool_ else g
    cols = [decoded.reshape(-1).tolist(), activated.reshape(-1).tolist()]
    template = f"{name} | decoded: [{dspec}], activated: [{g}]"
    if logits is not None:
        cols.append(logits.reshape(-1).tolist())
        template += f", logits: [{g}]"
    return [template % row for row in zip(*cols)]


def _format_values(name, logits, activated, decoded, digits, limit) -> List[str]:
    """Any shape: the values of each sample, flattened, the first `limit` shown."""
    n = decoded.shape[0]
    d, a, lg = _rows(decoded, n), _rows(activated, n), _rows(logits, n)
    out = []
    for i in range(n):
        text = f"{name} | decoded: [{_values(d[i], digits, limit)}], activated: [{_values(a[i], digits, limit)}]"
        if logits is not None:
            text += f", logits: [{_values(lg[i], digits, limit)}]"
        out.append(text)
    return out


def _format_ranked(class_names, top_k):
    """Classification: the top-k classes with their probabilities and logits, in rank order."""

    def fmt(name, logits, activated, decoded, digits, limit) -> List[str]:
        if activated.ndim > 2:  # a sequence (masked language modeling): the top-1 entry per position
            return _format_positions(name, logits, activated, decoded, digits, limit)
        k = min(top_k, decoded.shape[-1])
        idx = decoded[:, :k].astype(np.int64)
        g = f"%.{digits}g"
        parts = [np.asarray(class_names, dtype=object)[idx] if class_names else idx,
                 np.take_along_axis(activated, idx, axis=-1)]
        template = f"{name} | decoded: [{_joined(k, '%s')}], activated: [{_joined(k, g)}]"
        if logits is not None:
            parts.append(np.take_along_axis(logits, idx, axis=-1))
            template += f", logits: [{_joined(k, g)}]"
        rows = np.concatenate([p.astype(object) for p in parts], axis=1).tolist()
        return [template % tuple(row) for row in rows]

    return fmt


def _format_positions(name, logits, activated, decoded, digits, limit) -> List[str]:
    top = decoded[..., :1].astype(np.int64)  # (N, T, 1)
    probs = np.take_along_axis(activated, top, axis=-1)[..., 0]
    lgs = np.take_along_axis(logits, top, axis=-1)[..., 0] if logits is not None else None
    return _format_values(name, lgs, probs, top[..., 0], digits, limit)


def _format_flags(class_names, decoder=None):
    """Thresholded outputs: one value for a binary task, every class for a multilabel task, each
    decision with `(activated > threshold)` from `decoder.threshold` as it is at the call."""

    def fmt(name, logits, activated, decoded, digits, limit) -> List[str]:
        n = decoded.shape[0]
        threshold = getattr(decoder, "threshold", None)
        if decoded.ndim != 2 or (decoded.shape[1] == 1 and not class_names):  # a binary task
            if isinstance(threshold, float) and decoded.size == n and activated.size == n:
                return _format_decisions(name, logits, activated.reshape(n, 1), decoded.reshape(n, 1), None,
                                         [threshold], digits)
            return _format_scalar(name, logits, activated, decoded, digits, limit)
        c = decoded.shape[1]
        names = list(class_names) if class_names and len(class_names) == c else [str(j) for j in range(c)]
        thresholds = [threshold] * c if isinstance(threshold, float) else threshold
        if isinstance(thresholds, list) and len(thresholds) == c and activated.size == decoded.size:
            return _format_decisions(name, logits, activated.reshape(decoded.shape), decoded, names, thresholds,
                                     digits)
        g = f"%.{digits}g"
        flags = ", ".join(f"{k.replace('%', '%%')}: %s" for k in names)
        parts = [decoded, activated.reshape(decoded.shape)]
        template = f"{name} | decoded: [{flags}], activated: [{_joined(c, g)}]"
        if logits is not None:
            parts.append(logits.reshape(decoded.shape))
            template += f", logits: [{_joined(c, g)}]"
        rows = np.concatenate([p.astype(object) for p in parts], axis=1).tolist()
        return [template % tuple(row) for row in rows]

    return fmt


def _format_decisions(name, logits, activated, decoded, names, thresholds, digits) -> List[str]:
    """`name | decoded: [<class>: <decision> (<activated> > <threshold>), ...], logits: [...]` for
    `(N, C)` arrays (`names` None: one unnamed column, a binary task)."""
    n, c = decoded.shape
    g = f"%.{digits}g"
    # compared in the precision the decoder compares in (at least float32), so that `>` / `<=`
    # agrees with a decision taken by the same threshold
    a = activated.astype(np.promote_types(activated.dtype, np.float32), copy=False)
    above = a > np.asarray(thresholds, dtype=a.dtype)
    ops = np.where(above, ">", "<=").astype(object)
    labels = [""] * c if names is None else [f"{k.replace('%', '%%')}: " for k in names]
    cells = ", ".join(f"{label}%s ({g} %s {t:.{digits}g})" for label, t in zip(labels, thresholds))
    parts = np.stack([decoded.astype(object), activated.astype(object), ops], axis=2).reshape(n, 3 * c)
    template = f"{name} | decoded: [{cells}]"
    if logits is not None:
        parts = np.concatenate([parts, logits.reshape(n, c).astype(object)], axis=1)
        template += f", logits: [{_joined(c, g)}]"
    return [template % tuple(row) for row in parts.tolist()]


def formatter_for(task: Any, top_k: int) -> Callable[..., List[str]]:
    """The tag formatter of a task: its own `explain(name, logits, activated, decoded, digits,
    limit) -> [str]` when it defines one (NumPy arrays of the batch in, one string per sample out),
    else one chosen by its decoder."""
    own = getattr(task, "explain", None)
    if callable(own):
        return own
    decoder = getattr(task, "decoder", None)
    names = getattr(task, "class_names", None)
    if isinstance(decoder, SortDecoder):
        return _format_ranked(names, top_k)
    if isinstance(decoder, ThresholdDecoder):
        return _format_flags(names, decoder)
    return _format_scalar


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
            conds = [where[lit.path] for lit in node.conditions if lit.path in where]
            parents = ((max(conds),) if conds else ()) + (container,)
            where[node.path] = len(items)
            items.append(_Item(node.path, node.name, None if node.is_flow else leaf_index[node.path],
                               below(node), parents))
            if node.is_flow:
                walk(node.children, where[node.path])

    walk(graph.nodes, -1)
    return items


class TreeExplainer:
    """`explainer(outputs, ids=None) -> [treelib.Tree]`, one tree per sample (see the module doc).

    `outputs`: the mapping returned by `flow.torch()` in eval mode, `{"logits", "activated",
    "decoded", "mask"}` of `{path: tensor or array}`; missing `activated` / `decoded` / `mask` are
    computed from the logits with the tasks' current decoders (masks from the decoded predictions).
    `ids`: names of the samples for the roots (default `0..N-1`).

    Options: `top_k` classes shown per classification task, `digits` significant digits,
    `max_values` values shown per vector, `root_format` for the root tags.
    """

    def __init__(self, graph: FlowGraph, top_k: int = 3, digits: int = 4, max_values: int = 16,
                 root_format: str = "inp {}"):
        self.graph = graph
        self.top_k, self.digits, self.max_values, self.root_format = int(top_k), int(digits), int(max_values), root_format
        self._items = _plan(graph)
        self._formatters = [formatter_for(leaf.task, self.top_k) for leaf in graph.leaves]

    def __call__(self, outputs: Mapping[str, Mapping[str, Any]], ids: Optional[Sequence[Any]] = None) -> List[Tree]:
        logits, activated, decoded, masks = self._complete(outputs)
        paths = self.graph.paths
        n = decoded[paths[0]].shape[0]
        if ids is not None and len(ids) != n:
            raise ValueError(f"{len(ids)} ids for {n} samples")
        leaf_mask = np.stack([masks[p].reshape(-1).astype(bool) for p in paths], axis=1)  # (N, L)
        if leaf_mask.shape[0] != n:
            raise ValueError(f"masks have {leaf_mask.shape[0]} samples, decoded outputs {n}")
        present = np.stack([leaf_mask[:, it.leaves].any(1) for it in self._items], axis=1).tolist()
        items = [(it.path, it.tag, it.leaf, it.parents) for it in self._items]
        trees: List[Tree] = []
        gc_was_enabled = gc.isenabled()
        gc.disable()  # tens of thousands of small acyclic objects: collection passes would dominate the time
        try:
            tags = [self._formatters[i](leaf.path.rsplit(".", 1)[-1], logits.get(leaf.path), activated[leaf.path],
                                        decoded[leaf.path], self.digits, self.max_values)
                    for i, leaf in enumerate(self.graph.leaves)]
            self._build(trees, range(n) if ids is None else ids, present, items, tags, _FILL)
        finally:
            if gc_was_enabled:
                gc.enable()
        return trees

    def _build(self, trees, names, present, items, tags, fill) -> None:
        fmt = self.root_format
        batch = uuid.uuid4().hex  # tree identifiers: unique, without a uuid per tree (slow)
        for i, name in enumerate(names):
            tree = Tree(identifier=f"{batch}-{i}")
            row = present[i]
            entries = [(ROOT_ID, fmt.format(name), None)]
            for k, (path, tag, leaf, parents) in enumerate(items):
                if row[k]:
                    parent = ROOT_ID
                    for c in parents:
                        if c < 0:
                            break
                        if row[c]:
                            parent = items[c][0]
                            break
                    entries.append((path, tag if leaf is None else tags[leaf][i], parent))
            fill(tree, entries)
            trees.append(tree)

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
