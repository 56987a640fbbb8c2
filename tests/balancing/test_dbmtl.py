"""DB-MTL: log losses; per-task gradient EMA over the task's present steps, scaled to the largest norm."""
import math

import pytest
import torch

from dnn_cool_catalyst import balancing
from dnn_cool_catalyst.interpreters.loss import local_means, stack_terms


def _expected(buffers):
    norms = buffers.norm(dim=1)
    alpha = norms.max() / (norms + 1e-8)
    return alpha, alpha @ buffers


def test_defaults_transform_and_no_representation_variant():
    b = balancing.DBMTL().bind(["a", "b"])
    assert (b.beta, b.beta_sigma, b.eps) == (0.9, 0.5, 1e-8) and not list(b.parameters())
    losses = torch.tensor([2.0, 0.5], requires_grad=True)
    out = b.transform(losses, torch.arange(2))
    assert out.tolist() == pytest.approx([math.log(2.0), math.log(0.5)], rel=1e-6)
    out.sum().backward()
    assert losses.grad.tolist() == pytest.approx([0.5, 2.0], rel=1e-6)  # the heads get grad L / L
    with pytest.raises(ValueError, match="no representation variant"):
        balancing.DBMTL(representation=True)


def test_direction_against_hand_computation_with_an_absent_task():
    b = balancing.DBMTL().bind(["a", "b", "c"])
    g1 = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0], [1.0, 1.0, 1.0]])
    d, h = b.direction(g1, torch.ones(3), torch.arange(3), update=True)
    buffers = 0.1 * g1  # step 1: g + 0.9 * (0 - g)
    alpha, expected = _expected(buffers)
    assert d.tolist() == pytest.approx(expected.tolist(), rel=1e-6) and h.tolist() == [1.0, 1.0, 1.0]
    assert b.effective_weights()["a"] == pytest.approx(float(alpha[0]), rel=1e-6)
    assert torch.allclose(b.grad_buffer, buffers, rtol=1e-6)
    kept = b.grad_buffer[1].clone()
    # step 2 with b absent: a and c are at their 2nd present step, b keeps its row and count
    g2 = torch.tensor([[0.0, 1.0, 0.0], [2.0, 2.0, 2.0]])
    d, _ = b.direction(g2, torch.ones(2), torch.tensor([0, 2]), update=True)
    rows = g2 + (0.9 / math.sqrt(2)) * (buffers[[0, 2]] - g2)
    alpha, expected = _expected(rows)
    assert d.tolist() == pytest.approx(expected.tolist(), rel=1e-6)
    assert b.steps.tolist() == [2, 1, 2]
    assert torch.equal(b.grad_buffer[1], kept)
    assert b.effective_weights()["b"] == 0.0
    # b's second present step decays with its own count (2), not the calendar's (3)
    g3 = torch.tensor([[1.0, 0.0, 0.0]])
    d, _ = b.direction(g3, torch.ones(1), torch.tensor([1]), update=True)
    row = g3 + (0.9 / math.sqrt(2)) * (buffers[1:2] - g3)
    assert d.tolist() == pytest.approx(row[0].tolist(), rel=1e-6)  # one task: alpha = 1 (up to the 1e-8)
    assert b.steps.tolist() == [2, 2, 2]


def test_outside_training_and_a_changed_parameter_size():
    b = balancing.DBMTL().bind(["a", "b"])
    d, _ = b.direction(torch.ones(2, 4), torch.ones(2), torch.arange(2), update=False)
    assert b.grad_buffer.shape == (2, 0) and b.steps.tolist() == [0, 0]  # nothing kept
    assert torch.isfinite(d).all()
    b.direction(torch.ones(2, 4), torch.ones(2), torch.arange(2), update=True)
    state = {k: v.clone() for k, v in b.state_dict().items()}
    b.direction(torch.randn(2, 4), torch.ones(2), torch.arange(2), update=False)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in state.items())
    with pytest.raises(ValueError, match="4 shared parameter values of its first step, but this step has 5"):
        b.direction(torch.ones(2, 5), torch.ones(2), torch.arange(2), update=True)


def test_state_dict_round_trip_and_determinism():
    torch.manual_seed(0)
    steps = [(torch.randn(2, 6), torch.tensor([0, 2])), (torch.randn(3, 6), torch.arange(3)), (torch.randn(1, 6), torch.tensor([1]))]

    def run(b, todo):
        return [b.direction(g, torch.ones(len(i)), i, update=True)[0] for g, i in todo]

    first, second = balancing.DBMTL().bind(["a", "b", "c"]), balancing.DBMTL().bind(["a", "b", "c"])
    assert all(torch.equal(x, y) for x, y in zip(run(first, steps[:2]), run(second, steps[:2])))
    fresh = balancing.DBMTL().bind(["a", "b", "c"])
    fresh.load_state_dict(first.state_dict())  # the (T, 0) placeholder takes the saved D
    assert torch.equal(fresh.grad_buffer, first.grad_buffer) and torch.equal(fresh.steps, first.steps)
    assert torch.equal(run(fresh, steps[2:])[0], run(first, steps[2:])[0])


def test_end_to_end_on_the_gated_flow(gated_flow, make_batch, shared_model):
    flow = gated_flow()
    model = shared_model(flow)
    shared = list(model.backbone.parameters())
    loss_fn = flow.get_loss(balancer=balancing.DBMTL())
    x, y = make_batch([0, 0, 0, 0, 0], seed=3)  # value and tags absent
    means, _ = local_means(stack_terms(loss_fn.terms(model(x), y)))
    logs = torch.log(means[[0, 3]] + 1e-8)
    grads = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(logs[i], shared, retain_graph=True)])
                         for i in range(2)])
    alpha, expected = _expected(0.1 * grads)  # the first step's buffers
    head = list(model.flow.kind.parameters())
    expected_head = torch.autograd.grad(logs[1], head, retain_graph=True)  # h = 1 on log(L + eps)
    loss = loss_fn.backward(model(x), y, shared_parameters=shared)
    assert loss.item() == pytest.approx(float(means.detach()[[0, 3]].sum()), rel=1e-6)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in shared]), expected, rtol=1e-5, atol=1e-7)
    for p, e in zip(head, expected_head):
        torch.testing.assert_close(p.grad, e)
    b = loss_fn.balancer
    assert b.steps.tolist() == [1, 0, 0, 1] and not b.grad_buffer[1:3].any()
    for path in ("value", "tags"):
        assert all(p.grad is None or not p.grad.any() for p in getattr(model.flow, path).parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for seed in range(4):
        opt.zero_grad(set_to_none=True)
        x, y = make_batch([seed % 2, 0, 1, int(seed % 3 == 0)], seed=seed)
        assert math.isfinite(loss_fn.backward(model(x), y, shared_parameters=shared).item())
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
    assert torch.isfinite(b.grad_buffer).all()
