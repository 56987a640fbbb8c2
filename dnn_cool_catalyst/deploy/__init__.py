"""Deployment: the whole flow as one artifact (ONNX or pt2) with decoding, tuned thresholds and
precondition gating inside, and a loader that needs only onnxruntime and numpy for ONNX.

    dcc.deploy.export(flow, model, "model.onnx")             # after tuning the thresholds
    predict = dcc.deploy.load("model.onnx")
    predict({"features": batch})["door_open"]                 # {"decoded": ..., "applies": ...}

`export` lives in `deploy.exporter` (torch); `load` in `deploy.runtime`, a self-contained file (stdlib,
numpy, onnxruntime) that a service can import by path without this package.
"""
from .exporter import export
from .runtime import DeployError, Deployed, load, read_metadata

__all__ = ["DeployError", "Deployed", "export", "load", "read_metadata"]
