"""flow.torch(): outputs, modes, submodule names and input errors; fused heads (`fuse=True`)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import dnn_cool_catalyst as dcc
from dnn_cool_catalyst.interpreters.module import FusedHead
from dnn_cool_catalyst.synthetic import generated_labels, generated_tasks


def test_outputs_in_train_and_eval(security_flow, security_data):
    inputs, labels = security_data
    x, y = security_flow.get_dataset(inputs, labels)[list(range(10))]
    module = security_flow.torch()
    out = module.train()(x)
    assert set(out) == {"logits", "mask"}
    assert set(out["mask"]) == set(security_flow.graph.paths)
    with torch.no_grad():
        out = module.eval()(x)  # eval with gt: masks from gt, activated/decoded present
        assert set(out) == {"logits", "activated", "decoded", "mask"}
        shirt = "person_regression.body_regression.shirt_type"
        assert out["decoded"][shirt].shape == (10, 7)
        assert torch.equal(out["decoded"][shirt][:, 0], out["activated"][shirt].argmax(1))
        no_gt = module({"features": x["features"]})
    # without gt, door_open applies exactly where camera_blocked is decoded False
    blocked = no_gt["decoded"]["camera_blocked"].reshape(-1)
    assert torch.equal(no_gt["mask"]["door_open"], ~blocked)


def test_missing_feature_names_task_and_key(security_flow):
    with pytest.raises(dcc.InputError, match=r"'camera_blocked'.*x.features.*'img'"):
        security_flow.torch()({"img": torch.randn(2, 8)})


def test_missing_gt_for_precondition(security_flow):
    with pytest.raises(dcc.InputError, match="camera_blocked"):
        security_flow.torch().train()({"features": torch.randn(2, 8), "gt": {}})


def test_tuned_threshold_changes_module_decoding(security_flow):
    module = security_flow.torch().eval()
    x = {"features": torch.randn(16, 8)}
    with torch.no_grad():
        before = module(x)["decoded"]["camera_blocked"]
        security_flow.get_decoder().load_tuned({"camera_blocked": {"threshold": 1.0}})
        after = module(x)["decoded"]["camera_blocked"]
    assert before.shape == after.shape and not after.any()


def test_empty_batch_at_inference(security_flow):
    with torch.no_grad():
        out = security_flow.torch().eval()({"features": torch.randn(0, 8)})
    assert all(m.shape == (0,) for m in out["mask"].values())


def test_a_head_of_the_wrong_width_names_task_feature_and_widths(security_flow):
    with pytest.raises(dcc.HeadError, match=r"task 'camera_blocked'.*takes 8 input features, x.features has 16 "
                                            r"\(shape \(2, 16\)\).*nn.Linear\(16"):
        security_flow.torch()({"features": torch.randn(2, 16)})


def test_a_head_failing_otherwise_still_names_task_and_shape():
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    tasks = dcc.Tasks([dcc.BinaryClassificationTask("gate", Broken())])

    @tasks.add_flow
    def flow(flow, x, out):
        out += flow.gate(x.f)
        return out

    with pytest.raises(RuntimeError, match=r"task 'gate': its head Broken failed on x.f of shape \(3, 2\) \(boom\)"):
        tasks.get_full_flow().torch()({"f": torch.zeros(3, 2)})


def _sub_flow_tasks():
    tasks = dcc.Tasks([dcc.BinaryClassificationTask("blocked", torch.nn.Linear(4, 1)),
                       dcc.BinaryClassificationTask("exists", torch.nn.Linear(4, 1)),
                       dcc.BoundedRegressionTask("obj_x", torch.nn.Linear(4, 1))])

    @tasks.add_flow
    def localize_flow(flow, x, out):
        out += flow.exists(x.features)
        out += flow.obj_x(x.features) | out.exists
        return out

    return tasks


def _full(tasks, argument):
    def full_flow(flow, x, out):
        out += flow.blocked(x.cam)
        out += flow.localize_flow(getattr(x, argument)) | ~out.blocked
        return out

    return tasks.add_flow(full_flow)


def test_a_sub_flow_called_with_one_feature_reads_that_feature():
    """Seed spelling `flow.sub(x.features)` whose tasks read x.features: x.features is a tensor, so
    it stands for {"features": x.features} inside the sub-flow."""
    tasks = _sub_flow_tasks()
    flow = _full(tasks, "features")
    cam, features = torch.randn(3, 4), torch.randn(3, 4)
    with torch.no_grad():
        logits = flow.torch().eval()({"cam": cam, "features": features})["logits"]
        torch.testing.assert_close(logits["localize_flow.obj_x"], tasks["obj_x"].module(features))
        torch.testing.assert_close(logits["blocked"], tasks["blocked"].module(cam))


def test_a_sub_flow_called_with_a_mapping_reads_inside_it():
    tasks = _sub_flow_tasks()
    flow = _full(tasks, "features")
    inner, outer = torch.randn(3, 4), torch.randn(3, 4)
    with torch.no_grad():
        logits = flow.torch().eval()({"cam": outer, "features": {"features": inner}})["logits"]
    torch.testing.assert_close(logits["localize_flow.exists"], tasks["exists"].module(inner))
    with pytest.raises(dcc.InputError, match=r"'localize_flow.exists' reads x.features.features, but "
                                             r"x\['features'\] has no key 'features' \(has \['other'\]\)"):
        flow.torch()({"cam": outer, "features": {"other": inner}})


def test_a_feature_given_to_a_sub_flow_is_never_ignored():
    """The seed's `flow.localize_flow(x.localization_features)` with tasks reading x.features: with a
    tensor there, reading the caller's x.features would silently drop the argument; it is an error
    at get_dataset (and at the first forward) that names the task and the spelling that works."""
    import numpy as np

    tasks = _sub_flow_tasks()
    flow = _full(tasks, "localization_features")
    inputs = {"cam": torch.randn(3, 4), "localization_features": torch.randn(3, 4), "features": torch.randn(3, 4)}
    expected = (r"task 'localize_flow.exists' reads x.localization_features.features, but "
                r"x\['localization_features'\] is a Tensor, not a mapping of features.*flow.localize_flow\(x\)")
    with pytest.raises(dcc.InputError, match=expected):
        flow.get_dataset(inputs, {p: np.zeros(3) for p in flow.graph.paths})
    with pytest.raises(dcc.InputError, match=expected):
        flow.torch()(inputs)
    # x itself must be a mapping; no sub-flow hint then
    with pytest.raises(dcc.InputError, match=r"task 'blocked' reads x.cam, but x is a Tensor, not a mapping of features$"):
        flow.torch()(torch.randn(3, 4))


# ---- fused heads (issue 15): flow.torch(fuse=True) -------------------------------------------------
F_IN, F_OTHER, T, V = 5, 3, 3, 4


class ScaledLinear(nn.Linear):
    """An nn.Linear subclass whose forward does more: must never be fused."""

    def forward(self, x):
        return super().forward(x) * 2.0


def _head(kind, rng, wide):
    width = F_OTHER if wide else F_IN
    if kind == "mlm":  # not a plain Linear: stays as it is
        return nn.Sequential(nn.Linear(width, T * V), nn.Unflatten(1, (T, V)))
    if kind == "scaled":
        return ScaledLinear(width, 1)
    out = {"binary": 1, "regression": 1, "classification": 3, "multilabel": 2}[kind]
    return nn.Linear(width, out, bias=bool(rng.random() < 0.8))


def _task(kind, name, head):
    if kind in ("binary", "scaled"):
        return dcc.BinaryClassificationTask(name, head)
    return {"regression": dcc.BoundedRegressionTask, "classification": dcc.ClassificationTask,
            "multilabel": dcc.MultilabelClassificationTask, "mlm": dcc.MaskedLanguageModelingTask}[kind](name, head)


def random_fusable_flow(seed):
    """A random flow (same seed, same flow and weights): kinds mixed, two input widths (x.features,
    x.other), some heads without bias, a sub-flow, a non-Linear head, an nn.Linear subclass,
    literal and negated preconditions."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed % 1000)
    kinds = ("binary", "regression", "classification", "multilabel", "mlm", "scaled")
    spec, tasks = [], []
    for i in range(int(rng.integers(2, 9))):
        kind = "binary" if i == 0 else str(rng.choice(kinds, p=[0.3, 0.2, 0.2, 0.15, 0.05, 0.1]))
        wide = bool(rng.random() < 0.3) and kind != "mlm"
        name = f"t{i}"
        tasks.append(_task(kind, name, _head(kind, rng, wide)))
        binaries = [n for n, k, _, _ in spec if k in ("binary", "scaled")]
        conds = [(str(rng.choice(binaries)), bool(rng.random() < 0.5))] if binaries and rng.random() < 0.6 else []
        spec.append((name, kind, "other" if wide else ("tokens" if kind == "mlm" else "features"), conds))
    inner = [f"s{i}" for i in range(int(rng.integers(1, 4)))]
    tasks += [dcc.BoundedRegressionTask(n, nn.Linear(F_IN, 1)) for n in inner]
    t = dcc.Tasks(tasks)

    @t.add_flow
    def sub(flow, x, out):
        for n in inner:
            out += getattr(flow, n)(x.features)
        return out

    def root(flow, x, out):
        for name, kind, key, conds in spec:
            entry = getattr(flow, name)(getattr(x, key))
            for c, neg in conds:
                entry = entry | (~getattr(out, c) if neg else getattr(out, c))
            out += entry
        out += flow.sub(x) | out.t0
        return out

    flow = t.add_flow(root, flow_name="root")
    return flow, spec


