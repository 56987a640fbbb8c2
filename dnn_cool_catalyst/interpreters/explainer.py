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

Tasks with element dimensions (`element_dims=1`: one label per token) get one node per element
where they apply, `is_entity[2] | decoded: [True (0.91 > 0.5)], logits: [2.3]`, the node
identifier being `"<path>[2]"` (`"<path>[1, 4]"` with two element dimensions); a per-token task
preconditioned on another per-token task hangs below the same token's node (`entity_type[2]`
below `is_entity[2]`). The elements where the task does not apply (its precondition is FALSE
there, or the position is padding) are pruned and summarised in one node, `"<path>[pruned]"`,
`is_entity | does not apply at 2 of 5 tokens: 1, 3`, as are the applying elements beyond
`max_elements` (the first ones are shown; `not shown: 3 more tokens where it applies
(max_elements=64): 64, 65, 66`); the summary hangs where the task's node would for a per-sample
task. A task that applies at none of a sample's elements has no node, as a per-sample task whose
precondition is FALSE. Padding positions are known from the masks (a model given `x["elements"]`
leaves them out) or from the call's `elements=`, which also keeps them out of the counts.

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

from ..errors import capped
from ..functional import element_dims
from ..graph import FlowGraph, Leaf, Node as GraphNode
from ..tasks.describe import describe_elements
from ..tuning import as_numpy
from .masks import compute_masks

ROOT_ID = "/"
#: The identifier suffix of a per-element task's summary node (`"<path>[pruned]"`).
PRUNED = "[pruned]"


# The plan: tree nodes in flow order ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    path: str
    tag: str  # flows: their name; leaves: unused (formatted per sample)
    leaf: Optional[int]  # index into graph.leaves, None for a flow
    leaves: Tuple[int, ...]  # leaves at or below this item
    parents: Tuple[int, ...]  # candidate parents (item indices), best first; -1 = root
    per_element: bool = False  # a task with element dimensions: one node per element


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
            leaf = None if node.is_flow else leaf_index[node.path]
            per_element = leaf is not None and element_dims(graph.leaves[leaf].task) > 0
            items.append(_Item(node.path, node.name, leaf, below(node), parents, per_element))
            if node.is_flow:
                walk(node.children, where[node.path])

    walk(graph.nodes, -1)
    # a per-element condition task has no node of its own (its elements have), so what hangs below
    # it at the sample level hangs below the condition's own parent candidates instead
    expanded = []
    for item in items:
        candidates: List[int] = []

        def add(cs: Sequence[int]) -> None:
            for c in cs:
                candidates.append(c)
                if c >= 0 and items[c].per_element:
                    add(items[c].parents)

        add(item.parents)
        expanded.append(_Item(item.path, item.tag, item.leaf, item.leaves, tuple(dict.fromkeys(candidates)),
                              item.per_element))
    return expanded


# layout rows: (node id, kind, payload, parent id); kind "flow" (payload: its tag), "leaf" (leaf
# index), "element" ((leaf index, flat element index)) or "summary" (payload: the tag)
_Row = Tuple[str, str, Any, str]


def _layout(items: Sequence[_Item], shown: Sequence[bool], elements: Sequence[Tuple[int, ...]],
            summaries: Sequence[Optional[str]], names: Sequence[Sequence[str]]) -> List[_Row]:
    """The nodes of a tree that shows the items where `shown` is true, parents first: below the
    best candidate parent that is shown. A per-element item shows the elements `elements[j]`
    (flat indices; `names[j][e]` their labels), each below the same element of a per-element
    candidate parent where that is shown, and its summary `summaries[j]` (None: none) below its
    best per-sample candidate parent."""
    out: List[_Row] = []
    element_sets = [frozenset(e) for e in elements]

    def sample_parent(item: _Item) -> str:
        return next((items[c].path for c in item.parents
                     if c >= 0 and shown[c] and not items[c].per_element), ROOT_ID)

    for j, (item, here) in enumerate(zip(items, shown)):
        if not here:
            continue
        if not item.per_element:
            out.append((item.path, "leaf" if item.leaf is not None else "flow",
                        item.leaf if item.leaf is not None else item.tag, sample_parent(item)))
            continue
        for e in elements[j]:
            parent = ROOT_ID
            for c in item.parents:
                if c < 0:
                    break
                if items[c].per_element:
                    if shown[c] and e in element_sets[c]:
                        parent = f"{items[c].path}[{names[c][e]}]"
                        break
                elif shown[c]:
                    parent = items[c].path
                    break
            out.append((f"{item.path}[{names[j][e]}]", "element", (item.leaf, e), parent))
        if summaries[j] is not None:
            out.append((item.path + PRUNED, "summary", summaries[j], sample_parent(item)))
    return out


