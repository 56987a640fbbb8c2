"""Every method under the mask rule: a task with empty S_t takes no part in a step."""
import copy
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dnn_cool_catalyst import balancing
from dnn_cool_catalyst.interpreters.loss import BalancedFlowLoss, FlowLoss

METHODS = {"equal": balancing.EqualWeighting, "uncertainty": balancing.UncertaintyWeighting,
           "dwa": balancing.DynamicWeightAverage, "dwa_per_step": lambda: balancing.DynamicWeightAverage(period=1),
           "rlw": balancing.RandomLossWeighting,
           "gls": balancing.GeometricLossStrategy, "famo": balancing.FAMO}
PATHS = ("gate", "value", "tags", "kind")


def _task_state(balancer, i):
    """What a balancer keeps about task i: its own parameters, and row i of per-task buffers."""
    n = len(balancer.paths)
    found = []
    for name, t in balancer.state_dict().items():
        if not torch.is_tensor(t):  # RandomLossWeighting's generator: draws follow the steps, not the tasks
            continue
        if name.endswith(f".{i}"):
            found.append(t.clone())
        elif t.dim() >= 1 and t.shape[0] == n:
            found.append(t[i].clone())
    return found


def _step(model, loss_fn, opt, x, y):
    opt.zero_grad(set_to_none=True)
    loss = loss_fn.backward(model(x), y)
    opt.step()
    return loss


def test_absent_task_gets_zero_head_gradient_and_keeps_its_state(method, gated_flow, make_batch, shared_model):
    flow = gated_flow()
    model, loss_fn = shared_model(flow), flow.get_loss(balancer=method())
    loss_fn.shared_parameters = model.backbone.parameters()  # what the gradient methods balance
    opt = torch.optim.AdamW([*model.parameters(), *loss_fn.parameters()], lr=0.1)
    for seed in range(3):  # every task present, so that momentum and histories are non-trivial
        _step(model, loss_fn, opt, *make_batch([1, 0, 1, 0], seed=seed))
    value = PATHS.index("value")
    before = _task_state(loss_fn.balancer, value)
    opt.zero_grad(set_to_none=True)
    x, y = make_batch([0, 0, 0, 0], seed=9)  # gate 0 everywhere: value and tags are absent
    loss = loss_fn.backward(model(x), y)
    assert math.isfinite(loss.item())
    heads = dict(model.named_parameters())
    for name, p in heads.items():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
        if ".value." in f".{name}." or ".tags." in f".{name}.":
            assert p.grad is None or not p.grad.any(), f"{name} of an absent task got a gradient"
    assert any(p.grad is not None and p.grad.any() for n, p in heads.items() if "kind" in n)
    for p in loss_fn.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
    assert loss_fn.balancer.effective_weights()["value"] == 0.0
    assert loss_fn.balancer.effective_weights()["kind"] > 0.0
    opt.step()
    after = _task_state(loss_fn.balancer, value)
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "the absent task's state changed"


def test_no_task_present_gives_zero_loss_and_no_state_change(method, gated_flow, make_batch):
    flow = gated_flow()
    model, loss_fn = flow.torch(), flow.get_loss(balancer=method())
    state = copy.deepcopy(loss_fn.balancer.state_dict())
    x, y = make_batch([0, 1, 0, 1], missing=True)
    loss = loss_fn.backward(model(x), y)
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    assert all(p.grad is None for p in loss_fn.parameters())
    assert all(torch.equal(state[k], v) for k, v in loss_fn.balancer.state_dict().items() if torch.is_tensor(v))