def _data(flow, n, seed):
    rng = np.random.default_rng(seed + 1)
    x = {"features": torch.from_numpy(rng.normal(size=(n, F_IN)).astype(np.float32)),
         "other": torch.from_numpy(rng.normal(size=(n, F_OTHER)).astype(np.float32)),
         "tokens": torch.from_numpy(rng.normal(size=(n, F_IN)).astype(np.float32))}
    y = {}
    for leaf in flow.graph.leaves:
        task = leaf.task
        if isinstance(task, dcc.MaskedLanguageModelingTask):
            v = rng.integers(0, V, (n, T))
            v[rng.random((n, T)) < 0.3] = -100
        elif isinstance(task, dcc.ClassificationTask):
            v = rng.integers(-1, 3, n)
        elif isinstance(task, dcc.MultilabelClassificationTask):
            v = (rng.random((n, 2)) < 0.5).astype(np.float32)
            v[rng.random((n, 2)) < 0.2] = np.nan
        else:
            v = (rng.random(n) < 0.5).astype(np.float32)
            v[rng.random(n) < 0.2] = np.nan
        y[leaf.path] = task.prepare_labels(v)
    x["gt"] = {p: y[p] for p in flow.graph.condition_paths}
    return x, y


def _head_grads(module, flow):
    """{`<path>.weight` / `.bias`: gradient}, read from the fused group's rows where fused."""
    grads = {}
    for leaf in flow.graph.leaves:
        head = module
        for name in leaf.path.split("."):
            head = getattr(head, name)
        if isinstance(head, FusedHead):
            rows = head._group.rows(head.index)
            grads[leaf.path + ".weight"] = head._group.weight.grad[rows]
            if head._group.bias is not None:
                grads[leaf.path + ".bias"] = head._group.bias.grad[rows]
        else:
            for k, p in head.named_parameters():
                grads[f"{leaf.path}.{k}"] = p.grad
    return grads


