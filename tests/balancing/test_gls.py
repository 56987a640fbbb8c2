"""GeometricLossStrategy: (prod of the present L_t)^(1/n)."""
import pytest
import torch

from dnn_cool_catalyst import balancing


def test_geometric_mean_of_present_losses_and_its_gradient():
    b = balancing.GeometricLossStrategy().bind(["a", "b", "c"])
    losses = torch.tensor([1.0, 0.0, 4.0], requires_grad=True)
    loss = b(losses, [True, False, True], update=True)
    assert loss.item() == pytest.approx(2.0)
    loss.backward()
    # d/dL_t = loss / (n L_t): 2 / 2 and 2 / 8; the absent task 0
    assert losses.grad.tolist() == pytest.approx([1.0, 0.0, 0.25])
    assert b.last_weights.tolist() == pytest.approx([1.0, 0.0, 0.25])


def test_a_zero_loss_stays_finite():
    b = balancing.GeometricLossStrategy().bind(["a", "b"])
    losses = torch.tensor([0.0, 4.0], requires_grad=True)
    loss = b(losses, [True, True], update=True)
    loss.backward()
    assert loss.item() < 1e-15 and torch.isfinite(losses.grad).all()
