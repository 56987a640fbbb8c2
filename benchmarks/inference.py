"""Inference latency per batch: eager `model` + decoder + masks against the deployed artifacts.

The workload: the story's security flow (`dnn_cool_catalyst.story`: 14 tasks in four nested flows)
on an MLP backbone 128-256-256, thresholds tuned away from 0.5. Three sides, in one run:

- `eager`: the model in eval mode under `torch.no_grad()`, as `runner.predict` runs it
  (`flow.torch()` activates, decodes with the tuned thresholds and computes the masks from the
  decoded predictions);
- `onnx`: `dnn_cool_catalyst.deploy.load("model.onnx", threads=...)` called with numpy inputs
  (onnxruntime, with the loader's input checks and its `{path: {"decoded", "applies"}}` result);
- `pt2`: `dnn_cool_catalyst.deploy.load("model.pt2")` (`torch.export`'s program, same interface).

The script first asserts that the three give the same decoded values and `applies` on one batch.
The sides take turns call by call (the order rotates), 20 warm-up calls each, then the median of
`--reps` calls per side and batch size; it prints the medians and their ratios to eager. Goal:
ONNX at most as slow as eager at batch 1.

    python benchmarks/inference.py                  # CPU, 1 thread, batches 1 and 64
    python benchmarks/inference.py --device cuda    # eager and pt2 on a GPU (onnx stays on the CPU
                                                    # unless onnxruntime has the CUDA provider);
                                                    # prints a message and exits 0 without CUDA
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch
from torch import nn

import dnn_cool_catalyst as dcc
from dnn_cool_catalyst.story import security_tasks

RAW, FEATURES = 128, 256


class Backbone(nn.Module):
    """`raw` (N, 128) -> MLP -> `features` (N, 256) -> the flow's heads."""

    def __init__(self, flow_module: nn.Module):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(RAW, 256), nn.ReLU(), nn.Linear(256, FEATURES), nn.ReLU())
        self.flow = flow_module

    def forward(self, x):
        return self.flow({"features": self.mlp(x["raw"])})


def build(device: torch.device):
    torch.manual_seed(0)
    flow = security_tasks(features=FEATURES).get_full_flow()
    model = Backbone(flow.torch()).to(device).eval()
    params = {p: {"threshold": 0.42} for p, v in flow.get_decoder().params().items() if not isinstance(v["threshold"], list)}
    params["person_regression.face_regression.facial_characteristics"] = {"threshold": [0.3, 0.55, 0.6]}
    flow.get_decoder().load_tuned(params)
    return flow, model


def eager_call(model: nn.Module, device: torch.device) -> Callable[[np.ndarray], Dict]:
    def call(x: np.ndarray):
        with torch.no_grad():
            out = model({"raw": torch.from_numpy(x).to(device)})
            result = {p: (out["decoded"][p].cpu(), out["mask"][p].cpu()) for p in out["decoded"]}
        return result

    return call


def check_equal(flow, eager, deployed: Dict[str, Callable], x: np.ndarray) -> None:
    reference = eager(x)
    for name, call in deployed.items():
        got = call({"raw": x})
        for p in flow.graph.paths:
            d, m = reference[p]
            if d.dtype.is_floating_point:
                np.testing.assert_allclose(got[p]["decoded"], d.numpy(), rtol=0, atol=1e-4, err_msg=f"{name} {p}")
            else:
                np.testing.assert_array_equal(got[p]["decoded"], d.numpy(), err_msg=f"{name} {p}")
            np.testing.assert_array_equal(got[p]["applies"], m.numpy(), err_msg=f"{name} {p}")


def time_sides(sides: Dict[str, Callable[[], object]], reps: int, sync: Callable[[], None]) -> Dict[str, float]:
    names = list(sides)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for i in range(20 + reps):
        order = names[i % len(names):] + names[:i % len(names)]
        for n in order:
            t = time.perf_counter()
            sides[n]()
            sync()
            if i >= 20:
                times[n].append(time.perf_counter() - t)
    return {n: statistics.median(v) * 1e3 for n, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--reps", type=int, default=300)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/inference.py: no CUDA device here; nothing to measure on --device cuda")
        return
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    flow, model = build(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        example = {"raw": torch.zeros(4, RAW, device=device)}
        t = time.perf_counter()
        onnx_path = dcc.deploy.export(flow, model, Path(tmp) / "model.onnx", "onnx", example)
        t_onnx = time.perf_counter() - t
        t = time.perf_counter()
        pt2_path = dcc.deploy.export(flow, model, Path(tmp) / "model.pt2", "pt2", example)
        t_pt2 = time.perf_counter() - t
        providers = None
        if device.type == "cuda":
            import onnxruntime

            if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
                providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        deployed = {"onnx": dcc.deploy.load(onnx_path, providers=providers, threads=args.threads),
                    "pt2": dcc.deploy.load(pt2_path, threads=args.threads)}
        eager = eager_call(model, device)
        rng = np.random.default_rng(0)
        check_equal(flow, eager, deployed, rng.normal(size=(64, RAW)).astype(np.float32))
        print(f"torch {torch.__version__}, device {device}, {args.threads} thread(s); export: onnx {t_onnx:.1f} s, "
              f"pt2 {t_pt2:.1f} s; onnx runs on {'CUDA' if providers else 'the CPU'}; the three sides agree")
        for n in args.batches:
            x = rng.normal(size=(n, RAW)).astype(np.float32)
            sides = {"eager": lambda: eager(x), "onnx": lambda: deployed["onnx"]({"raw": x}),
                     "pt2": lambda: deployed["pt2"]({"raw": x})}
            ms = time_sides(sides, args.reps, sync)
            print(f"batch {n:4d}: eager {ms['eager']:8.3f} ms   onnx {ms['onnx']:8.3f} ms (x{ms['onnx'] / ms['eager']:.3f})"
                  f"   pt2 {ms['pt2']:8.3f} ms (x{ms['pt2'] / ms['eager']:.3f})")


if __name__ == "__main__":
    main()