# Fused against unfused: the same float32 products, computed as one GEMM over the concatenated
# weights instead of one per head (another blocking of the dot products over F_IN <= 5 terms: a few
# ulps on values of order 1), then the same ops; 1e-6 absolute leaves room for that.
TOL = dict(rtol=1e-6, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 9))
def test_fused_equals_unfused_logits_losses_per_sample_losses_and_gradients(seed, n):
    flow_a, spec = random_fusable_flow(seed)
    flow_b, _ = random_fusable_flow(seed)  # the same flow, own task objects (fusing ties a task's module)
    plain, fused = flow_a.torch(), flow_b.torch(fuse=True)
    assert fused.fuse and not plain.fuse
    x, y = _data(flow_a, n, seed)
    out_a, out_b = plain.train()(x), fused.train()(x)
    assert list(out_a["logits"]) == list(out_b["logits"]) == list(flow_a.graph.paths)
    for p in out_a["logits"]:
        torch.testing.assert_close(out_b["logits"][p], out_a["logits"][p], **TOL)
        assert torch.equal(out_b["mask"][p], out_a["mask"][p])
    loss_a, loss_b = flow_a.get_loss()(out_a, y), flow_b.get_loss()(out_b, y)
    torch.testing.assert_close(loss_b, loss_a, **TOL)
    ps_a, ps_b = flow_a.get_per_sample_loss()(out_a, y), flow_b.get_per_sample_loss()(out_b, y)
    for p in ps_a:
        torch.testing.assert_close(ps_b[p], ps_a[p], equal_nan=True, **TOL)
    loss_a.backward()
    loss_b.backward()
    grads_a, grads_b = _head_grads(plain, flow_a), _head_grads(fused, flow_b)
    assert set(grads_a) == set(grads_b)
    for k, g in grads_a.items():
        if g is None:
            assert grads_b[k] is None or not grads_b[k].any(), k
        else:
            torch.testing.assert_close(grads_b[k], g, **TOL, msg=k)
    with torch.no_grad():  # inference: decoded and masks from the decoded predictions
        inf_a, inf_b = plain.eval()({k: v for k, v in x.items() if k != "gt"}), fused.eval()(
            {k: v for k, v in x.items() if k != "gt"})
    for p in inf_a["decoded"]:
        torch.testing.assert_close(inf_b["activated"][p], inf_a["activated"][p], **TOL)
    # which heads were fused: plain nn.Linear, two or more per (input, width, bias)
    fused_paths = {path for _, _, members in fused._fused for path, _ in members}
    for leaf in flow_b.graph.leaves:
        if type(leaf.task.module) is not nn.Linear:
            assert leaf.path not in fused_paths


