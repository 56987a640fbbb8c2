"""The plumbing of the gradient methods (`BalancedFlowLoss.gradient_step`): what the surrogate loss
gives the shared parameters (or features), the heads, absent tasks and the method's own parameters,
checked against gradients computed by hand."""
import math

import pytest
import torch
from torch import nn

from dnn_cool_catalyst.balancing.gradient import GradientBalancer, split_like, task_gradients
from dnn_cool_catalyst.interpreters.loss import local_means, stack_terms

PATHS = ("gate", "value", "tags", "kind")


class Fixed(GradientBalancer):
    """A gradient method with given `c` and `h` per task (by path position); remembers its calls."""

    def __init__(self, c, h, representation=False):
        super().__init__(representation=representation)
        self.c, self.h, self.calls = c, h, []

    def weigh(self, gram, losses, index, update):
        self.calls.append((gram.clone(), losses.clone(), index.clone(), update))
        c = torch.tensor([self.c[i] for i in index.tolist()], dtype=losses.dtype)
        h = torch.tensor([self.h[i] for i in index.tolist()], dtype=losses.dtype)
        self._record(index, c)
        return c, h


C, H = [0.5, 2.0, -1.0, 3.0], [1.5, 0.25, 2.0, 0.5]


def _losses(loss_fn, model, x, y):
    """The tasks' losses `L_t` (with their graph) and which are present, as the loss computes them."""
    means, counts = local_means(stack_terms(loss_fn.terms(model(x), y)))
    return means, (counts > 0).tolist()


def _grads(value, tensors):
    return torch.autograd.grad(value, tensors, retain_graph=True, allow_unused=True)


def _flat(grads, tensors):
    return torch.cat([(g if g is not None else torch.zeros_like(t)).reshape(-1) for g, t in zip(grads, tensors)])


def test_shared_parameters_get_d_and_heads_their_weighted_gradient(gated_flow, make_batch, shared_model):
    flow = gated_flow()
    model = shared_model(flow)
    x, y = make_batch([1, 0, 1, 0, 1], seed=3)
    shared = list(model.backbone.parameters())
    loss_fn = flow.get_loss(balancer=Fixed(C, H))
    losses, present = _losses(loss_fn, model, x, y)
    assert all(present)
    expected_shared = sum(C[t] * _flat(_grads(losses[t], shared), shared) for t in range(4))
    expected_heads = {}
    for t, path in enumerate(PATHS):
        head = list(getattr(model.flow, path).parameters())
        expected_heads[path] = [H[t] * g for g in _grads(losses[t], head)]
    model.zero_grad(set_to_none=True)
    value = loss_fn.backward(model(x), y, shared_parameters=shared)
    assert value.item() == pytest.approx(losses.sum().item(), rel=1e-6)  # the logged value: the plain sum
    torch.testing.assert_close(_flat([p.grad for p in shared], shared), expected_shared)
    for path in PATHS:
        for p, g in zip(getattr(model.flow, path).parameters(), expected_heads[path]):
            torch.testing.assert_close(p.grad, g)
    gram, seen, index, update = loss_fn.balancer.calls[-1]
    g = torch.stack([_flat(_grads(losses[t], shared), shared) for t in range(4)]).double()
    torch.testing.assert_close(gram, g @ g.T)
    assert index.tolist() == [0, 1, 2, 3] and update and not seen.requires_grad
    assert loss_fn.balancer.effective_weights() == {p: pytest.approx(c) for p, c in zip(PATHS, C)}


def test_absent_heads_get_exactly_zero_and_are_never_rows(gated_flow, make_batch, shared_model):
    flow = gated_flow()
    model = shared_model(flow)
    x, y = make_batch([0, 0, 0], seed=1)  # value and tags absent
    loss_fn = flow.get_loss(balancer=Fixed(C, H))
    loss_fn.shared_parameters = model.backbone.parameters()
    losses, _ = _losses(loss_fn, model, x, y)
    loss = loss_fn(model(x), y)
    loss.backward()
    assert loss.item() == pytest.approx((losses[0] + losses[3]).item(), rel=1e-6)
    for path in ("value", "tags"):  # in the graph (DDP needs no find_unused_parameters), with a zero gradient
        assert all(p.grad is not None and not p.grad.any() for p in getattr(model.flow, path).parameters())
    gram, seen, index, _ = loss_fn.balancer.calls[-1]
    assert index.tolist() == [0, 3] and gram.shape == (2, 2) and seen.shape == (2,)
    assert loss_fn.balancer.effective_weights()["value"] == 0.0


