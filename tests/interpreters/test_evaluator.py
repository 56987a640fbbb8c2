"""`flow.get_evaluator()`: the table's shape and order, counts equal to |S_t|, predicted preconditions."""
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn import metrics as skm
from torch import nn

import dnn_cool_catalyst as dcc

from dnn_cool_catalyst.story import security_labels, security_tasks

PERSON = "person_present"
SHIRT = "person_regression.body_regression.shirt_type"
FACIAL = "person_regression.face_regression.facial_characteristics"


def _predictions(n, seed):
    torch.manual_seed(seed)
    flow = security_tasks(features=8).get_full_flow()
    with torch.no_grad():
        out = flow.torch().eval()({"features": torch.randn(n, 8) * 3})
    return flow, out


def _reference_pre(labels):
    """Ground-truth preconditions of the security flow (API.md section 4), by hand."""
    cb, do, pp = (np.asarray(labels[p]) for p in ("camera_blocked", "door_open", PERSON))
    pre = {"camera_blocked": np.ones(len(cb), bool), "door_open": ~(cb == 1)}
    pre["door_locked"] = pre["door_open"] & ~(do == 1)
    pre[PERSON] = pre["door_open"] & ~(do == 0)
    person = pre[PERSON] & ~(pp == 0)
    return lambda path: pre.get(path, person)


def _available(y):
    y = np.asarray(y)
    avail = ~np.isnan(y) if y.dtype.kind == "f" else y >= 0
    return avail.reshape(len(y), -1).any(1)


def test_table_rows_in_flow_order_with_counts_equal_to_s_t():
    flow, out = _predictions(300, seed=0)
    labels = security_labels(300, seed=1, missing_rate=0.1)
    df = flow.get_evaluator(per_class=False)(out["activated"], labels)
    assert list(df.columns) == ["task_path", "metric_name", "metric_res", "num_samples"]
    assert list(dict.fromkeys(df.task_path)) == list(flow.graph.paths)
    assert len(df) == len(flow.get_metrics())
    with_classes = flow.get_evaluator()(out["activated"], labels)  # the default adds per-class rows
    overall = with_classes[~with_classes.metric_name.str.contains("/")].reset_index(drop=True)
    pd.testing.assert_frame_equal(overall, df)
    pre = _reference_pre(labels)
    for path, rows in df.groupby("task_path", sort=False):
        assert set(rows.num_samples) == {int((pre(path) & _available(labels[path])).sum())}, path
    names = df[df.task_path == SHIRT].metric_name.tolist()
    assert names == ["accuracy_1", "accuracy_3", "accuracy_5", "f1_score", "precision", "recall"]
    assert df[df.task_path == FACIAL].metric_name.tolist() == ["accuracy", "f1_score"]


def test_values_match_sklearn_on_s_t():
    flow, out = _predictions(300, seed=2)
    labels = security_labels(300, seed=3, missing_rate=0.1)
    df = flow.get_evaluator()(out["activated"], labels).set_index(["task_path", "metric_name"]).metric_res
    pre = _reference_pre(labels)
    sel = pre(PERSON) & _available(labels[PERSON])
    decided = out["activated"][PERSON].numpy().reshape(-1) > 0.5
    assert df[PERSON, "f1_score"] == pytest.approx(
        skm.f1_score(labels[PERSON][sel], decided[sel], zero_division=0))
    sel = pre(SHIRT) & _available(labels[SHIRT])
    probs = out["activated"][SHIRT].numpy()
    assert df[SHIRT, "accuracy_3"] == pytest.approx(
        skm.top_k_accuracy_score(labels[SHIRT][sel], probs[sel], k=3, labels=np.arange(7)))
    box = "person_regression.face_regression.face_w"
    sel = pre(box) & _available(labels[box])
    assert df[box, "mean_absolute_error_decoded"] == pytest.approx(
        skm.mean_absolute_error(labels[box][sel] * 64, out["activated"][box].numpy().reshape(-1)[sel] * 64), rel=1e-5)