def _fused_pair(seed=0):
    return generated_tasks(12, features=6, seed=seed).get_full_flow(), generated_tasks(12, features=6, seed=seed).get_full_flow()


def test_state_dicts_load_across_fused_and_unfused(tmp_path):
    flow_a, flow_b = _fused_pair()
    plain, fused = flow_a.torch(), flow_b.torch(fuse=True)
    assert len(fused.fused_heads) == 1 and isinstance(fused.t000_binary, FusedHead)
    assert list(plain.state_dict()) == list(fused.state_dict())  # per-task names, same order
    # a checkpoint written by an unfused module (as before issue 15), with other values
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(torch.randn_like(p))
    torch.save(plain.state_dict(), tmp_path / "plain.pt")
    fused.load_state_dict(torch.load(tmp_path / "plain.pt", weights_only=True))
    x = {"features": torch.randn(4, 6)}
    for p, z in plain.eval()(x)["logits"].items():
        torch.testing.assert_close(fused.eval()(x)["logits"][p], z, **TOL)
    # and back: a fused module's state dict into a fresh unfused one
    fresh = generated_tasks_flow(seed=0).torch()  # the same flow, other task objects
    fresh.load_state_dict(fused.state_dict())
    for k, v in plain.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    # the tasks' own modules read the loaded values (their storage is the group's)
    head = flow_b.tasks["t000_binary"].module
    assert torch.equal(head.weight, plain.t000_binary.weight)


def generated_tasks_flow(seed):
    return generated_tasks(12, features=6, seed=seed).get_full_flow()


def test_fused_load_reports_missing_unexpected_and_mismatched_keys():
    _, flow = _fused_pair()
    fused = flow.torch(fuse=True)
    sd = fused.state_dict()
    bad = dict(sd)
    del bad["t000_binary.bias"]
    bad["t000_binary.extra"] = torch.zeros(1)
    result = fused.load_state_dict(bad, strict=False)
    assert "t000_binary.bias" in result.missing_keys and "t000_binary.extra" in result.unexpected_keys
    with pytest.raises(RuntimeError, match=r"size mismatch for t000_binary.weight"):
        fused.load_state_dict({**sd, "t000_binary.weight": torch.zeros(2, 6)})


