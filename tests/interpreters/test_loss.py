"""The flow loss: empty S_t, zero gradients of gated heads, weights, errors."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import dnn_cool_catalyst as dcc
from dnn_cool_catalyst.interpreters.loss import FlowLoss, global_stacked, stack_terms


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


def test_ddp_scaling_leaves_one_process_alone(tmp_path):
    """`global_stacked` (the one home of the DDP scaling, also behind `from_terms`) returns the
    rows unchanged in one process, with or without a group; `test_ddp.py` checks two processes."""
    import torch.distributed as dist

    stacked = torch.tensor([[3.0, 2.0], [0.0, 0.0]], requires_grad=True)
    assert global_stacked(stacked) is stacked
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert global_stacked(stacked) is stacked
    finally:
        dist.destroy_process_group()
    assert FlowLoss.combine({}, {}) is None


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


def _leaf_outputs(out, **replace):
    """Outputs whose logits are fresh leaves (to read their gradient), some rows replaced."""
    logits = {}
    for path, z in out["logits"].items():
        z = z.detach().clone()
        for row, value in replace.get(path, []):
            z[row] = value
        logits[path] = z.requires_grad_()
    return {"logits": logits, "mask": out["mask"]}


def test_non_finite_logits_outside_s_t_leave_loss_and_gradients_alone():
    """An overflowing logit of a sample outside S_t once made the flow loss NaN (NaN * 0 = NaN)."""
    torch.manual_seed(0)
    flow = _flow()
    x, y = _batch([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    y["tags"][4, 1] = float("nan")  # a missing element inside S_t: its logit is outside too
    with torch.no_grad():
        out = flow.torch().train()(x)
    inf, nan = float("inf"), float("nan")
    bad = {"value": [(1, inf), (3, nan)], "tags": [(5, -inf), ((4, 1), nan)], "kind": [(0, inf), (2, nan)]}
    results = []
    for replace in ({}, bad):
        outputs = _leaf_outputs(out, **replace)
        loss = flow.get_loss()(outputs, y)
        loss.backward()
        results.append((loss.detach(), {p: z.grad for p, z in outputs["logits"].items()}))
    (clean, clean_grads), (loss, grads) = results
    assert torch.isfinite(loss) and torch.equal(loss, clean)
    for path, g in grads.items():
        assert torch.equal(g, clean_grads[path]), path
    assert not grads["value"][[1, 3]].any() and not grads["kind"][[0, 2]].any() and grads["tags"][4, 1] == 0


def test_custom_task_non_finite_outside_s_t_never_reaches_loss_or_gradient():
    """A NaN logit and an infinite label outside S_t (a NaN or infinite element loss, whose
    backward is NaN there): the loss is that of S_t and the excluded logits' gradient is 0."""
    task = dcc.Task(name="depth", module=nn.Linear(3, 1),
                    loss=lambda z, y: (z.squeeze(-1) - torch.nan_to_num(y, nan=0.0, posinf=math.inf)) ** 2)
    gate = dcc.BinaryClassificationTask("gate", nn.Linear(3, 1))
    tasks = dcc.Tasks([gate, task])

    @tasks.add_flow
    def f(flow, x, out):
        out += flow.gate(x.f)
        out += flow.depth(x.f) | out.gate
        return out

    g = torch.tensor([1.0, 0.0, 1.0, 0.0])
    y = {"gate": g, "depth": torch.tensor([1.0, math.inf, 2.0, 3.0])}
    z = torch.tensor([[0.5], [0.1], [-0.5], [math.nan]], requires_grad=True)
    outputs = {"logits": {"gate": torch.zeros(4, 1), "depth": z}, "mask": {"gate": torch.ones(4, dtype=torch.bool),
                                                                           "depth": g.bool()}}
    loss = f.get_loss()(outputs, y)
    loss.backward()
    expected = math.log(2) + ((0.5 - 1.0) ** 2 + (-0.5 - 2.0) ** 2) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert z.grad[[1, 3]].tolist() == [[0.0], [0.0]] and torch.isfinite(z.grad).all()


def _mlm_flow(vocab):
    tasks = dcc.Tasks([dcc.MaskedLanguageModelingTask("tokens", nn.Linear(4, vocab))])

    @tasks.add_flow
    def lm(flow, x, out):
        out += flow.tokens(x.f)
        return out

    return lm


