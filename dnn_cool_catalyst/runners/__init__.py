"""Catalyst runners for task flows (import as `dnn_cool_catalyst.runners`; needs Catalyst).

- `FlowRunner`: Catalyst's `Runner` with flow-aware defaults, `infer`, `tune`, `evaluate`,
  `export` / `FlowRunner.load`.
- `FlowTensorboardLogger`: TensorBoard with text and precision-recall curves.
- `DataParallelEngine`: a DataParallel engine that works with the pinned accelerate.
- `BalancedDataParallelEngine` / `BalancedDataParallel`: DataParallel with losses, metric states
  and per-sample losses reduced inside the replicas (`balance_dataparallel_memory=True`).
- `DistributedDataParallelEngine`: Catalyst's DDP engine with torchrun support, a free port and
  the backend chosen by the device.
"""
from .balance import BalancedDataParallel, ReplicaReducer, merge_replicas
from .compat import DataParallelEngine
from .engines import BalancedDataParallelEngine, DistributedDataParallelEngine
from .export import export_model, load_model, read_manifest
from .runner import FlowRunner
from .tensorboard import FlowTensorboardLogger

__all__ = ["BalancedDataParallel", "BalancedDataParallelEngine", "DataParallelEngine", "DistributedDataParallelEngine",
           "FlowRunner", "FlowTensorboardLogger", "ReplicaReducer", "export_model", "load_model", "merge_replicas",
           "read_manifest"]
