"""Run a deployed flow artifact: `load(path)(inputs) -> {task path: {"decoded", "applies", ...}}`.

This file is self-contained on purpose: it imports only the standard library and numpy at module
level, `onnxruntime` to run an ONNX artifact and `torch` only for a pt2 artifact. It never imports
the rest of `dnn_cool_catalyst` (nor its tasks, flows or Catalyst), so a service that ships the
artifact needs nothing of the training code: it can import this module by path, or copy this one
file next to the artifact::

    import importlib.util
    spec = importlib.util.spec_from_file_location("dcc_runtime", "runtime.py")
    runtime = importlib.util.module_from_spec(spec); spec.loader.exec_module(runtime)
    predict = runtime.load("model.onnx")
    result = predict({"features": batch})       # numpy or torch, (N, ...) per input
    result["door_open"]["decoded"], result["door_open"]["applies"]

The artifact's metadata (JSON, written by `dnn_cool_catalyst.deploy.export`) describes the inputs,
the tasks (kind, class names, scale, decoder and its thresholds, precondition) and the output
names; it is checked against what the artifact is called with.
"""
from __future__ import annotations

import json
import os
import zipfile
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

#: The key of the metadata in an ONNX model's `metadata_props`, and (with `.json`) the extra file
#: of a pt2 archive.
METADATA_KEY = "dnn_cool_catalyst"
PT2_EXTRA_FILE = METADATA_KEY + ".json"
#: The artifact layout this loader reads; `export` writes it. A newer one is refused.
FORMAT = "dnn_cool_catalyst.deploy"
FORMAT_VERSION = 2  # 2: inputs may have the dynamic sequence length ELEMENT_DIM (flows with per-element tasks)
BATCH = "batch"  # the symbolic batch dimension in the metadata's input shapes
ELEMENT_DIM = "elements"  # the symbolic sequence length (per-token tasks), shared by the inputs that have it
SHOWN = 10


class DeployError(ValueError):
    """An artifact that cannot be exported or loaded, or inputs that do not fit it; the message
    names the task, the input or the file, and what was expected."""