@pytest.mark.parametrize("dtype,rtol", [
    # the element losses are rounded to the logits' dtype once (relative error <= 2**-11 for
    # float16, 2**-8 for bfloat16) after a log-softmax that CPU kernels compute in float32; the
    # mean of values each within that relative error is within it too: 2 such roundings of margin
    (torch.float16, 2.0 ** -10),
    (torch.bfloat16, 2.0 ** -7),
])
def test_half_precision_logits_sum_and_count_in_float32(dtype, rtol):
    """A language model with 16,384 labelled tokens under model.half(): the sum of the token losses
    (about 116,000) overflowed float16 (largest 65,504) and the loss was inf."""
    vocab, n, t = 1200, 16, 1024
    flow = _mlm_flow(vocab)
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(n, t, vocab, generator=g) * 0.1).to(dtype)  # rounded once: both losses see these
    labels = torch.randint(0, vocab, (n, t), generator=g)
    masks = {"tokens": torch.ones(n, dtype=torch.bool)}
    loss_fn = flow.get_loss()
    for y in (labels, torch.where(torch.arange(n * t).reshape(n, t) == 5, -100, labels)):  # 16384, 16383 tokens
        (s, c), = loss_fn.terms({"logits": {"tokens": z}, "mask": masks}, {"tokens": y}).values()
        assert s.dtype == c.dtype == torch.float32
        assert c.item() == (y != -100).sum().item()  # exact: float16 counts exactly only to 2048
        half = loss_fn({"logits": {"tokens": z}, "mask": masks}, {"tokens": y})
        full = loss_fn({"logits": {"tokens": z.float()}, "mask": masks}, {"tokens": y})
        assert torch.isfinite(half) and full.item() == pytest.approx(7.09, abs=0.01)
        assert half.item() == pytest.approx(full.item(), rel=rtol)
    ps = flow.get_per_sample_loss()({"logits": {"tokens": z}, "mask": masks}, {"tokens": labels})
    assert ps["tokens"].dtype == torch.float32 and torch.isfinite(ps["tokens"]).all()


def test_class_index_beyond_the_logits_names_path_index_position_and_width(nested_kind_flow):
    """Without class_names the dataset cannot know the number of classes; cross entropy said only
    "IndexError: Target 7 is out of bounds" (on CUDA: a device-side assert)."""
    flow = nested_kind_flow(width=4)
    x = {"f": torch.randn(5, 3), "gt": {"gate": torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0])}}
    y = {"gate": x["gt"]["gate"], "inner.kind": torch.tensor([0, 3, 7, -1, 9])}
    out = flow.torch().train()(x)
    # the label of a sample outside S_t (sample 1's gate is 0) counts too: it is a data error all the same
    msg = r"'inner\.kind': label 7 at sample 2 is out of range for logits of width 4 \(valid: 0 to 3\); 1 more .* 9.*at least 10"
    for _ in range(2):  # every batch on the CPU, not only the first
        with pytest.raises(dcc.LabelError, match=msg):
            flow.get_loss()(out, y)
    with pytest.raises(dcc.LabelError, match=msg):
        flow.get_loss().check_labels(out, y)
    y["inner.kind"] = torch.tensor([0, 3, 2, -1, 1])
    assert torch.isfinite(flow.get_loss()(out, y))


def test_token_id_beyond_the_vocabulary_names_path_and_position():
    flow = _mlm_flow(vocab=10)
    z = torch.randn(2, 3, 10)
    y = torch.tensor([[1, -100, 2], [3, 10, -100]])
    with pytest.raises(dcc.LabelError, match=r"'tokens': label 10 at \[1, 1\] is out of range for logits of width 10"):
        flow.get_loss()({"logits": {"tokens": z}, "mask": {"tokens": torch.ones(2, dtype=torch.bool)}}, {"tokens": y})


