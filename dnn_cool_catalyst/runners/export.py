"""Export a trained flow model to a directory and load it back, with nothing unpickled.

A directory holds `weights.pth` (the model's `state_dict`, loaded with `weights_only=True`),
`tuned_params.json` (the decoders' parameters), with `deployable` the flow as one artifact per
format (`model.onnx`, `model.pt2`: `dnn_cool_catalyst.deploy.export`, decoding, tuned thresholds
and precondition gating inside), and `manifest.json` (format, versions, flow name, task paths and
kinds, model class, files), written last, so a directory with a manifest is complete.
"""
from __future__ import annotations

import os
import platform
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..distributed import unwrap
from ..files import read_json, write_atomic, write_json

FORMAT = "dnn_cool_catalyst.export/1"
WEIGHTS_FILE = "weights.pth"
TUNED_FILE = "tuned_params.json"
MANIFEST_FILE = "manifest.json"
DEPLOY_FILE = "model.{}"  # the deployment artifact of each format
RUNTIME_FILE = "dcc_runtime.py"  # deploy/runtime.py, beside the artifacts: `import dcc_runtime` loads them


def manifest_of(flow: Any, model: nn.Module) -> Dict[str, Any]:
    """The manifest describing `model` trained for `flow` (plain JSON)."""
    import catalyst

    from .. import __version__

    return {
        "format": FORMAT,
        "versions": {"dnn_cool_catalyst": __version__, "torch": torch.__version__,
                     "catalyst": catalyst.__version__, "python": platform.python_version()},
        "flow": flow.name,
        "tasks": [{"path": leaf.path, "kind": leaf.task.kind} for leaf in flow.graph.leaves],  # `ITask.kind`
        "model": f"{type(model).__module__}.{type(model).__qualname__}",
        "files": {"weights": WEIGHTS_FILE, "tuned_params": TUNED_FILE},
    }


def deployable_formats(deployable: Union[bool, str, Sequence[str]]) -> Tuple[str, ...]:
    """`True` -> `("onnx",)`, `False` -> `()`, a format or a sequence of formats as given
    (`dnn_cool_catalyst.deploy.exporter.FORMATS`; an unknown one is refused before anything is written)."""
    from ..deploy.exporter import FORMATS

    if deployable is True:
        return ("onnx",)
    if deployable is False or deployable is None:
        return ()
    formats = (deployable,) if isinstance(deployable, str) else tuple(deployable)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"deployable: unknown artifact format(s) {unknown}; known: {list(FORMATS)} (or True for onnx)")
    return formats


def first_inputs(loader: Any) -> Mapping[str, Any]:
    """The inputs `X` of a loader's first batch (`(X, y)` pairs or `X` alone), as example inputs."""
    from ..batches import split_batch

    for batch in loader:
        return split_batch(batch, "export", allow_inputs_only=True)[0]
    raise ValueError("export: the loader given for the example inputs yielded no batches")


def export_model(directory: str | os.PathLike, flow: Any, model: nn.Module,
                 deployable: Union[bool, str, Sequence[str]] = False,
                 example_inputs: Optional[Mapping[str, Any]] = None, loader: Any = None) -> str:
    """Write `model`'s weights, `flow`'s decoder parameters, with `deployable` (True: ONNX; or
    `"onnx"`, `"pt2"`, or both in a list) the deployment artifact(s) `model.<format>` and their
    self-contained loader `dcc_runtime.py` (`deploy/runtime.py`: `import dcc_runtime;
    dcc_runtime.load("model.onnx")` needs only numpy and onnxruntime), and a manifest into
    `directory`. The artifacts trace the model on `example_inputs`, else on the first
    batch of `loader`, else on inputs inferred from the flow (`deploy.export`)."""
    from ..tuning import save_tuned

    formats = deployable_formats(deployable)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    model = unwrap(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    write_atomic(os.path.join(directory, WEIGHTS_FILE), lambda fh: torch.save(state, fh))
    save_tuned(os.path.join(directory, TUNED_FILE), flow.get_decoder().params())
    manifest = manifest_of(flow, model)
    if formats:
        from ..deploy import export

        if example_inputs is None and loader is not None:
            example_inputs = first_inputs(loader)
        for fmt in formats:
            name = DEPLOY_FILE.format(fmt)
            export(flow, model, os.path.join(directory, name), format=fmt, example_inputs=example_inputs)
            manifest["files"].setdefault("deployable", {})[fmt] = name
        # the self-contained loader beside the artifacts: a service imports it without this package (or torch)
        from ..deploy import runtime

        with open(runtime.__file__, "rb") as fh:
            source = fh.read()
        write_atomic(os.path.join(directory, RUNTIME_FILE), lambda out: out.write(source))
        manifest["files"]["runtime"] = RUNTIME_FILE
    write_json(os.path.join(directory, MANIFEST_FILE), manifest)
    return directory


def read_manifest(directory: str | os.PathLike) -> Dict[str, Any]:
    """The manifest of an exported directory; an error naming the directory when it is not one."""
    path = os.path.join(os.fspath(directory), MANIFEST_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{os.fspath(directory)!r} is not an exported flow model: no {MANIFEST_FILE}")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown export format {manifest.get('format') if isinstance(manifest, dict) else None!r}"
                         f" (expected {FORMAT!r})")
    return manifest


def check_compatible(manifest: Dict[str, Any], flow: Any) -> None:
    """Raise `ValueError` naming the task paths or kinds in which `flow` differs from the manifest."""
    saved = {t["path"]: t["kind"] for t in manifest["tasks"]}
    current = {leaf.path: leaf.task.kind for leaf in flow.graph.leaves}
    problems = []
    if sorted(set(saved) - set(current)):
        problems.append(f"tasks only in the export: {sorted(set(saved) - set(current))}")
    if sorted(set(current) - set(saved)):
        problems.append(f"tasks only in the flow: {sorted(set(current) - set(saved))}")
    kinds = [f"{p} ({saved[p]} exported, {current[p]} now)" for p in saved if p in current and saved[p] != current[p]]
    if kinds:
        problems.append(f"task kinds differ: {kinds}")
    if problems:
        raise ValueError(f"the exported model (flow {manifest['flow']!r}) does not fit flow {flow.name!r}: "
                         + "; ".join(problems))


def load_model(directory: str | os.PathLike, flow: Any, model: nn.Module,
               map_location: Any = "cpu") -> Tuple[nn.Module, Dict[str, Any]]:
    """Load weights (`weights_only=True`) into `model` and tuned parameters into `flow`'s decoders;
    returns `(model, manifest)`.

    The tuned parameters are checked first (`TunedParamsError` naming the task and the file, e.g.
    a NaN threshold or an unknown task path), before the model is touched; when the weights then do
    not fit, the decoders get their previous parameters back."""
    from ..tuning import load_tuned

    directory = os.fspath(directory)
    manifest = read_manifest(directory)
    check_compatible(manifest, flow)
    tuned_path = os.path.join(directory, TUNED_FILE)
    decoder = flow.get_decoder()
    before = decoder.params()
    decoder.load_tuned(load_tuned(tuned_path), source=tuned_path)  # all or nothing
    try:
        state = torch.load(os.path.join(directory, WEIGHTS_FILE), map_location=map_location, weights_only=True)
        target = unwrap(model)
        missing, unexpected = target.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{os.path.join(directory, WEIGHTS_FILE)} does not fit {type(target).__name__} "
                             f"(exported from {manifest.get('model')}): missing keys {list(missing)[:10]}, "
                             f"unexpected keys {list(unexpected)[:10]}")
    except BaseException:
        decoder.load_tuned(before)
        raise
    return model, manifest
