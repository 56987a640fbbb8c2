"""Catalyst runners for task flows (import as `dnn_cool_catalyst.runners`; needs Catalyst).

- `FlowRunner`: Catalyst's `Runner` with flow-aware defaults, `infer`, `tune`, `evaluate`,
  `export` / `FlowRunner.load`.
- `FlowTensorboardLogger`: TensorBoard with text and precision-recall curves.
- `DataParallelEngine`: a DataParallel engine that works with the pinned accelerate.
"""
from .compat import DataParallelEngine
from .export import export_model, load_model, read_manifest
from .runner import FlowRunner
from .tensorboard import FlowTensorboardLogger

__all__ = ["DataParallelEngine", "FlowRunner", "FlowTensorboardLogger", "export_model", "load_model", "read_manifest"]