def test_out_of_range_class_index_under_torch_compile_makes_the_loss_nan():
    """Where no Python check can run (a compiled graph; on an accelerator after the first batch),
    the guard needs no host sync: the task's term is NaN, never a silently clamped label."""
    flow = _mlm_flow(vocab=10)
    loss_fn = flow.get_loss()
    masks = {"tokens": torch.ones(2, dtype=torch.bool)}
    step = torch.compile(lambda z, y: loss_fn({"logits": {"tokens": z}, "mask": masks}, {"tokens": y}),
                         fullgraph=True, backend="aot_eager")
    z = torch.randn(2, 3, 10)
    assert torch.isfinite(step(z, torch.tensor([[1, -100, 2], [3, 9, -100]])))
    assert torch.isnan(step(z, torch.tensor([[1, -100, 2], [3, 10, -100]])))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_out_of_range_class_index_on_cuda_first_batch_error_then_nan_without_device_assert(nested_kind_flow):
    flow = nested_kind_flow(width=4)
    module = flow.torch().cuda().train()
    loss_fn = flow.get_loss()
    x = {"f": torch.randn(3, 3, device="cuda"), "gt": {"gate": torch.ones(3, device="cuda")}}
    good = {"gate": x["gt"]["gate"], "inner.kind": torch.tensor([0, 3, 1], device="cuda")}
    bad = {"gate": x["gt"]["gate"], "inner.kind": torch.tensor([0, 7, 1], device="cuda")}
    with pytest.raises(dcc.LabelError, match=r"'inner\.kind': label 7 at sample 1 .* width 4"):
        loss_fn(module(x), bad)  # the first batch: checked at once
    assert torch.isfinite(loss_fn(module(x), good))
    assert torch.isnan(loss_fn(module(x), bad))  # later: no host sync, no device assert, a NaN term
    torch.cuda.synchronize()
    with pytest.raises(dcc.LabelError, match="label 7"):
        loss_fn.check_labels(module(x), bad)


_BALANCED_WORKER = '''
import json, sys
import torch
import torch.distributed as dist
from torch import nn
import dnn_cool_catalyst as dcc
from dnn_cool_catalyst import balancing

rank, world, store, out = int(sys.argv[1]), 2, sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world)


class GramProbe(balancing.GradientBalancer):
    """Weights that depend on the gradients' scale (the methods' own may not: MGDA, PCGrad), so
    that the global Gram matrix's scale is checked too."""

    def weigh(self, gram, losses, index, update):
        c = (1.0 / (1.0 + gram.diagonal().sqrt())).to(losses.dtype)
        self._record(index, c)
        return c, c.flip(0)


def methods():
    """Every concrete method of balancing.__all__ (gradient methods also in their representation
    variant), by the key the test reads: the name, or "<name>-representation"; and GramProbe."""
    found = {"GramProbe": (GramProbe, {}), "GramProbe-representation": (GramProbe, {"representation": True})}
    for name in balancing.__all__:
        cls = getattr(balancing, name)
        if cls in (balancing.Balancer, balancing.GradientBalancer):
            continue
        options = {"period": 1} if name == "DynamicWeightAverage" else {}  # weights that move within 3 steps
        found[name] = (cls, options)
        if issubclass(cls, balancing.GradientBalancer) and cls.supports_representation:
            found[name + "-representation"] = (cls, {"representation": True})
    return found


def train(cls, options, world, rank, distributed):
    torch.manual_seed(0)
    tasks = dcc.Tasks([dcc.BinaryClassificationTask("gate", nn.Linear(3, 1)),
                       dcc.BoundedRegressionTask("value", nn.Linear(3, 1)),
                       dcc.ClassificationTask("kind", nn.Linear(3, 4))])

    @tasks.add_flow
    def full(flow, x, out):
        out += flow.gate(x.f)
        out += flow.value(x.f) | out.gate
        out += flow.kind(x.f) | ~out.gate
        return out

    heads, backbone = full.torch(), nn.Linear(3, 3)  # the backbone: what the gradient methods balance
    model = lambda x: heads({"f": torch.tanh(backbone(x["f"])), "gt": x["gt"]})
    params = [*backbone.parameters(), *heads.parameters()]
    loss_fn = full.get_loss(balancer=cls(**options), distributed=distributed)
    opt = torch.optim.SGD([*params, *loss_fn.parameters()], lr=0.1)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        gate = torch.tensor([1, 1, 0, 1, 0, 0, 0, 0], dtype=torch.float32)  # rank 1 of 2: no sample of value
        if step == 2:
            gate = torch.zeros(8)  # value absent on every rank
        y = {"gate": gate, "value": torch.rand(8, generator=g), "kind": torch.randint(0, 4, (8,), generator=g)}
        x = {"f": torch.randn(8, 3, generator=g), "gt": {"gate": gate}}
        shard = slice(0, 8) if world == 1 else (slice(0, 5) if rank == 0 else slice(5, 8))  # uneven shards
        xs = {"f": x["f"][shard], "gt": {"gate": gate[shard]}}
        ys = {k: v[shard] for k, v in y.items()}
        opt.zero_grad(set_to_none=True)
        loss_fn.backward(model(xs), ys, shared_parameters=backbone.parameters())
        for p in params:  # what DDP does: the mean of the ranks' gradients
            if world > 1:
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
    return [p.detach().reshape(-1).tolist() for p in [*params, *loss_fn.parameters()]]


found = methods()
# rank 0 also trains alone on the whole batch (distributed=False: no collective), the reference
result = {"ddp": {k: train(*m, world, rank, True) for k, m in found.items()},
          "one": {k: train(*m, 1, 0, False) for k, m in found.items()} if rank == 0 else {}}
with open(out, "w") as f:
    json.dump(result, f)
'''


