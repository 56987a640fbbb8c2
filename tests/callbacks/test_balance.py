"""BalancerCallback: the run's optimizer is attached to the balancer (absent tasks keep their
learned value and optimizer moments), and detached at the end of the run."""
from types import SimpleNamespace

import torch

from dnn_cool_catalyst import balancing
from dnn_cool_catalyst.callbacks.balance import BalancerCallback


def _batch(gate, seed):
    g = torch.Generator().manual_seed(seed)
    n = len(gate)
    y = {"gate": torch.tensor(gate, dtype=torch.float32), "value": torch.rand(n, generator=g),
         "tags": (torch.rand(n, 2, generator=g) > 0.5).float(), "kind": torch.randint(0, 4, (n,), generator=g)}
    return {"f": torch.randn(n, 3, generator=g), "gt": {"gate": y["gate"]}}, y


def test_the_optimizer_is_attached_for_the_run_only(gated_flow):
    flow = gated_flow()
    model, loss_fn = flow.torch(), flow.get_loss(balancer=balancing.UncertaintyWeighting())
    log_vars = loss_fn.balancer.log_vars
    opt = torch.optim.AdamW([*model.parameters(), *loss_fn.parameters()], lr=0.1)

    def step(gate, seed):
        opt.zero_grad(set_to_none=True)
        loss_fn.backward(model(_batch(gate, seed)[0]), _batch(gate, seed)[1])
        opt.step()

    runner = SimpleNamespace(criterion=loss_fn, optimizer=opt)
    callback = BalancerCallback()
    callback.on_experiment_start(runner)
    for seed in range(3):
        step([1, 0, 1, 0], seed)
    before = log_vars.detach().clone()
    step([0, 0, 0, 0], 5)  # value (1) and tags (2) absent
    assert torch.equal(log_vars.detach()[1:3], before[1:3]) and not torch.equal(log_vars.detach(), before)
    callback.on_experiment_end(runner)
    step([0, 0, 0, 0], 6)  # detached: AdamW's momentum moves the zero-gradient entries until the next call
    assert not torch.equal(log_vars.detach()[1:3], before[1:3])
