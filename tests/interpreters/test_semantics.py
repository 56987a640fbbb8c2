"""Precondition masks, the flow loss and per-sample losses against an independent reference.

The reference below evaluates API.md section 4 sample by sample with Python's three-valued
logic (True / False / None for UNKNOWN) directly from a random flow *specification*, without the
tracer, the graph or any interpreter of the package.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import dnn_cool_catalyst as dcc

F_DIM, T, V = 5, 3, 4
KINDS = ("binary", "regression", "classification", "multilabel", "mlm")


# ---- random flow specifications -----------------------------------------------------------------
def make_spec(rng, depth, counter):
    """A flow spec: list of entries (name, kind or None for a sub-flow, conditions, sub-spec)."""
    entries, binaries = [], []
    for _ in range(int(rng.integers(1, 4))):
        name = f"t{next(counter)}"
        kind = "binary" if rng.random() < 0.6 or not binaries else str(rng.choice(KINDS))
        conds = []
        if binaries and rng.random() < 0.75:
            for b in rng.choice(binaries, size=min(len(binaries), int(rng.integers(1, 3))), replace=False):
                conds.append((str(b), bool(rng.random() < 0.5)))
        entries.append((name, kind, conds, None))
        if kind == "binary":
            binaries.append(name)
    if depth > 1:
        conds = [(str(rng.choice(binaries)), bool(rng.random() < 0.5))] if rng.random() < 0.8 else []
        entries.append((f"f{next(counter)}", None, conds, make_spec(rng, depth - 1, counter)))
        name = f"t{next(counter)}"  # a task after the sub-flow, conditioned on a task before it
        entries.append((name, str(rng.choice(KINDS)), [(str(rng.choice(binaries)), False)], None))
    return entries


def leaves_of(spec, prefix=""):
    for name, kind, _, sub in spec:
        if sub is None:
            yield prefix + name, name, kind
        else:
            yield from leaves_of(sub, f"{prefix}{name}.")


def make_task(name, kind):
    if kind == "binary":
        return dcc.BinaryClassificationTask(name, nn.Linear(F_DIM, 1))
    if kind == "regression":
        return dcc.BoundedRegressionTask(name, nn.Linear(F_DIM, 1), scale=10.0)
    if kind == "classification":
        return dcc.ClassificationTask(name, nn.Linear(F_DIM, 3))
    if kind == "multilabel":
        return dcc.MultilabelClassificationTask(name, nn.Linear(F_DIM, 2))
    return dcc.MaskedLanguageModelingTask(name, nn.Sequential(nn.Linear(F_DIM, T * V), nn.Unflatten(1, (T, V))))


def build_flow(spec):
    tasks = dcc.Tasks([make_task(name, kind) for _, name, kind in leaves_of(spec)])

    def register(spec, name):
        for entry_name, kind, _, sub in spec:
            if sub is not None:
                register(sub, entry_name)

        def func(flow, x, out):
            for entry_name, kind, conds, sub in spec:
                entry = getattr(flow, entry_name)(x if sub is not None else x.features)
                for c_name, negated in conds:
                    c = getattr(out, c_name)
                    entry = entry | (~c if negated else c)
                out += entry
            return out

        return tasks.add_flow(func, flow_name=name)

    return register(spec, "root")


def random_labels(rng, kind, n, missing):
    if kind in ("binary",):
        y = (rng.random(n) < 0.5).astype(np.float32)
        y[rng.random(n) < missing] = np.nan
    elif kind == "regression":
        y = rng.random(n).astype(np.float32)
        y[rng.random(n) < missing] = np.nan
    elif kind == "classification":
        y = rng.integers(0, 3, n)
        y[rng.random(n) < missing] = -1
    elif kind == "multilabel":
        y = (rng.random((n, 2)) < 0.5).astype(np.float32)
        y[rng.random((n, 2)) < missing] = np.nan
    else:
        y = rng.integers(0, V, (n, T))
        y[rng.random((n, T)) < missing] = -100
    return y


# ---- the reference -------------------------------------------------------------------------------
def k_and(a, b):
    if a is False or b is False:
        return False
    if a is None or b is None:
        return None
    return True


def ref_preconditions(spec, labels, i, decoded=None):
    """{path: three-valued precondition} for sample i (decoded: {path: bool} at inference)."""
    result = {}

    def walk(spec, prefix, inherited):
        local = {}
        for name, kind, conds, sub in spec:
            own = True
            for c_name, negated in conds:
                pre_b, path_b = local[c_name]
                if pre_b is False:
                    v = False
                elif decoded is not None:
                    v = decoded[path_b] != negated
                    v = k_and(pre_b, v)
                else:
                    lab = labels[path_b][i]
                    v = None if math.isnan(lab) else (bool(lab > 0.5) != negated)
                own = k_and(own, v)
            pre = k_and(inherited, own)
            if sub is None:
                result[prefix + name] = pre
                local[name] = (pre, prefix + name)
            else:
                walk(sub, f"{prefix}{name}.", pre)

    walk(spec, "", True)
    return result


def log_softmax(z):
    m = max(z)
    return [v - m - math.log(sum(math.exp(u - m) for u in z)) for v in z]


def bce(z, y):
    return max(z, 0) - z * y + math.log1p(math.exp(-abs(z)))


def ref_elements(kind, z, y):
    """[(element loss)] of the available elements of one sample."""
    if kind == "binary":
        return [] if math.isnan(y) else [bce(z[0], y)]
    if kind == "regression":
        return [] if math.isnan(y) else [(1 / (1 + math.exp(-z[0])) - y) ** 2]
    if kind == "classification":
        return [] if y < 0 else [-log_softmax(z)[y]]
    if kind == "multilabel":
        return [bce(zj, yj) for zj, yj in zip(z, y) if not math.isnan(yj)]
    return [-log_softmax(z[t])[y[t]] for t in range(T) if y[t] != -100]


def reference(spec, logits, labels, n):
    """(flow loss, {path: per-sample list}, {path: mask list})."""
    kinds = {path: kind for path, _, kind in leaves_of(spec)}
    pres = [ref_preconditions(spec, labels, i) for i in range(n)]
    total, per_sample, masks = 0.0, {}, {}
    for path, kind in kinds.items():
        elems, ps, ms = [], [], []
        for i in range(n):
            in_mask = pres[i][path] is not False
            ms.append(in_mask)
            e = ref_elements(kind, logits[path][i].tolist(), labels[path][i].tolist()) if in_mask else []
            elems += e
            ps.append(sum(e) / len(e) if e else math.nan)
        total += sum(elems) / len(elems) if elems else 0.0
        per_sample[path], masks[path] = ps, ms
    return total, per_sample, masks


# ---- the properties ------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), depth=st.integers(1, 3), missing=st.sampled_from([0.0, 0.2, 0.6, 1.0]),
       n=st.integers(1, 12))
def test_masks_loss_and_per_sample_loss_match_reference(seed, depth, missing, n):
    rng = np.random.default_rng(seed)
    spec = make_spec(rng, depth, iter(range(1000)))
    torch.manual_seed(seed % 1000)
    flow = build_flow(spec)
    labels = {path: random_labels(rng, kind, n, missing) for path, _, kind in leaves_of(spec)}
    ds = flow.get_dataset({"features": rng.normal(size=(n, F_DIM)).astype(np.float32)}, labels)
    x, y = ds[list(range(n))]
    module = flow.torch().train()
    out = module(x)
    ref_total, ref_ps, ref_masks = reference(spec, {p: t.detach().double() for p, t in out["logits"].items()},
                                             {p: t.numpy() for p, t in y.items()}, n)
    for path, m in ref_masks.items():
        assert out["mask"][path].tolist() == m, path
    loss = flow.get_loss()(out, y)
    assert torch.isfinite(loss)
    # float32 losses against a float64 reference on the same logits: ~1e-7 relative per term,
    # sums of up to a dozen terms of order 1; 1e-5 leaves room for any summation order
    assert loss.item() == pytest.approx(ref_total, rel=1e-5, abs=1e-5)
    ps = flow.get_per_sample_loss()(out, y)
    overall = np.zeros(n)
    for path, values in ref_ps.items():
        np.testing.assert_allclose(ps[path].detach().numpy(), values, rtol=1e-5, atol=1e-6, equal_nan=True)
        overall += np.nan_to_num(values)
    np.testing.assert_allclose(ps["overall"].detach().numpy(), overall, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), depth=st.integers(1, 3), n=st.integers(1, 10))
def test_inference_masks_follow_decoded_predictions(seed, depth, n):
    rng = np.random.default_rng(seed)
    spec = make_spec(rng, depth, iter(range(1000)))
    torch.manual_seed(seed % 1000)
    flow = build_flow(spec)
    module = flow.torch().eval()
    with torch.no_grad():
        out = module({"features": torch.randn(n, F_DIM) * 3})
    for i in range(n):
        decoded = {p: bool(d[i].reshape(-1)[0]) for p, d in out["decoded"].items() if d.dtype == torch.bool and d[i].numel() == 1}
        ref = ref_preconditions(spec, None, i, decoded=decoded)
        for path, pre in ref.items():
            assert pre is not None  # inference is never unknown
            assert bool(out["mask"][path][i]) == pre, (path, i)


def test_negation_never_turns_inapplicable_into_true():
    """`door_locked | ~out.door_open` is false where the camera is blocked (door_open inapplicable)."""
    tasks = dcc.Tasks([dcc.BinaryClassificationTask(n, nn.Linear(2, 1)) for n in ("blocked", "door_open", "door_locked")])

    @tasks.add_flow
    def full_flow(flow, x, out):
        out += flow.blocked(x.f)
        out += flow.door_open(x.f) | ~out.blocked
        out += flow.door_locked(x.f) | ~out.door_open
        return out

    nan = float("nan")
    gt = {"blocked": torch.tensor([1.0, 0.0, 0.0, nan, nan]), "door_open": torch.tensor([0.0, 0.0, 1.0, nan, 0.0])}
    out = full_flow.torch().train()({"f": torch.randn(5, 2), "gt": gt})
    assert out["mask"]["door_open"].tolist() == [False, True, True, True, True]
    assert out["mask"]["door_locked"].tolist() == [False, True, False, True, True]


def _outside_s_t(kind, mask, y):
    """Boolean over the logits' shape: the logits of elements outside S_t (precondition false or
    label missing). Classification rows and MLM token rows are one element each."""
    n = mask.shape[0]
    if kind == "classification":
        return (~(mask & (y >= 0))).reshape(n, 1).expand(n, 3)
    if kind == "mlm":
        return (~(mask.reshape(n, 1) & (y != -100))).reshape(n, T, 1).expand(n, T, V)
    if kind == "multilabel":
        return ~(mask.reshape(n, 1) & ~torch.isnan(y))
    return (~(mask & ~torch.isnan(y))).reshape(n, 1)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), depth=st.integers(1, 3), missing=st.sampled_from([0.0, 0.3, 1.0]),
       n=st.integers(1, 10),
       junk=st.lists(st.sampled_from([math.inf, -math.inf, math.nan, 1e30, -1e30]), min_size=1, max_size=5))
def test_non_finite_values_outside_s_t_change_neither_loss_nor_gradients(seed, depth, missing, n, junk):
    """Arbitrary non-finite logits (and float labels) of elements outside S_t leave the flow loss,
    the per-sample losses and the gradient w.r.t. every logit as they are: those outside S_t get
    exactly 0, never NaN. Equal to the last bit: the same values are summed in the same shapes."""
    rng = np.random.default_rng(seed)
    spec = make_spec(rng, depth, iter(range(1000)))
    torch.manual_seed(seed % 1000)
    flow = build_flow(spec)
    kinds = {path: kind for path, _, kind in leaves_of(spec)}
    labels = {path: random_labels(rng, kind, n, missing) for path, kind in kinds.items()}
    x, y = flow.get_dataset({"features": rng.normal(size=(n, F_DIM)).astype(np.float32)}, labels)[list(range(n))]
    with torch.no_grad():
        out = flow.torch().train()(x)
    junk_values = torch.tensor(junk)

    def loss_and_grads(corrupt):
        logits, targets = {}, dict(y)
        for path, z in out["logits"].items():
            z = z.detach().clone()
            if corrupt:
                outside = _outside_s_t(kinds[path], out["mask"][path], y[path])
                fill = junk_values[torch.arange(z.numel()) % len(junk)].reshape(z.shape)
                z = torch.where(outside, fill, z)
                if y[path].is_floating_point():  # labels of samples outside the precondition
                    m = out["mask"][path].reshape(-1, *([1] * (y[path].dim() - 1)))
                    targets[path] = torch.where(m, y[path], fill.reshape(-1)[: y[path].numel()].reshape(y[path].shape))
            logits[path] = z.requires_grad_()
        outputs = {"logits": logits, "mask": out["mask"]}
        loss = flow.get_loss()(outputs, targets)
        loss.backward()
        ps = flow.get_per_sample_loss()(outputs, targets)
        return loss.detach(), {p: z.grad for p, z in logits.items()}, {p: v.detach() for p, v in ps.items()}

    clean_loss, clean_grads, clean_ps = loss_and_grads(False)
    loss, grads, ps = loss_and_grads(True)
    assert torch.isfinite(clean_loss) and torch.equal(loss, clean_loss)
    for path in grads:
        outside = _outside_s_t(kinds[path], out["mask"][path], y[path])
        assert torch.equal(grads[path], clean_grads[path]), path
        assert not grads[path][outside].any(), path
    for path in ps:
        torch.testing.assert_close(ps[path], clean_ps[path], rtol=0, atol=0, equal_nan=True)