def test_predicted_preconditions_score_where_the_decoded_precondition_holds():
    flow, out = _predictions(300, seed=4)
    labels = security_labels(300, seed=5, missing_rate=0.1)
    numpy_preds = {p: v.numpy() for p, v in out["activated"].items()}
    df = flow.get_evaluator(preconditions="predicted")(numpy_preds, labels)
    counts = df.drop_duplicates("task_path").set_index("task_path").num_samples
    for path in flow.graph.paths:  # the module's inference masks come from the same decoded predictions
        assert counts[path] == int((out["mask"][path].numpy() & _available(labels[path])).sum()), path
    assert (counts != flow.get_evaluator()(numpy_preds, labels).drop_duplicates("task_path")
            .set_index("task_path").num_samples).any()
    # a call may override the constructor's mode, or give masks directly
    same = flow.get_evaluator()(out, labels, preconditions="predicted")
    pd.testing.assert_frame_equal(same, df)
    direct = flow.get_evaluator()(out["activated"], labels, preconditions=out["mask"])
    pd.testing.assert_frame_equal(direct, df)


def test_tuned_decoders_are_used():
    flow, out = _predictions(200, seed=6)
    labels = security_labels(200, seed=7)
    evaluator = flow.get_evaluator()
    before = evaluator(out["activated"], labels).set_index(["task_path", "metric_name"]).metric_res
    flow.get_decoder().load_tuned({"camera_blocked": {"threshold": 1.0}})  # nothing decoded positive
    after = evaluator(out["activated"], labels).set_index(["task_path", "metric_name"]).metric_res
    assert after["camera_blocked", "recall"] == 0.0 != before["camera_blocked", "recall"]


def test_task_without_samples_gives_nan_and_zero_count():
    flow, out = _predictions(60, seed=8)
    labels = security_labels(60, seed=9)
    labels["door_locked"][:] = np.nan
    df = flow.get_evaluator()(out["activated"], labels)
    rows = df[df.task_path == "door_locked"]
    assert rows.metric_res.isna().all() and (rows.num_samples == 0).all()


def test_errors_name_what_is_missing():
    flow, out = _predictions(20, seed=10)
    labels = security_labels(20, seed=11)
    with pytest.raises(KeyError, match="door_open"):
        flow.get_evaluator()({p: v for p, v in out["activated"].items() if p != "door_open"}, labels)
    with pytest.raises(KeyError, match="door_opn"):
        flow.get_evaluator()({**out["activated"], "door_opn": out["activated"]["door_open"]}, labels)
    with pytest.raises(ValueError, match="preconditions must be one of"):
        flow.get_evaluator(preconditions="decoded")
    with pytest.raises(Exception, match="door_locked"):
        flow.get_evaluator()(out["activated"], {p: v for p, v in labels.items() if p != "door_locked"})


