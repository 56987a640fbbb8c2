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
