"""`FlowRunner.export(directory, deployable=True)`: the deployment artifact next to the manifest,
traced on a loader's first batch, giving what `runner.predict` gives."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import dnn_cool_catalyst as dcc
from dnn_cool_catalyst.runners import FlowRunner

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def test_export_writes_a_deployable_artifact_next_to_the_manifest(data, flow_and_model, loaders_for, tmp_path):
    flow, model = flow_and_model(seed=0)
    runner = FlowRunner(flow, model=model, logdir=str(tmp_path / "logs"))
    runner.tune(loaders_for(flow, data)["valid"])
    directory = runner.export(deployable=True, loader=loaders_for(flow, data)["valid"])
    assert directory == str(tmp_path / "logs" / "export")
    names = sorted(p.name for p in (tmp_path / "logs" / "export").iterdir())
    assert names == ["dcc_runtime.py", "manifest.json", "model.onnx", "tuned_params.json", "weights.pth"]
    manifest = json.loads((tmp_path / "logs" / "export" / "manifest.json").read_text())
    assert manifest["files"]["deployable"] == {"onnx": "model.onnx"}
    assert manifest["files"]["runtime"] == "dcc_runtime.py"
    # the loader written beside the artifact runs it in a fresh interpreter without torch or this package
    script = ("import sys, numpy as np, dcc_runtime; "
              "out = dcc_runtime.load('model.onnx')({'raw': np.load('raw.npy')}); "
              "assert 'torch' not in sys.modules and not any(m.startswith('dnn_cool_catalyst') for m in sys.modules); "
              "print(sorted(out)[0], out['camera_blocked']['decoded'].shape)")
    export_dir = tmp_path / "logs" / "export"
    np.save(export_dir / "raw.npy", np.asarray(data[0]["raw"][:3], dtype=np.float32))
    done = subprocess.run([sys.executable, "-c", script], cwd=export_dir, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(3, 1)" in done.stdout
    (export_dir / "raw.npy").unlink()

    predict = dcc.deploy.load(tmp_path / "logs" / "export" / "model.onnx")
    assert [i["name"] for i in predict.metadata["inputs"]] == ["raw"]  # not gt, index
    valid = loaders_for(flow, data)["valid"]
    reference = runner.predict(valid)
    result = predict({"raw": data[0]["raw"]})
    for p in flow.graph.paths:
        want = reference["decoded"][p].numpy()
        if want.dtype.kind == "f":
            # onnxruntime's float32 kernels differ from torch's by a few ulps; times the scale (64)
            np.testing.assert_allclose(result[p]["decoded"], want, rtol=0, atol=1e-5)
        else:
            np.testing.assert_array_equal(result[p]["decoded"], want)
        np.testing.assert_array_equal(result[p]["applies"], reference["mask"][p].numpy())


def test_an_unknown_deployable_format_is_refused_before_writing(flow_and_model, tmp_path):
    flow, model = flow_and_model()
    with pytest.raises(ValueError, match=r"unknown artifact format\(s\) \['tflite'\]"):
        FlowRunner(flow, model=model).export(tmp_path / "e", deployable="tflite")
    assert not (tmp_path / "e").exists()
    with pytest.raises(ValueError, match="give a directory"):
        FlowRunner(flow, model=model).export()
