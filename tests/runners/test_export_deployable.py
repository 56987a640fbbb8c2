"""`FlowRunner.export(directory, deployable=True)`: the deployment artifact next to the manifest,
traced on a loader's first batch, giving what `runner.predict` gives."""
import json

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
    assert names == ["manifest.json", "model.onnx", "tuned_params.json", "weights.pth"]
    manifest = json.loads((tmp_path / "logs" / "export" / "manifest.json").read_text())
    assert manifest["files"]["deployable"] == {"onnx": "model.onnx"}

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
