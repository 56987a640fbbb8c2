"""Per-token tasks (issue 17 point 1) in the metrics, the evaluator and tuning: every token of
`S_t` is one scored item. Checked against a hand-written reference that loops over the tokens in
numpy / scikit-learn, on a token-tagging flow with padding (NaN / -1 labels, `x["elements"]`),
a per-sample condition broadcast over the tokens and per-token conditions."""
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from sklearn import metrics as skm

from dnn_cool_catalyst.tuning import METRICS


def load_token_tagging():
    """`tests/token_tagging.py`, the token-tagging flow and its hand-written reference."""
    path = Path(__file__).resolve().parents[1] / "token_tagging.py"
    spec = importlib.util.spec_from_file_location("token_tagging", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tt = load_token_tagging()
token_flow, token_data, reference_masks, reference_rows = (tt.token_flow, tt.token_data, tt.reference_masks,
                                                          tt.reference_rows)


def _outputs(flow, x, y, train=False):
    module = flow.torch()
    module.train(train)
    with torch.no_grad():
        inputs = dict(x)
        if train:
            inputs["gt"] = {p: y[p] for p in ("has_entities", "is_entity")}
        return module(inputs)


def _assert_rows(computed, counts, ref_values, ref_counts):
    """Equal counts; values equal up to float64 rounding (sums of the same items added in another
    order: 1e-12), NaN where nothing was scored."""
    for path, metrics in ref_values.items():
        assert counts[path] == ref_counts[path], path
        for name, value in metrics.items():
            assert computed[f"{path}/{name}"] == pytest.approx(value, abs=1e-12, nan_ok=True), f"{path}/{name}"


def test_flow_metrics_score_tokens_of_s_t_as_samples():
    flow = token_flow()
    x, y, real = token_data(9, 7, seed=3)
    out = _outputs(flow, x, y, train=True)  # masks from x["gt"] and the x["elements"] padding marker
    assert out["mask"]["entity_type"].shape == (9, 7)
    metrics = flow.get_metrics()
    metrics.update(out, y)
    activated = flow.get_activation()(out["logits"])
    ref_values, ref_counts = reference_rows(activated, y, reference_masks(y, real))
    _assert_rows(metrics.compute(), metrics.num_samples(), ref_values, ref_counts)


def test_flow_metrics_in_batches_equal_one_batch():
    flow = token_flow()
    x, y, _ = token_data(12, 5, seed=4)
    out = _outputs(flow, x, y, train=True)
    whole = flow.get_metrics()
    whole.update(out, y)
    parts = flow.get_metrics()
    for rows in (slice(0, 5), slice(5, 12)):
        xs = {k: v[rows] for k, v in x.items()}
        ys = {k: v[rows] for k, v in y.items()}
        parts.update(_outputs(flow, xs, ys, train=True), ys)
    assert parts.num_samples() == whole.num_samples()
    a, b = whole.compute(), parts.compute()
    for key in a:  # the same counts in another order of additions: float64 rounding only
        assert b[key] == pytest.approx(a[key], abs=1e-12, nan_ok=True), key


def test_a_per_sample_mask_of_a_per_token_task_covers_its_tokens():
    flow = token_flow()
    x, y, real = token_data(6, 4, seed=5, missing=0.0)
    out = _outputs(flow, x, y)
    activated = out["activated"]
    per_sample = {p: torch.ones(6, dtype=torch.bool) for p in flow.graph.paths}
    per_sample["span_score"] = torch.tensor([True, False, True, True, False, True])
    per_token = dict(per_sample)
    per_token["span_score"] = per_sample["span_score"][:, None].expand(6, 4)
    ev = flow.get_evaluator(per_class=False)
    a, b = ev(activated, y, preconditions=per_sample), ev(activated, y, preconditions=per_token)
    assert a.equals(b)
    row = a[(a.task_path == "span_score")].iloc[0]
    assert row.num_samples == int((real & per_token["span_score"].numpy()).sum())


def test_evaluator_rows_equal_token_reference_and_count_elements():
    flow = token_flow(seed=1)
    x, y, real = token_data(10, 6, seed=6)
    out = _outputs(flow, x, y)
    table = flow.get_evaluator(per_class=False)(out["activated"], y)
    ref_values, ref_counts = reference_rows(out["activated"], y, reference_masks(y, real))
    computed = {f"{r.task_path}/{r.metric_name}": r.metric_res for r in table.itertuples()}
    counts = {r.task_path: r.num_samples for r in table.itertuples()}
    _assert_rows(computed, counts, ref_values, ref_counts)
    assert counts["is_entity"] > 10  # elements, not samples


def test_evaluator_per_class_rows_of_a_per_token_classification():
    flow = token_flow(seed=2)
    x, y, real = token_data(10, 6, seed=7)
    out = _outputs(flow, x, y)
    table = flow.get_evaluator()(out["activated"], y)
    pre = reference_masks(y, real)["entity_type"]
    lab = y["entity_type"].numpy()
    sel = pre & (lab >= 0)
    truth = lab[sel]
    top1 = out["activated"]["entity_type"].numpy().argmax(-1)[sel]
    classes = np.unique(np.concatenate([truth, top1]))
    p, r, f, support = skm.precision_recall_fscore_support(truth, top1, labels=classes, zero_division=0)
    rows = table[(table.task_path == "entity_type") & table.metric_name.str.startswith("recall/")]
    assert [int(name.split("/")[1]) for name in rows.metric_name] == list(classes)
    np.testing.assert_allclose(rows.metric_res.to_numpy(), r, atol=1e-12)
    assert list(rows.num_samples) == list(support)


def test_predicted_preconditions_per_token():
    flow = token_flow(seed=3)
    x, y, real = token_data(8, 5, seed=8)
    out = _outputs(flow, x, y)
    table = flow.get_evaluator(preconditions="predicted", per_class=False)(out["activated"], y)
    decoded = out["decoded"]
    has = decoded["has_entities"].reshape(-1).numpy()
    is_e = decoded["is_entity"].reshape(8, 5).numpy()
    pre = has[:, None] & is_e  # the decoded conditions, per token; padding is unlabelled
    lab = y["is_person"].numpy()
    sel = pre & ~np.isnan(lab)
    row = table[(table.task_path == "is_person") & (table.metric_name == "accuracy")].iloc[0]
    assert row.num_samples == int(sel.sum())
    a = out["activated"]["is_person"].reshape(8, 5).numpy()
    assert row.metric_res == pytest.approx(((a[sel] > 0.5) == (lab[sel] > 0.5)).mean(), abs=1e-12)


def test_evaluator_uncertainty_per_token_is_the_mean_over_scored_tokens():
    flow = token_flow(seed=4)
    x, y, real = token_data(6, 5, seed=9)
    out = _outputs(flow, x, y)
    rng = np.random.default_rng(0)
    stats = {p: {"entropy": rng.random((6,) + tuple(out["activated"][p].shape[1:]))} for p in flow.graph.paths}
    stats["span_score"] = {"variance": rng.random((6, 5, 1))}
    stats["tags"] = {"entropy": rng.random((6, 3))}  # not per token: no per-token mean, NaN
    table = flow.get_evaluator(per_class=False)(out["activated"], y, uncertainty=stats)
    pre = reference_masks(y, real)
    lab = y["is_entity"].numpy()
    sel = pre["is_entity"] & ~np.isnan(lab)
    expected = stats["is_entity"]["entropy"].reshape(6, 5)[sel].mean()
    got = table[table.task_path == "is_entity"].entropy.iloc[0]
    assert got == pytest.approx(expected, abs=1e-6)  # float32 per-row means, float64 mean
    sel = pre["span_score"] & ~np.isnan(y["span_score"].numpy())
    got = table[table.task_path == "span_score"].variance.iloc[0]
    assert got == pytest.approx(stats["span_score"]["variance"].reshape(6, 5)[sel].mean(), abs=1e-6)
    assert math.isnan(table[table.task_path == "tags"].entropy.iloc[0])


def test_evaluator_names_a_per_token_mask_that_does_not_fit():
    flow = token_flow()
    x, y, _ = token_data(4, 3, seed=1)
    out = _outputs(flow, x, y)
    masks = {p: torch.ones(4, dtype=torch.bool) for p in flow.graph.paths}
    masks["entity_type"] = torch.ones(4, 2, dtype=torch.bool)  # T is 3
    with pytest.raises(ValueError, match="entity_type"):
        flow.get_evaluator()(out["activated"], y, preconditions=masks)


def _best_score_by_hand(scores, labels, fn):
    """The exact best of `fn` over every cut of the sorted scores (decisions `scores > cut`)."""
    best = -math.inf
    for cut in [-math.inf, *np.unique(scores)]:
        p = scores > cut
        tp, fp = float((p & labels).sum()), float((p & ~labels).sum())
        fn_, tn = float((~p & labels).sum()), float((~p & ~labels).sum())
        best = max(best, float(fn(np.array([tp]), np.array([fp]), np.array([fn_]), np.array([tn]))[0]))
    return best


@pytest.mark.parametrize("metric", ["accuracy", "f1"])
def test_tuning_a_per_token_binary_task_over_the_tokens_of_s_t(metric):
    flow = token_flow(seed=5)
    x, y, real = token_data(12, 6, seed=10)
    out = _outputs(flow, x, y)
    params, report = flow.get_decoder().fit(out["activated"], y, metric=metric)
    pre = reference_masks(y, real)
    for path in ("is_entity", "is_person"):  # conditions per sample (broadcast) and per token
        lab = y[path].numpy()
        sel = pre[path] & ~np.isnan(lab)
        scores = out["activated"][path].reshape(lab.shape).numpy()[sel]
        truth = lab[sel] > 0.5
        assert report[path]["num_samples"] == int(sel.sum())
        best = _best_score_by_hand(scores, truth, METRICS[metric])
        assert report[path]["score"] == pytest.approx(best, abs=1e-12)
        thr = params[path]["threshold"]
        decided = scores > thr
        tp, fp = (decided & truth).sum(), (decided & ~truth).sum()
        fn_, tn = (~decided & truth).sum(), (~decided & ~truth).sum()
        achieved = METRICS[metric](np.array([tp], float), np.array([fp], float), np.array([fn_], float),
                                   np.array([tn], float))[0]
        assert achieved == pytest.approx(best, abs=1e-12)


def test_tuning_per_token_with_masks_given_per_token_and_per_sample():
    flow = token_flow(seed=6)
    x, y, real = token_data(8, 5, seed=11, missing=0.0)
    out = _outputs(flow, x, y)
    decoder = flow.get_decoder()
    per_sample = {"is_person": torch.tensor([1, 1, 0, 1, 0, 1, 1, 1], dtype=torch.bool)}
    per_token = {"is_person": per_sample["is_person"][:, None].expand(8, 5).numpy()}  # arrays are accepted
    a = decoder.fit({"is_person": out["activated"]["is_person"]}, y, masks=per_sample)
    b = decoder.fit({"is_person": out["activated"]["is_person"]}, y, masks=per_token)
    assert a == b
    column = {"is_person": per_sample["is_person"][:, None]}  # (N, 1): per sample too
    assert decoder.fit({"is_person": out["activated"]["is_person"]}, y, masks=column) == a
    assert a[1]["is_person"]["num_samples"] == int((real & per_token["is_person"]).sum())
    with pytest.raises(ValueError, match="is_person"):
        decoder.fit({"is_person": out["activated"]["is_person"]}, y,
                    masks={"is_person": torch.ones(8, 4, dtype=torch.bool)})  # T is 5


def test_tuned_thresholds_of_per_token_tasks_apply_in_the_metrics():
    flow = token_flow(seed=7)
    x, y, real = token_data(10, 5, seed=12)
    out = _outputs(flow, x, y)
    tuned = flow.get_decoder().tune(out["activated"], y)
    table = flow.get_evaluator(per_class=False)(out["activated"], y)
    thresholds = {p: v["threshold"] for p, v in tuned.items() if p in ("has_entities", "is_entity", "is_person")}
    ref_values, ref_counts = reference_rows(out["activated"], y, reference_masks(y, real), tuned=thresholds)
    computed = {f"{r.task_path}/{r.metric_name}": r.metric_res for r in table.itertuples()}
    counts = {r.task_path: r.num_samples for r in table.itertuples()}
    ref_values = {p: v for p, v in ref_values.items() if p in thresholds}
    _assert_rows(computed, counts, ref_values, ref_counts)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), t=st.integers(1, 5), seed=st.integers(0, 10_000), missing=st.sampled_from([0.0, 0.3, 0.9]))
def test_metrics_equal_the_token_reference_on_random_batches(n, t, seed, missing):
    flow = token_flow(seed % 3)
    x, y, real = token_data(n, t, seed, missing=missing)
    out = _outputs(flow, x, y, train=True)
    metrics = flow.get_metrics()
    metrics.update(out, y)
    computed, counts = metrics.compute(), metrics.num_samples()
    activated = flow.get_activation()(out["logits"])
    pre = reference_masks(y, real)
    ref_values, ref_counts = reference_rows(activated, y, pre)
    _assert_rows(computed, counts, ref_values, ref_counts)
