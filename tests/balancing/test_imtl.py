"""IMTL: IMTL-L scales the losses by learned exp(s_t); IMTL-G gives d equal projections on every u_t."""
import math

import pytest
import torch

from dnn_cool_catalyst import balancing
from dnn_cool_catalyst.balancing.imtl import impartial_weights
from dnn_cool_catalyst.interpreters.loss import local_means, stack_terms


def _weigh(grads, paths="abcd"):
    b = balancing.IMTL().bind(list(paths[:len(grads)]))
    return b.weigh(grads @ grads.T, torch.ones(len(grads)), torch.arange(len(grads)), True)


def test_two_tasks_against_hand_computation():
    # u_1 = (1, 0), u_2 = (0, 1): d = (a_1, 2 a_2) has equal projections where a_1 = 2 a_2, so (2/3, 1/3)
    # (the paper's closed form: alpha_2 = g_1 . (u_1 - u_2) / ((g_1 - g_2) . (u_1 - u_2)) = 1 / 3)
    alpha, h = _weigh(torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64))
    assert alpha.tolist() == pytest.approx([2 / 3, 1 / 3], rel=1e-12)
    assert h.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("seed", range(3))
def test_the_aggregated_gradient_has_equal_projections_and_matches_the_papers_closed_form(seed):
    torch.manual_seed(seed)
    grads = torch.randn(4, 9, dtype=torch.float64) * torch.tensor([[0.1], [1.0], [5.0], [30.0]], dtype=torch.float64)
    alpha, _ = _weigh(grads)
    d = alpha @ grads
    units = grads / grads.norm(dim=1, keepdim=True)
    projections = units @ d
    assert float(alpha.sum()) == pytest.approx(1.0, abs=1e-12)
    assert projections.tolist() == pytest.approx([float(projections[0])] * 4, rel=1e-9)
    # the paper's eq.: alpha_{2..T} = g_1 U^T (D U^T)^-1 on the vectors
    big_d, big_u = grads[:1] - grads[1:], units[:1] - units[1:]
    rest = grads[0] @ big_u.T @ torch.inverse(big_d @ big_u.T)
    assert alpha.tolist() == pytest.approx(torch.cat([1 - rest.sum(0, keepdim=True), rest]).tolist(), rel=1e-8)


def test_a_zero_gradient_gets_no_weight_and_dependent_gradients_stay_finite():
    grads = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    alpha = impartial_weights(grads @ grads.T)
    assert alpha[1] == 0.0 and alpha.tolist() == pytest.approx([0.75, 0.0, 0.25], rel=1e-12)
    same = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)  # the paper's inverse does not exist
    alpha = impartial_weights(same @ same.T)
    assert torch.isfinite(alpha).all() and float(alpha.sum()) == pytest.approx(1.0, abs=1e-10)
    projections = (same / same.norm(dim=1, keepdim=True)) @ (alpha @ same)
    assert projections.tolist() == pytest.approx([float(projections[0])] * 3, rel=1e-9)
    assert impartial_weights(torch.zeros(2, 2, dtype=torch.float64)).tolist() == [0.5, 0.5]
    assert impartial_weights(torch.tensor([[4.0]], dtype=torch.float64)).tolist() == [1.0]


def test_imtl_l_transform_and_its_scales_gradient():
    b = balancing.IMTL().bind(["a", "b", "c"])
    assert [p.shape for p in b.parameters()] == [(3,)] and b.log_scales.tolist() == [0.0, 0.0, 0.0]
    assert b.supports_representation
    with torch.no_grad():
        b.log_scales[0].fill_(0.5)
        b.log_scales[1].fill_(7.0)
        b.log_scales[2].fill_(-1.0)
    losses = torch.tensor([2.0, 3.0], requires_grad=True)
    index = torch.tensor([0, 2])  # b absent
    out = b.transform(losses, index)
    assert out.tolist() == pytest.approx([math.exp(0.5) * 2.0 - 0.5, math.exp(-1.0) * 3.0 + 1.0], rel=1e-6)
    out.sum().backward()  # the heads' term with h = 1
    assert b.log_scales.grad[0].item() == pytest.approx(math.exp(0.5) * 2.0 - 1.0, rel=1e-6)
    assert b.log_scales.grad[2].item() == pytest.approx(math.exp(-1.0) * 3.0 - 1.0, rel=1e-6)
    assert b.log_scales.grad[1] == 0.0  # an absent task's scale: an exact zero
    assert losses.grad.tolist() == pytest.approx([math.exp(0.5), math.exp(-1.0)], rel=1e-6)


