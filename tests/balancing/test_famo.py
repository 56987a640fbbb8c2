"""FAMO: c * sum z log D for the model; the logits follow the decrease of each task's log loss."""
import math

import pytest
import torch

from dnn_cool_catalyst import balancing


def test_loss_and_logit_update_against_hand_computation():
    b = balancing.FAMO().bind(["a", "b"])
    assert (b.lr, b.gamma, b.min_losses) == (0.025, 0.01, 0.0)  # the authors' defaults
    assert not list(b.parameters())  # the logits follow FAMO's own rule, not the optimizer
    losses = torch.tensor([1.0, 4.0], requires_grad=True)
    loss = b(losses, [True, True], update=True)
    # z = (1/2, 1/2), c = 1 / (0.5 / 1 + 0.5 / 4) = 1.6: loss = 1.6 * 0.5 * log 4, dloss/dL_t = c z_t / D_t
    assert loss.item() == pytest.approx(0.8 * math.log(4.0), rel=1e-6)
    loss.backward()
    assert losses.grad.tolist() == pytest.approx([0.8, 0.2], rel=1e-6)
    assert b.xi.tolist() == [0.0, 0.0]  # no history yet: no logit step
    # a's log loss fell by log 2, b's not: J_z^T delta = (log2 / 4, -log2 / 4); Adam's first step
    # moves each logit by lr against the sign of its gradient
    b(torch.tensor([0.5, 4.0]), [True, True], update=True)
    assert b.xi.tolist() == pytest.approx([-0.025, 0.025], rel=1e-5)
    za, zb = math.exp(-0.025) / (math.exp(-0.025) + math.exp(0.025)), math.exp(0.025) / (math.exp(-0.025) + math.exp(0.025))
    c = 1.0 / (za / 0.5 + zb / 4.0)
    assert b.last_weights.tolist() == pytest.approx([c * za / 0.5, c * zb / 4.0], rel=1e-5)


def test_an_absent_task_keeps_its_logit_history_and_adam_state():
    b = balancing.FAMO().bind(["a", "b", "c"])
    b(torch.tensor([1.0, 2.0, 3.0]), [True, True, True], update=True)
    b(torch.tensor([0.5, 0.0, 3.0]), [True, False, True], update=True)  # b absent
    assert b.steps.tolist() == [1, 0, 1] and b.xi[1] == 0.0
    assert b.previous[1].item() == pytest.approx(math.log(2.0))  # b's last present step
    b(torch.tensor([0.5, 1.0, 3.0]), [True, True, True], update=True)
    assert b.steps.tolist() == [2, 1, 2]  # b's delta: log 2 - log 1, against its own last present step
