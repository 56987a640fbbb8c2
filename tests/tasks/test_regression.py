"""BoundedRegressionTask: the choice of loss on the activated value."""
import math

import pytest
import torch
from torch import nn

import dnn_cool_catalyst as dcc


def _loss(kind, logits, labels):
    task = dcc.BoundedRegressionTask("r", nn.Linear(1, 1), loss=kind) if kind else dcc.BoundedRegressionTask("r", nn.Linear(1, 1))
    return task.elementwise_loss(logits, task.prepare_labels(labels))


def test_each_loss_on_the_sigmoid_against_hand_values():
    # sigmoid(0) = 0.5 against labels 0.5, 0.45, 0.0: errors 0, 0.05, 0.5
    logits, labels = torch.zeros(3, 1), [0.5, 0.45, 0.0]
    assert _loss(None, logits, labels).tolist() == pytest.approx([0.0, 0.0025, 0.25])  # default: MSE
    assert _loss("mse", logits, labels).tolist() == pytest.approx([0.0, 0.0025, 0.25])
    assert _loss("l1", logits, labels).tolist() == pytest.approx([0.0, 0.05, 0.5])
    # Huber with beta 0.1: 0.5 e^2 / beta below 0.1, e - beta / 2 above
    assert _loss("smooth_l1", logits, labels).tolist() == pytest.approx([0.0, 0.5 * 0.05 ** 2 / 0.1, 0.5 - 0.05])


@pytest.mark.parametrize("kind", ["mse", "l1", "smooth_l1"])
def test_missing_labels_give_finite_loss_and_zero_gradient(kind):
    logits = torch.tensor([[0.3], [2.0]], requires_grad=True)
    task = dcc.BoundedRegressionTask("r", nn.Linear(1, 1), loss=kind)
    labels = task.prepare_labels([0.2, math.nan])
    elem = task.elementwise_loss(logits, labels)
    assert torch.isfinite(elem).all()
    (elem * task.available(labels)).sum().backward()
    assert logits.grad[1].item() == 0.0 and logits.grad[0].item() != 0.0
    assert math.isnan(task.sample_loss(logits.detach(), labels)[1])


def test_default_is_mse_and_unknown_loss_names_the_task():
    assert dcc.BoundedRegressionTask("r", nn.Linear(1, 1)).loss_name == "mse"
    with pytest.raises(ValueError, match="'box_x'.*huber"):
        dcc.BoundedRegressionTask("box_x", nn.Linear(1, 1), loss="huber")
