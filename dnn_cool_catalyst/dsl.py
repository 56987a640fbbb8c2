"""`Tasks`, `add_flow` and `TaskFlow`: the tracer that turns a flow function into a `FlowGraph`.

A flow function is run exactly once, at `add_flow` time, against tracing proxies:

- `flow.<name>(features)` calls a task or an earlier flow (unknown names fail with close matches),
- `x.<feature>` names an input (nested: `x.a.b` reads `x["a"]["b"]`; `x` alone is the whole input);
  a sub-flow called with `x.f` sees `x.f` as its `x` when that is a mapping of features, and
  `{"f": x.f}` when it is a single feature (the seed's `flow.object_flow(x.features)`, whose tasks
  read `x.features`); `flow.sub(x)` lets the sub-flow's tasks read every feature by name
  (`graph.lookup`),
- `out.<task>` is a condition on an earlier binary task of the same flow, `~` negates it, `&` joins,
  `a.or_else(b)` is Kleene's OR, `a ^ b` exclusive or (three-valued),
- `entry | condition` preconditions the entry; `out += entry` adds it.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .errors import FlowDefinitionError, capped, did_you_mean
from .graph import Compound, Condition, FlowGraph, InputKey, Literal, build_graph
from .keys import ELEMENTS, GT
from .tasks.base import ITask


class _Condition:
    """A conjunction of conditions built from `out.<task>`, `~`, `&`, `.or_else(...)` and `^`
    (`literals`: the conjoined `Literal`s and `Compound`s)."""

    __slots__ = ("literals", "_flow")

    def __init__(self, literals: Tuple[Condition, ...], flow: str):
        self.literals = literals
        self._flow = flow

    def __invert__(self) -> "_Condition":
        if len(self.literals) != 1 or not isinstance(self.literals[0], Literal):
            hint = ""
            if len(self.literals) == 1 and self.literals[0].op == "or":
                hint = " (e.g. ~a.or_else(b) is ~a & ~b)"
            raise FlowDefinitionError(
                f"flow {self._flow!r}: `~` applies to a single condition such as ~out.task, not to "
                f"{self}; negate each part instead{hint}")
        lit = self.literals[0]
        return _Condition((Literal(lit.path, not lit.negated),), self._flow)

    def __and__(self, other: "_Condition") -> "_Condition":
        self._check(other, "`&` joins")
        lits = self.literals + tuple(lit for lit in other.literals if lit not in self.literals)
        return _Condition(lits, self._flow)

    def or_else(self, *others: "_Condition") -> "_Condition":
        """Kleene's OR: TRUE where any is TRUE, else UNKNOWN where any is UNKNOWN, else FALSE
        (`|` is the precondition operator, so OR has a name, the older dnn_cool's)."""
        if not others:
            raise FlowDefinitionError(f"flow {self._flow!r}: {self}.or_else() needs at least one other condition")
        for other in others:
            self._check(other, ".or_else takes")
        return _Condition((Compound("or", (self._expr(),) + tuple(o._expr() for o in others)),), self._flow)

    def __xor__(self, other: "_Condition") -> "_Condition":
        """Exclusive or, three-valued: UNKNOWN where either is UNKNOWN, else TRUE where exactly one is TRUE."""
        self._check(other, "`^` joins")
        return _Condition((Compound("xor", (self._expr(), other._expr())),), self._flow)

    def _expr(self) -> Condition:
        return self.literals[0] if len(self.literals) == 1 else Compound("and", self.literals)

    def _check(self, other: Any, what: str) -> None:
        if not isinstance(other, _Condition):
            raise FlowDefinitionError(f"flow {self._flow!r}: {what} conditions (out.<task>), got {type(other).__name__}")

    def __or__(self, other):
        raise FlowDefinitionError(f"flow {self._flow!r}: conditions cannot be joined with `|` (`task | condition` "
                                  "preconditions a task): use `a.or_else(b)` for OR, `&` for AND, `^` for XOR")

    def __bool__(self):
        raise FlowDefinitionError(f"flow {self._flow!r}: a condition ({self}) has no truth value while tracing; "
                                  "use `task | condition`, `~`, `&`, `.or_else(...)` and `^`, not Python's if/and/or/not")

    def __str__(self) -> str:
        return " & ".join(map(str, self.literals))


class _Entry:
    """A traced call `flow.<name>(features)`, possibly preconditioned with `|`."""

    __slots__ = ("name", "target", "key", "conditions", "added", "_flow")

    def __init__(self, name: str, target: Any, key: InputKey, flow: str, conditions=()):
        self.name, self.target, self.key, self._flow = name, target, key, flow
        self.conditions: Tuple[Condition, ...] = tuple(conditions)
        self.added = False

    def __or__(self, cond: _Condition) -> "_Entry":
        if not isinstance(cond, _Condition):
            raise FlowDefinitionError(
                f"flow {self._flow!r}: `{self.name}(...) | c` needs a condition such as out.<task> or "
                f"~out.<task>, got {type(cond).__name__}")
        self.conditions += tuple(lit for lit in cond.literals if lit not in self.conditions)
        return self


class _Features:
    """The `x` proxy: attribute access names input features."""

    __slots__ = ("_key", "_flow", "_known")

    def __init__(self, key: InputKey, flow: str, known: Optional[Sequence[str]]):
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_flow", flow)
        object.__setattr__(self, "_known", known)

    def __getattr__(self, name: str) -> "_Features":
        if name.startswith("__"):
            raise AttributeError(name)
        if name == GT:
            raise FlowDefinitionError(f"flow {self._flow!r}: `x.gt` is reserved for ground-truth preconditions")
        if name == ELEMENTS and not self._key:
            raise FlowDefinitionError(f"flow {self._flow!r}: `x.elements` is reserved for the padding marker of tasks "
                                      "with element dimensions (bool (N, T), True where a token exists)")
        if not self._key and self._known is not None and name not in self._known:
            raise FlowDefinitionError(f"flow {self._flow!r}: unknown feature x.{name}{did_you_mean(name, self._known)}")
        return _Features(self._key + (name,), self._flow, None)

    def __setattr__(self, name, value):
        raise FlowDefinitionError(f"flow {self._flow!r}: inputs are read-only while tracing (x.{name} = ...)")


class _FlowProxy:
    """The `flow` proxy: `flow.<task or flow>(features)` records a call."""

    __slots__ = ("_tasks", "_flow", "_calls")

    def __init__(self, tasks: "Tasks", flow: str):
        self._tasks, self._flow, self._calls = tasks, flow, []

    def __getattr__(self, name: str) -> Callable[..., _Entry]:
        if name.startswith("__"):
            raise AttributeError(name)
        target = self._tasks._registry.get(name)
        if target is None:
            raise FlowDefinitionError(f"flow {self._flow!r}: unknown task or flow {name!r}"
                                      f"{did_you_mean(name, self._tasks._registry)}")

        def call(features=None, *rest, **kwargs) -> _Entry:
            if rest or kwargs:
                raise FlowDefinitionError(f"flow {self._flow!r}: flow.{name}(...) takes one input, e.g. x.features")
            if not isinstance(features, _Features):
                raise FlowDefinitionError(f"flow {self._flow!r}: flow.{name}(...) must be given x or x.<feature>, "
                                          f"got {type(features).__name__}")
            entry = _Entry(name, target, features._key, self._flow)
            self._calls.append(entry)
            return entry

        return call


class _Out:
    """The `out` proxy: `out += entry` adds, `out.<task>` is a condition on an added binary task."""

    def __init__(self, flow: str):
        object.__setattr__(self, "_flow", flow)
        object.__setattr__(self, "_entries", [])

    def __iadd__(self, entry: _Entry) -> "_Out":
        if not isinstance(entry, _Entry):
            raise FlowDefinitionError(f"flow {self._flow!r}: `out += ...` takes flow.<task>(x...), got {type(entry).__name__}")
        names = [e.name for e in self._entries]
        if entry.name in names:
            kind = "flow" if isinstance(entry.target, TaskFlow) else "task"
            raise FlowDefinitionError(
                f"flow {self._flow!r}: {kind} {entry.name!r} is added twice; both would share its "
                f"head{'s' if kind == 'flow' else ''} and decoder{'s' if kind == 'flow' else ''}. Add it once, or, "
                f"to predict it twice, use two {kind}s with different names")
        if entry.added:
            raise FlowDefinitionError(f"flow {self._flow!r}: the same call to {entry.name!r} is added twice")
        entry.added = True
        self._entries.append(entry)
        return self

    def __getattr__(self, name: str) -> _Condition:
        if name.startswith("__"):
            raise AttributeError(name)
        for e in self._entries:
            if e.name == name:
                if isinstance(e.target, TaskFlow):
                    raise FlowDefinitionError(f"flow {self._flow!r}: out.{name} is a flow; only binary tasks can be conditions")
                if not e.target.can_condition:
                    raise FlowDefinitionError(f"flow {self._flow!r}: out.{name} is a {type(e.target).__name__}; "
                                              "only binary tasks can be conditions")
                return _Condition((Literal(name),), self._flow)
        added = [e.name for e in self._entries]
        raise FlowDefinitionError(f"flow {self._flow!r}: condition out.{name} must name a task added earlier in this "
                                  f"flow{did_you_mean(name, added)}")

    def __setattr__(self, name, value):
        raise FlowDefinitionError(f"flow {self._flow!r}: use `out += flow.{name}(...)`, not assignment")


class TaskFlow:
    """A traced flow of tasks: compiles into the module, loss, dataset, metrics and the rest.

    Obtained from `Tasks.add_flow` / `Tasks.get_full_flow`; a flow can be called inside a later
    flow like a task (`flow.person_flow(x)`), and `| condition` then applies to every task in it.
    """

    def __init__(self, name: str, graph: FlowGraph):
        # The user's flow function is not kept: the traced graph holds everything the products
        # need, and a local function would not pickle (DDP pickles the runner).
        self.name = name
        self.graph = graph
        self._module = None

    def __repr__(self) -> str:
        return f"TaskFlow({self.name!r}, tasks={list(self.graph.paths)})"

    @property
    def tasks(self) -> Dict[str, ITask]:
        """Leaf tasks by path, in flow order."""
        return {leaf.path: leaf.task for leaf in self.graph.leaves}

    # Products (each an interpreter of `self.graph`) ---------------------------------------------
    def torch(self, fuse: Optional[bool] = None):
        """The `nn.Module` (heads as named submodules); the same object on every call.

        `fuse=True`: the tasks' plain `nn.Linear` heads that read the same input run as one GEMM
        per input (`interpreters.module.FlowModule`; same outputs, state dict with the same
        names). `None`: as the module was built, or `FUSE_DEFAULT` (False) on the first call. The
        module is built once: asking for the other `fuse` afterwards is an error."""
        from .interpreters.module import FUSE_DEFAULT, FlowModule

        if self._module is None:
            self._module = FlowModule(self.graph, fuse=FUSE_DEFAULT if fuse is None else fuse)
        elif fuse is not None and bool(fuse) != self._module.fuse:
            raise ValueError(f"flow {self.name!r}: flow.torch() was already built with fuse={self._module.fuse}, and "
                             f"it is one module per flow (the runner, the exporter and inference expect that one); "
                             f"call flow.torch(fuse={bool(fuse)}) before anything else builds it, or build "
                             f"FlowModule(flow.graph, fuse={bool(fuse)}) for a separate module")
        return self._module

    def get_loss(self, balancer: Any = None, **kwargs):
        """The masked flow loss `loss(outputs, targets) -> scalar` (an `nn.Module`).

        `balancer` (a `dnn_cool_catalyst.balancing.Balancer`, e.g. `UncertaintyWeighting()`):
        combine the tasks' losses with it instead of their weighted sum (`BalancedFlowLoss`; its
        learnable parameters are `loss_fn.parameters()`). None: the weighted sum, as always."""
        from .interpreters.loss import BalancedFlowLoss, FlowLoss

        if balancer is None:
            return FlowLoss(self.graph, **kwargs)
        return BalancedFlowLoss(self.graph, balancer, **kwargs)

    def get_per_sample_loss(self):
        """`(outputs, targets) -> {path: (N,), "overall": (N,)}`, NaN outside a task's mask."""
        from .interpreters.loss import FlowPerSampleLoss

        return FlowPerSampleLoss(self.graph)

    def get_dataset(self, inputs: Mapping[str, Any], labels: Mapping[str, Any], **kwargs):
        """A `Dataset` of `(X, y)`, `X["gt"]` holding the labels of exactly the precondition tasks;
        `partial=True` for a source labelled for some tasks only (see `FlowDataset`)."""
        from .interpreters.dataset import FlowDataset

        return FlowDataset(self.graph, inputs, labels, **kwargs)

    def get_metrics(self):
        """Fresh per-task metrics (`FlowMetrics`), each knowing its task path."""
        from .interpreters.metrics import FlowMetrics

        return FlowMetrics(self.graph)

    def get_activation(self):
        """`{path: logits} -> {path: activated}`."""
        from .interpreters.decoding import FlowActivation

        return FlowActivation(self.graph)

    def get_decoder(self):
        """`{path: activated} -> {path: decoded}`, with `tune` and `load_tuned`."""
        from .interpreters.decoding import FlowDecoder

        return FlowDecoder(self.graph)

    def get_evaluator(self, **kwargs):
        """`(predictions, targets) -> DataFrame[task_path, metric_name, metric_res, num_samples]`."""
        from .interpreters.evaluator import FlowEvaluator

        return FlowEvaluator(self.graph, **kwargs)

    def get_filter(self, output: str = "decoded", preconditions: Optional[str] = None, elements: bool = False):
        """`(outputs, targets) -> {path: (predictions, labels)}` restricted to the samples where each
        task applies (precondition not FALSE, a label present), for scoring with your own metrics
        (scikit-learn, torchmetrics). See `interpreters.filtering.FlowFilter` for the options."""
        from .interpreters.filtering import FlowFilter

        return FlowFilter(self.graph, output=output, preconditions=preconditions, elements=elements)

    def get_treelib_explainer(self, **kwargs):
        """`(outputs) -> [treelib.Tree]`, one per sample, branches of false preconditions pruned."""
        from .interpreters.explainer import TreeExplainer

        return TreeExplainer(self.graph, **kwargs)


class Tasks:
    """A registry of tasks and the flows composed from them.

    `inputs`, when given, lists the feature names `x.<name>` may use, so that a misspelt feature
    fails at `add_flow` time (otherwise it fails on the first batch, naming the task and key).
    """

    def __init__(self, tasks: Iterable[ITask] = (), inputs: Optional[Iterable[str]] = None):
        self._registry: Dict[str, Any] = {}
        self._flows: List[TaskFlow] = []
        self.inputs = list(inputs) if inputs is not None else None
        for task in tasks:
            self.add_task(task)

    def add_task(self, task: ITask) -> ITask:
        """Register a task under its name."""
        if not isinstance(task, ITask):
            raise TypeError(f"expected a task (ITask), got {type(task).__name__}")
        self._check_new_name(task.name)
        self._registry[task.name] = task
        return task

    def _check_new_name(self, name: str) -> None:
        if name in self._registry:
            raise FlowDefinitionError(f"a task or flow named {name!r} is already registered")

    def __getitem__(self, name: str):
        try:
            return self._registry[name]
        except KeyError:
            raise KeyError(f"no task or flow {name!r}{did_you_mean(name, self._registry)}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._registry

    @property
    def flows(self) -> Dict[str, TaskFlow]:
        return {f.name: f for f in self._flows}

    def add_flow(self, func: Optional[Callable] = None, flow_name: Optional[str] = None):
        """Trace `func(flow, x, out)` into a `TaskFlow` and register it (usable in later flows).

        Spellings: `@tasks.add_flow`, `@tasks.add_flow()`, `@tasks.add_flow(flow_name="f")`,
        `tasks.add_flow(func, flow_name=None)`. Returns the `TaskFlow`.
        """
        if func is None:
            return lambda f: self.add_flow(f, flow_name)
        if not callable(func):
            raise TypeError(f"add_flow takes a function (flow, x, out), got {type(func).__name__}")
        name = flow_name or func.__name__
        if not name.isidentifier():
            raise FlowDefinitionError(f"flow name must be a Python identifier, got {name!r}")
        self._check_new_name(name)
        flow = TaskFlow(name, self._trace(func, name))
        self._registry[name] = flow
        self._flows.append(flow)
        return flow

    def get_full_flow(self) -> TaskFlow:
        """The flow added last."""
        if not self._flows:
            raise FlowDefinitionError("no flow has been added yet (use @tasks.add_flow)")
        return self._flows[-1]

    def get_flow(self, name: str) -> TaskFlow:
        """A flow by name."""
        flow = self._registry.get(name)
        if not isinstance(flow, TaskFlow):
            raise KeyError(f"no flow {name!r}{did_you_mean(name, self.flows)}")
        return flow

    def _trace(self, func: Callable, name: str) -> FlowGraph:
        proxy = _FlowProxy(self, name)
        out = _Out(name)
        result = func(proxy, _Features((), name, self.inputs), out)
        if result is not out:
            raise FlowDefinitionError(f"flow {name!r} must end with `return out`"
                                      + (" (it returned nothing)" if result is None else ""))
        dangling = [c.name for c in proxy._calls if not c.added]
        if dangling:
            raise FlowDefinitionError(f"flow {name!r}: flow.{dangling[0]}(...) is never added with `out += ...`")
        entries = out._entries
        if not entries:
            raise FlowDefinitionError(f"flow {name!r} adds no task")
        order = {e.name: i for i, e in enumerate(entries)}
        for i, e in enumerate(entries):
            for cond in e.conditions:
                # `out.b` resolved before b was added is caught in _Out; this catches self-reference
                if any(order[p] >= i for p in cond.paths):
                    raise FlowDefinitionError(f"flow {name!r}: {e.name} | {cond} refers to a task not added before it")
        graph = build_graph(name, [(e.name, e.target, e.key, e.conditions,
                                    e.target.graph if isinstance(e.target, TaskFlow) else None) for e in entries])
        _check_single_paths(graph)
        return graph


def _check_single_paths(graph: FlowGraph) -> None:
    """Each task (and flow) object at one path only: at two paths, e.g. added directly and again
    inside a sub-flow, it would run one head and one decoder for both, so tuning would report one
    threshold per path and decoding apply whichever was loaded last."""
    seen: Dict[int, str] = {}

    def walk(nodes) -> None:
        for node in nodes:
            first = seen.setdefault(id(node.task), node.path)
            if first != node.path:
                raise FlowDefinitionError(_twice_message(graph.name, node, first))
            if node.is_flow:
                walk(node.children)

    walk(graph.nodes)


def _twice_message(flow: str, node, first: str) -> str:
    if not node.is_flow:
        return (f"flow {flow!r}: task {node.name!r} is used twice, as {first!r} and {node.path!r}; both would "
                f"share one head and one decoder (one threshold, tuned for one path and applied to both). "
                f"Use two tasks with different names, one per place (e.g. {node.name}_a and {node.name}_b), or "
                f"use it once")
    leaves = [leaf.path for leaf in node.task.graph.leaves]
    shown = capped([f"{p!r} at {first + '.' + p!r} and {node.path + '.' + p!r}" for p in leaves[:3]] + leaves[3:],
                   3, quote=False)
    return (f"flow {flow!r}: flow {node.name!r} is used twice, as {first!r} and {node.path!r}, so its tasks would "
            f"each share one head and one decoder at two paths: {shown}. Use flows over tasks with "
            f"different names, one per place, or use it once")