def test_only_plain_linear_heads_sharing_an_input_are_fused():
    torch.manual_seed(0)
    shared = nn.Linear(4, 1)
    tasks = dcc.Tasks([
        dcc.BinaryClassificationTask("a", nn.Linear(4, 1)),
        dcc.BinaryClassificationTask("b", nn.Linear(4, 1)),
        dcc.BinaryClassificationTask("c", ScaledLinear(4, 1)),      # a subclass
        dcc.BinaryClassificationTask("d", nn.Linear(4, 1)),         # another input
        dcc.BinaryClassificationTask("e", nn.Linear(4, 1, bias=False)),  # no bias: its own group, alone
        dcc.BinaryClassificationTask("s1", shared),                 # one module for two tasks
        dcc.BinaryClassificationTask("s2", shared),
        dcc.ClassificationTask("k", nn.Linear(4, 3)),
    ])

    @tasks.add_flow
    def flow(flow, x, out):
        out += flow.a(x.f)
        out += flow.b(x.f) | ~out.a
        out += flow.c(x.f)
        out += flow.d(x.g)
        out += flow.e(x.f)
        out += flow.s1(x.f)
        out += flow.s2(x.f)
        out += flow.k(x.f) | out.b
        return out

    module = tasks.get_full_flow().torch(fuse=True)
    assert [[p for p, _ in m] for _, _, m in module._fused] == [["a", "b", "k"]]
    assert type(module.c) is ScaledLinear and module.s1 is shared and type(module.e) is nn.Linear
    assert isinstance(module.k, FusedHead) and module.k.weight.shape == (3, 4)
    out = module.eval()({"f": torch.randn(2, 4), "g": torch.randn(2, 4)})
    assert out["logits"]["k"].shape == (2, 3)


def test_torch_is_one_module_per_flow():
    flow = generated_tasks_flow(seed=0)
    module = flow.torch(fuse=True)
    assert flow.torch() is module and flow.torch(fuse=True) is module
    with pytest.raises(ValueError, match="already built with fuse=True"):
        flow.torch(fuse=False)
    other = generated_tasks_flow(seed=0)
    assert not other.torch().fuse
    with pytest.raises(ValueError, match="already built with fuse=False"):
        other.torch(fuse=True)


def test_conversions_keep_the_tasks_modules_on_the_group_storage():
    flow = generated_tasks_flow(seed=1)
    module = flow.torch(fuse=True).double()
    head = flow.tasks["t000_binary"].module
    assert head.weight.dtype == torch.float64
    with torch.no_grad():
        module.fused_heads[0].weight.add_(1.0)
    assert torch.equal(head.weight, module.t000_binary.weight)
    assert torch.equal(head(torch.ones(2, 6, dtype=torch.float64)), module.t000_binary(torch.ones(2, 6, dtype=torch.float64)))


def test_fused_module_compiles_fullgraph_and_equals_eager():
    flow = generated_tasks_flow(seed=2)
    module = flow.torch(fuse=True).train()
    loss_fn = flow.get_loss()
    labels = generated_labels(flow, 16, seed=0)
    x = {"features": torch.randn(16, 6), "gt": {p: labels[p] for p in flow.graph.condition_paths}}

    def step(x, y):
        return loss_fn(module(x), y)

    eager = step(x, labels)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, labels)
    # the traced graph may fuse or reorder reductions: rounding of a float32 loss of order 1
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_representation_variant_of_a_gradient_method_sees_the_fused_heads():
    from dnn_cool_catalyst import balancing

    results = []
    for fuse in (False, True):
        flow = generated_tasks_flow(seed=4)
        heads = flow.torch(fuse=fuse)
        torch.manual_seed(1)
        backbone = nn.Linear(6, 6)
        loss_fn = flow.get_loss(balancer=balancing.CAGrad(representation=True))
        labels = generated_labels(flow, 24, seed=1)
        torch.manual_seed(2)
        f = torch.randn(24, 6)
        out = heads({"features": torch.tanh(backbone(f)), "gt": {p: labels[p] for p in flow.graph.condition_paths}})
        loss = loss_fn.backward(out, labels)
        results.append((loss.detach(), [p.grad.clone() for p in backbone.parameters()], _head_grads(heads, flow)))
    (la, ba, ha), (lb, bb, hb) = results
    # the method solves a small problem on the same Gram matrix: float32 rounding only
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    for ga, gb in zip(ba, bb):
        torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-6)
    for k in ha:
        torch.testing.assert_close(hb[k], ha[k], rtol=1e-5, atol=1e-6, msg=k)
