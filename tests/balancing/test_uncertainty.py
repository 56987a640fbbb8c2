"""UncertaintyWeighting: 0.5 exp(-s_t) L_t + 0.5 s_t over the present tasks (Kendall et al. 2018, eq. 7)."""
import math

import pytest
import torch

from dnn_cool_catalyst import balancing


def test_update_rule_against_hand_computation():
    b = balancing.UncertaintyWeighting().bind(["a", "b", "c"])
    assert [p.shape for p in b.parameters()] == [(3,)] and b.log_vars.tolist() == [0.0, 0.0, 0.0]  # sigma = 1
    with torch.no_grad():
        b.log_vars[0].fill_(0.5)
        b.log_vars[2].fill_(-1.0)
    losses = torch.tensor([2.0, 0.0, 3.0], requires_grad=True)
    loss = b(losses, [True, False, True], update=True)
    expected = 0.5 * math.exp(-0.5) * 2.0 + 0.25 + 0.5 * math.exp(1.0) * 3.0 - 0.5
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # d/ds_t = -0.5 exp(-s_t) L_t + 0.5; the absent task's s gets 0
    assert b.log_vars.grad[0].item() == pytest.approx(-0.5 * math.exp(-0.5) * 2.0 + 0.5, rel=1e-6)
    assert b.log_vars.grad[2].item() == pytest.approx(-0.5 * math.exp(1.0) * 3.0 + 0.5, rel=1e-6)
    assert b.log_vars.grad[1] == 0.0  # the absent task's entry: an exact zero
    assert losses.grad[0] == pytest.approx(0.5 * math.exp(-0.5)) and losses.grad[1] == 0.0
    assert b.effective_weights()["c"] == pytest.approx(0.5 * math.exp(1.0), rel=1e-6)


def test_learned_weight_tends_to_the_inverse_loss():
    # at the optimum of 0.5 exp(-s) L + 0.5 s, exp(s) = L: the weight 0.5 / L
    b = balancing.UncertaintyWeighting().bind(["a"])
    opt = torch.optim.SGD(b.parameters(), lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        b(torch.tensor([4.0]), [True], update=True).backward()
        opt.step()
    assert math.exp(b.log_vars[0].item()) == pytest.approx(4.0, rel=1e-3)
