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
