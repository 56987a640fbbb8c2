"""FlowMetrics: metrics of a task that count the same states share them, and every metric still
has the value it has alone."""
import copy
import math

import pytest
import torch

from dnn_cool_catalyst.metrics import binary_counts


def _outputs(flow, data):
    inputs, labels = data
    ds = flow.get_dataset(inputs, labels)
    x, y = ds[list(range(len(ds)))]
    with torch.no_grad():
        return flow.torch().eval()(x), y


def test_each_metric_has_its_value_alone(security_flow, security_data):
    out, y = _outputs(security_flow, security_data)
    metrics = security_flow.get_metrics()
    metrics.update(out, y)
    got = metrics.compute()
    assert len(metrics.groups) < len(metrics.metrics)  # binary, multilabel, regression and confusion metrics share
    for tm in metrics:
        alone = copy.deepcopy(dict(tm.task.create_metrics())[tm.name])
        preds = out["activated"][tm.path] if alone.uses == "activated" else out["decoded"][tm.path]
        alone.update(preds, y[tm.path], out["mask"][tm.path])
        expected = alone.compute()
        assert (math.isnan(got[tm.key]) and math.isnan(expected)) or got[tm.key] == expected, tm.key


def test_a_shared_state_is_counted_and_exported_once(security_flow, security_data):
    out, y = _outputs(security_flow, security_data)
    metrics = security_flow.get_metrics()
    metrics.update(out, y)
    states = metrics.states()
    p = "door_open"
    names = [tm.name for tm in metrics if tm.path == p]
    assert names == ["accuracy", "f1_score", "precision", "recall"]
    (group,) = metrics.groups_by_path[p]
    assert group.key == f"{p}/accuracy" and [m.name for m in group.members] == names
    assert {k for k in states if k.startswith(f"{p}/")} == {f"{p}/num_samples"} | {f"{p}/accuracy/{s}" for s in
                                                                                   ("tp", "fp", "fn", "tn")}
    expected = binary_counts(out["decoded"][p], y[p], out["mask"][p])
    for name, count in expected.items():
        assert float(states[f"{p}/accuracy/{name}"]) == float(count), name  # once, not once per metric
    keys = set(states) - {f"{q}/num_samples" for q in metrics.groups_by_path}
    assert keys == {f"{g.key}/{s}" for g in metrics.groups for s in g.owner.metric.states}


def test_reset_and_merge_keep_the_members_linked(security_flow, security_data):
    out, y = _outputs(security_flow, security_data)
    whole = security_flow.get_metrics()
    whole.update(out, y)
    merged = security_flow.get_metrics()
    merged.update(out, y)
    merged.reset()  # in place: members still read their owner's states
    half = len(y["door_open"]) // 2
    for rows in (slice(0, half), slice(half, None)):
        part = security_flow.get_metrics()
        part.update({k: {p: t[rows] for p, t in v.items()} for k, v in out.items()}, {p: t[rows] for p, t in y.items()})
        merged.merge(part.states())
    # float64 states summed over two halves instead of at once: ~1e-15 relative on values of order 1
    assert merged.compute() == pytest.approx(whole.compute(), nan_ok=True, abs=1e-12)
    for g in merged.groups:
        assert all(tm.metric.states is g.owner.metric.states for tm in g.members)


# ---- metric states stacked per kind -------------------------------------------------------------------------------
from hypothesis import given, settings, strategies as st  # noqa: E402

from dnn_cool_catalyst.interpreters.metrics import StateStack  # noqa: E402
from dnn_cool_catalyst.metrics import BinaryConfusionMetric  # noqa: E402
from dnn_cool_catalyst.synthetic import generated_labels, generated_tasks  # noqa: E402


def _generated_batches(n_tasks, sizes, seed):
    """A generated flow and batches of its eval-mode outputs (masks from decoded predictions) with labels."""
    flow = generated_tasks(n_tasks, features=6, seed=seed).get_full_flow()
    module = flow.torch().eval()
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for i, n in enumerate(sizes):
        labels = generated_labels(flow, n, seed=seed + i)
        with torch.no_grad():
            out = module({"features": torch.randn(n, 6, generator=gen) * 3})
        batches.append((out, labels))
    return flow, batches


def _one_by_one(metrics, out, y):
    """What FlowMetrics did before states were stacked: every group updated alone."""
    for g in metrics.groups:
        preds = out["activated"][g.path] if g.uses == "activated" else out["decoded"][g.path]
        g.update(preds, y[g.path], out["mask"][g.path])


