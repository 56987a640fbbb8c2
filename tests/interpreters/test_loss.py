"""The flow loss: empty S_t, zero gradients of gated heads, weights, errors."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import dnn_cool_catalyst as dcc
from dnn_cool_catalyst.interpreters.loss import FlowLoss, stack_terms


def _flow(weight=1.0):
    tasks = dcc.Tasks([
        dcc.BinaryClassificationTask("gate", nn.Linear(3, 1)),
        dcc.BoundedRegressionTask("value", nn.Linear(3, 1), weight=weight),
        dcc.MultilabelClassificationTask("tags", nn.Linear(3, 2)),
        dcc.ClassificationTask("kind", nn.Linear(3, 4)),
    ])

    @tasks.add_flow
    def full(flow, x, out):
        out += flow.gate(x.f)
        out += flow.value(x.f) | out.gate
        out += flow.tags(x.f) | out.gate
        out += flow.kind(x.f) | ~out.gate
        return out

    return full


def _batch(gate, n=6, value=0.5):
    nan = float("nan")
    x = {"f": torch.randn(n, 3), "gt": {"gate": torch.tensor(gate, dtype=torch.float32)}}
    y = {"gate": torch.tensor(gate, dtype=torch.float32), "value": torch.full((n,), value),
         "tags": torch.ones(n, 2), "kind": torch.zeros(n, dtype=torch.long)}
    return x, y


def test_empty_precondition_adds_zero_and_gives_zero_gradient():
    flow = _flow()
    module = flow.torch().train()
    x, y = _batch([0.0] * 6)  # gate false everywhere: value and tags have empty S_t
    out = module(x)
    loss, terms = flow.get_loss()(out, y, return_terms=True)
    assert terms["value"].item() == 0.0 and terms["tags"].item() == 0.0
    loss.backward()
    for name in ("value", "tags"):
        head = getattr(module, name)
        assert head.weight.grad is not None, name  # every head receives a gradient (DDP-safe) ...
        assert torch.count_nonzero(head.weight.grad) == 0 and torch.count_nonzero(head.bias.grad) == 0  # ... of zero
    assert torch.count_nonzero(module.kind.weight.grad) > 0


def test_all_labels_missing_never_nan():
    flow = _flow()
    module = flow.torch().train()
    nan = float("nan")
    x, y = _batch([nan] * 4, n=4, value=nan)
    y = {k: (torch.full_like(v, -1) if v.dtype == torch.long else torch.full_like(v, nan)) for k, v in y.items()}
    out = module(x)
    loss = flow.get_loss()(out, y)
    assert loss.item() == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() and not p.grad.any() for p in module.parameters())


def test_weight_scales_the_task_term():
    torch.manual_seed(0)
    flow1 = _flow(weight=1.0)
    x, y = _batch([1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    out = flow1.torch().train()(x)
    loss1, terms = flow1.get_loss()(out, y, return_terms=True)
    flow1.tasks["value"].weight = 3.0
    loss3 = flow1.get_loss()(out, y)
    assert loss3.item() == pytest.approx(loss1.item() + 2 * terms["value"].item(), rel=1e-6)


def test_combine_is_the_weighted_sum_of_masked_means():
    g = torch.Generator().manual_seed(3)
    terms = {p: (torch.rand((), generator=g, dtype=torch.float64) * 5, torch.tensor(float(c), dtype=torch.float64))
             for p, c in zip("abcd", (3, 0, 1, 7))}
    weights = {"a": 1.0, "b": 2.0, "c": 0.5, "d": 1.0}
    expected = sum(weights[p] * float(s) / max(float(c), 1.0) for p, (s, c) in terms.items())
    got = FlowLoss.combine(terms, weights)
    assert got.shape == () and float(got) == pytest.approx(expected, rel=1e-12)
    half = {"a": (torch.tensor(1.0, dtype=torch.float16), torch.tensor(2.0, dtype=torch.float16)),
            "b": (torch.tensor(3.0), torch.tensor(4.0))}  # mixed precision: promoted, as adding them would
    assert float(FlowLoss.combine(half, {"a": 1.0, "b": 1.0})) == pytest.approx(0.5 + 0.75)


def test_from_stacked_equals_from_terms(security_flow, security_data):
    inputs, labels = security_data
    x, y = security_flow.get_dataset(inputs, labels)[list(range(40))]
    security_flow.tasks["door_open"].weight = 2.5
    loss_fn = security_flow.get_loss()
    terms = loss_fn.terms(security_flow.torch().train()(x), y)
    stacked = stack_terms(terms)
    assert stacked.shape == (len(terms), 2)
    torch.testing.assert_close(loss_fn.from_stacked(stacked, list(terms)), loss_fn.from_terms(terms), rtol=1e-6, atol=0)


def test_missing_target_and_bad_shape_name_the_task():
    flow = _flow()
    x, y = _batch([1.0] * 6)
    out = flow.torch().train()(x)
    del y["tags"]
    with pytest.raises(dcc.LabelError, match="'tags'"):
        flow.get_loss()(out, y)
    x, y = _batch([1.0] * 6)
    y["tags"] = torch.ones(6, 5)
    with pytest.raises(dcc.LabelError, match=r"'tags'.*\(6, 2\).*\(6, 5\)"):
        flow.get_loss()(out, y)


def test_per_sample_loss_nan_outside_mask_and_overall_ignores_it():
    flow = _flow()
    x, y = _batch([1.0, 0.0, 1.0])
    x["f"] = torch.randn(3, 3)
    y = {k: v[:3] for k, v in y.items()}
    out = flow.torch().train()(x)
    ps = {k: v.detach() for k, v in flow.get_per_sample_loss()(out, y).items()}
    assert math.isnan(ps["value"][1]) and not math.isnan(ps["value"][0])
    assert math.isnan(ps["kind"][0]) and not math.isnan(ps["kind"][1])
    expected = sum(torch.nan_to_num(ps[p]) for p in flow.graph.paths)
    torch.testing.assert_close(ps["overall"], expected)
    alone = flow.get_per_sample_loss()(out, y, overall=False)
    assert "overall" not in alone and set(alone) == set(flow.graph.paths)
    for p in flow.graph.paths:
        torch.testing.assert_close(alone[p].detach(), ps[p], equal_nan=True)


def test_torch_compile_fullgraph_matches_eager(security_flow, security_data):
    inputs, labels = security_data
    ds = security_flow.get_dataset(inputs, labels)
    x, y = ds[list(range(64))]
    module = security_flow.torch().train()
    loss_fn = security_flow.get_loss()

    def step(x, y):
        return loss_fn(module(x), y)

    eager = step(x, y)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, y)
    # the traced graph may fuse or reorder reductions: rounding of a float32 loss of order 1
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