def test_no_task_present_is_zero_and_finite_without_calling_the_method(gated_flow, make_batch, shared_model):
    flow = gated_flow()
    model = shared_model(flow)
    loss_fn = flow.get_loss(balancer=Fixed(C, H))
    x, y = make_batch([0, 1, 1], missing=True)
    loss = loss_fn.backward(model(x), y, shared_parameters=model.backbone.parameters())
    assert loss.item() == 0.0 and not loss_fn.balancer.calls
    assert all(p.grad is None or (torch.isfinite(p.grad).all() and not p.grad.any()) for p in model.parameters())


def test_outside_training_steps_the_method_is_not_called(gated_flow, make_batch, shared_model):
    flow = gated_flow()
    model = shared_model(flow)
    loss_fn = flow.get_loss(balancer=Fixed(C, H))  # no shared parameters: not needed there
    x, y = make_batch([1, 0], seed=2)
    losses, _ = _losses(loss_fn, model, x, y)
    with torch.no_grad():
        assert loss_fn(model(x), y).item() == pytest.approx(losses.sum().item())
    loss_fn.eval()
    assert loss_fn(model(x), y).item() == pytest.approx(losses.sum().item())
    assert not loss_fn.balancer.calls


def test_a_training_step_without_shared_parameters_says_what_to_pass(gated_flow, make_batch, shared_model):
    flow = gated_flow()
    model = shared_model(flow)
    loss_fn = flow.get_loss(balancer=Fixed(C, H))
    x, y = make_batch([1, 0], seed=2)
    with pytest.raises(ValueError, match=r"Fixed is a gradient method .* shared_parameters=model\.backbone\."
                                         r"parameters\(\).*loss_fn\.shared_parameters.*representation=True"):
        loss_fn(model(x), y)
    model.backbone.requires_grad_(False)
    with pytest.raises(ValueError, match="do not require a gradient"):
        loss_fn.backward(model(x), y, shared_parameters=model.backbone.parameters())


def test_the_call_argument_applies_to_that_call_only(gated_flow, make_batch, shared_model):
    flow = gated_flow()
    model = shared_model(flow)
    loss_fn = flow.get_loss(balancer=Fixed(C, H))
    x, y = make_batch([1, 0], seed=2)
    loss_fn.backward(model(x), y, shared_parameters=model.backbone.parameters())
    assert loss_fn.shared_parameters is None
    with pytest.raises(ValueError, match="needs the parameters every task shares"):
        loss_fn.backward(model(x), y)


def test_representation_variant_equals_a_hand_computation(gated_flow, make_batch):
    flow = gated_flow()
    heads = flow.torch()
    torch.manual_seed(2)
    backbone = nn.Linear(3, 3)
    loss_fn = flow.get_loss(balancer=Fixed(C, H, representation=True))
    x, y = make_batch([1, 0, 1, 1], seed=5)

    def run():
        z = torch.tanh(backbone(x["f"]))
        return z, heads({"f": z, "gt": x["gt"]})

    z, out = run()
    means, _ = local_means(stack_terms(loss_fn.terms(out, y)))
    r = torch.stack([_grads(means[t], [z])[0].reshape(-1) for t in range(4)])  # dL_t / d features
    c = torch.tensor(C)
    expected_backbone = torch.autograd.grad(z, list(backbone.parameters()), grad_outputs=(c @ r).reshape(z.shape),
                                            retain_graph=True)
    expected_heads = {p: [H[t] * g for g in _grads(means[t], list(getattr(heads, p).parameters()))]
                      for t, p in enumerate(PATHS)}
    backbone.zero_grad(set_to_none=True)
    heads.zero_grad(set_to_none=True)
    loss = loss_fn.backward(run()[1], y)  # no shared parameters needed
    assert loss.item() == pytest.approx(means.sum().item(), rel=1e-6)
    for p, g in zip(backbone.parameters(), expected_backbone):
        torch.testing.assert_close(p.grad, g)
    for path in PATHS:
        for p, g in zip(getattr(heads, path).parameters(), expected_heads[path]):
            torch.testing.assert_close(p.grad, g)
    torch.testing.assert_close(loss_fn.balancer.calls[-1][0], (r @ r.T).double())
    assert not loss_fn._heads.seen  # nothing of the step kept