def _assert_same(stacked, alone):
    a, b = stacked.states(), alone.states()
    assert a.keys() == b.keys()
    for k in b:
        if k.endswith("/num_samples"):
            continue
        # counts are whole numbers in float64: exact; the absolute-error sums add the same float64
        # terms per batch in another order (a row of a (G, N) reduction): a few ulp
        if k.endswith("/abs_sum"):
            torch.testing.assert_close(a[k], b[k].to(a[k].device), rtol=1e-12, atol=1e-12, msg=k)
        else:
            assert torch.equal(a[k].cpu(), b[k].cpu().expand_as(a[k].cpu())), k
    ca, cb = stacked.compute(), alone.compute()  # stacked ones computed row by row at once (compute_rows)
    assert ca.keys() == cb.keys()
    for k in cb:
        if math.isnan(cb[k]):
            assert math.isnan(ca[k]), k
        elif "mean_absolute_error" in k:  # from the abs_sum above (a few ulp)
            assert ca[k] == pytest.approx(cb[k], rel=1e-12, abs=1e-12), k
        else:
            assert ca[k] == cb[k], k  # counts and the same float64 operations: exactly
    pa, pb = stacked.per_class(), alone.per_class()
    assert [(p, name, support) for p, name, _, support in pa] == [(p, name, support) for p, name, _, support in pb]
    assert all(x[2] == y[2] or (math.isnan(x[2]) and math.isnan(y[2])) for x, y in zip(pa, pb))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), n_tasks=st.integers(2, 40),
       sizes=st.lists(st.integers(1, 12), min_size=1, max_size=4))
def test_stacked_metric_states_equal_one_by_one_updates(seed, n_tasks, sizes):
    flow, batches = _generated_batches(n_tasks, sizes, seed)
    stacked, alone = flow.get_metrics(), flow.get_metrics()
    for out, y in batches:
        stacked.update(out, y)
        _one_by_one(alone, out, y)
    _assert_same(stacked, alone)
    # reset, merge and another round keep stacking right (the states are stacked anew after each)
    twin = flow.get_metrics()
    twin.update(*batches[0])
    stacked.merge(twin)
    _one_by_one(alone, *batches[0])
    _assert_same(stacked, alone)
    stacked.reset(), alone.reset()
    for out, y in batches[::-1]:
        stacked.update(out, y)
        _one_by_one(alone, out, y)
    _assert_same(stacked, alone)


def test_each_kind_is_one_stack_updated_once_per_batch(monkeypatch):
    flow, batches = _generated_batches(48, [9], seed=3)
    metrics = flow.get_metrics()
    stacks = [stack for stack, _ in metrics._units if stack is not None]
    # binary confusion, multilabel per-class confusion, absolute error, top-k (k = 1, 3, 5), confusion matrix
    kinds = {(type(s.groups[0].owner.metric).__name__, str(s.groups[0].owner.metric.state_key)) for s in stacks}
    assert len(stacks) == len(kinds) == 7, kinds
    calls = []
    for stack in stacks:
        kernel = stack.groups[0].owner.metric.stacked_increments
        monkeypatch.setattr(stack.groups[0].owner.metric, "stacked_increments",
                            lambda *a, _k=kernel, **kw: calls.append(1) or _k(*a, **kw))
    updates = []
    for g in metrics.groups:  # no group of a stack is updated alone
        monkeypatch.setattr(g.owner.metric, "update", lambda *a, _m=g.owner.metric: updates.append(_m))
    metrics.update(*batches[0])
    assert len(calls) == len(stacks)
    assert all(not any(g.owner.metric is m for s in stacks for g in s.groups) for m in updates)
    computes = []
    for tm in metrics.metrics:  # the binary, top-k and absolute-error metrics compute row by row at once
        monkeypatch.setattr(tm.metric, "compute", lambda _m=tm.metric: computes.append(_m) or 0.0)
    metrics.compute()
    assert {type(m).__name__ for m in computes} == {"ConfusionMatrixMetric", "MultilabelConfusionMetric"}


def test_exported_states_do_not_change_with_later_updates():
    flow, batches = _generated_batches(12, [8, 8], seed=4)
    metrics = flow.get_metrics()
    metrics.update(*batches[0])
    exported = {k: v.clone() for k, v in metrics.states().items()}
    before = metrics.states()
    metrics.update(*batches[1])
    for k, v in before.items():
        assert torch.equal(v, exported[k]), k


def test_only_given_paths_and_present_predictions_are_counted():
    flow, batches = _generated_batches(20, [10], seed=5)
    out, y = batches[0]
    binary = [p for p in out["logits"] if p.endswith("_binary")]
    some = set(binary[: len(binary) // 2])
    stacked, alone = flow.get_metrics(), flow.get_metrics()
    # decoded predictions of half the binary tasks only, activated of none: the rest is left out
    stacked.update_states({"decoded": {p: out["decoded"][p] for p in binary}}, y, out["mask"], paths=some)
    for g in alone.groups:
        if g.path in some and g.uses == "decoded":
            g.update(out["decoded"][g.path], y[g.path], out["mask"][g.path])
    _assert_same(stacked, alone)


class _Doubling(BinaryConfusionMetric):
    """A user's metric that counts its own way: never stacked with the built-in kernel."""

    def update(self, preds, targets, mask):
        super().update(preds, targets, mask)
        super().update(preds, targets, mask)


def test_a_metric_that_overrides_update_is_updated_alone():
    from dnn_cool_catalyst.interpreters.metrics import _stackable

    assert _stackable(BinaryConfusionMetric("f1_score")) and not _stackable(_Doubling("f1_score"))
    stack = StateStack([])
    assert not stack.linked
    assert BinaryConfusionMetric("recall").rows_key == ("binary_confusion", "recall")
    assert _Doubling("recall").rows_key == ("binary_confusion", "recall")  # update overridden, compute not
