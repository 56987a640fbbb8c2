"""CAGrad: the dual on the simplex (checked by a grid), the primal ball (checked by brute force)."""
import math

import pytest
import torch

from dnn_cool_catalyst import balancing
from dnn_cool_catalyst.balancing.cagrad import dual_weights
from dnn_cool_catalyst.interpreters.loss import local_means, stack_terms


def _dual(gram, w, c):
    b = torch.full((len(w),), 1.0 / len(w), dtype=torch.float64)
    return float(w @ gram @ b + c * math.sqrt(gram.mean()) * (w @ gram @ w).clamp_min(0).sqrt())


def _gradients():
    # two conflicting gradients of different norms (cos < 0); the dual's minimiser is inside the simplex
    return torch.tensor([[2.0, 0.0], [-1.0, 1.5]], dtype=torch.float64)


def test_defaults_are_the_authors():
    b = balancing.CAGrad()
    assert (b.c, b.rescale, b.representation) == (0.5, 1, False)
    assert balancing.CAGrad(representation=True).representation
    assert not list(b.bind(["a", "b"]).parameters()) and not b.state_dict()  # no state to keep


@pytest.mark.parametrize("grads", [[[2.0, 0.0], [-1.0, 1.5]], [[1.0, 0.2], [-0.6, 2.0]]], ids=["inside", "vertex"])
def test_the_dual_matches_a_fine_grid_for_two_tasks(grads):
    grads = torch.tensor(grads, dtype=torch.float64)
    gram = grads @ grads.T
    w = dual_weights(gram, 0.5)
    grid = torch.linspace(0, 1, 200001, dtype=torch.float64)
    values = [_dual(gram, torch.stack([x, 1 - x]), 0.5) for x in grid[::1000]]  # coarse, then fine around it
    best = grid[::1000][int(torch.tensor(values, dtype=torch.float64).argmin())]
    fine = grid[(grid - best).abs() <= 0.005]
    values = torch.tensor([_dual(gram, torch.stack([x, 1 - x]), 0.5) for x in fine], dtype=torch.float64)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-12) and bool((w >= 0).all())
    # the grid's spacing is 5e-6: its minimiser is within that of the true one
    assert float(w[0]) == pytest.approx(float(fine[int(values.argmin())]), abs=1e-5)
    assert _dual(gram, w, 0.5) <= float(values.min()) + 1e-12


def test_the_direction_maximises_the_worst_improvement_in_the_ball():
    grads = _gradients()
    c = 0.5
    coef, h = balancing.CAGrad(c=c, rescale=0).bind(["a", "b"]).weigh(grads @ grads.T, torch.ones(2), torch.arange(2), True)
    d = coef @ grads
    g0 = grads.mean(0)
    radius = c * float(g0.norm())
    assert float((d - g0).norm()) == pytest.approx(radius, rel=1e-6)  # on the ball's boundary
    angles = torch.linspace(0, 2 * math.pi, 400001, dtype=torch.float64)
    candidates = g0 + radius * torch.stack([angles.cos(), angles.sin()], 1)
    best = float((candidates @ grads.T).min(1).values.max())
    # the optimum is at a kink of min_t (the improvements are equal there): the angle grid's spacing
    # 1.6e-5 costs up to radius * max||g_t|| * 1.6e-5 = 1.4e-5 of the worst improvement
    assert float((grads @ d).min()) == pytest.approx(best, abs=1.5e-5)
    assert float((grads @ d).min()) >= best - 1e-9
    assert h.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("seed", range(3))
def test_no_point_of_the_ball_beats_the_direction_for_three_tasks(seed):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(3, 3, generator=g, dtype=torch.float64) + torch.tensor([[0.5, 0.0, 0.0]], dtype=torch.float64)
    coef, _ = balancing.CAGrad(rescale=0).bind(["a", "b", "c"]).weigh(grads @ grads.T, torch.ones(3), torch.arange(3), True)
    d = coef @ grads
    g0 = grads.mean(0)
    radius = 0.5 * float(g0.norm())
    directions = torch.randn(200000, 3, generator=g, dtype=torch.float64)
    # the sphere and the inside of the ball
    points = g0 + radius * directions / directions.norm(dim=1, keepdim=True) * torch.rand(200000, 1, generator=g, dtype=torch.float64) ** (1 / 3)
    points = torch.cat([points, g0 + radius * directions / directions.norm(dim=1, keepdim=True)])
    assert float((d - g0).norm()) <= radius * (1 + 1e-9)
    assert float((grads @ d).min()) >= float((points @ grads.T).min(1).values.max()) - 1e-9


def test_rescale_and_a_single_task():
    grads = _gradients()
    gram = grads @ grads.T
    args = (torch.ones(2), torch.arange(2), True)
    plain = balancing.CAGrad(rescale=0).bind(["a", "b"]).weigh(gram, *args)[0]
    assert torch.allclose(balancing.CAGrad().bind(["a", "b"]).weigh(gram, *args)[0], plain / 1.25, rtol=1e-12)
    assert torch.allclose(balancing.CAGrad(rescale=2).bind(["a", "b"]).weigh(gram, *args)[0], plain / 1.5, rtol=1e-12)
    # one task: d = g + c ||g|| g / ||g|| = 1.5 g, divided by 1 + c^2
    one = balancing.CAGrad().bind(["a", "b"]).weigh(gram[:1, :1], torch.ones(1), torch.tensor([1]), True)[0]
    assert one.tolist() == pytest.approx([1.5 / 1.25], rel=1e-12)
    with pytest.raises(ValueError, match="rescale must be 0"):
        balancing.CAGrad(rescale=3)
    with pytest.raises(ValueError, match="must be >= 0"):
        balancing.CAGrad(c=-1.0)


