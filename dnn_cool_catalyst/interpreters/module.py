"""`flow.torch()`: the flow as an `nn.Module`, heads registered under task and flow names."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import HeadError, InputError
from ..graph import FlowGraph, InputKey, lookup
from ..keys import ACTIVATED, DECODED, ELEMENTS, GT, LOGITS, MASK
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


FUSE_DEFAULT = False  # `flow.torch()` without `fuse=`: see `FlowModule` for why not fused by default


def fusable(head: nn.Module) -> bool:
    """Whether a head can join a fused group: exactly `nn.Linear` (not a subclass, whose forward may
    do more than `x @ W.T + b`)."""
    return type(head) is nn.Linear


def _group_key(head: nn.Linear, input_key: InputKey) -> Tuple[Any, ...]:
    w, b = head.weight, head.bias
    return (input_key, head.in_features, w.dtype, w.device, w.requires_grad,
            None if b is None else (b.dtype, b.device, b.requires_grad))


class FusedLinear(nn.Module):
    """The `nn.Linear` heads of several tasks that read one input, as one GEMM: `forward(x)` returns
    `F.linear(x, weight, bias).split(out_features)`, one view per head.

    Storage: one concatenated `weight` `(sum k, in)` and `bias` `(sum k,)` Parameter, initialised
    from the heads, rather than each head's own parameters concatenated on every forward. Measured
    (`benchmarks/many_tasks.py --storage`: hand-written train steps, CPU, 1 thread, batch 256,
    AdamW): against one `nn.Linear` per head, concatenating per forward gave 0.89x / 0.93x / 0.78x
    at 16 / 64 / 256 tasks, one Parameter 0.73x / 0.60x / 0.46x. The per-forward `torch.cat` copies
    all weights, its backward splits the gradient and accumulates it into each of 2 x T tensors,
    and the optimizer still steps 2 x T small tensors (AdamW's default on CPU is a loop over them);
    one Parameter is one GEMM, one gradient and one optimizer update per group.

    The heads' own modules (`task.module`) are kept, their `weight` and `bias` re-pointed at their
    rows of the concatenated storage (`_tie`; again after `.to()` / `.cuda()` / `.half()`), so they
    read the trained values; they are not parameters of the flow module any more (an optimizer built
    from `flow.torch(fuse=True).parameters()` steps the group). The state dict is the heads' own
    (`FusedHead`).
    """

    def __init__(self, heads: Sequence[nn.Linear]):
        super().__init__()
        first = heads[0]
        self.in_features = first.in_features
        self.sizes = tuple(h.out_features for h in heads)
        self.offsets = tuple(sum(self.sizes[:i]) for i in range(len(heads) + 1))
        self.weight = nn.Parameter(torch.cat([h.weight.detach() for h in heads]), requires_grad=first.weight.requires_grad)
        self.bias = (None if first.bias is None else
                     nn.Parameter(torch.cat([h.bias.detach() for h in heads]), requires_grad=first.bias.requires_grad))
        self.__dict__["_heads"] = tuple(heads)  # not submodules: their parameters are the group's rows
        self._tie()

    def rows(self, i: int) -> slice:
        """The rows of head `i` in the concatenated weight and bias."""
        return slice(self.offsets[i], self.offsets[i + 1])

    def _tie(self) -> None:
        for i, head in enumerate(self._heads):
            head.weight.data = self.weight.data[self.rows(i)]
            if self.bias is not None:
                head.bias.data = self.bias.data[self.rows(i)]

    def _apply(self, fn, *args, **kwargs):
        # `.to()` replaces the group's storage; the heads' views must follow (nn.Module has no
        # public hook for it; `_apply` is what every conversion calls, torch 2.1 to 2.13)
        result = super()._apply(fn, *args, **kwargs)
        self._tie()
        return result

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        return F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)

    # the heads' entries are written and read by each `FusedHead` under the task's own name
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        pass

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        pass

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.sizes}, bias={self.bias is not None}"


class FusedHead(nn.Module):
    """Where a fused task's head was in the module tree (`model.<task>`): its rows of a
    `FusedLinear`, as `weight` / `bias` (views) and in the state dict under the task's own names
    (`<task>.weight`, `<task>.bias`), so that state dicts load across fused and unfused modules and
    from checkpoints written before fusing. Calling it computes the head alone."""

    def __init__(self, group: FusedLinear, index: int):
        super().__init__()
        self.__dict__["_group"] = group  # not a submodule: the group lives once, in the root flow module
        self.index = index
        self.in_features, self.out_features = group.in_features, group.sizes[index]

    @property
    def weight(self) -> Tensor:
        return self._group.weight[self._group.rows(self.index)]

    @property
    def bias(self) -> Optional[Tensor]:
        b = self._group.bias
        return None if b is None else b[self._group.rows(self.index)]

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def _entries(self) -> List[Tuple[str, Tensor]]:
        return [("weight", self.weight)] + ([("bias", self.bias)] if self._group.bias is not None else [])

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, t in self._entries():
            destination[prefix + name] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        entries = self._entries()
        for name, target in entries:
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = state_dict[key]
            if not isinstance(value, Tensor) or value.shape != target.shape:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {shape} from checkpoint, "
                                  f"the shape in current model is {tuple(target.shape)}.")
                continue
            with torch.no_grad():
                target.copy_(value)
        if strict:
            known = {prefix + name for name, _ in entries}
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in known)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fused"


class FlowModule(nn.Module):
    """Runs every head on its input and adds the precondition masks.

    `forward(x)` returns `{"logits", "activated", "decoded", "mask"}`, each `{path: tensor}`.
    Masks come from `x["gt"]` when present (ground truth, three-valued) and from the decoded
    predictions otherwise. In training mode with `gt`, activation and decoding are skipped.
    Heads are looked up through `_modules` on every call so that DataParallel replicas use their
    own copies.

    `fuse=True` (`flow.torch(fuse=True)`): heads that are exactly `nn.Linear`, not shared between
    tasks, and read the same input with the same `in_features`, dtype, device and `requires_grad`,
    run as one GEMM per group (`FusedLinear`, registered as `fused_heads`), the logits being views
    of its output; a group needs two heads, any other head runs as it is. `model.<task>` is then a
    `FusedHead` and the state dict keeps the per-task names. Forward hooks registered on a fused
    head's own module (`task.module`, e.g. by the representation variant of a gradient method) are
    called as if it had run, with its input and its logits. Not the default (`FUSE_DEFAULT`): the
    parameters are then one tensor per group, so code that addresses a head's parameters (optimizer
    groups per head, freezing one head with `requires_grad_`, `task.module` as a parameter of
    the model) needs the unfused module.
    """

    def __init__(self, graph: FlowGraph, fuse: bool = False):
        super().__init__()
        self.graph = graph
        self.fuse = bool(fuse)
        for node in graph.nodes:
            self.add_module(node.name, FlowModule(node.task.graph) if node.is_flow else node.task.module)
        self._routes = tuple((leaf.path, tuple(leaf.path.split(".")), leaf.input_key, leaf.task) for leaf in graph.leaves)
        self._tasks = tuple((leaf.path, leaf.task) for leaf in graph.leaves)
        mask_plan(graph)  # derived now, so that torch.compile only reads it
        self._fused: Tuple[Tuple[int, InputKey, Tuple[Tuple[str, Any], ...]], ...] = ()
        if self.fuse:
            self._fuse()

    def _fuse(self) -> None:
        uses: Dict[int, int] = {}
        for _, _, _, task in self._routes:
            uses[id(task.module)] = uses.get(id(task.module), 0) + 1
        groups: Dict[Tuple[Any, ...], List[Tuple[str, Tuple[str, ...], Any]]] = {}
        for path, route, key, task in self._routes:
            head = task.module
            if fusable(head) and uses[id(head)] == 1:
                groups.setdefault(_group_key(head, key), []).append((path, route, task))
        fused, routes = [], []
        self.fused_heads = nn.ModuleList()
        for gkey, members in groups.items():
            if len(members) < 2:
                continue
            group = FusedLinear([task.module for _, _, task in members])
            for i, (_, route, _) in enumerate(members):
                parent = self
                for name in route[:-1]:
                    parent = parent._modules[name]
                parent._modules[route[-1]] = FusedHead(group, i)
            fused.append((len(self.fused_heads), gkey[0], tuple((path, task) for path, _, task in members)))
            self.fused_heads.append(group)
        done = {path for _, _, members in fused for path, _ in members}
        self._fused = tuple(fused)
        self._routes = tuple(r for r in self._routes if r[0] not in done)

    def forward(self, x: Mapping[str, Any]) -> Dict[str, Dict[str, Tensor]]:
        logits: Dict[str, Tensor] = {}
        for index, key, members in self._fused:
            group = self._modules["fused_heads"]._modules[str(index)]
            path = members[0][0]
            value = read_input(x, key, path)
            try:
                outs = group(value)
            except RuntimeError as e:
                raise head_error(path, key, group, value, e) from e
            for (path, task), z in zip(members, outs):
                logits[path] = z
                if task.module._forward_hooks:
                    for hook in tuple(task.module._forward_hooks.values()):
                        hook(task.module, (value,), z)
        for path, route, key, _ in self._routes:
            head = self
            for name in route:
                head = head._modules[name]
            value = read_input(x, key, path)
            try:
                logits[path] = head(value)
            except RuntimeError as e:
                raise head_error(path, key, head, value, e) from e
        if self._fused:
            logits = {path: logits[path] for path in self.graph.paths}  # flow order, as unfused
        gt = x.get(GT) if isinstance(x, Mapping) else None
        out: Dict[str, Dict[str, Tensor]] = {LOGITS: logits}
        decoded = None
        if gt is None or not self.training:
            activated = {path: task.activate(logits[path]) for path, task in self._tasks}
            decoded = {path: task.decode(activated[path]) for path, task in self._tasks}
            out[ACTIVATED], out[DECODED] = activated, decoded
        first = next(iter(logits.values()))
        elements = x.get(ELEMENTS) if isinstance(x, Mapping) else None
        out[MASK] = compute_masks(self.graph, first.shape[0], first.device, gt=gt, decoded=decoded, elements=elements)
        return out

    def extra_repr(self) -> str:
        return f"flow={self.graph.name!r}" + (", fuse=True" if self.fuse else "")
