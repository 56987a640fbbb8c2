"""`deploy.load` / `deploy/runtime.py`: the loader runs in a fresh interpreter without torch or the
package's training code, and says what it expected when the artifact and the inputs differ."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import dnn_cool_catalyst as dcc
from dnn_cool_catalyst.deploy import DeployError
from dnn_cool_catalyst.deploy import runtime

from .conftest import FORMATS, assert_same, eager, security_inputs

RUNTIME = runtime.__file__

SCRIPT = r"""
import importlib.util, json, sys
import numpy as np
spec = importlib.util.spec_from_file_location("dcc_runtime", sys.argv[1])
rt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rt)
predict = rt.load(sys.argv[2])
result = predict({"features": np.load(sys.argv[3])})
np.savez(sys.argv[4], **{f"{p}|{k}": v[k] for p, v in result.items() for k in ("decoded", "applies")})
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "catalyst", "dnn_cool_catalyst"))
print(json.dumps(loaded))
"""


@pytest.mark.parametrize("fmt", FORMATS)
def test_loading_in_a_fresh_interpreter_without_the_package(security_artifacts, tmp_path, fmt):
    flow, model, paths = security_artifacts
    inputs = security_inputs(7)
    np.save(tmp_path / "x.npy", inputs["features"])
    script = tmp_path / "serve.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of the package on the path
    done = subprocess.run([sys.executable, str(script), RUNTIME, paths[fmt], str(tmp_path / "x.npy"),
                           str(tmp_path / "out.npz")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert not [m for m in loaded if m.split(".")[0] in ("catalyst", "dnn_cool_catalyst")]
    if fmt == "onnx":
        assert loaded == []  # onnxruntime and numpy only: no torch
    saved = np.load(tmp_path / "out.npz")
    result = {p: {"decoded": saved[f"{p}|decoded"], "applies": saved[f"{p}|applies"]} for p in flow.graph.paths}
    assert_same(result, eager(model, flow, inputs), flow)


def test_inputs_may_be_torch_tensors_or_nested(security_artifacts):
    flow, model, paths = security_artifacts
    x = security_inputs(4)
    predict = dcc.deploy.load(paths["onnx"])
    a = predict({"features": torch.from_numpy(x["features"])})
    b = predict({"features": x["features"].astype(np.float64)})  # cast to the artifact's float32
    for p in flow.graph.paths:
        np.testing.assert_array_equal(a[p]["decoded"], b[p]["decoded"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_input_mismatches_say_what_was_expected(security_artifacts, fmt):
    _, _, paths = security_artifacts
    predict = dcc.deploy.load(paths[fmt])
    x = security_inputs(3)["features"]
    with pytest.raises(DeployError, match=r"takes inputs 'features'; missing: 'features'; unexpected: 'feature'"):
        predict({"feature": x})
    with pytest.raises(DeployError, match=r"missing: ; unexpected: 'image'"):
        predict({"features": x, "image": x})
    with pytest.raises(DeployError, match=r"input 'features' has shape \(3, 5\), the artifact expects \(batch, 8\)"):
        predict({"features": x[:, :5]})
    with pytest.raises(DeployError, match=r"shape \(8,\), the artifact expects \(batch, 8\)"):
        predict({"features": x[0]})
    with pytest.raises(DeployError, match="must be a mapping"):
        predict(x)


def _rewrite_onnx_metadata(src, dst, edit):
    onnx = pytest.importorskip("onnx")
    model = onnx.load(src)
    for prop in model.metadata_props:
        if prop.key == runtime.METADATA_KEY:
            meta = edit(json.loads(prop.value))
            if meta is None:
                model.metadata_props.remove(prop)
            else:
                prop.value = json.dumps(meta)
            break
    onnx.save(model, dst)
    return str(dst)


def test_a_newer_format_version_is_refused(security_artifacts, tmp_path):
    _, _, paths = security_artifacts
    newer = _rewrite_onnx_metadata(paths["onnx"], tmp_path / "newer.onnx",
                                   lambda m: {**m, "format_version": runtime.FORMAT_VERSION + 1, "package_version": "9.0"})
    with pytest.raises(DeployError, match=r"format version 3, newer than this loader reads \(2; package '9.0' "
                                          r"wrote it\): load it with dnn_cool_catalyst >= '9.0'"):
        dcc.deploy.load(newer)


def test_an_onnx_model_without_metadata_is_not_an_artifact(security_artifacts, tmp_path):
    _, _, paths = security_artifacts
    plain = _rewrite_onnx_metadata(paths["onnx"], tmp_path / "plain.onnx", lambda m: None)
    with pytest.raises(DeployError, match="is not a dnn_cool_catalyst deployment artifact"):
        dcc.deploy.load(plain)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(DeployError, match="onnxruntime cannot load it"):
        dcc.deploy.load(tmp_path / "junk.onnx")
    with pytest.raises(FileNotFoundError, match="no deployment artifact"):
        dcc.deploy.load(tmp_path / "missing.onnx")


def test_inputs_with_different_batch_sizes_are_refused(tmp_path):
    from .conftest import mlm_flow

    flow = mlm_flow()
    path = dcc.deploy.export(flow, flow.torch(), tmp_path / "mlm.onnx",
                             example_inputs={"pooled": torch.zeros(2, 6), "tokens": torch.zeros(2, 5, 6)})
    predict = dcc.deploy.load(path)
    assert [i["shape"] for i in predict.metadata["inputs"]] == [["batch", 6], ["batch", 5, 6]]
    with pytest.raises(DeployError, match=r"input 'tokens' has 3 samples, 'pooled' 2: every input needs the same"):
        predict({"pooled": np.zeros((2, 6), np.float32), "tokens": np.zeros((3, 5, 6), np.float32)})