def _capped(items: Sequence[Any]) -> str:
    items = list(items)
    head = ", ".join(repr(i) for i in items[:SHOWN])
    return head + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def check_metadata(meta: Any, where: str) -> Dict[str, Any]:
    """The metadata as a dict, or a `DeployError` naming `where` when it is missing, of another
    format or of a newer format version than this loader reads."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DeployError(f"{where} is not a dnn_cool_catalyst deployment artifact (its metadata has no "
                          f"format {FORMAT!r}); export one with dnn_cool_catalyst.deploy.export")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise DeployError(f"{where} has artifact format version {version!r}, newer than this loader reads "
                          f"({FORMAT_VERSION}; package {meta.get('package_version')!r} wrote it): load it with "
                          f"dnn_cool_catalyst >= {meta.get('package_version')!r}")
    return meta


def flatten_inputs(inputs: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """`{"a": {"b": t}}` -> `{"a.b": t}` (the artifact's input names join nested keys with dots)."""
    flat: Dict[str, Any] = {}
    for k, v in inputs.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(flatten_inputs(v, name + "."))
        else:
            flat[name] = v
    return flat


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    return np.asarray(value)


class Deployed:
    """A loaded artifact: call it with the model's inputs (a mapping, nested or with dotted names,
    of numpy arrays or torch tensors, batch first) to get `{path: {"decoded", "applies"}}`, plus
    `"classes"` (class names in the decoded order) for tasks with class names.

    `metadata` is the artifact's JSON metadata; `paths` the task paths in flow order."""

    def __init__(self, path: str, metadata: Dict[str, Any], run):
        self.path, self.metadata, self._run = path, metadata, run
        self.inputs: List[Dict[str, Any]] = metadata["inputs"]
        self.tasks: List[Dict[str, Any]] = metadata["tasks"]
        self.paths = tuple(t["path"] for t in self.tasks)

    def prepare(self, inputs: Mapping[str, Any]) -> List[np.ndarray]:
        """The inputs as arrays in the artifact's order, each checked: names, dtype, widths, batch."""
        if not isinstance(inputs, Mapping):
            raise DeployError(f"{self.path}: inputs must be a mapping of input name to array, got "
                              f"{type(inputs).__name__}; expected {_capped([i['name'] for i in self.inputs])}")
        flat = flatten_inputs(inputs)
        expected = [i["name"] for i in self.inputs]
        missing = [n for n in expected if n not in flat]
        extra = [n for n in flat if n not in expected]
        if missing or extra:
            raise DeployError(f"{self.path}: the artifact takes inputs {_capped(expected)}; missing: {_capped(missing)}; "
                              f"unexpected: {_capped(extra)}")
        arrays, batch, length = [], None, None
        for spec in self.inputs:
            a = _as_numpy(flat[spec["name"]])
            shape = spec["shape"]
            want = "(" + ", ".join(str(d) for d in shape) + ")"
            if a.ndim != len(shape) or any(d not in (BATCH, ELEMENT_DIM) and a.shape[i] != d for i, d in enumerate(shape)):
                raise DeployError(f"{self.path}: input {spec['name']!r} has shape {tuple(a.shape)}, the artifact "
                                  f"expects {want} ({BATCH} = any number of samples"
                                  + (f", {ELEMENT_DIM} = any sequence length)" if ELEMENT_DIM in shape else ")"))
            if ELEMENT_DIM in shape:
                n = a.shape[shape.index(ELEMENT_DIM)]
                if length is not None and n != length[1]:
                    raise DeployError(f"{self.path}: input {spec['name']!r} has sequences of length {n}, {length[0]!r} "
                                      f"{length[1]}: the inputs with dimension {ELEMENT_DIM!r} share it (pad them alike)")
                length = length or (spec["name"], n)
            if batch is not None and a.shape[0] != batch[1]:
                raise DeployError(f"{self.path}: input {spec['name']!r} has {a.shape[0]} samples, "
                                  f"{batch[0]!r} {batch[1]}: every input needs the same batch size")
            batch = batch or (spec["name"], a.shape[0])
            dtype = np.dtype(spec["dtype"])
            if a.dtype != dtype:
                if a.dtype.kind in "fc" and dtype.kind in "iub":
                    raise DeployError(f"{self.path}: input {spec['name']!r} is {a.dtype}, the artifact expects "
                                      f"{dtype}: pass integer values")
                a = a.astype(dtype)
            arrays.append(np.ascontiguousarray(a))
        return arrays

    def __call__(self, inputs: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
        outputs = self._run(self.prepare(inputs))
        result: Dict[str, Dict[str, Any]] = {}
        for task, (decoded, applies) in zip(self.tasks, zip(outputs[0::2], outputs[1::2])):
            entry = {"decoded": decoded, "applies": applies.astype(bool)}
            names = task.get("class_names")
            if names:
                entry["classes"] = _class_names(task, decoded, names, int(task.get("element_dims") or 0))
            result[task["path"]] = entry
        return result

    def __repr__(self) -> str:
        return (f"Deployed({self.path!r}, {self.metadata['artifact']}, flow={self.metadata['flow']!r}, "
                f"tasks={len(self.tasks)})")


def _class_names(task: Dict[str, Any], decoded: np.ndarray, names: Sequence[str], element_dims: int = 0):
    """Ranked indices -> an array of names of the same shape; per-class decisions -> per sample the
    list of the names decided yes (per element, a list per sample of such lists, for a task with
    element dimensions)."""
    table = np.asarray(names, dtype=object)
    if decoded.dtype == np.bool_:
        if element_dims:
            rows = decoded.reshape(decoded.shape[0], -1, decoded.shape[-1])
            return [[list(table[r]) for r in sample] for sample in rows]
        return [list(table[row]) for row in decoded.reshape(decoded.shape[0], -1)]
    return table[decoded]


def read_metadata(path: str | os.PathLike) -> Dict[str, Any]:
    """The JSON metadata of an artifact, without running it (ONNX needs `onnx` or `onnxruntime`)."""
    path = os.fspath(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            hits = [n for n in z.namelist() if n.endswith("extra/" + PT2_EXTRA_FILE)]
            if not hits:
                raise DeployError(f"{path} is a pt2 archive without {PT2_EXTRA_FILE}: not exported by "
                                  "dnn_cool_catalyst.deploy.export")
            return check_metadata(json.loads(z.read(hits[0]).decode("utf-8")), path)
    return _onnx_session(path, None, None)[1]


def _onnx_session(path: str, providers: Optional[Sequence[str]], threads: Optional[int]) -> Tuple[Any, Dict[str, Any]]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise DeployError(f"loading {path} needs onnxruntime: pip install 'dnn_cool_catalyst[deploy]' "
                          "(or onnxruntime)") from None
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = options.inter_op_num_threads = int(threads)
    try:
        session = ort.InferenceSession(path, sess_options=options, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as e:  # onnxruntime raises its own types
        raise DeployError(f"{path}: onnxruntime cannot load it as an ONNX model ({e})") from None
    raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    meta = check_metadata(json.loads(raw) if raw else None, path)
    return session, meta


def load(path: str | os.PathLike, providers: Optional[Sequence[str]] = None, threads: Optional[int] = None) -> Deployed:
    """Load an artifact written by `dnn_cool_catalyst.deploy.export`: an ONNX file (run with
    onnxruntime; `providers` as onnxruntime names them, CPU by default; `threads` bounds its intra-op
    threads) or a pt2 archive (run with `torch.export.load`; torch needed). Returns a `Deployed`,
    callable `inputs -> {path: {"decoded", "applies"[, "classes"]}}` with numpy arrays."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no deployment artifact at {path!r}")
    if zipfile.is_zipfile(path):
        return _load_pt2(path, threads)
    session, meta = _onnx_session(path, providers, threads)
    names = [i["name"] for i in meta["inputs"]]
    outputs = [name for t in meta["tasks"] for name in (t["outputs"]["decoded"], t["outputs"]["applies"])]

    def run(arrays: List[np.ndarray]) -> List[np.ndarray]:
        return session.run(outputs, dict(zip(names, arrays)))

    return Deployed(path, meta, run)


def _load_pt2(path: str, threads: Optional[int]) -> Deployed:
    try:
        import torch
    except ImportError:
        raise DeployError(f"loading the pt2 artifact {path} needs torch (an ONNX artifact needs only "
                          "onnxruntime)") from None
    extra = {PT2_EXTRA_FILE: ""}
    program = torch.export.load(path, extra_files=extra)
    meta = check_metadata(json.loads(extra[PT2_EXTRA_FILE]) if extra[PT2_EXTRA_FILE] else None, path)
    module = program.module()
    device = torch.device(meta.get("device", "cpu"))  # traced there: its constants live there
    if threads is not None:
        torch.set_num_threads(int(threads))

    def run(arrays: List[np.ndarray]) -> List[np.ndarray]:
        with torch.no_grad():
            out = module(*(torch.from_numpy(a).to(device) for a in arrays))
        return [o.detach().cpu().numpy() for o in out]

    return Deployed(path, meta, run)
