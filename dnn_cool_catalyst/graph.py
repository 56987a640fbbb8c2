"""The immutable graph a flow function is traced into, once, at `add_flow` time.

A `FlowGraph` is a tree of `Node`s (a leaf task, or a nested flow with its own nodes) plus the
flattened `leaves` in flow order. Each leaf carries its *precondition*: the conjunction of every
condition applied to it and to each flow that contains it (literals `out.b` / `~out.b`, and
compounds `a.or_else(b)` / `a ^ b`), with task paths relative to the graph's root. Every product of a flow (module, loss, metrics, dataset, decoder, evaluator,
explainer) is an interpreter of this graph; none re-runs the user's function.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Tuple, Union

from .errors import FlowDefinitionError
from .tasks.base import ITask

InputKey = Tuple[str, ...]  # () is the whole input mapping, ("a", "b") is x["a"]["b"] (see `lookup`)


@dataclass(frozen=True)
class Literal:
    """`out.<path>` (negated=False) or `~out.<path>` (negated=True)."""

    path: str
    negated: bool = False

    def prefixed(self, prefix: str) -> "Literal":
        return Literal(f"{prefix}.{self.path}", self.negated)

    @property
    def paths(self) -> Tuple[str, ...]:
        """The condition task it reads."""
        return (self.path,)

    def __str__(self) -> str:
        return f"{'~' if self.negated else ''}out.{self.path}"


COMPOUND_OPS = ("and", "or", "xor")


@dataclass(frozen=True)
class Compound:
    """A condition joining others three-valuedly (Kleene): `"or"` (`a.or_else(b)`: TRUE if either is
    TRUE, else UNKNOWN if either is UNKNOWN, else FALSE), `"xor"` (`a ^ b`: UNKNOWN if either is
    UNKNOWN, else TRUE where exactly one is TRUE; for more operands, an odd number) or `"and"` (a conjunction
    used as an operand of those: `(out.a & out.b).or_else(out.c)`). A precondition is a conjunction
    of literals and compounds."""

    op: str
    operands: Tuple["Condition", ...]

    def __post_init__(self):
        if self.op not in COMPOUND_OPS:
            raise ValueError(f"unknown condition operator {self.op!r}; known: {COMPOUND_OPS}")

    @property
    def paths(self) -> Tuple[str, ...]:
        """The condition tasks it reads, each once, in order of appearance."""
        seen: Dict[str, None] = {}
        for operand in self.operands:
            for p in operand.paths:
                seen.setdefault(p, None)
        return tuple(seen)

    def prefixed(self, prefix: str) -> "Compound":
        return Compound(self.op, tuple(o.prefixed(prefix) for o in self.operands))

    def __str__(self) -> str:
        if self.op == "or":
            return f"{self.operands[0]}.or_else({', '.join(str(o) for o in self.operands[1:])})"
        return "(" + f" {'&' if self.op == 'and' else '^'} ".join(str(o) for o in self.operands) + ")"


Condition = Union[Literal, Compound]


@dataclass(frozen=True)
class Node:
    """One `out += ...` entry: a leaf task (`flow is None`) or a nested flow."""

    name: str
    path: str
    task: object  # ITask for a leaf, TaskFlow for a nested flow
    input_key: InputKey
    conditions: Tuple[Condition, ...]  # its own conditions (the `| c` applied to this entry)
    children: Tuple["Node", ...] = ()
    is_flow: bool = False


@dataclass(frozen=True)
class Leaf:
    """A leaf task at `path`, reading `input_key`, applying when all `precondition` conditions
    (literals and compounds) hold."""

    path: str
    task: ITask
    input_key: InputKey
    precondition: Tuple[Condition, ...]


@dataclass(frozen=True)
class FlowGraph:
    """A traced flow: its `nodes` (tree) and `leaves` (flattened, in flow order)."""

    name: str
    nodes: Tuple[Node, ...]
    leaves: Tuple[Leaf, ...]

    @property
    def paths(self) -> Tuple[str, ...]:
        return tuple(leaf.path for leaf in self.leaves)

    @property
    def condition_paths(self) -> Tuple[str, ...]:
        """Paths of the tasks used as preconditions, in flow order (they need labels in `gt`)."""
        used = {p for leaf in self.leaves for cond in leaf.precondition for p in cond.paths}
        return tuple(p for p in self.paths if p in used)

    @property
    def input_keys(self) -> Tuple[InputKey, ...]:
        seen: Dict[InputKey, None] = {}
        for leaf in self.leaves:
            seen.setdefault(leaf.input_key, None)
        return tuple(seen)

    def leaf(self, path: str) -> Leaf:
        for leaf in self.leaves:
            if leaf.path == path:
                return leaf
        raise KeyError(f"flow {self.name!r} has no task {path!r}; known: {list(self.paths)}")


def build_graph(name: str, entries) -> FlowGraph:
    """Assemble a graph from traced entries `(name, task, input_key, conditions, subgraph)`."""
    nodes = []
    for entry_name, task, key, conds, sub in entries:
        if sub is None:
            nodes.append(Node(entry_name, entry_name, task, key, conds))
        else:
            nodes.append(Node(entry_name, entry_name, task, key, conds,
                              children=tuple(_rebase(n, entry_name, key) for n in sub.nodes), is_flow=True))
    leaves = []
    _collect(tuple(nodes), (), leaves)
    _check_element_conditions(name, leaves)
    return FlowGraph(name, tuple(nodes), tuple(leaves))


def _check_element_conditions(name: str, leaves) -> None:
    """A condition on a task with element dimensions (`out.is_entity`, one value per token) can
    only precondition tasks with the same element dimensions (it applies element by element); a
    per-sample task has no token to take it from. Per-sample conditions apply to every task."""
    dims = {leaf.path: int(getattr(leaf.task, "element_dims", 0) or 0) for leaf in leaves}
    for leaf in leaves:
        for cond in leaf.precondition:
            for p in cond.paths:
                k = dims.get(p, 0)
                if k and k != dims[leaf.path]:
                    raise FlowDefinitionError(
                        f"flow {name!r}: task {leaf.path!r} ({dims[leaf.path]} element dimension(s)) is preconditioned "
                        f"by {cond}, which has {k} element dimension(s) (one value per token): a per-element condition "
                        f"applies only to tasks with the same element dimensions (give {leaf.path!r} element_dims={k}, "
                        "or condition it on a per-sample task)")


def _rebase(node: Node, prefix: str, key: InputKey) -> Node:
    return Node(
        node.name,
        f"{prefix}.{node.path}",
        node.task,
        key + node.input_key,
        tuple(lit.prefixed(prefix) for lit in node.conditions),
        tuple(_rebase(c, prefix, key) for c in node.children),
        node.is_flow,
    )


def _collect(nodes: Tuple[Node, ...], inherited: Tuple[Condition, ...], out: list) -> None:
    for node in nodes:
        pre = inherited + tuple(lit for lit in node.conditions if lit not in inherited)
        if node.is_flow:
            _collect(node.children, pre, out)
        else:
            out.append(Leaf(node.path, node.task, node.input_key, pre))


def lookup(x: Any, key: InputKey) -> Tuple[int, Any]:
    """Follow `key` into the inputs `x`: `(len(key), value)` when found, else `(i, node)` with
    `key[i]` the first part missing and `node` the value of `key[:i]`.

    `x.a.b` reads `x["a"]["b"]`. A sub-flow called with `x.f` sees `x.f` as its `x`, so its task
    reading `x.g` has the key `("f", "g")`. When `x.f` is a single feature (a tensor) rather than a
    mapping of features, it stands for the mapping `{f: x.f}`: `x.f.f` is `x.f`. That gives the seed's
    `flow.object_flow(x.features)`, whose tasks read `x.features`, its meaning (they read the
    caller's `x.features`), while any other name inside such a call stays an error, so a feature
    passed to a sub-flow is never silently ignored.
    """
    node = x
    for i, k in enumerate(key):
        if isinstance(node, Mapping):
            if k not in node:
                return i, node
            node = node[k]
        elif i and key[i - 1] == k:
            continue  # x.f.f on a single feature x.f (see above)
        elif hasattr(node, "keys"):  # mapping-like containers that are not `Mapping`s (e.g. a TensorDict)
            try:
                node = node[k]
            except (KeyError, TypeError, IndexError, ValueError):
                return i, node
        else:
            return i, node
    return len(key), node