def test_default_loss_is_unchanged_and_equal_weighting_reproduces_it(gated_flow, make_batch):
    flow = gated_flow(value_weight=2.5)
    plain = flow.get_loss()
    assert type(plain) is FlowLoss and not list(plain.parameters())
    balanced = flow.get_loss(balancer=balancing.EqualWeighting())
    assert isinstance(balanced, BalancedFlowLoss)
    x, y = make_batch([1, 0, 1, 1, 0], seed=4)
    model = flow.torch()
    grads = []
    for loss_fn in (plain, balanced):
        model.zero_grad(set_to_none=True)
        loss = loss_fn.backward(model(x), y)
        grads.append((loss, [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))


def test_backward_is_the_loss_backward(method, gated_flow, make_batch, shared_model):
    flow = gated_flow()
    model = shared_model(flow)
    x, y = make_batch([1, 0, 1], seed=2)
    got = []
    for fill in ("call", "backward"):
        loss_fn = flow.get_loss(balancer=method())
        model.zero_grad(set_to_none=True)
        if fill == "call":
            loss_fn.shared_parameters = model.backbone.parameters()
            loss = loss_fn(model(x), y)
            loss.backward()
        else:
            loss = loss_fn.backward(model(x), y, shared_parameters=model.backbone.parameters())
            assert not loss.requires_grad
        got.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(got[0][0], got[1][0]) and all(torch.equal(a, b) for a, b in zip(got[0][1], got[1][1]))


def test_state_advances_only_on_training_steps(method, gated_flow, make_batch):
    flow = gated_flow()
    model, loss_fn = flow.torch(), flow.get_loss(balancer=method())
    x, y = make_batch([1, 0, 1, 0], seed=1)
    state = copy.deepcopy(loss_fn.balancer.state_dict())
    generator = getattr(loss_fn.balancer, "generator", None)
    drawn = generator.get_state().clone() if generator is not None else None
    with torch.no_grad():
        loss_fn(model(x), y)
    loss_fn.eval()
    loss_fn(model(x), y)
    assert all(torch.equal(state[k], v) for k, v in loss_fn.balancer.state_dict().items() if torch.is_tensor(v))
    if generator is not None:
        assert torch.equal(drawn, generator.get_state())


def test_a_balancer_binds_once_and_a_non_balancer_is_refused(gated_flow):
    flow = gated_flow()
    b = balancing.UncertaintyWeighting()
    loss_fn = flow.get_loss(balancer=b)
    assert b.paths == PATHS and [p.shape for p in loss_fn.parameters()] == [(len(PATHS),)]  # one (T,) vector
    with pytest.raises(ValueError, match="already bound"):
        flow.get_loss(balancer=b)
    with pytest.raises(TypeError, match="balancer must be"):
        flow.get_loss(balancer=lambda losses: losses.sum())


def test_terms_in_another_order_are_matched_to_the_tasks(gated_flow, make_batch):
    flow = gated_flow()
    loss_fn = flow.get_loss(balancer=balancing.GeometricLossStrategy())
    x, y = make_batch([1, 0, 1], seed=3)
    terms = loss_fn.terms(flow.torch()(x), y)
    reordered = dict(reversed(list(terms.items())))
    assert torch.equal(loss_fn.from_terms(terms), loss_fn.from_terms(reordered))
    with pytest.raises(ValueError, match="missing: .kind.; not tasks of the flow: none"):
        loss_fn.from_terms({p: t for p, t in terms.items() if p != "kind"})


@settings(max_examples=40, deadline=None)
@given(present=st.lists(st.booleans(), min_size=4, max_size=4),
       values=st.lists(st.floats(0.0, 50.0), min_size=4, max_size=4),
       name=st.sampled_from(sorted(METHODS)), steps=st.integers(1, 3))
def test_any_presence_pattern_gives_finite_loss_and_no_weight_to_absent_tasks(present, values, name, steps):
    b = METHODS[name]().bind(PATHS)
    for _ in range(steps):
        # the flow gives an absent task exactly 0
        losses = torch.tensor([v if p else 0.0 for v, p in zip(values, present)], requires_grad=True)
        loss = b(losses, present, update=True)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(losses.grad).all()
        assert all(w == 0.0 for w, p in zip(b.last_weights.tolist(), present) if not p)
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in b.parameters())


VECTORS = {"uncertainty": (balancing.UncertaintyWeighting, "log_vars"), "imtl": (balancing.IMTL, "log_scales"),
           "gradnorm": (balancing.GradNorm, "task_weights")}


