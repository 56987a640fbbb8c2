"""`flow.torch()`: the flow as an `nn.Module`, heads registered under task and flow names."""
from __future__ import annotations

from typing import Any, Dict, Mapping

from torch import Tensor, nn

from ..errors import HeadError, InputError
from ..graph import FlowGraph, InputKey, lookup
from ..keys import ACTIVATED, DECODED, GT, LOGITS, MASK
from .masks import compute_masks, mask_plan


def read_input(x: Any, key: InputKey, path: str) -> Any:
    """`x[k1][k2]...` under the input rule of `graph.lookup`, with an error naming the task, the
    available keys and, for a task inside a sub-flow, the spelling that works."""
    i, value = lookup(x, key)
    if i == len(key):
        return value
    feature = "x." + ".".join(key)
    where = "x" + "".join(f"[{p!r}]" for p in key[:i])
    if isinstance(value, Mapping):
        raise InputError(f"task {path!r} reads {feature}, but {where} has no key {key[i]!r} (has {sorted(value)})")
    msg = f"task {path!r} reads {feature}, but {where} is a {type(value).__name__}, not a mapping of features"
    if i and "." in path:
        sub = path.rsplit(".", 1)[0]
        msg += (f". Inside a sub-flow called with one feature, flow.<sub>(x.{key[i - 1]}), its tasks can read only that "
                f"feature, as x.{key[i - 1]} (a single feature x.f stands for {{'f': x.f}}); to let the tasks of "
                f"{sub!r} read their features by name, call the sub-flow with x, e.g. flow.{sub.rsplit('.', 1)[-1]}(x)")
    raise InputError(msg)


def _expected_width(head: nn.Module) -> Any:
    """The input width of a head's first layer that declares one (`in_features`, `in_channels`,
    `normalized_shape`), or None."""
    for module in head.modules():
        for attr in ("in_features", "in_channels"):
            width = getattr(module, attr, None)
            if isinstance(width, int):
                return width
        shape = getattr(module, "normalized_shape", None)
        if isinstance(shape, tuple) and len(shape) == 1:
            return shape[0]
    return None


def head_error(path: str, key: InputKey, head: nn.Module, value: Any, err: Exception) -> HeadError:
    """The error for a head that failed on its input: the task, the feature and both widths."""
    feature = "x." + ".".join(key)
    shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
    expected = _expected_width(head)
    width = value.shape[-1] if isinstance(value, Tensor) and value.dim() > 0 else None
    if expected is not None and width is not None and expected != width:
        hint = (f": the head takes {expected} input features, {feature} has {width} (shape {shape}). Make the "
                f"head's input width {width} (e.g. nn.Linear({width}, ...); in a Project, Converters(in_features={width})) "
                f"or feed it a feature of width {expected}")
    else:
        hint = f" of shape {shape}"
    return HeadError(f"task {path!r}: its head {type(head).__name__} failed on {feature}{hint} ({err})")


class FlowModule(nn.Module):
    """Runs every head on its input and adds the precondition masks.

    `forward(x)` returns `{"logits", "activated", "decoded", "mask"}`, each `{path: tensor}`.
    Masks come from `x["gt"]` when present (ground truth, three-valued) and from the decoded
    predictions otherwise. In training mode with `gt`, activation and decoding are skipped.
    Heads are looked up through `_modules` on every call so that DataParallel replicas use their
    own copies.
    """

    def __init__(self, graph: FlowGraph):
        super().__init__()
        self.graph = graph
        for node in graph.nodes:
            self.add_module(node.name, FlowModule(node.task.graph) if node.is_flow else node.task.module)
        self._routes = tuple((leaf.path, tuple(leaf.path.split(".")), leaf.input_key, leaf.task) for leaf in graph.leaves)
        mask_plan(graph)  # derived now, so that torch.compile only reads it

    def forward(self, x: Mapping[str, Any]) -> Dict[str, Dict[str, Tensor]]:
        logits: Dict[str, Tensor] = {}
        for path, route, key, _ in self._routes:
            head = self
            for name in route:
                head = head._modules[name]
            value = read_input(x, key, path)
            try:
                logits[path] = head(value)
            except RuntimeError as e:
                raise head_error(path, key, head, value, e) from e
        gt = x.get(GT) if isinstance(x, Mapping) else None
        out: Dict[str, Dict[str, Tensor]] = {LOGITS: logits}
        decoded = None
        if gt is None or not self.training:
            activated = {path: task.activate(logits[path]) for path, _, _, task in self._routes}
            decoded = {path: task.decode(activated[path]) for path, _, _, task in self._routes}
            out[ACTIVATED], out[DECODED] = activated, decoded
        first = next(iter(logits.values()))
        out[MASK] = compute_masks(self.graph, first.shape[0], first.device, gt=gt, decoded=decoded)
        return out

    def extra_repr(self) -> str:
        return f"flow={self.graph.name!r}"