def _every_method():
    """The keys of the worker's `methods()`: every concrete method of `balancing.__all__`, gradient
    methods also as "<name>-representation" where they have that variant."""
    from dnn_cool_catalyst import balancing

    keys = ["GramProbe", "GramProbe-representation"]  # the worker's own probe of the Gram matrix's scale
    for name in balancing.__all__:
        cls = getattr(balancing, name)
        if cls in (balancing.Balancer, balancing.GradientBalancer):
            continue
        keys.append(name)
        if issubclass(cls, balancing.GradientBalancer) and cls.supports_representation:
            keys.append(name + "-representation")
    return keys


@pytest.fixture(scope="module")
def balanced_ddp_runs(tmp_path_factory):
    """One spawn of 2 gloo processes training every method (DDP), and rank 0 alone as the reference."""
    import json
    import os
    import subprocess
    import sys

    tmp_path = tmp_path_factory.mktemp("balanced_ddp")
    worker = tmp_path / "worker.py"
    worker.write_text(_BALANCED_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(worker), str(r), str(tmp_path / "store"),
                               str(tmp_path / f"out{r}.json")], env=env) for r in range(2)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    return [json.loads((tmp_path / f"out{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("key", _every_method())
def test_balanced_loss_under_ddp_gives_the_one_process_update(key, balanced_ddp_runs):
    ranks = balanced_ddp_runs
    assert set(ranks[0]["one"]) == set(_every_method())
    params = ranks[0]["one"][key]
    for r in range(2):
        for a, b in zip(params, ranks[r]["ddp"][key]):
            # float32 sums (and all-reduced gradient matrices) taken in another order on two
            # processes: rounding only
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"{key}, rank {r}")


# ---- losses by kind: tasks of one loss group computed together --------------------------------------------------
class _OwnBCE(dcc.BinaryClassificationTask):
    """A user's binary task that overrides the element loss: never joined with the built-in ones."""

    def elementwise_loss(self, logits, labels):
        return 2.0 * super().elementwise_loss(logits, labels)


def _kind_task(rng, name, f):
    """A random task of a random kind; several kinds come in variants that must not be joined."""
    kind = str(rng.choice(["binary", "binary", "binary_flat", "regression", "classification", "multilabel", "mlm",
                           "own", "custom"]))
    if kind == "binary":
        return dcc.BinaryClassificationTask(name, nn.Linear(f, 1), weight=float(rng.choice([1.0, 0.5])))
    if kind == "binary_flat":  # (N,) logits: joined only with other (N,) ones
        return dcc.BinaryClassificationTask(name, nn.Sequential(nn.Linear(f, 1), nn.Flatten(0)))
    if kind == "regression":
        return dcc.BoundedRegressionTask(name, nn.Linear(f, 1), loss=str(rng.choice(["mse", "l1", "smooth_l1"])))
    if kind == "classification":
        return dcc.ClassificationTask(name, nn.Linear(f, int(rng.choice([3, 4]))))
    if kind == "multilabel":
        return dcc.MultilabelClassificationTask(name, nn.Linear(f, int(rng.choice([2, 3]))))
    if kind == "mlm":
        return dcc.MaskedLanguageModelingTask(name, nn.Sequential(nn.Linear(f, 6), nn.Unflatten(1, (2, 3))))
    if kind == "own":
        return _OwnBCE(name, nn.Linear(f, 1))
    return dcc.Task(name=name, module=nn.Linear(f, 1), loss=lambda z, y: (z.reshape(y.shape) - y.nan_to_num()) ** 2)


def _kind_flow(rng, count):
    tasks = dcc.Tasks([_kind_task(rng, f"t{i}", 4) for i in range(count)])
    names = [f"t{i}" for i in range(count)]
    half = len(names) // 2

    @tasks.add_flow
    def inner(flow, x, out):
        for name in names[half:]:
            out += getattr(flow, name)(x.f)
        return out

    @tasks.add_flow
    def outer(flow, x, out):
        for name in names[:half]:
            out += getattr(flow, name)(x.f)
        out += flow.inner(x)
        return out

    return outer


def _kind_batch(rng, flow, n, dtype, missing):
    """Random logits (leaves requiring a gradient), labels and masks for every task; non-finite logits
    wherever an element is outside S_t (masked out, or its label missing)."""
    logits, labels, masks = {}, {}, {}
    for leaf in flow.graph.leaves:
        task, path = leaf.task, leaf.path
        probe = task.module(torch.zeros(1, 4))
        shape = (n, *probe.shape[1:])
        z = torch.as_tensor(rng.normal(0, 3, size=shape)).to(dtype)
        if isinstance(task, dcc.ClassificationTask):
            y = torch.as_tensor(rng.integers(0, shape[-1], n))
            y[torch.as_tensor(rng.random(n) < missing)] = -1
        elif isinstance(task, dcc.MaskedLanguageModelingTask):
            y = torch.as_tensor(rng.integers(0, shape[-1], shape[:-1]))
            y[torch.as_tensor(rng.random(shape[:-1]) < missing)] = -100
        else:
            lab_shape = shape if isinstance(task, dcc.MultilabelClassificationTask) else (n,)
            y = torch.as_tensor(rng.integers(0, 2, lab_shape).astype(np.float32))
            if isinstance(task, dcc.BoundedRegressionTask):
                y = torch.as_tensor(rng.random(lab_shape).astype(np.float32))
            y[torch.as_tensor(rng.random(lab_shape) < missing)] = math.nan
        m = torch.as_tensor(rng.random(n) < 0.6)
        # junk where the element is not selected: it must reach neither the terms nor the gradients
        av = task.available(y)
        junk_rows = ~m | (~av if av.dim() == 1 else (~av).flatten(1).all(1))
        junk = torch.as_tensor(rng.choice([math.inf, -math.inf, math.nan], size=shape)).to(dtype)
        z = torch.where(junk_rows.reshape(n, *([1] * (z.dim() - 1))), junk, z)
        logits[path] = z.requires_grad_()
        labels[path], masks[path] = y, m
    return {"logits": logits, "mask": masks}, labels


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), count=st.integers(2, 14), n=st.integers(0, 9),
       missing=st.sampled_from([0.0, 0.3, 1.0]))