def test_per_class_rows_match_sklearn_on_s_t():
    flow, out = _predictions(400, seed=12)
    labels = security_labels(400, seed=13, missing_rate=0.1)
    df = flow.get_evaluator()(out["activated"], labels)
    pre = _reference_pre(labels)
    # classification: the classes among the labels or top-1 predictions of S_t, by name
    names = flow.tasks[SHIRT].class_names
    sel = pre(SHIRT) & _available(labels[SHIRT])
    y, p = np.asarray(labels[SHIRT])[sel], out["activated"][SHIRT].numpy().argmax(1)[sel]
    classes = np.union1d(y, p)
    pr, rc, f1, support = skm.precision_recall_fscore_support(y, p, labels=classes, zero_division=0)
    rows = df[(df.task_path == SHIRT) & df.metric_name.str.contains("/")]
    expected = [(f"{kind}/{names[c]}", v[k], support[k]) for k, c in enumerate(classes.tolist())
                for kind, v in (("precision", pr), ("recall", rc), ("f1_score", f1))]
    assert rows.metric_name.tolist() == [e[0] for e in expected]
    assert rows.metric_res.tolist() == pytest.approx([e[1] for e in expected], abs=1e-12)
    assert rows.num_samples.tolist() == [e[2] for e in expected]  # each class's support
    macro = df.set_index(["task_path", "metric_name"]).metric_res[SHIRT, "f1_score"]
    assert macro == pytest.approx(rows[rows.metric_name.str.startswith("f1_score/")].metric_res.mean(), abs=1e-12)
    # multilabel: every class, over its available elements in S_t
    names = flow.tasks[FACIAL].class_names
    y = np.asarray(labels[FACIAL])
    decided = out["activated"][FACIAL].numpy() > 0.5
    rows = df[(df.task_path == FACIAL) & df.metric_name.str.contains("/")].set_index("metric_name")
    assert len(rows) == 3 * len(names)
    for k, name in enumerate(names):
        sel = pre(FACIAL) & ~np.isnan(y[:, k])
        pr, rc, f1, support = skm.precision_recall_fscore_support(y[sel, k], decided[sel, k], labels=[1],
                                                                  zero_division=0)
        for kind, v in (("precision", pr), ("recall", rc), ("f1_score", f1)):
            assert rows.metric_res[f"{kind}/{name}"] == pytest.approx(v[0], abs=1e-12), (kind, name)
            assert rows.num_samples[f"{kind}/{name}"] == support[0]
    # binary and regression tasks have no per-class rows
    assert not df[df.task_path.isin(["door_open", "person_regression.face_regression.face_w"])
                  ].metric_name.str.contains("/").any()


def test_per_class_rows_name_classes_by_index_without_class_names():
    from torch import nn

    import dnn_cool_catalyst as dcc

    tasks = dcc.Tasks([dcc.ClassificationTask("kind", nn.Linear(2, 3)),
                       dcc.MultilabelClassificationTask("tags", nn.Linear(2, 2))])

    @tasks.add_flow
    def flow(flow, x, out):
        out += flow.kind(x.f)
        out += flow.tags(x.f)
        return out

    f = tasks.get_full_flow()
    preds = {"kind": torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1]]),
             "tags": torch.tensor([[0.9, 0.1], [0.2, 0.7], [0.8, 0.8]])}
    labels = {"kind": np.array([0, 1, 1]), "tags": np.array([[1.0, 0.0], [0.0, 1.0], [1.0, np.nan]])}
    df = f.get_evaluator()(preds, labels).set_index(["task_path", "metric_name"])
    assert df.metric_res["kind", "recall/1"] == 0.5 and df.num_samples["kind", "recall/1"] == 2
    assert df.metric_res["kind", "precision/0"] == 0.5 and df.num_samples["kind", "precision/0"] == 1
    assert ("kind", "f1_score/2") not in df.index  # neither a label nor a prediction
    assert df.metric_res["tags", "precision/0"] == 1.0 and df.num_samples["tags", "precision/0"] == 2
    assert df.metric_res["tags", "recall/1"] == 1.0 and df.num_samples["tags", "recall/1"] == 1


def test_non_default_averaging_is_named_in_the_table_and_matches_sklearn():
    from sklearn.metrics import f1_score

    torch.manual_seed(0)
    tasks = dcc.Tasks([dcc.ClassificationTask("kind", nn.Linear(3, 4), average="weighted")])

    @tasks.add_flow
    def only(flow, x, out):
        out += flow.kind(x.f)
        return out

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 80)
    activated = torch.softmax(torch.randn(80, 4), dim=1)
    table = only.get_evaluator(per_class=False)({"kind": activated}, {"kind": labels})
    row = table[table.metric_name == "f1_score_weighted"]
    assert len(row) == 1 and "f1_score" not in set(table.metric_name)
    expected = f1_score(labels, activated.argmax(1).numpy(), average="weighted", zero_division=0)
    assert row.metric_res.iloc[0] == pytest.approx(expected, abs=1e-12)