def test_representation_variant_refuses_logits_it_did_not_see_and_constant_features(gated_flow, make_batch):
    flow = gated_flow()
    heads = flow.torch()
    loss_fn = flow.get_loss(balancer=Fixed(C, H, representation=True))
    x, y = make_batch([1, 0, 1], seed=5)
    with pytest.raises(ValueError, match="read inputs that do not require a gradient"):
        loss_fn(heads(x), y)  # the heads read x.f directly: nothing shared before them
    out = heads({"f": nn.Linear(3, 3)(x["f"]), "gt": x["gt"]})
    copied = {**out, "logits": {p: v * 1.0 for p, v in out["logits"].items()}}
    with pytest.raises(RuntimeError, match=r"logits of task\(s\) .*gate.* are not the outputs of a head call"):
        loss_fn(copied, y)


def test_no_hooks_without_a_representation_variant(gated_flow):
    flow = gated_flow()
    flow.get_loss(balancer=Fixed(C, H))
    flow.get_loss()
    assert not any(m._forward_hooks for m in flow.torch().modules())
    loss_fn = flow.get_loss(balancer=Fixed(C, H, representation=True))
    assert loss_fn._heads is not None and all(m._forward_hooks for m in (flow.torch().gate, flow.torch().kind))


class Scaled(Fixed):
    """`transform` with a learnable scale and an auxiliary loss: what IMTL / GradNorm use."""

    def __init__(self):
        super().__init__([1.0] * 4, [1.0] * 4)
        self.s = nn.Parameter(torch.tensor([0.1, 0.2, 0.3, 0.4]))

    def transform(self, losses, index):
        return self.s[index].exp() * losses

    def auxiliary_loss(self):
        return (self.s ** 2).sum() * 3.0


def test_transform_and_auxiliary_loss_reach_the_methods_parameters(gated_flow, make_batch, shared_model):
    flow = gated_flow()
    model = shared_model(flow)
    loss_fn = flow.get_loss(balancer=Scaled())
    x, y = make_batch([1, 0, 1], seed=4)
    losses, _ = _losses(loss_fn, model, x, y)
    s = loss_fn.balancer.s
    expected_s = _grads((s.exp() * losses).sum() + (s ** 2).sum() * 3.0, [s])[0]
    shared = list(model.backbone.parameters())
    expected_shared = _flat(_grads((s.exp() * losses).sum(), shared), shared)
    loss = loss_fn.backward(model(x), y, shared_parameters=shared)
    assert loss.item() == pytest.approx(losses.sum().item(), rel=1e-6)  # neither scale nor auxiliary in the value
    torch.testing.assert_close(s.grad, expected_s.detach())
    torch.testing.assert_close(_flat([p.grad for p in shared], shared), expected_shared.detach())


def test_task_gradients_batched_and_looped_agree(monkeypatch):
    torch.manual_seed(0)
    w, v = torch.randn(3, 4, requires_grad=True), torch.randn(2, requires_grad=True)
    unused = torch.randn(5, requires_grad=True)
    losses = torch.stack([(w ** 2).sum(), (w.sum(0) * 3).sum() + v.sum(), torch.tanh(v).prod()])
    expected = torch.stack([_flat(_grads(losses[t], [w, v, unused]), [w, v, unused]) for t in range(3)])
    torch.testing.assert_close(task_gradients(losses, [w, v, unused]), expected)
    real = torch.autograd.grad

    def no_batching(*args, **kwargs):  # an operation without a batching rule: the loop takes over
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("Batching rule not implemented")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batching)
    torch.testing.assert_close(task_gradients(losses, [w, v, unused]), expected)
    assert [t.shape for t in split_like(expected[0], [w, v, unused])] == [w.shape, v.shape, unused.shape]
    assert math.isfinite(float(task_gradients(losses[:1], [w, v, unused]).sum()))
