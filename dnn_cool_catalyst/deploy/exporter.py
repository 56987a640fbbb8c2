"""`export(flow, model, path)`: the whole flow as one artifact, decoding and preconditions inside.

The exported graph is `DeployModule`: the model's logits -> each task's activation -> its decoder
with the decoder's current (tuned) parameters as constants -> the precondition masks from the
decoded predictions (`compute_masks(decoded=...)`, as at inference) -> per task path, in flow
order, the decoded value and an `applies` boolean. The batch dimension is dynamic, and so is the sequence length of a flow with per-element tasks
(`element_dims=1`): the inputs that carry it (`element_inputs`) share one dynamic dimension
`"elements"` after the batch, and a per-element task's `applies` is per element `(N, T)`, padding
positions (`x["elements"]` False, an input of the artifact when the model takes it) never
applying. The metadata
(JSON; `runtime.METADATA_KEY` in ONNX `metadata_props`, `runtime.PT2_EXTRA_FILE` in a pt2 archive)
describes inputs, tasks and outputs for `runtime.load`, which needs neither torch (for ONNX) nor
this package.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..distributed import unwrap
from ..errors import capped
from ..files import write_atomic
from ..graph import Compound, Literal
from ..functional import element_dims
from ..interpreters.masks import compute_masks
from ..keys import ELEMENTS, GT, INDEX, LOGITS, SOURCE
from ..functional import per_element_mask
from ..tasks.base import ScaleDecoder, SortDecoder, ThresholdDecoder
from .runtime import BATCH, ELEMENT_DIM, FORMAT, FORMAT_VERSION, METADATA_KEY, PT2_EXTRA_FILE, DeployError

FORMATS = ("onnx", "pt2")
TRAINING_KEYS = (GT, INDEX, SOURCE)  # left out of the example inputs: training batches carry them
EXAMPLE_BATCH = 3  # traced with 3 samples: torch.export specialises sizes 0 and 1, not 3


def condition_tree(cond: Any) -> Dict[str, Any]:
    """A precondition condition as JSON: `{"task": path, "negated": bool}` for `out.b` / `~out.b`,
    `{"op": "and" | "or" | "xor", "operands": [...]}` for compounds."""
    if isinstance(cond, Literal):
        return {"task": cond.path, "negated": cond.negated}
    if isinstance(cond, Compound):
        return {"op": cond.op, "operands": [condition_tree(c) for c in cond.operands]}
    raise DeployError(f"unknown condition {cond!r}")


def precondition_of(leaf: Any) -> Tuple[str, Dict[str, Any]]:
    """`(text, tree)` of a leaf's precondition: the conjunction of its conditions (`"" / {"op": "and",
    "operands": []}` when it always applies)."""
    text = " & ".join(str(c) for c in leaf.precondition)
    return text, {"op": "and", "operands": [condition_tree(c) for c in leaf.precondition]}


class _TaskDecoder(nn.Module):
    """One task's activation and decoding, with the decoder's parameters frozen as constants.

    The predefined decoders are rewritten here with their parameters as buffers (they cache device
    tensors of their own, which tracing must not write into); any other decoder is called as is."""

    def __init__(self, path: str, task: Any):
        super().__init__()
        self.path, self.task = path, task
        decoder = getattr(task, "decoder", None)
        self.mode = "task"
        if isinstance(decoder, ThresholdDecoder):
            self.mode = "threshold"
            self.register_buffer("threshold", torch.tensor(decoder.threshold, dtype=torch.float32))
        elif isinstance(decoder, SortDecoder):
            self.mode, self.top_k = "sort", decoder.top_k
        elif isinstance(decoder, ScaleDecoder):
            self.mode, self.scale = "scale", decoder.scale

    def forward(self, logits: Tensor) -> Tensor:
        activated = self.task.activate(logits)
        if self.mode == "threshold":
            if activated.dtype in (torch.float16, torch.bfloat16):
                activated = activated.float()  # as ThresholdDecoder: thresholds are float32 values
            if self.threshold.dim() and activated.shape[-1] != self.threshold.shape[0]:
                raise DeployError(f"task {self.path!r}: {self.threshold.shape[0]} tuned thresholds for outputs of "
                                  f"shape {tuple(activated.shape)}")
            return activated > self.threshold.to(activated.dtype)
        if self.mode == "sort":
            # ONNX TopK ranks equal values by lower index first, as SortDecoder's stable argsort
            k = activated.shape[-1] if self.top_k is None else min(self.top_k, activated.shape[-1])
            return torch.topk(activated, k, dim=-1, sorted=True).indices
        if self.mode == "scale":
            return activated * self.scale
        return self.task.decode(activated)


class DeployModule(nn.Module):
    """`forward(*inputs)` (tensors, in the order of `input_names`) -> a flat tuple `(decoded_0,
    applies_0, decoded_1, applies_1, ...)` over the flow's task paths in flow order.

    `input_keys` are the nested keys of the model's input mapping, one per positional input."""

    def __init__(self, flow: Any, model: nn.Module, input_keys: Sequence[Tuple[str, ...]]):
        super().__init__()
        self.graph = flow.graph
        self.model = unwrap(model)
        self.input_keys = tuple(tuple(k) for k in input_keys)
        self.decoders = nn.ModuleList([_TaskDecoder(leaf.path, leaf.task) for leaf in self.graph.leaves])

    def inputs_mapping(self, tensors: Sequence[Tensor]) -> Dict[str, Any]:
        """The nested input mapping the model takes, from positional tensors."""
        x: Dict[str, Any] = {}
        for key, t in zip(self.input_keys, tensors):
            node = x
            for k in key[:-1]:
                node = node.setdefault(k, {})
            node[key[-1]] = t
        return x

    def forward(self, *tensors: Tensor) -> Tuple[Tensor, ...]:
        x = self.inputs_mapping(tensors)
        out = self.model(x)
        logits = out[LOGITS]
        decoded = {}
        for leaf, dec in zip(self.graph.leaves, self.decoders):
            decoded[leaf.path] = dec(logits[leaf.path])
        first = next(iter(logits.values()))
        # the padding marker x["elements"]: padding positions never apply, as at inference
        masks = compute_masks(self.graph, first.shape[0], first.device, decoded=decoded, elements=x.get(ELEMENTS))
        # a per-element task's `applies` per element (N, *E), also where its precondition is per sample
        return tuple(t for leaf in self.graph.leaves
                     for t in (decoded[leaf.path], per_element_mask(leaf.task, masks[leaf.path], decoded[leaf.path])))


def flatten_example(inputs: Mapping[str, Any], prefix: Tuple[str, ...] = ()) -> List[Tuple[Tuple[str, ...], Tensor]]:
    """`[(nested key, tensor)]` of a (nested) input mapping, in its order; non-tensor values are
    an error naming them (an artifact takes tensors only)."""
    items: List[Tuple[Tuple[str, ...], Tensor]] = []
    for k, v in inputs.items():
        key = prefix + (str(k),)
        if isinstance(v, Mapping):
            items += flatten_example(v, key)
        elif isinstance(v, Tensor):
            items.append((key, v))
        else:
            try:
                import numpy as np

                items.append((key, torch.as_tensor(np.asarray(v))))
            except (TypeError, ValueError, RuntimeError):
                raise DeployError(f"example input {'.'.join(key)!r} is a {type(v).__name__}: an exported artifact takes "
                                  "tensors (or arrays) only") from None
    return items


def infer_example_inputs(flow: Any, model: nn.Module, batch: int = EXAMPLE_BATCH) -> Dict[str, Any]:
    """Example inputs from the flow: for a model that is `flow.torch()`, every input key the flow
    reads, of width the `in_features` of the first `nn.Linear` head reading it. Anything else (a
    backbone before the heads, convolutional heads, token inputs) is a `DeployError` asking for
    `example_inputs`."""
    need = ("pass example_inputs=, a batch mapping as the model takes it (e.g. {'features': torch.zeros(2, 256)}; "
            "the batch size does not matter)")
    if unwrap(model) is not flow.torch():
        raise DeployError(f"deploy.export cannot infer the inputs of a {type(unwrap(model)).__name__} (not "
                          f"flow.torch() of flow {flow.name!r}): {need}")
    x: Dict[str, Any] = {}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for key in flow.graph.input_keys:
        leaf = next(leaf for leaf in flow.graph.leaves if leaf.input_key == key)
        head = leaf.task.module
        first = next((m for m in head.modules() if not list(m.children())), head)
        if not key or not isinstance(first, nn.Linear):
            raise DeployError(f"deploy.export cannot infer the input x.{'.'.join(key)} of task {leaf.path!r} (its head "
                              f"starts with {type(first).__name__}, not nn.Linear): {need}")
        node = x
        for k in key[:-1]:
            node = node.setdefault(k, {})
        node.setdefault(key[-1], torch.zeros(batch, first.in_features, device=device))
    return x


def metadata_of(flow: Any, input_specs: Sequence[Tuple[Tuple[str, ...], Tensor]], artifact: str,
                device: str = "cpu", element_inputs: Sequence[str] = ()) -> Dict[str, Any]:
    """The artifact's JSON metadata (see `runtime`); the inputs named in `element_inputs` have the
    dynamic sequence length `"elements"` as their second dimension (format version 2, which older
    loaders refuse by name rather than misread; version 1 otherwise)."""
    from .. import __version__

    tasks = []
    for leaf in flow.graph.leaves:
        task, decoder = leaf.task, getattr(leaf.task, "decoder", None)
        text, tree = precondition_of(leaf)
        dec = {"type": type(decoder).__name__ if decoder is not None else None}
        if isinstance(decoder, ThresholdDecoder):
            dec["threshold"] = decoder.threshold
        elif isinstance(decoder, SortDecoder):
            dec["top_k"] = decoder.top_k
        elif isinstance(decoder, ScaleDecoder):
            dec["scale"] = decoder.scale
        names = getattr(task, "class_names", None)
        tasks.append({
            "path": leaf.path, "kind": task.kind, "class_names": list(names) if names else None,
            "scale": getattr(task, "scale", None), "decoder": dec,
            "precondition": text, "precondition_tree": tree, "element_dims": element_dims(task),
            "outputs": {"decoded": f"{leaf.path}.decoded", "applies": f"{leaf.path}.applies"},
        })

    def shape(name: str, t: Tensor) -> List[Any]:
        return [BATCH] + ([ELEMENT_DIM] + list(t.shape[2:]) if name in element_inputs else list(t.shape[1:]))

    return {
        "format": FORMAT, "format_version": FORMAT_VERSION if element_inputs else 1, "artifact": artifact,
        "package_version": __version__, "torch_version": torch.__version__, "flow": flow.name,
        "device": device,  # where a pt2 artifact runs (it was traced there); ONNX runs where onnxruntime puts it
        "inputs": [{"name": ".".join(k), "key": list(k), "dtype": str(t.dtype).replace("torch.", ""),
                    "shape": shape(".".join(k), t)} for k, t in input_specs],
        "tasks": tasks,
    }


def element_input_names(flow: Any, model: nn.Module, items: Sequence[Tuple[Tuple[str, ...], Tensor]],
                        element_inputs: Optional[Sequence[str]]) -> Tuple[str, ...]:
    """The (dotted) names of the inputs whose second dimension is the sequence length of the
    flow's per-element tasks, checked to share it. Default (`element_inputs=None`): none for a flow
    without per-element tasks; else `elements` (the padding marker) and, for a model that is
    `flow.torch()`, the inputs the per-element tasks read (a backbone's inputs cannot be told:
    name them in `element_inputs`)."""
    names = {".".join(k): t for k, t in items}
    per_element = [leaf for leaf in flow.graph.leaves if element_dims(leaf.task)]
    if element_inputs is None:
        if not per_element:
            return ()
        wanted = [ELEMENTS]
        if unwrap(model) is flow.torch():
            wanted += [".".join(leaf.input_key) for leaf in per_element]
        chosen = tuple(dict.fromkeys(n for n in wanted if n in names and names[n].dim() >= 2))
    else:
        if isinstance(element_inputs, str):
            element_inputs = [element_inputs]
        chosen = tuple(dict.fromkeys(str(n) for n in element_inputs))
        unknown = [n for n in chosen if n not in names]
        if unknown:
            raise DeployError(f"deploy.export: element_inputs {capped(unknown)} are not inputs of the artifact "
                              f"(they are {capped(list(names))})")
        flat = [n for n in chosen if names[n].dim() < 2]
        if flat:
            raise DeployError(f"deploy.export: element_inputs {capped(flat)} have no dimension after the batch "
                              "to be the sequence length")
    lengths = {n: int(names[n].shape[1]) for n in chosen}
    if len(set(lengths.values())) > 1:
        raise DeployError("deploy.export: the element inputs must share their sequence length (dimension 1), got "
                          + ", ".join(f"{n} {tuple(names[n].shape)}" for n in chosen))
    if chosen and next(iter(lengths.values())) < 2:
        raise DeployError(f"deploy.export: the example inputs {capped(list(chosen))} have sequences of length "
                          f"{next(iter(lengths.values()))}; give at least 2 positions (the tracer fixes lengths 0 and "
                          "1), the artifact then takes any length")
    return chosen


def export(flow: Any, model: nn.Module, path: str | os.PathLike, format: str = "onnx",
           example_inputs: Optional[Mapping[str, Any]] = None, element_inputs: Optional[Sequence[str]] = None) -> str:
    """Write `model` (anything mapping the flow's inputs to `flow.torch()`'s outputs, e.g.
    `flow.torch()` itself) with `flow`'s decoding and precondition gating into one artifact at
    `path`; returns the path.

    `format="onnx"` (`torch.onnx.export`, run by onnxruntime) or `"pt2"` (`torch.export`). The
    graph takes the inputs of `example_inputs` (a batch mapping as the model takes it, e.g. a
    loader's `X`, whose `"gt"`, `"index"` and `"source"` are left out; inferred for `flow.torch()`
    with `nn.Linear` heads) with a dynamic batch size, and returns per task path
    `"<path>.decoded"` (thresholded booleans, ranked class indices, regression values in label
    units) and `"<path>.applies"` (its precondition from the decoded predictions). The decoders'
    current (tuned) parameters are constants of the graph: tune before exporting. Load it with
    `dnn_cool_catalyst.deploy.load` (or `deploy/runtime.py` alone).

    A flow with per-element tasks (`element_dims=1`, one output per token) exports with a dynamic
    sequence length too: `element_inputs` names the inputs (dotted names) whose dimension 1 is it
    (default: `elements`, the padding marker, and, for `flow.torch()`, the inputs the per-element
    tasks read; `element_input_names`); their decoded values are `(N, T, ...)` and `applies`
    `(N, T)`. Give example inputs with at least 2 positions.
    """
    if format not in FORMATS:
        raise DeployError(f"deploy.export: format must be one of {FORMATS}, got {format!r}")
    path = os.fspath(path)
    if example_inputs is None:
        example_inputs = infer_example_inputs(flow, model)
    if not isinstance(example_inputs, Mapping):
        raise DeployError(f"deploy.export: example_inputs must be a mapping of input name to tensor, got "
                          f"{type(example_inputs).__name__}")
    # what a training batch carries besides the model's inputs (labels, dataset indices) is not an input
    items = [(k, t) for k, t in flatten_example(example_inputs) if k[0] not in TRAINING_KEYS]
    if not items:
        raise DeployError("deploy.export: example_inputs holds no tensors")
    batch = {t.shape[0] if t.dim() else None for _, t in items}
    if len(batch) != 1 or None in batch:
        raise DeployError(f"deploy.export: every example input needs the same batch size (first dimension), got "
                          + ", ".join(f"{'.'.join(k)} {tuple(t.shape)}" for k, t in items))
    if batch.pop() < 2:  # a batch of one would be specialised by the tracer (the batch is kept dynamic)
        items = [(k, torch.cat([t] * EXAMPLE_BATCH)) for k, t in items]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    items = [(k, t.to(device)) for k, t in items]  # traced where the model is (a pt2 artifact runs there)
    elements = element_input_names(flow, model, items, element_inputs)
    wrapper = DeployModule(flow, model, [k for k, _ in items])
    was_training = wrapper.model.training
    wrapper.eval()
    args = tuple(t for _, t in items)
    try:
        _check_tasks(wrapper, args)
        meta = metadata_of(flow, items, format, str(args[0].device), elements)
        names = [".".join(k) for k, _ in items]
        batch_dim = torch.export.Dim(BATCH, min=1)
        length_dim = torch.export.Dim(ELEMENT_DIM, min=1)
        dynamic = (tuple({0: batch_dim, 1: length_dim} if name in elements else {0: batch_dim}
                         for name in names),)  # one entry: forward(*tensors)
        with torch.no_grad():
            if format == "onnx":
                _export_onnx(wrapper, args, names, dynamic, meta, path)
            else:
                _export_pt2(wrapper, args, dynamic, meta, path)
    finally:
        wrapper.model.train(was_training)
    return path


def _check_tasks(wrapper: DeployModule, args: Tuple[Tensor, ...]) -> None:
    """Run the wrapper eagerly once, task by task, so that a task whose activation or decoder fails
    is named before tracing (whose errors name none)."""
    with torch.no_grad():
        try:
            out = wrapper.model(wrapper.inputs_mapping(args))
        except Exception as e:
            leaf = _task_in_traceback(e, wrapper)  # in eval mode the model decodes too
            if leaf is not None:
                raise DeployError(f"deploy.export: task {leaf.path!r} ({leaf.task.kind}) cannot be exported: its "
                                  f"activation or decoder failed ({type(e).__name__}: {e})") from e
            raise DeployError(f"deploy.export: the model failed on the example inputs ({type(e).__name__}: {e})") from e
        for leaf, dec in zip(wrapper.graph.leaves, wrapper.decoders):
            try:
                value = dec(out[LOGITS][leaf.path])
            except Exception as e:
                raise DeployError(f"deploy.export: task {leaf.path!r} ({leaf.task.kind}) cannot be exported: its "
                                  f"activation or decoder failed ({type(e).__name__}: {e})") from e
            if not isinstance(value, Tensor):
                raise DeployError(f"deploy.export: task {leaf.path!r} ({leaf.task.kind}) cannot be exported: its "
                                  f"decoder returned a {type(value).__name__}, not a tensor")


def _task_in_traceback(e: BaseException, wrapper: DeployModule) -> Any:
    """The leaf whose own activation or decoder code (outside this package) the tracebacks of `e`
    and its causes pass through, or None."""
    import traceback

    files, seen, err = set(), set(), e
    while err is not None and id(err) not in seen:  # the exporters wrap the tracer's error
        seen.add(id(err))
        files |= {frame.filename for frame in traceback.extract_tb(err.__traceback__)}
        err = err.__cause__ or err.__context__
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    for leaf in wrapper.graph.leaves:
        for fn in (getattr(leaf.task, "activation", None), getattr(getattr(leaf.task, "decoder", None), "decode", None),
                   getattr(type(leaf.task), "activate", None), getattr(type(leaf.task), "decode", None)):
            code = getattr(getattr(fn, "__func__", fn), "__code__", None)
            if code is not None and code.co_filename in files and not os.path.abspath(code.co_filename).startswith(package):
                return leaf
    return None


def _trace_error(e: Exception, wrapper: DeployModule, what: str) -> DeployError:
    """A tracing failure, naming the task whose code it passed through when there is one."""
    leaf = _task_in_traceback(e, wrapper)
    if leaf is not None:
        return DeployError(f"deploy.export ({what}): task {leaf.path!r} ({leaf.task.kind}) cannot be exported: "
                           f"its activation or decoder does not trace ({_first_line(e)}); "
                           "write it with tensor operations only, without Python branches on values")
    return DeployError(f"deploy.export ({what}): the flow's model cannot be exported ({_first_line(e)})")


def _first_line(e: BaseException) -> str:
    """The innermost cause's first line: the exporters' own messages are pages long."""
    seen = set()
    while (e.__cause__ is not None) and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


@contextlib.contextmanager
def _quiet_exporter():
    """Silence what the exporters say about themselves, not about the user's model: the ONNX
    registry's notes that torchvision's operators are skipped (torchvision is not a dependency),
    torch's own deprecation inside `torch.export` (`LeafSpec`), and the note that the dynamic
    axis named "batch" is renamed. Errors still raise; other warnings still show."""
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry.level
    registry.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            warnings.filterwarnings("ignore", message=r"# The axis name: (batch|elements) will not be used.*")
            yield
    finally:
        registry.setLevel(level)


def _export_onnx(wrapper: DeployModule, args, names, dynamic, meta, path: str) -> None:
    try:
        import onnxscript  # noqa: F401  (the torch.onnx exporter needs it)
    except ImportError:
        raise DeployError("deploy.export(format='onnx') needs onnx and onnxscript: pip install "
                          "'dnn_cool_catalyst[deploy]'") from None
    outputs = [name for t in meta["tasks"] for name in (t["outputs"]["decoded"], t["outputs"]["applies"])]
    try:
        with _quiet_exporter():
            program = torch.onnx.export(wrapper, args, input_names=names, output_names=outputs,
                                        dynamic_shapes=dynamic, dynamo=True, verbose=False, optimize=True)
    except Exception as e:
        raise _trace_error(e, wrapper, "onnx") from e
    program.model.metadata_props[METADATA_KEY] = json.dumps(meta, allow_nan=False)
    write_atomic(path, lambda fh: fh.write(program.model_proto.SerializeToString()))


def _export_pt2(wrapper: DeployModule, args, dynamic, meta, path: str) -> None:
    try:
        with _quiet_exporter():
            program = torch.export.export(wrapper, args, dynamic_shapes=dynamic)
    except Exception as e:
        raise _trace_error(e, wrapper, "pt2") from e
    extra = {PT2_EXTRA_FILE: json.dumps(meta, allow_nan=False)}
    write_atomic(path, lambda fh: torch.export.save(program, fh, extra_files=extra))