def test_the_learned_scale_brings_the_scaled_loss_to_one():
    b = balancing.IMTL().bind(["a"])
    opt = torch.optim.SGD(b.parameters(), lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        b.transform(torch.tensor([4.0]), torch.tensor([0])).sum().backward()
        opt.step()
    assert math.exp(b.log_scales[0].item()) * 4.0 == pytest.approx(1.0, rel=1e-4)


def test_records_alpha_of_the_present_tasks_and_state_dict_round_trip():
    torch.manual_seed(0)
    grads = torch.randn(2, 5, dtype=torch.float64)
    b = balancing.IMTL().bind(["a", "b", "c"])
    with torch.no_grad():
        b.log_scales[1].fill_(0.3)
    alpha, _ = b.weigh(grads @ grads.T, torch.ones(2), torch.tensor([1, 2]), True)
    assert b.effective_weights()["a"] == 0.0 and b.effective_weights()["c"] == pytest.approx(float(alpha[1]))
    assert torch.equal(alpha, b.weigh(grads @ grads.T, torch.ones(2), torch.tensor([1, 2]), True)[0])  # deterministic
    fresh = balancing.IMTL().bind(["a", "b", "c"])
    fresh.load_state_dict(b.state_dict())
    assert fresh.log_scales.tolist() == pytest.approx([0.0, 0.3, 0.0])


def test_end_to_end_on_the_gated_flow(gated_flow, make_batch, shared_model):
    flow = gated_flow()
    model = shared_model(flow)
    shared = list(model.backbone.parameters())
    loss_fn = flow.get_loss(balancer=balancing.IMTL())
    with torch.no_grad():
        loss_fn.balancer.log_scales[0].fill_(0.2)
        loss_fn.balancer.log_scales[3].fill_(-0.4)
    x, y = make_batch([0, 0, 0, 0, 0], seed=3)  # value and tags absent
    means, counts = local_means(stack_terms(loss_fn.terms(model(x), y)))
    assert (counts > 0).tolist() == [True, False, False, True]
    s = torch.tensor([0.2, -0.4])
    scaled = s.exp() * means[[0, 3]] - s
    grads = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(scaled[i], shared, retain_graph=True)])
                         for i in range(2)]).double()
    units = grads / grads.norm(dim=1, keepdim=True)
    # two tasks: d = a g_1 + (1 - a) g_2 with equal projections on u_1 and u_2, solved on the vectors
    a = float((grads[1] @ (units[1] - units[0])) / ((grads[0] - grads[1]) @ (units[0] - units[1])))
    expected = a * grads[0] + (1 - a) * grads[1]
    model.zero_grad(set_to_none=True)
    loss = loss_fn.backward(model(x), y, shared_parameters=shared)
    assert loss.item() == pytest.approx(float(means.detach()[[0, 3]].sum()), rel=1e-6)
    got = torch.cat([p.grad.reshape(-1) for p in shared]).double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)  # float32 against float64 by hand
    scales = loss_fn.balancer.log_scales
    assert scales.grad[0].item() == pytest.approx(math.exp(0.2) * float(means.detach()[0]) - 1.0, rel=1e-5)
    assert scales.grad[1] == 0.0 and scales.grad[2] == 0.0  # absent: exact zeros
    for path in ("value", "tags"):
        assert all(p.grad is None or not p.grad.any() for p in getattr(model.flow, path).parameters())
    opt = torch.optim.SGD([*model.parameters(), *loss_fn.parameters()], lr=0.1)
    for seed in range(4):
        opt.zero_grad(set_to_none=True)
        x, y = make_batch([seed % 2, 0, 1, int(seed % 3 == 0)], seed=seed)
        assert math.isfinite(loss_fn.backward(model(x), y, shared_parameters=shared).item())
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in [*model.parameters(), *loss_fn.parameters()])
        opt.step()


def test_non_finite_gradients_give_uniform_weights_not_an_svd_error():
    grads = torch.tensor([[1.0, float("inf")], [0.5, 1.0]], dtype=torch.float64)
    assert impartial_weights(grads @ grads.T).tolist() == [0.5, 0.5]