def test_losses_by_kind_equal_the_per_task_terms_losses_and_gradients(seed, count, n, missing):
    """Grouped (`by_kind=True`) against every task alone: the same (sum, count) terms (counts
    exactly), loss, per-sample losses and logits' gradients. Tolerance: a group's sums add the same
    float32 element losses as each task's own sum, in another order (a row of a (G, N) reduction
    instead of a 1-D sum), and vectorised kernels may round an element loss 1 ulp differently on a
    longer tensor: |error| <= a few ulp of the sum, far below rtol=1e-6 at these sizes."""
    rng = np.random.default_rng(seed)
    flow = _kind_flow(rng, count)
    outputs, labels = _kind_batch(rng, flow, n, torch.float32, missing)
    grouped, alone = flow.get_loss(), flow.get_loss(by_kind=False)
    tg, ta = grouped.terms(outputs, labels), alone.terms(outputs, labels)
    assert list(tg) == list(ta) == [leaf.path for leaf in flow.graph.leaves]
    for p in ta:
        assert tg[p][1].item() == ta[p][1].item(), p  # counts exactly
        torch.testing.assert_close(tg[p][0], ta[p][0], rtol=1e-6, atol=1e-6, msg=p)
        assert torch.isfinite(tg[p][0]), p  # junk outside S_t never leaks
    grads = []
    for loss_fn in (grouped, alone):
        for z in outputs["logits"].values():
            z.grad = None
        loss = loss_fn(outputs, labels)
        loss.backward()
        grads.append((loss.detach(), {p: z.grad.clone() for p, z in outputs["logits"].items()}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-6)
    for p, g in grads[1][1].items():
        assert torch.isfinite(grads[0][1][p]).all(), p
        torch.testing.assert_close(grads[0][1][p], g, rtol=1e-6, atol=1e-7, msg=p)
    from dnn_cool_catalyst.interpreters.loss import FlowPerSampleLoss

    detached = {"logits": {p: z.detach() for p, z in outputs["logits"].items()}, "mask": outputs["mask"]}
    pg = FlowPerSampleLoss(flow.graph)(detached, labels)
    pa = FlowPerSampleLoss(flow.graph, by_kind=False)(detached, labels)
    assert list(pg) == list(pa)
    for p in pa:
        torch.testing.assert_close(pg[p], pa[p], rtol=1e-6, atol=1e-6, equal_nan=True, msg=p)


def test_loss_groups_follow_the_kind_its_loss_and_overrides():
    from dnn_cool_catalyst.interpreters.loss import kind_groups

    lin = lambda k=1: nn.Linear(2, k)  # noqa: E731
    tasks = [
        dcc.BinaryClassificationTask("b1", lin()), dcc.BinaryClassificationTask("b2", lin(), weight=3.0),
        _OwnBCE("own", lin()),
        dcc.BoundedRegressionTask("r1", lin()), dcc.BoundedRegressionTask("r2", lin(), loss="l1"),
        dcc.BoundedRegressionTask("r3", lin(), scale=5.0),
        dcc.ClassificationTask("c1", lin(3)), dcc.ClassificationTask("c2", lin(3)),
        dcc.MultilabelClassificationTask("m1", lin(2)), dcc.MultilabelClassificationTask("m2", lin(2)),
        dcc.BinaryClassificationTask("b3", lin()),
    ]
    tasks[-1].loss = lambda z, y: (z.reshape(y.shape) - y.nan_to_num()) ** 2  # a replaced loss: alone
    groups, alone = kind_groups([(t.name, t) for t in tasks])
    named = [[tasks[i].name for i in g] for g in groups]
    assert named == [["b1", "b2"], ["r1", "r3"], ["c1", "c2"], ["m1", "m2"]]
    assert [tasks[i].name for i in alone] == ["own", "r2", "b3"]


def test_half_precision_losses_by_kind_equal_per_task():
    """float16 / bfloat16 logits: the element losses are computed in half precision on both paths,
    summed in float32; an element loss may round 1 half-precision ulp differently in a longer
    vectorised kernel (rel. 2**-8 for bfloat16), hence rtol 1e-2 / 1e-3 on the sums and gradients."""
    rng = np.random.default_rng(7)
    tasks = dcc.Tasks([dcc.BinaryClassificationTask(f"b{i}", nn.Linear(4, 1)) for i in range(5)]
                      + [dcc.BoundedRegressionTask(f"r{i}", nn.Linear(4, 1)) for i in range(3)]
                      + [dcc.ClassificationTask(f"c{i}", nn.Linear(4, 3)) for i in range(3)])

    @tasks.add_flow
    def flat(flow, x, out):
        for name in [f"b{i}" for i in range(5)] + [f"r{i}" for i in range(3)] + [f"c{i}" for i in range(3)]:
            out += getattr(flow, name)(x.f)
        return out

    for dtype, rtol in ((torch.float16, 1e-3), (torch.bfloat16, 1e-2)):
        outputs, labels = _kind_batch(rng, flat, 40, dtype, 0.2)
        tg = flat.get_loss().terms(outputs, labels)
        ta = flat.get_loss(by_kind=False).terms(outputs, labels)
        for p in ta:
            assert tg[p][0].dtype == torch.float32 and tg[p][1].item() == ta[p][1].item()
            torch.testing.assert_close(tg[p][0], ta[p][0], rtol=rtol, atol=rtol, msg=p)
        lg = flat.get_loss()(outputs, labels)
        lg.backward()
        gg = {p: z.grad.clone() for p, z in outputs["logits"].items()}
        for z in outputs["logits"].values():
            z.grad = None
        flat.get_loss(by_kind=False)(outputs, labels).backward()
        for p, z in outputs["logits"].items():
            assert gg[p].dtype == dtype and torch.isfinite(gg[p]).all()
            torch.testing.assert_close(gg[p].float(), z.grad.float(), rtol=rtol, atol=rtol, msg=p)


def _two_classifications(width=4):
    tasks = dcc.Tasks([dcc.ClassificationTask("c1", nn.Linear(3, width)),
                       dcc.ClassificationTask("c2", nn.Linear(3, width))])

    @tasks.add_flow
    def pair(flow, x, out):
        out += flow.c1(x.f)
        out += flow.c2(x.f)
        return out

    return pair


def test_grouped_class_index_beyond_the_logits_names_its_own_task_and_position():
    flow = _two_classifications()
    loss_fn = flow.get_loss()
    assert loss_fn._groups  # c1 and c2 are computed together
    outputs = {"logits": {"c1": torch.randn(5, 4), "c2": torch.randn(5, 4)},
               "mask": {"c1": torch.ones(5, dtype=torch.bool), "c2": torch.ones(5, dtype=torch.bool)}}
    labels = {"c1": torch.tensor([0, 3, 2, -1, 1]), "c2": torch.tensor([0, 1, -1, 6, 2])}
    with pytest.raises(dcc.LabelError, match=r"'c2': label 6 at sample 3 is out of range for logits of width 4"):
        loss_fn(outputs, labels)
    labels["c2"] = torch.tensor([0, 1, -1, 3, 2])
    assert torch.isfinite(loss_fn(outputs, labels))


def test_grouped_out_of_range_class_index_under_torch_compile_makes_only_its_term_nan():
    flow = _two_classifications()
    loss_fn = flow.get_loss()
    masks = {"c1": torch.ones(3, dtype=torch.bool), "c2": torch.ones(3, dtype=torch.bool)}
    z = {"c1": torch.randn(3, 4), "c2": torch.randn(3, 4)}

    def terms(y1, y2):
        stacked, _ = loss_fn.stacked_terms({"logits": z, "mask": masks}, {"c1": y1, "c2": y2})
        return stacked

    step = torch.compile(terms, fullgraph=True, backend="aot_eager")
    good = step(torch.tensor([0, 1, 2]), torch.tensor([3, 1, 2]))
    assert torch.isfinite(good).all()
    bad = step(torch.tensor([0, 1, 2]), torch.tensor([3, 9, 2]))
    assert torch.isfinite(bad[0]).all() and torch.isnan(bad[1, 0]) and bad[1, 1].item() == 3


def test_bad_shape_in_a_group_names_the_task():
    flow = _two_classifications()
    outputs = {"logits": {"c1": torch.randn(5, 4), "c2": torch.randn(5, 4)},
               "mask": {"c1": torch.ones(5, dtype=torch.bool), "c2": torch.ones(5, dtype=torch.bool)}}
    labels = {"c1": torch.tensor([0, 3, 2, -1, 1]), "c2": torch.zeros(5, 2, dtype=torch.long)}
    with pytest.raises(dcc.LabelError, match=r"'c2'.*\(5, 4\).*\(5, 2\)"):
        flow.get_loss()(outputs, labels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_out_of_range_class_index_on_cuda_first_batch_error_then_only_its_term_nan():
    flow = _two_classifications()
    loss_fn = flow.get_loss()
    ones = torch.ones(3, dtype=torch.bool, device="cuda")
    outputs = {"logits": {"c1": torch.randn(3, 4, device="cuda"), "c2": torch.randn(3, 4, device="cuda")},
               "mask": {"c1": ones, "c2": ones}}
    good = {"c1": torch.tensor([0, 3, 1], device="cuda"), "c2": torch.tensor([2, 1, 0], device="cuda")}
    bad = {"c1": good["c1"], "c2": torch.tensor([2, 7, 0], device="cuda")}
    with pytest.raises(dcc.LabelError, match=r"'c2': label 7 at sample 1 .* width 4"):
        loss_fn(outputs, bad)  # the first batch: checked at once
    assert torch.isfinite(loss_fn(outputs, good))
    terms = loss_fn.terms(outputs, bad)  # later: no host sync, only c2's term is NaN
    assert torch.isfinite(terms["c1"][0]) and torch.isnan(terms["c2"][0])
