"""EqualWeighting: the plain sum of the present tasks' losses."""
import torch

from dnn_cool_catalyst import balancing


def test_sum_of_losses_with_unit_weights_for_present_tasks():
    b = balancing.EqualWeighting().bind(["a", "b", "c"])
    losses = torch.tensor([2.0, 0.0, 3.5], requires_grad=True)
    loss = b(losses, [True, False, True], update=True)
    assert loss.item() == 5.5
    loss.backward()
    assert losses.grad.tolist() == [1.0, 1.0, 1.0]  # the absent loss is exactly 0 (and its head gets 0)
    assert b.effective_weights() == {"a": 1.0, "b": 0.0, "c": 1.0}