def test_the_weights_do_not_depend_on_the_gradients_scale():
    torch.manual_seed(0)
    grads = torch.randn(4, 30, dtype=torch.float64)
    b = balancing.CAGrad().bind(["a", "b", "c", "d"])
    args = (torch.ones(4), torch.arange(4), True)
    coef = b.weigh(grads @ grads.T, *args)[0]
    # 1e-6-sized gradients (LibMTL's absolute 1e-8 guards would change the answer)
    tiny = b.weigh((grads @ grads.T) * 1e-12, *args)[0]
    assert torch.allclose(coef, tiny, rtol=1e-7)


def test_records_the_coefficients_of_the_present_tasks_only_and_is_deterministic():
    torch.manual_seed(1)
    grads = torch.randn(3, 12, dtype=torch.float64)
    index = torch.tensor([0, 2, 3])
    b = balancing.CAGrad().bind(["a", "b", "c", "d"])
    first = b.weigh(grads @ grads.T, torch.ones(3), index, True)[0]
    weights = b.effective_weights()
    assert weights["b"] == 0.0 and [weights[p] for p in "acd"] == pytest.approx(first.tolist())
    assert torch.equal(first, b.weigh(grads @ grads.T, torch.ones(3), index, True)[0])


def test_gradients_with_a_vanishing_combination_stay_finite():
    grads = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # g_1 + g_2 = 0
    coef, _ = balancing.CAGrad().bind(["a", "b", "c"]).weigh(grads @ grads.T, torch.ones(3), torch.arange(3), True)
    assert torch.isfinite(coef).all()
    zero = torch.zeros(2, 2, dtype=torch.float64)  # every gradient 0
    coef, _ = balancing.CAGrad().bind(["a", "b"]).weigh(zero, torch.ones(2), torch.arange(2), True)
    assert torch.isfinite(coef).all()


def _present_losses_and_gradients(loss_fn, model, x, y, shared):
    """The present tasks' positions, losses (with graph) and flattened gradients w.r.t. `shared`."""
    means, counts = local_means(stack_terms(loss_fn.terms(model(x), y)))
    where = [t for t in range(len(counts)) if counts[t] > 0]
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(means[t], shared, retain_graph=True)]) for t in where]
    return where, means, torch.stack(rows)


def test_end_to_end_the_backbone_descends_cagrads_direction_and_absent_heads_get_nothing(gated_flow, make_batch,
                                                                                          shared_model):
    flow = gated_flow()
    model = shared_model(flow)
    shared = list(model.backbone.parameters())
    loss_fn = flow.get_loss(balancer=balancing.CAGrad())
    x, y = make_batch([0, 0, 0, 0, 0], seed=3)  # value and tags absent
    where, means, grads = _present_losses_and_gradients(loss_fn, model, x, y, shared)
    assert where == [0, 3]
    kind = list(model.flow.kind.parameters())
    expected_kind = torch.autograd.grad(means[3], kind, retain_graph=True)  # h = 1: the head's own gradient
    g = grads.double()
    w = dual_weights(g @ g.T, 0.5)
    g0, gw = g.mean(0), w @ g
    expected = (g0 + 0.5 * g0.norm() * gw / gw.norm()) / 1.25  # on the vectors, not the Gram matrix
    model.zero_grad(set_to_none=True)
    loss = loss_fn.backward(model(x), y, shared_parameters=shared)
    assert loss.item() == pytest.approx(float(means.detach()[where].sum()), rel=1e-6)
    got = torch.cat([p.grad.reshape(-1) for p in shared]).double()
    # float32 gradients (the loss's dtype) against the float64 hand computation
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    for p, e in zip(kind, expected_kind):
        torch.testing.assert_close(p.grad, e)
    for path in ("value", "tags"):
        assert all(p.grad is None or not p.grad.any() for p in getattr(model.flow, path).parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for seed in range(4):  # a few steps with every presence pattern of the flow
        opt.zero_grad(set_to_none=True)
        x, y = make_batch([seed % 2, 0, 1, int(seed % 3 == 0)], seed=seed)
        assert math.isfinite(loss_fn.backward(model(x), y, shared_parameters=shared).item())
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()


def test_non_finite_gradients_give_finite_coefficients_at_once():
    grads = torch.tensor([[1.0, float("inf")], [0.5, 1.0]], dtype=torch.float64)
    coef, _ = balancing.CAGrad().bind(["a", "b"]).weigh(grads @ grads.T, torch.ones(2), torch.arange(2), True)
    assert coef.tolist() == pytest.approx([0.5 / 1.25, 0.5 / 1.25])  # d = g_0 (non-finite, as the gradients)