def _vector_setup(name, gated_flow, shared_model):
    cls, attr = VECTORS[name]
    flow = gated_flow()
    model, loss_fn = shared_model(flow), flow.get_loss(balancer=cls())
    loss_fn.shared_parameters = model.backbone.parameters()
    vector = getattr(loss_fn.balancer, attr)
    # weight decay and momentum: both move an entry whose gradient is 0
    opt = torch.optim.AdamW([{"params": list(model.parameters())}, {"params": [vector], "weight_decay": 0.1}], lr=0.1)
    return model, loss_fn, vector, opt


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_learned_per_task_values_are_one_vector_and_an_attached_optimizer_leaves_absent_entries(
        name, gated_flow, make_batch, shared_model):
    model, loss_fn, vector, opt = _vector_setup(name, gated_flow, shared_model)
    assert [p.shape for p in loss_fn.parameters()] == [(len(PATHS),)]  # one tensor for the optimizer, not T
    hooks = loss_fn.balancer.attach(opt)
    for seed in range(3):  # every task present: non-zero moments for every entry
        _step(model, loss_fn, opt, *make_batch([1, 0, 1, 0], seed=seed))
    absent = [PATHS.index("value"), PATHS.index("tags")]
    present = [PATHS.index("gate"), PATHS.index("kind")]
    value, moments = vector.detach().clone(), {k: v.clone() for k, v in opt.state[vector].items() if k != "step"}
    _step(model, loss_fn, opt, *make_batch([0, 0, 0, 0], seed=9))  # gate 0 everywhere: value and tags absent
    assert torch.equal(vector.grad[absent], torch.zeros(2))
    # right after the step: the absent entries and their Adam moments as they were, as with a None gradient
    assert torch.equal(vector.detach()[absent], value[absent])
    for key, before in moments.items():
        assert torch.equal(opt.state[vector][key][absent], before[absent]), key
        assert not torch.equal(opt.state[vector][key][present], before[present]), key
    assert not torch.equal(vector.detach()[present], value[present])
    for hook in hooks:
        hook.remove()
    _step(model, loss_fn, opt, *make_batch([0, 0, 0, 0], seed=10))  # detached: AdamW moves them again...
    assert not torch.equal(vector.detach()[absent], value[absent])
    # ...but the balancer puts them back before saving and at its next call
    saved = loss_fn.state_dict()[f"balancer.{VECTORS[name][1]}"]
    assert torch.equal(saved[absent], value[absent]) and torch.equal(vector.detach()[absent], value[absent])


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_without_attaching_the_next_call_uses_the_absent_tasks_values_of_their_last_step(
        name, gated_flow, make_batch, shared_model):
    model, loss_fn, vector, opt = _vector_setup(name, gated_flow, shared_model)
    for seed in range(3):
        _step(model, loss_fn, opt, *make_batch([1, 0, 1, 0], seed=seed))
    absent = [PATHS.index("value"), PATHS.index("tags")]
    value = vector.detach().clone()
    _step(model, loss_fn, opt, *make_batch([0, 0, 0, 0], seed=9))
    assert not torch.equal(vector.detach()[absent], value[absent])  # AdamW moved the zero-gradient entries
    x, y = make_batch([1, 0, 1, 0], seed=4)
    with torch.no_grad():  # any next call (here a validation one) puts back the values of their last step
        loss_fn(model(x), y)
    assert torch.equal(vector.detach()[absent], value[absent])


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_a_checkpoint_with_one_scalar_per_task_loads_into_the_vector(name, gated_flow):
    cls, attr = VECTORS[name]
    flow = gated_flow()
    saved = flow.get_loss(balancer=cls()).state_dict()
    values = torch.tensor([0.5, -1.0, 2.0, 0.25])
    del saved[f"balancer.{attr}"]
    # the layout before the (T,) vector: a ParameterList of 0-d parameters, `<attr>.<i>`
    saved.update({f"balancer.{attr}.{i}": v.clone() for i, v in enumerate(values)})
    loss_fn = flow.get_loss(balancer=cls())
    loss_fn.load_state_dict(saved)  # strict: no key left over, none missing
    assert torch.equal(getattr(loss_fn.balancer, attr).detach(), values)
