"""`ITask`: what a task of the user's own gets by default (class names, kind, description)."""
import numpy as np
import torch
from torch import nn

import dnn_cool_catalyst as dcc
from dnn_cool_catalyst.tasks import ScaleDecoder


class Depth(dcc.ITask):
    """A minimal task of the user's own, on the bare protocol."""

    def __init__(self, name="depth"):
        self.name, self.module, self.decoder = name, nn.Linear(4, 2), ScaleDecoder(10.0)

    def elementwise_loss(self, logits, labels):
        return (logits - labels.nan_to_num()) ** 2

    def available(self, labels):
        return ~torch.isnan(labels)

    def activate(self, logits):
        return logits

    def decode(self, activated):
        return self.decoder(activated)

    def prepare_labels(self, values):
        return torch.as_tensor(values, dtype=torch.float32)


def test_defaults_of_a_task_of_ones_own():
    task = Depth()
    assert task.class_names is None
    assert task.kind == "Depth"  # its class name, as export manifests recorded before `kind`
    texts = task.describe(np.array([[1.0, 2.5]]), np.array([[0.1, 0.25]]), np.array([[0.1, 0.25]]))
    assert texts == ["decoded: [1, 2.5], activated: [0.1, 0.25], logits: [0.1, 0.25]"]


def test_kind_is_the_class_name_unless_a_class_sets_it():
    class Gate(dcc.BinaryClassificationTask):
        pass

    class Door(dcc.BinaryClassificationTask):
        kind = "door"

    assert dcc.Task(name="t", module=nn.Linear(1, 1), loss=lambda z, y: z).kind == "Task"
    assert Gate("g", nn.Linear(1, 1)).kind == "Gate"
    assert Door("d", nn.Linear(1, 1)).kind == "door"
    assert dcc.BinaryClassificationTask("b", nn.Linear(1, 1)).kind == "BinaryClassificationTask"


def test_class_names_are_the_tasks_own_or_none():
    assert dcc.ClassificationTask("c", nn.Linear(1, 3), class_names=("x", "y", "z")).class_names == ["x", "y", "z"]
    assert dcc.MultilabelClassificationTask("m", nn.Linear(1, 2)).class_names is None
    assert dcc.BinaryClassificationTask("b", nn.Linear(1, 1)).class_names is None
    assert dcc.Task(name="t", module=nn.Linear(1, 1), loss=lambda z, y: z).class_names is None


def test_describe_sample_of_a_task_of_ones_own_decodes_label_and_prediction_alike():
    task = Depth()
    assert not task.decides_by_threshold
    assert task.describe_sample(torch.tensor([0.5, 0.1]), torch.tensor([0.2, 0.25])) == ("[5, 1]", "[2, 2.5]")
    assert task.describe_sample(torch.tensor([0.5, 0.1]), None) == ("[5, 1]", "?")


def test_a_custom_task_with_a_threshold_decoder_decides_and_describes_decisions():
    from dnn_cool_catalyst.tasks import ThresholdDecoder

    gate = dcc.Task(name="gate", module=nn.Linear(1, 1), loss=lambda z, y: z, activation=torch.sigmoid,
                    decoder=ThresholdDecoder(0.5))
    assert gate.decides_by_threshold
    assert gate.describe_sample(torch.tensor(1.0), torch.tensor([0.25])) == ("True", "False (0.25)")
    gate.class_names = ["a", "b"]
    assert gate.describe_sample(torch.tensor([1.0, 0.0]), torch.tensor([0.75, 0.25])) == ("[a]", "[a]")


def test_predefined_kinds_say_whether_they_decide_by_threshold():
    assert dcc.BinaryClassificationTask("b", nn.Linear(1, 1)).decides_by_threshold
    assert dcc.MultilabelClassificationTask("m", nn.Linear(1, 2)).decides_by_threshold
    assert not dcc.ClassificationTask("c", nn.Linear(1, 3)).decides_by_threshold
    assert not dcc.BoundedRegressionTask("r", nn.Linear(1, 1)).decides_by_threshold
    assert not dcc.MaskedLanguageModelingTask("t", nn.Linear(1, 3)).decides_by_threshold


def test_ranked_kinds_share_label_bound_and_description():
    from dnn_cool_catalyst.tasks.base import RankedTask

    shirt = dcc.ClassificationTask("c", nn.Linear(1, 3), class_names=["polo", "tee", "hoodie"])
    tokens = dcc.MaskedLanguageModelingTask("t", nn.Linear(1, 3))
    assert isinstance(shirt, RankedTask) and isinstance(tokens, RankedTask)
    assert shirt.kind == "ClassificationTask" and tokens.kind == "MaskedLanguageModelingTask"
    assert shirt.label_bound(torch.zeros(2, 3)) == 3 and tokens.label_bound(torch.zeros(2, 4, 7)) == 7
    assert shirt.describe_sample(torch.tensor(2), torch.tensor([0.1, 0.7, 0.2])) == ("hoodie", "tee (0.7)")
    texts = shirt.describe(np.array([[1, 2, 0]]), np.array([[0.2, 0.7, 0.1]]), None, top_k=2)
    assert texts == ["decoded: [tee, hoodie], activated: [0.7, 0.1]"]
