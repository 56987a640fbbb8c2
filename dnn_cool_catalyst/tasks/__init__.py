"""Task kinds: one file each, with activation, decoder, loss, availability, labels and metrics."""
from .base import Decoder, ITask, ScaleDecoder, SortDecoder, Task, ThresholdDecoder
from .binary import BinaryClassificationTask
from .classification import ClassificationTask
from .mlm import MaskedLanguageModelingTask
from .multilabel import MultilabelClassificationTask
from .regression import BoundedRegressionTask

__all__ = [
    "BinaryClassificationTask", "BoundedRegressionTask", "ClassificationTask", "Decoder", "ITask",
    "MaskedLanguageModelingTask", "MultilabelClassificationTask", "ScaleDecoder", "SortDecoder",
    "Task", "ThresholdDecoder",
]
