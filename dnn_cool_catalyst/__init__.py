"""dnn_cool_catalyst: multi-task learning with task preconditions for PyTorch and Catalyst.

Declare tasks, compose them into flows with preconditions, and get the module, the masked loss,
metrics, decoders, evaluation, explanations and datasets from that one description.
"""
from . import attribution, balancing, datasets, uncertainty
from .converters import Column, Converters, ImageFiles, TableError
from .dsl import Tasks, TaskFlow
from .errors import FlowDefinitionError, HeadError, InputError, LabelError, TunedParamsError
from .graph import FlowGraph
from .mixed import MixedDataset
from .project import BackboneModel, Project
from .tasks import (
    BinaryClassificationTask,
    BoundedRegressionTask,
    ClassificationTask,
    Decoder,
    ITask,
    MaskedLanguageModelingTask,
    MultilabelClassificationTask,
    Task,
)
from .tuning import best_threshold, load_tuned, save_tuned, threshold_sweep

__version__ = "0.1.0"

__all__ = [
    "BackboneModel", "Column", "Converters", "ImageFiles", "Project", "TableError",
    "BinaryClassificationTask", "BoundedRegressionTask", "ClassificationTask", "Decoder", "FlowDefinitionError",
    "FlowGraph", "HeadError", "ITask", "InputError", "LabelError", "MaskedLanguageModelingTask",
    "MixedDataset", "MultilabelClassificationTask", "Task", "TaskFlow", "Tasks", "TunedParamsError", "__version__",
    "attribution", "balancing", "best_threshold", "datasets", "load_tuned", "save_tuned", "threshold_sweep", "uncertainty",
]

# imported on first access only: the Catalyst adapters, and deployment (torch.onnx, onnxruntime)
_LAZY_SUBPACKAGES = ("callbacks", "runners", "deploy")


def __getattr__(name: str):
    """`dcc.runners`, `dcc.callbacks` (and Catalyst) and `dcc.deploy` are imported on first access."""
    if name in _LAZY_SUBPACKAGES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
