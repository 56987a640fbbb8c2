"""GradNorm: weights renormalised over the present tasks, L_grad = sum |w_t ||g_t|| - mean G * r_t^alpha|."""
import pytest
import torch

from dnn_cool_catalyst import balancing
from dnn_cool_catalyst.interpreters.loss import local_means, stack_terms


def _gram(norms):
    # orthogonal gradients of the given norms: GradNorm reads only the diagonal
    return torch.diag(torch.tensor(norms, dtype=torch.float64) ** 2)


def test_defaults_and_parameters():
    b = balancing.GradNorm().bind(["a", "b", "c"])
    assert b.alpha == 1.5 and b.supports_representation
    assert [p.shape for p in b.parameters()] == [(3,)] and b.task_weights.tolist() == [1.0, 1.0, 1.0]
    assert b.auxiliary_loss() is None


def test_gradient_loss_against_hand_computation_and_finite_differences():
    b = balancing.GradNorm().bind(["a", "b", "c"])
    index = torch.tensor([0, 1, 2])
    norms = [1.0, 2.0, 4.0]
    b.weigh(_gram(norms), torch.tensor([1.0, 2.0, 4.0]), index, update=True)  # L_t(0)
    with torch.no_grad():
        b.task_weights.copy_(torch.tensor([0.5, 1.0, 1.5]))  # sum 3: the renormalisation keeps them
    losses = torch.tensor([0.5, 2.0, 2.0])  # L/L(0) = (0.5, 1, 0.5): b trains slowest
    c, h = b.weigh(_gram(norms), losses, index, update=True)
    assert c.tolist() == pytest.approx([0.5, 1.0, 1.5]) and torch.equal(c, h)
    w = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)
    n = torch.tensor(norms, dtype=torch.float64)
    ratio = torch.tensor([0.5, 1.0, 0.5], dtype=torch.float64)
    target = (w * n).mean() * (ratio / ratio.mean()) ** 1.5  # held constant, as in the paper

    def l_grad(v):
        return float((v * n - target).abs().sum())

    aux = b.auxiliary_loss()
    assert aux.item() == pytest.approx(l_grad(w), rel=1e-6)
    aux.backward()
    got = b.task_weights.grad.double()
    step = 1e-6
    numeric = torch.tensor([(l_grad(w + step * e) - l_grad(w - step * e)) / (2 * step)
                            for e in torch.eye(3, dtype=torch.float64)])
    assert got.tolist() == pytest.approx(numeric.tolist(), rel=1e-5)
    # b is behind: its gradient norm is below its target, so L_grad raises its weight
    assert got[1] < 0


def test_a_slow_task_gains_weight_and_weights_sum_to_the_present_tasks():
    b = balancing.GradNorm().bind(["a", "b"])
    opt = torch.optim.SGD(b.parameters(), lr=0.01)
    index = torch.arange(2)
    for step in range(20):
        opt.zero_grad()
        b.weigh(_gram([1.0, 1.0]), torch.tensor([1.0, 0.9 ** step]), index, update=True)  # a does not improve
        b.auxiliary_loss().backward()
        opt.step()
    c, _ = b.weigh(_gram([1.0, 1.0]), torch.tensor([1.0, 0.9 ** 20]), index, update=True)
    assert c[0] > 1.0 > c[1] and float(c.sum()) == pytest.approx(2.0)


def test_absent_tasks_keep_weight_initial_loss_and_get_no_gradient():
    b = balancing.GradNorm().bind(["a", "b", "c"])
    with torch.no_grad():
        b.task_weights[0].fill_(0.5)
        b.task_weights[1].fill_(7.0)
        b.task_weights[2].fill_(2.5)
    index = torch.tensor([0, 2])  # b absent
    c, _ = b.weigh(_gram([1.0, 3.0]), torch.tensor([2.0, 5.0]), index, update=True)
    assert c.tolist() == pytest.approx([2 * 0.5 / 3.0, 2 * 2.5 / 3.0])  # renormalised to sum 2 (the present tasks)
    assert b.task_weights[1].item() == 7.0
    assert b.initial_losses.tolist() == [2.0, 0.0, 5.0] and b.seen.tolist() == [True, False, True]
    b.auxiliary_loss().backward()
    assert b.task_weights.grad[1] == 0.0  # absent: an exact zero in the (T,) vector's gradient
    assert b.effective_weights()["b"] == 0.0
    # b's first present step records its L(0); a keeps the one of its first step
    b.weigh(_gram([1.0, 1.0, 1.0]), torch.tensor([1.0, 3.0, 4.0]), torch.arange(3), update=True)
    assert b.initial_losses.tolist() == [2.0, 3.0, 5.0]


