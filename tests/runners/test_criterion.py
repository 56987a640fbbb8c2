"""`runners.criterion`: one protocol for the batch loss, whatever the criterion."""
import pytest
import torch

from dnn_cool_catalyst.callbacks.batch import StackedLossTerms
from dnn_cool_catalyst.runners.criterion import FlowLossStep, PlainLossStep, loss_step


def _batch(flow, labels, n=16):
    x, y = flow.get_dataset({"features": torch.randn(len(next(iter(labels.values()))), 8)}, labels)[list(range(n))]
    return flow.torch()(x), y


def test_a_flow_loss_gives_its_loss_and_the_stacked_terms(data, flow_and_model):
    flow, _ = flow_and_model()
    flow_loss = flow.get_loss()
    outputs, y = _batch(flow, data[1])
    step = loss_step(flow_loss)
    assert isinstance(step, FlowLossStep)
    loss, terms = step(outputs, y)
    # the same terms stacked then combined, against combined from the mapping: sums of the same
    # float32 values in the same order, up to the rounding of one division per task
    torch.testing.assert_close(loss, flow_loss(outputs, y), rtol=1e-6, atol=0)
    assert isinstance(terms, StackedLossTerms) and list(terms) == list(flow_loss.terms(outputs, y))
    assert not terms.stacked.requires_grad and loss.requires_grad
    reduced = {p: (s * 0, c) for p, (s, c) in flow_loss.terms(outputs, y).items()}  # as a balanced model gives them
    assert float(step(outputs, y, reduced)[0].detach()) == 0.0


def test_a_plain_criterion_gives_its_loss_and_no_terms():
    step = loss_step(lambda outputs, targets: outputs["z"].sum() - targets["t"].sum())
    assert isinstance(step, PlainLossStep)
    loss, terms = step({"z": torch.ones(3)}, {"t": torch.ones(1)})
    assert float(loss) == 2.0 and terms is None
    with pytest.raises(ValueError, match="reduced the loss terms itself.*leave criterion=None"):
        step({"z": torch.ones(3)}, {"t": torch.ones(1)}, terms={"a": (torch.ones(()), torch.ones(()))})
    with pytest.raises(TypeError, match="criterion must be a FlowLoss or a callable.*got int"):
        loss_step(3)