def _check_elements(leaf: Leaf, elements: np.ndarray, shape: Tuple[int, ...]) -> None:
    if elements.shape != shape:
        raise ValueError(f"elements (the padding marker) have shape {elements.shape}, the outputs of task "
                         f"{leaf.path!r} {shape}: give one bool per position, True where it exists")


def _element_names(shape: Tuple[int, ...]) -> List[str]:
    """Labels of the elements of shape `shape` in row-major order: `"0", "1", ...` for tokens,
    `"0, 0", "0, 1", ...` for two element dimensions."""
    if len(shape) == 1:
        return [str(t) for t in range(shape[0])]
    return [", ".join(map(str, idx)) for idx in np.ndindex(*shape)]


class TreeExplainer:
    """`explainer(outputs, ids=None, elements=None) -> [treelib.Tree]`, one tree per sample (see the module doc).

    `outputs`: the mapping returned by `flow.torch()` in eval mode, `{"logits", "activated",
    "decoded", "mask"}` of `{path: tensor or array}`; missing `activated` / `decoded` / `mask` are
    computed from the logits with the tasks' current decoders (masks from the decoded predictions).
    `ids`: names of the samples for the roots (default `0..N-1`). `elements`: for flows with
    per-element tasks, the padding marker `x["elements"]` (bool `(N, T)`, True where a token
    exists): padding positions then never show, nor count as positions where a task does not apply.

    Options: `top_k` classes shown per classification task, `digits` significant digits,
    `max_values` values shown per vector, `max_elements` element nodes shown per per-element task
    and sample (the others are counted in its summary node), `root_format` for the root tags.

    `uncertainty=True` (default False) adds MC-dropout statistics to each task's node, read from
    `outputs["uncertainty"]` (`runner.predict(loader, mc_samples=n)` gives it, or put
    `uncertainty.mc_dropout(model, x)` there): `| entropy 0.31, MI 0.05, applied 0.9` for a
    classifier (entropy and mutual information in nats, averaged over the classes of a multilabel
    task), `| variance 0.002, applied 1` for any other task; `applied` is the fraction of passes
    in which the task applied. A per-element task shows each element's own statistics on its node.
    """

    def __init__(self, graph: FlowGraph, top_k: int = 3, digits: int = 4, max_values: int = 16,
                 root_format: str = "inp {}", uncertainty: bool = False, max_elements: int = 64):
        self.graph = graph
        self.top_k, self.digits, self.max_values, self.root_format = int(top_k), int(digits), int(max_values), root_format
        self.uncertainty = bool(uncertainty)
        self.max_elements = int(max_elements)
        if self.max_elements < 0:
            raise ValueError(f"max_elements must be >= 0, got {max_elements!r}")
        self._items = _plan(graph)

    def __call__(self, outputs: Mapping[str, Mapping[str, Any]], ids: Optional[Sequence[Any]] = None,
                 elements: Any = None) -> List[Tree]:
        elements = None if elements is None else as_numpy(elements)
        if elements is not None and elements.dtype != np.bool_:
            raise TypeError(f"elements (the padding marker x['elements']) must be bool (N, T), got {elements.dtype}")
        logits, activated, decoded, masks = self._complete(outputs, elements)
        paths = self.graph.paths
        n = decoded[paths[0]].shape[0]
        if ids is not None and len(ids) != n:
            raise ValueError(f"{len(ids)} ids for {n} samples")
        leaves = self.graph.leaves
        # per leaf: (N,) bool for per-sample tasks, (N, |E|) for per-element tasks
        applies = [self._leaf_mask(leaf, masks[leaf.path], activated[leaf.path], n, elements) for leaf in leaves]
        leaf_mask = np.stack([m if m.ndim == 1 else m.any(1) for m in applies], axis=1)  # (N, L)
        present = np.stack([leaf_mask[:, it.leaves].any(1) for it in self._items], axis=1).tolist()  # (N, items)
        tags = [self._tags(leaf, logits.get(leaf.path), activated[leaf.path], decoded[leaf.path], n)
                for leaf in leaves]
        if self.uncertainty:
            tags = [self._with_uncertainty(texts, self._uncertainty_texts(outputs, leaf, n, applies[j]))
                    for j, (texts, leaf) in enumerate(zip(tags, leaves))]
        per_element = [j for j, it in enumerate(self._items) if it.per_element]
        names = [_element_names(self._element_shape(leaves[it.leaf], activated[it.path]))
                 if it.per_element else [] for it in self._items]
        exists = None if elements is None else elements.reshape(n, -1)
        fmt = self.root_format
        batch = uuid.uuid4().hex  # tree identifiers: unique, without a uuid per tree (slow)
        trees: List[Tree] = []
        layouts: Dict[Any, list] = {}  # samples share a few shapes of tree: each laid out once
        no_elements = tuple(() for _ in self._items)
        no_summaries = tuple(None for _ in self._items)
        for i, name in enumerate(range(n) if ids is None else ids):
            shape = tuple(present[i])
            shown_elements, summaries = no_elements, no_summaries
            if per_element:
                shown_elements, summaries = list(no_elements), list(no_summaries)
                for j in per_element:
                    if shape[j]:
                        m = applies[self._items[j].leaf][i]
                        shown_elements[j], summaries[j] = self._elements_of(
                            self._items[j], m, None if exists is None else exists[i], names[j])
                shown_elements, summaries = tuple(shown_elements), tuple(summaries)
            key = (shape, shown_elements, summaries)
            layout = layouts.get(key)
            if layout is None:
                layout = layouts[key] = _layout(self._items, shape, shown_elements, summaries, names)
            tree = Tree(identifier=f"{batch}-{i}")
            tree.add_node(Node(fmt.format(name), ROOT_ID))
            for nid, kind, payload, parent in layout:
                if kind == "leaf":
                    tag = tags[payload][i]
                elif kind == "element":
                    tag = tags[payload[0]][i][payload[1]]
                else:
                    tag = payload
                tree.add_node(Node(tag, nid), parent)
            trees.append(tree)
        return trees

    @staticmethod
    def _element_shape(leaf: Leaf, activated: np.ndarray) -> Tuple[int, ...]:
        k = element_dims(leaf.task)
        if activated.ndim < 1 + k:
            raise ValueError(f"task {leaf.path!r} has {k} element dimension(s) (element_dims) but its activated "
                             f"outputs have shape {activated.shape}: give them as (N, T, ...)")
        return tuple(activated.shape[1:1 + k])

    def _leaf_mask(self, leaf: Leaf, mask: np.ndarray, activated: np.ndarray, n: int,
                   elements: Optional[np.ndarray]) -> np.ndarray:
        """Where the task applies: `(N,)` for a per-sample task, `(N, |E|)` for a per-element one
        (a per-sample mask broadcast over the elements, padding `elements` left out)."""
        mask = mask.astype(bool, copy=False)
        if not element_dims(leaf.task):
            if mask.shape[0] != n or mask.size != n:
                raise ValueError(f"the mask of task {leaf.path!r} has shape {mask.shape}, the outputs {n} samples "
                                 "(a task without element dimensions has one mask value per sample)")
            return mask.reshape(n)
        shape = (n, *self._element_shape(leaf, activated))
        if mask.shape != shape:
            if mask.size != n:
                raise ValueError(f"the mask of task {leaf.path!r} has shape {mask.shape}; it must be per sample ({n},) "
                                 f"or per element {shape}, as its outputs")
            mask = np.broadcast_to(mask.reshape(n, *([1] * (len(shape) - 1))), shape)
        if elements is not None:
            _check_elements(leaf, elements, shape)
            mask = mask & elements
        return mask.reshape(n, -1)

    def _elements_of(self, item: _Item, mask: np.ndarray, exists: Optional[np.ndarray],
                     names: Sequence[str]) -> Tuple[Tuple[int, ...], Optional[str]]:
        """The elements of one sample shown for a per-element task (at most `max_elements`, in
        order) and the text of its summary node (None when nothing is pruned)."""
        applied = np.flatnonzero(mask)
        shown = tuple(applied[: self.max_elements].tolist())
        total = int(mask.shape[0] if exists is None else exists.sum())
        absent = np.flatnonzero(~mask if exists is None else exists & ~mask)
        unit = "token" if not names or "," not in names[0] else "element"  # one element dimension: tokens
        parts = []
        if absent.size:
            parts.append(f"does not apply at {absent.size} of {total} {unit}s: "
                         f"{capped([names[e] for e in absent], quote=False)}")
        hidden = applied[self.max_elements:]
        if hidden.size:
            parts.append(f"not shown: {hidden.size} more {unit}{'s' if hidden.size > 1 else ''} where it applies "
                         f"(max_elements={self.max_elements}): {capped([names[e] for e in hidden], quote=False)}")
        summary = f"{item.tag} | " + "; ".join(parts) if parts else None
        return shown, summary

    def _tags(self, leaf: Leaf, logits: Optional[np.ndarray], activated: np.ndarray, decoded: np.ndarray,
              n: int) -> List[Any]:
        """`"<name> | <the task's description>"` for each sample; a per-element task: a list per
        sample, `"<name>[<element>] | <description>"` for each of its elements."""
        options = dict(digits=self.digits, max_values=self.max_values, top_k=self.top_k)
        name = leaf.path.rsplit(".", 1)[-1]
        k = element_dims(leaf.task)
        if k:
            shape = self._element_shape(leaf, activated)
            try:
                texts = describe_elements(leaf.task.describe, k, decoded, activated, logits, **options)
            except ValueError as e:
                raise ValueError(f"task {leaf.path!r} (element_dims={k}): {e}") from None
            labels = _element_names(shape)
            return [[f"{name}[{label}] | {text}" for label, text in zip(labels, row)] for row in texts]
        texts = leaf.task.describe(decoded, activated, logits, **options)
        if len(texts) != n:
            raise ValueError(f"task {leaf.path!r}: describe() returned {len(texts)} texts for {n} samples; "
                             "it must return one text per sample")
        prefix = f"{name} | "
        return [prefix + text for text in texts]

    @staticmethod
    def _with_uncertainty(tags: List[Any], extra: List[Any]) -> List[Any]:
        return [[t + u for t, u in zip(ts, us)] if isinstance(ts, list) else ts + us for ts, us in zip(tags, extra)]

    def _uncertainty_texts(self, outputs: Mapping[str, Any], leaf: Leaf, n: int, applies: np.ndarray) -> List[Any]:
        """`" | entropy .., MI .., applied .."` (classifiers) or `" | variance .., applied .."` per
        sample; for a per-element task a list per sample, one text per element."""
        from ..uncertainty import APPLIED, ENTROPY, MUTUAL_INFORMATION, VARIANCE, per_sample

        stats = outputs.get("uncertainty") if isinstance(outputs, Mapping) else None
        if not isinstance(stats, Mapping) or leaf.path not in stats:
            raise KeyError(f"the explainer shows uncertainty (uncertainty=True) but outputs['uncertainty'] has no "
                           f"statistics for task {leaf.path!r}: predict with runner.predict(loader, mc_samples=n), or "
                           "set outputs['uncertainty'] = dcc.uncertainty.mc_dropout(model, x)")
        u = stats[leaf.path]
        shown = ((ENTROPY, "entropy"), (MUTUAL_INFORMATION, "MI")) if ENTROPY in u else ((VARIANCE, "variance"),)
        d = self.digits
        if applies.ndim == 2:  # per element: each element's own statistics
            m = applies.shape[1]
            columns = []
            for key, label in shown + ((APPLIED, "applied"),):
                values = as_numpy(torch.as_tensor(u[key])).astype(np.float64)
                if values.shape[0] != n or values.size % (n * m) and values.size != n:
                    raise ValueError(f"outputs['uncertainty'] of task {leaf.path!r} has {label} of shape {values.shape}, "
                                     f"the outputs {n} samples of {m} elements")
                if values.size == n:  # one value per sample: the same on each of its elements
                    values = np.repeat(values.reshape(n, 1), m, axis=1)
                columns.append((label, values.reshape(n, m, -1).mean(-1)))
            return [[" | " + ", ".join(f"{label} {values[i, e]:.{d}g}" for label, values in columns) for e in range(m)]
                    for i in range(n)]
        columns = [(label, as_numpy(per_sample(torch.as_tensor(u[key])))) for key, label in shown + ((APPLIED, "applied"),)]
        for label, values in columns:
            if values.shape[0] != n:
                raise ValueError(f"outputs['uncertainty'] of task {leaf.path!r} has {values.shape[0]} samples "
                                 f"({label}), the outputs {n}")
        return [" | " + ", ".join(f"{label} {values[i]:.{d}g}" for label, values in columns) for i in range(n)]

    def _complete(self, outputs, elements: Optional[np.ndarray] = None):
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
        if elements is not None:  # checked first: masks are computed with them
            for leaf in self.graph.leaves:
                out = raw_act.get(leaf.path, raw_logits.get(leaf.path))
                if element_dims(leaf.task) and out is not None:
                    _check_elements(leaf, elements, (out.shape[0], *self._element_shape(leaf, as_numpy(out))))
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
                                     decoded={p: t.cpu() for p, t in torch_decoded.items()},
                                     elements=None if elements is None else torch.as_tensor(elements))
        for p in self.graph.paths:
            if p not in raw_mask:
                raise KeyError(f"outputs['mask'] has no entry for task {p!r}")
            masks[p] = as_numpy(raw_mask[p])
        return logits, activated, decoded, masks
