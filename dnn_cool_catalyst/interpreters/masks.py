"""Precondition masks (API.md section 4), from ground truth or from decoded predictions."""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

from ..errors import InputError
from ..functional import and_masks, element_dims, expand_mask, is_compiling
from ..graph import Compound, Condition, FlowGraph, Literal
from ..tasks.binary import BinaryClassificationTask, first_column


def compute_masks(graph: FlowGraph, batch_size: int, device: torch.device,
                  gt: Optional[Mapping[str, Tensor]] = None,
                  decoded: Optional[Mapping[str, Tensor]] = None,
                  elements: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """`{path: bool (N,)}`: where each leaf's precondition is not FALSE.

    Tasks with element dimensions (`ITask.element_dims`, one label per token): a condition on
    such a task is a value per element, and the mask of a task it preconditions is `(N, *E)`
    (per-sample conditions broadcast over the elements, `functional.and_masks`). `elements`
    (the input's `x["elements"]`, bool `(N, *E)`, True where a position exists) is the padding
    marker: every task with element dimensions gets it in its mask, so padding positions never
    apply, at inference too (where there are no labels to mark them missing).

    With `gt` (training, ground-truth evaluation) conditions are three-valued: `out.b` is FALSE
    where b's own precondition is FALSE, UNKNOWN where b's label is missing, else the label; `~`
    flips only known labels; `&` is Kleene's. Only "not FALSE" matters for masks, so a literal is
    `mask_b & (missing_b | label_b != negated)`. Without `gt`, `decoded` predictions are used and
    never unknown: `mask_b & (decoded_b != negated)`.

    Compounds (`a.or_else(b)`, `a ^ b`, and conjunctions inside them) are evaluated three-valued
    (`three_valued`): their mask is where they are not FALSE.

    How (one pass, not a loop per task): a leaf whose precondition is literals only, and whose
    condition tasks' preconditions are too (recursively), has as mask the AND of every literal in
    that closure (`mask_b` unrolls into b's own literals). So each literal used is evaluated once,
    as a row of a `(K, N)` boolean matrix (one comparison for all binary condition tasks), and the
    masks of all such leaves are one gather of their closures' rows and one `all` (`MaskPlan`).
    Leaves that involve a compound follow, in flow order, the three-valued path. The masks of the
    literal-only leaves are rows of one `(L, N)` tensor (views; they are read, never written).
    """
    if gt is None and decoded is None:
        raise ValueError("compute_masks needs ground truth (gt) or decoded predictions")
    plan = mask_plan(graph)
    rows = plan.literal_rows(graph, batch_size, device, gt, decoded)
    # (J * L, N) gathered rows, the j-th literal of every leaf's closure (padded with the ones
    # row) in block j; AND of the J blocks (J elementwise ops: `all` over a middle dimension of
    # a bool tensor is ~40x slower on CPU)
    blocks = rows.index_select(0, plan.index(rows.device)).view(plan.width, len(plan.pure_paths), rows.shape[1])
    pure = blocks[0]
    for j in range(1, plan.width):
        pure = pure & blocks[j]
    masks: Dict[str, Tensor] = dict(zip(plan.pure_paths, pure.unbind(0)))
    if elements is not None:
        for path in plan.element_paths:
            if path in masks:
                masks[path] = and_masks(masks[path], _elements(graph, path, elements, batch_size))
    if not plan.other_leaves:
        return masks
    literal_values: Dict[Condition, Tensor] = {}
    for leaf in plan.other_leaves:
        m = None
        if elements is not None and leaf.path in plan.element_paths:
            m = _elements(graph, leaf.path, elements, batch_size)
        for lit in leaf.precondition:
            v = literal_values.get(lit)
            if v is None:
                if isinstance(lit, Compound):
                    _, false = three_valued(graph, lit, masks, gt, decoded)
                    v = ~false
                else:
                    v = and_masks(masks[lit.path], _literal(graph, lit, gt, decoded))
                literal_values[lit] = v
            m = v if m is None else and_masks(m, v)
        masks[leaf.path] = m if m is not None else torch.ones(batch_size, dtype=torch.bool, device=device)
    return {path: masks[path] for path in graph.paths}  # flow order, as every consumer iterates it


def _elements(graph: FlowGraph, path: str, elements: Tensor, batch_size: int) -> Tensor:
    """The padding marker `x["elements"]` checked against a task with element dimensions."""
    k = element_dims(graph.leaf(path).task)
    if not isinstance(elements, Tensor) or elements.dtype != torch.bool:
        raise InputError(f"x['elements'] (which positions exist, for task {path!r} and the other tasks with element "
                         f"dimensions) must be a bool tensor (N, T), got "
                         f"{elements.dtype if isinstance(elements, Tensor) else type(elements).__name__}")
    if elements.dim() < 2 or elements.dim() > 1 + k or elements.shape[0] != batch_size:
        raise InputError(f"x['elements'] has shape {tuple(elements.shape)}; task {path!r} has {k} element dimension(s) "
                         f"and the batch {batch_size} samples: give (N, T) for tokens")
    return elements


def _default_condition(task) -> bool:
    """Whether the task evaluates conditions as `BinaryClassificationTask` does (not overridden),
    so that its literals can be computed together with the other such tasks'."""
    cls = type(task)
    return (cls.condition is BinaryClassificationTask.condition
            and cls.condition_not_false is BinaryClassificationTask.condition_not_false)


class MaskPlan:
    """What `compute_masks` needs of a graph, derived once (`mask_plan`): the literals `(path,
    negated)` the literal-only leaves use, the row of each in the `(K, N)` literal matrix, and
    each such leaf's closure as row indices (padded with the all-true last row to `width`), laid
    out j-major: the first literal of every leaf, then the second, and so on.

    Rows: first `out.b` then `~out.b` for every binary condition task `b` evaluated together
    (`fast_paths`), then one row per literal of other condition tasks (`other_literals`), then a
    row of ones.
    """

    def __init__(self, graph: FlowGraph):
        leaves = {leaf.path: leaf for leaf in graph.leaves}
        # tasks with element dimensions: their masks may be per element (conditions per token, the
        # padding marker), so they, and the leaves that read their conditions, take the
        # sequential path, where `and_masks` broadcasts per-sample values over the elements
        self.element_paths = frozenset(leaf.path for leaf in graph.leaves if element_dims(leaf.task))
        closure: Dict[str, Optional[Tuple[Literal, ...]]] = {}  # None: a compound is involved
        for leaf in graph.leaves:
            lits: Dict[Literal, None] = {}
            for cond in leaf.precondition:
                inner = closure.get(cond.path) if isinstance(cond, Literal) and cond.path not in self.element_paths else None
                if inner is None:
                    lits = None
                    break
                lits.update(dict.fromkeys(inner))
                lits[cond] = None
            closure[leaf.path] = None if lits is None else tuple(lits)
        used = {lit.path: None for lits in closure.values() if lits for lit in lits}
        self.fast_paths = tuple(p for p in used if _default_condition(leaves[p].task))
        fast = set(self.fast_paths)
        self.other_literals = tuple(dict.fromkeys(lit for lits in closure.values() if lits for lit in lits
                                                  if lit.path not in fast))
        row = {Literal(p, neg): i + (len(self.fast_paths) if neg else 0)
               for i, p in enumerate(self.fast_paths) for neg in (False, True)}
        row.update({lit: 2 * len(self.fast_paths) + i for i, lit in enumerate(self.other_literals)})
        ones = 2 * len(self.fast_paths) + len(self.other_literals)
        self.pure_paths = tuple(p for p, lits in closure.items() if lits is not None)
        self.other_leaves = tuple(leaf for leaf in graph.leaves if closure[leaf.path] is None)
        self.width = max([len(closure[p]) for p in self.pure_paths] + [1])
        padded = [[row[lit] for lit in closure[p]] + [ones] * (self.width - len(closure[p])) for p in self.pure_paths]
        self._index = [padded[i][j] for j in range(self.width) for i in range(len(padded))]  # j-major
        self._by_device: Dict[torch.device, Tensor] = {}

    def index(self, device: torch.device) -> Tensor:
        """The closures' row indices, `(width * L,)` j-major, on `device` (made once per device)."""
        t = self._by_device.get(device)
        if t is None:
            t = torch.tensor(self._index, dtype=torch.long, device=device).reshape(-1)
            if not is_compiling():  # a traced constant is the graph's, not a cache entry
                self._by_device[device] = t
        return t

    def literal_rows(self, graph: FlowGraph, batch_size: int, device: torch.device, gt, decoded) -> Tensor:
        """The `(K + 1, N)` boolean matrix: where each literal is not FALSE, before `&` with its
        condition task's own mask (that is in the closure already), and a last row of ones."""
        parts = []
        if self.fast_paths:
            if gt is not None:
                _check_gt(graph, self.fast_paths, gt)
                labels = _first_columns([gt[p] for p in self.fast_paths])
                # comparisons with NaN are false: a missing label makes neither literal FALSE
                parts += [~(labels <= 0.5), ~(labels > 0.5)]
            else:
                value = _first_columns([decoded[p] for p in self.fast_paths]).bool()
                parts += [value, ~value]
        parts += [_literal(graph, lit, gt, decoded).unsqueeze(0) for lit in self.other_literals]
        parts.append(torch.ones(1, parts[0].shape[1] if parts else batch_size, dtype=torch.bool,
                                device=parts[0].device if parts else device))
        return torch.cat(parts) if len(parts) > 1 else parts[0]


def _first_columns(values) -> Tensor:
    """`(K, N)`: `first_column` of each of K tensors, as `BinaryClassificationTask.condition` reads
    them; one stack when they share a shape (`(N,)` or `(N, 1)`, the usual case), else one by one.
    Different dtypes are promoted (0/1 labels and NaN, and nonzero-ness, are kept exactly)."""
    shape = values[0].shape
    if all(v.shape == shape for v in values):
        stacked = torch.stack(values)
        return stacked if stacked.dim() == 2 else stacked.flatten(2)[:, :, 0]
    return torch.stack([first_column(v) for v in values])


def mask_plan(graph: FlowGraph) -> MaskPlan:
    """The graph's `MaskPlan`, derived on first use and kept with the (immutable) graph.

    Kept in the graph's instance dict, not a field: equality, hashing and repr of the graph stay
    its structure's. `FlowModule` derives it when built, so torch.compile only reads it."""
    plan = graph.__dict__.get("_mask_plan")
    if plan is None:
        plan = MaskPlan(graph)
        if not is_compiling():
            object.__setattr__(graph, "_mask_plan", plan)  # FlowGraph is a frozen dataclass
    return plan


def _check_gt(graph: FlowGraph, paths, gt) -> None:
    for path in paths:
        if path not in gt:
            raise InputError(f"x['gt'] has no labels for precondition task {path!r} of flow {graph.name!r}; "
                             f"gt has {sorted(gt)}")


def _literal(graph: FlowGraph, lit: Literal, gt, decoded) -> Tensor:
    """Where the literal is not FALSE, before `&` with the condition task's own mask."""
    task = graph.leaf(lit.path).task
    if gt is not None:
        if lit.path not in gt:
            raise InputError(f"x['gt'] has no labels for precondition task {lit.path!r} of flow {graph.name!r}; "
                             f"gt has {sorted(gt)}")
        return task.condition_not_false(gt[lit.path], lit.negated)
    _, value = task.condition(decoded[lit.path], from_labels=False)
    return ~value if lit.negated else value


def three_valued(graph: FlowGraph, cond, masks: Mapping[str, Tensor], gt, decoded) -> Tuple[Tensor, Tensor]:
    """`(true, false)` boolean `(N,)` of a condition (UNKNOWN where neither): a literal `out.b` is
    FALSE where b's precondition is FALSE (`masks[b]` false) or its label / decoded value says no
    (yes for `~out.b`), TRUE where b applies and says yes (no), UNKNOWN where b applies and its label
    is missing; `and` / `or` / `xor` are Kleene's (API.md section 4, extended in the README)."""
    if isinstance(cond, Literal):
        task = graph.leaf(cond.path).task
        if gt is not None:
            if cond.path not in gt:
                raise InputError(f"x['gt'] has no labels for precondition task {cond.path!r} of flow {graph.name!r}; "
                                 f"gt has {sorted(gt)}")
            known, value = task.condition(gt[cond.path], from_labels=True)
        else:
            known, value = task.condition(decoded[cond.path], from_labels=False)
        says = value != cond.negated
        applies, known, says = _broadcast(masks[cond.path], known, says)
        return applies & known & says, ~applies | (known & ~says)
    parts = [three_valued(graph, c, masks, gt, decoded) for c in cond.operands]
    values = _broadcast(*(t for part in parts for t in part))
    trues = torch.stack(values[0::2])
    falses = torch.stack(values[1::2])
    if cond.op == "and":
        return trues.all(0), falses.any(0)
    if cond.op == "or":
        return trues.any(0), falses.all(0)
    known = (trues | falses).all(0)
    odd = (trues.sum(0) % 2) == 1
    return known & odd, known & ~odd


def _broadcast(*masks: Tensor) -> Tuple[Tensor, ...]:
    """Masks of leading shapes (`(N,)`, `(N, T)`) expanded to the shape of the one with the most
    dimensions (`functional.expand_mask`: per-sample values repeat over the elements)."""
    widest = masks[0]
    for m in masks[1:]:  # not max(key=...): torch.compile cannot trace it
        if m.dim() > widest.dim():
            widest = m
    return tuple(m if m.dim() == widest.dim() else expand_mask(m, widest).expand(widest.shape) for m in masks)