def test_outside_training_nothing_changes():
    b = balancing.GradNorm().bind(["a", "b"])
    with torch.no_grad():
        b.task_weights[0].fill_(3.0)
    state = {k: v.clone() for k, v in b.state_dict().items()}
    c, _ = b.weigh(_gram([1.0, 1.0]), torch.tensor([1.0, 2.0]), torch.arange(2), update=False)
    assert c.tolist() == pytest.approx([1.5, 0.5])  # the value used is renormalised, the parameters are not
    assert b.auxiliary_loss() is None
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in state.items())


def test_state_dict_round_trip_and_determinism():
    def run(b):
        out = []
        for step, losses in enumerate(([1.0, 2.0], [0.8, 1.9], [0.5, 1.9])):
            for p in b.parameters():
                p.grad = None
            c, _ = b.weigh(_gram([1.0, 2.0]), torch.tensor(losses), torch.arange(2), update=True)
            b.auxiliary_loss().backward()
            with torch.no_grad():
                for p in b.parameters():
                    p -= 0.1 * p.grad
            out.append(c)
        return torch.stack(out)

    first, second = balancing.GradNorm().bind(["a", "b"]), balancing.GradNorm().bind(["a", "b"])
    assert torch.equal(run(first), run(second))
    fresh = balancing.GradNorm().bind(["a", "b"])
    fresh.load_state_dict(first.state_dict())
    assert torch.equal(run(fresh), run(first))


def test_end_to_end_on_the_gated_flow(gated_flow, make_batch, shared_model):
    flow = gated_flow()
    model = shared_model(flow)
    shared = list(model.backbone.parameters())
    loss_fn = flow.get_loss(balancer=balancing.GradNorm())
    opt = torch.optim.SGD([*model.parameters(), *loss_fn.parameters()], lr=0.05)
    for seed in range(3):  # every task present: L_t(0) recorded for all, weights moved by L_grad
        opt.zero_grad(set_to_none=True)
        x, y = make_batch([1, 0, 1, 0], seed=seed)
        loss_fn.backward(model(x), y, shared_parameters=shared)
        opt.step()
    weights = loss_fn.balancer.task_weights.detach().clone()
    assert any(abs(float(w) - 1.0) > 1e-6 for w in weights)
    x, y = make_batch([0, 0, 0, 0, 0], seed=3)  # value and tags absent
    means, _ = local_means(stack_terms(loss_fn.terms(model(x), y)))
    present_w = torch.stack([weights[0], weights[3]])
    w = present_w * 2 / present_w.sum()  # renormalised over the two present tasks
    grads = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(means[t], shared, retain_graph=True)])
                         for t in (0, 3)])
    head = list(model.flow.kind.parameters())
    expected_head = [w[1] * g for g in torch.autograd.grad(means[3], head, retain_graph=True)]
    opt.zero_grad(set_to_none=True)
    loss_fn.backward(model(x), y, shared_parameters=shared)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in shared]), w @ grads, rtol=1e-5, atol=1e-7)
    for p, e in zip(head, expected_head):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-7)
    b = loss_fn.balancer
    assert b.task_weights.grad[1] == 0.0 and b.task_weights.grad[2] == 0.0
    b.restore_absent()  # the values of the absent tasks as they were in the step (SGD's step moved none anyway)
    assert b.task_weights[1].item() == float(weights[1]) and b.task_weights[2].item() == float(weights[2])
    assert b.task_weights.grad[0] != 0.0 and torch.isfinite(b.task_weights.grad[0])
    for path in ("value", "tags"):
        assert all(p.grad is None or not p.grad.any() for p in getattr(model.flow, path).parameters())


def test_a_negative_weight_is_clipped_before_renormalising():
    b = balancing.GradNorm().bind(["a", "b"])
    with torch.no_grad():
        b.task_weights[0].fill_(-1.0)
        b.task_weights[1].fill_(3.0)
    c, _ = b.weigh(_gram([1.0, 1.0]), torch.ones(2), torch.arange(2), update=True)
    assert c.tolist() == [0.0, 2.0] and b.task_weights.tolist() == [0.0, 2.0]
    with torch.no_grad():
        b.task_weights[1].fill_(-0.5)
    c, _ = b.weigh(_gram([1.0, 1.0]), torch.ones(2), torch.arange(2), update=True)
    assert c.tolist() == [1.0, 1.0]  # all clipped to 0: start again from 1
