"""Each metric against scikit-learn on random data with masks and missing labels; exact merging."""
import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from dnn_cool_catalyst.metrics import (
    BinaryConfusionMetric,
    ConfusionMatrixMetric,
    ElementAccuracy,
    MeanAbsoluteError,
    MultilabelConfusionMetric,
    Perplexity,
    TokenAccuracy,
    TopKAccuracy,
)
from dnn_cool_catalyst.story import security_labels, security_tasks


def _binary_data(rng, n=300):
    labels = (rng.random(n) < 0.4).astype(np.float32)
    labels[rng.random(n) < 0.15] = np.nan
    preds = rng.random(n) < 0.5
    mask = rng.random(n) < 0.7
    return torch.from_numpy(preds), torch.from_numpy(labels), torch.from_numpy(mask)


def _feed(metric, preds, targets, mask, chunks=3):
    """Update in uneven chunks, as batches of a loader."""
    n = targets.shape[0]
    cuts = sorted({0, n, *np.random.default_rng(0).integers(0, n, chunks - 1).tolist()})
    for a, b in zip(cuts[:-1], cuts[1:]):
        metric.update(preds[a:b], targets[a:b], mask[a:b])
    return metric.compute()


SK_BINARY = {
    "accuracy": skm.accuracy_score,
    "f1_score": lambda y, p: skm.f1_score(y, p, zero_division=0),
    "precision": lambda y, p: skm.precision_score(y, p, zero_division=0),
    "recall": lambda y, p: skm.recall_score(y, p, zero_division=0),
}


@pytest.mark.parametrize("kind", BinaryConfusionMetric.KINDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_metrics_match_sklearn_on_s_t(kind, seed):
    preds, labels, mask = _binary_data(np.random.default_rng(seed))
    sel = (mask & ~torch.isnan(labels)).numpy()
    expected = SK_BINARY[kind](labels.numpy()[sel], preds.numpy()[sel])
    assert _feed(BinaryConfusionMetric(kind), preds, labels, mask) == pytest.approx(expected, abs=1e-12)


def test_binary_metrics_accept_column_predictions():
    preds, labels, mask = _binary_data(np.random.default_rng(3))
    a = BinaryConfusionMetric("f1_score")
    b = BinaryConfusionMetric("f1_score")
    a.update(preds, labels, mask)
    b.update(preds.reshape(-1, 1), labels, mask)
    assert a.compute() == b.compute()


@pytest.mark.parametrize("metric", [BinaryConfusionMetric("precision"), TopKAccuracy(1), MeanAbsoluteError(),
                                    TokenAccuracy(), Perplexity(), ConfusionMatrixMetric("recall", 4)])
def test_nan_when_nothing_seen(metric):
    assert math.isnan(metric.compute())


def test_nan_when_every_sample_is_masked_out_or_missing():
    preds, labels, _ = _binary_data(np.random.default_rng(4))
    m = BinaryConfusionMetric("accuracy")
    m.update(preds, labels, torch.zeros_like(preds))
    m.update(preds, torch.full_like(labels, float("nan")), torch.ones_like(preds))
    assert math.isnan(m.compute())


def test_zero_division_follows_sklearn_zero():
    m = BinaryConfusionMetric("precision")  # no predicted positive among seen samples
    m.update(torch.zeros(4, dtype=torch.bool), torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.ones(4, dtype=torch.bool))
    assert m.compute() == 0.0 == skm.precision_score([1, 0, 1, 0], [0, 0, 0, 0], zero_division=0)


def _classification_data(rng, n=400, c=7):
    probs = torch.softmax(torch.from_numpy(rng.normal(size=(n, c)) * 2), -1).float()
    labels = torch.from_numpy(rng.integers(0, c, n))
    labels[torch.from_numpy(rng.random(n) < 0.1)] = -1
    mask = torch.from_numpy(rng.random(n) < 0.8)
    decoded = torch.argsort(probs, -1, descending=True)
    return probs, decoded, labels, mask


@pytest.mark.parametrize("k", [1, 3, 5])
def test_top_k_accuracy_matches_sklearn(k):
    probs, decoded, labels, mask = _classification_data(np.random.default_rng(k))
    sel = ((labels >= 0) & mask).numpy()
    expected = skm.top_k_accuracy_score(labels.numpy()[sel], probs.numpy()[sel], k=k, labels=np.arange(7))
    assert _feed(TopKAccuracy(k), decoded, labels, mask) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("kind", ConfusionMatrixMetric.KINDS)
@pytest.mark.parametrize("num_classes", [7, None])
def test_macro_classification_metrics_match_sklearn(kind, num_classes):
    rng = np.random.default_rng(5)
    probs, decoded, labels, mask = _classification_data(rng, n=120, c=7)
    labels[labels == 6] = 2  # class 6 never a label: it only counts where it is predicted (sklearn's union)
    sel = ((labels >= 0) & mask).numpy()
    y, p = labels.numpy()[sel], decoded[:, 0].numpy()[sel]
    fn = {"f1_score": skm.f1_score, "precision": skm.precision_score, "recall": skm.recall_score}[kind]
    expected = fn(y, p, average="macro", zero_division=0)
    assert _feed(ConfusionMatrixMetric(kind, num_classes), decoded, labels, mask) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("average", ["micro", "weighted", "macro"])
@pytest.mark.parametrize("kind", ConfusionMatrixMetric.KINDS)
def test_classification_averaging_matches_sklearn(kind, average):
    rng = np.random.default_rng(11)
    probs, decoded, labels, mask = _classification_data(rng, n=150, c=6)
    labels[labels == 5] = 1  # class 5 only predicted: in the union, with support 0 (weight 0 when weighted)
    sel = ((labels >= 0) & mask).numpy()
    y, p = labels.numpy()[sel], decoded[:, 0].numpy()[sel]
    fn = {"f1_score": skm.f1_score, "precision": skm.precision_score, "recall": skm.recall_score}[kind]
    expected = fn(y, p, average=average, zero_division=0)
    got = _feed(ConfusionMatrixMetric(kind, 6, average=average), decoded, labels, mask)
    assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("average", ["micro", "macro", "weighted"])
def test_multilabel_f1_averaging_matches_sklearn_without_missing_elements(average):
    rng = np.random.default_rng(12)
    n, c = 160, 4
    labels = (rng.random((n, c)) < 0.35).astype(np.float32)
    preds = rng.random((n, c)) < 0.4
    mask = rng.random(n) < 0.8
    got = _feed(MultilabelConfusionMetric("f1_score", c, average=average), torch.from_numpy(preds),
                torch.from_numpy(labels), torch.from_numpy(mask))
    expected = skm.f1_score(labels[mask], preds[mask], average=average, zero_division=0)
    assert got == pytest.approx(expected, abs=1e-12)


def test_multilabel_macro_f1_over_classes_with_an_available_element_by_hand():
    # class 0: tp 1, fp 1 -> F1 2/3; class 1: every label missing -> left out; class 2: fn 1 -> F1 0
    labels = torch.tensor([[1.0, math.nan, 1.0], [0.0, math.nan, 0.0]])
    preds = torch.tensor([[True, True, False], [True, False, False]])
    metric = MultilabelConfusionMetric("f1_score", 3, average="macro")
    metric.update(preds, labels, torch.tensor([True, True]))
    assert metric.compute() == pytest.approx((2 / 3 + 0.0) / 2)


def test_unknown_average_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="macro.*micro.*weighted"):
        ConfusionMatrixMetric("f1_score", average="samples")


def test_non_default_averaging_shows_in_the_metric_names():
    import dnn_cool_catalyst as dcc
    from torch import nn

    default = dcc.ClassificationTask("kind", nn.Linear(2, 3), class_names=["a", "b", "c"])
    micro = dcc.ClassificationTask("kind", nn.Linear(2, 3), class_names=["a", "b", "c"], average="micro")
    tags = dcc.MultilabelClassificationTask("tags", nn.Linear(2, 3), average="weighted")
    names = lambda task: [name for name, _ in task.metrics]  # noqa: E731
    assert {"f1_score", "precision", "recall"} <= set(names(default))
    assert {"f1_score_micro", "precision_micro", "recall_micro"} <= set(names(micro))
    assert "f1_score" not in names(micro)
    assert names(tags) == ["accuracy", "f1_score_weighted"]


def test_confusion_matrix_states_merge_across_sizes():
    probs, decoded, labels, mask = _classification_data(np.random.default_rng(6), n=50, c=4)
    whole = ConfusionMatrixMetric("f1_score")
    whole.update(decoded, labels, mask)
    empty = ConfusionMatrixMetric("f1_score")  # saw nothing: a 0 x 0 matrix
    part = ConfusionMatrixMetric("f1_score")
    part.update(decoded[:20], labels[:20], mask[:20])
    rest = ConfusionMatrixMetric("f1_score")
    rest.update(decoded[20:], labels[20:], mask[20:])
    empty.merge(part)
    empty.merge(rest.states)
    assert torch.equal(empty.states["matrix"], whole.states["matrix"])
    assert empty.compute() == whole.compute()


def test_multilabel_accuracy_and_micro_f1_match_sklearn_over_available_elements():
    rng = np.random.default_rng(7)
    n, c = 200, 5
    labels = (rng.random((n, c)) < 0.3).astype(np.float32)
    labels[rng.random((n, c)) < 0.2] = np.nan
    preds = rng.random((n, c)) < 0.4
    mask = rng.random(n) < 0.75
    sel = mask[:, None] & ~np.isnan(labels)
    t, p, m = torch.from_numpy(labels), torch.from_numpy(preds), torch.from_numpy(mask)
    assert _feed(ElementAccuracy(), p, t, m) == pytest.approx(skm.accuracy_score(labels[sel], preds[sel]))
    assert _feed(BinaryConfusionMetric("f1_score"), p, t, m) == pytest.approx(skm.f1_score(labels[sel], preds[sel]))
    # without missing elements this is scikit-learn's micro average over the label matrix
    full = mask
    y_full = np.nan_to_num(labels)
    mf = BinaryConfusionMetric("f1_score")
    mf.update(p, torch.from_numpy(y_full), m)
    assert mf.compute() == pytest.approx(skm.f1_score(y_full[full], preds[full], average="micro"))


@pytest.mark.parametrize("scale", [1.0, 64.0])
def test_mean_absolute_error_matches_sklearn_in_label_and_decoded_units(scale):
    rng = np.random.default_rng(8)
    n = 300
    labels = rng.random(n).astype(np.float32)
    labels[rng.random(n) < 0.1] = np.nan
    act = rng.random(n).astype(np.float32)
    mask = rng.random(n) < 0.6
    sel = mask & ~np.isnan(labels)
    expected = skm.mean_absolute_error(labels[sel] * scale, act[sel] * scale)
    got = _feed(MeanAbsoluteError(scale), torch.from_numpy(act).reshape(-1, 1), torch.from_numpy(labels),
                torch.from_numpy(mask))
    assert got == pytest.approx(expected, rel=1e-6)


def _mlm_data(rng, n=30, t=9, v=11):
    probs = torch.softmax(torch.from_numpy(rng.normal(size=(n, t, v))), -1)
    labels = torch.from_numpy(rng.integers(0, v, (n, t)))
    labels[torch.from_numpy(rng.random((n, t)) < 0.6)] = -100
    mask = torch.from_numpy(rng.random(n) < 0.7)
    return probs, labels, mask


def test_token_accuracy_and_perplexity_match_sklearn():
    probs, labels, mask = _mlm_data(np.random.default_rng(9))
    decoded = torch.topk(probs, 5, -1).indices
    sel = ((labels != -100) & mask[:, None]).numpy()
    y = labels.numpy()[sel]
    p = probs.numpy()[sel]
    assert _feed(TokenAccuracy(), decoded, labels, mask) == pytest.approx(skm.accuracy_score(y, p.argmax(-1)))
    expected = math.exp(skm.log_loss(y, p, labels=np.arange(p.shape[-1])))
    assert _feed(Perplexity(), probs, labels, mask) == pytest.approx(expected, rel=1e-9)


def test_perplexity_is_finite_when_a_probability_underflows():
    probs = torch.zeros(1, 2, 3)
    probs[..., 0] = 1.0
    m = Perplexity()
    m.update(probs, torch.tensor([[1, 0]]), torch.ones(1, dtype=torch.bool))
    assert math.isfinite(m.compute()) and m.compute() > 1


def test_states_merge_exactly_across_uneven_chunks():
    preds, labels, mask = _binary_data(np.random.default_rng(10), n=101)
    whole = BinaryConfusionMetric("f1_score")
    whole.update(preds, labels, mask)
    merged = BinaryConfusionMetric("f1_score")
    for a, b in [(0, 1), (1, 50), (50, 50), (50, 101)]:
        part = BinaryConfusionMetric("f1_score")
        part.update(preds[a:b], labels[a:b], mask[a:b])
        merged.merge(part)
    assert all(torch.equal(merged.states[k], whole.states[k]) for k in whole.states)


def test_merge_refuses_states_of_another_metric():
    with pytest.raises(ValueError, match="states"):
        BinaryConfusionMetric().merge(TopKAccuracy(1))


def _security_outputs(flow, n, seed):
    torch.manual_seed(seed)
    x = {"features": torch.randn(n, 8)}
    labels = {p: flow.tasks[p].prepare_labels(v) for p, v in security_labels(n, seed=seed, missing_rate=0.2).items()}
    model = flow.torch().eval()
    with torch.no_grad():
        x["gt"] = {p: labels[p] for p in flow.graph.condition_paths}
        out = model(x)
    return out, labels


def test_flow_metrics_merge_equals_one_pass_and_counts_s_t():
    flow = security_tasks(features=8).get_full_flow()
    out, labels = _security_outputs(flow, 90, seed=1)
    whole = flow.get_metrics()
    whole.update(out, labels)
    merged = flow.get_metrics()
    for a, b in [(0, 7), (7, 7), (7, 60), (60, 90)]:
        part = flow.get_metrics()
        part.update({k: {p: t[a:b] for p, t in v.items()} for k, v in out.items()},
                    {p: t[a:b] for p, t in labels.items()})
        merged.merge(part.states() if a else part)
    expected, got = whole.compute(), merged.compute()
    assert expected.keys() == got.keys()
    for key in expected:  # float64 states over other groupings of <= 90 terms: ~1e-14, far below 1e-12
        assert got[key] == pytest.approx(expected[key], nan_ok=True, abs=1e-12), key
    assert merged.num_samples() == whole.num_samples()
    for p, count in whole.num_samples().items():
        avail = flow.tasks[p].available(labels[p]).reshape(90, -1).any(1)
        assert count == int((avail & out["mask"][p]).sum())


def test_all_reduce_in_a_process_group_keeps_exact_states(tmp_path):
    import torch.distributed as dist

    flow = security_tasks(features=8).get_full_flow()
    out, labels = _security_outputs(flow, 40, seed=2)
    metrics = flow.get_metrics()
    metrics.update(out, labels)
    before = {k: v.clone() for k, v in metrics.states().items()}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        metrics.all_reduce()  # one rank: the sum is the state itself
        empty = ConfusionMatrixMetric("f1_score")
        empty.all_reduce()  # a rank that saw nothing still takes part
        empty_multilabel = MultilabelConfusionMetric("f1_score")
        empty_multilabel.all_reduce()
    finally:
        dist.destroy_process_group()
    after = metrics.states()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k].cpu(), before[k]) for k in before)
    assert empty.states["matrix"].shape == (0, 0)
    assert all(v.shape == () and float(v) == 0 for v in empty_multilabel.states.values())


def test_metrics_with_one_state_key_count_once_for_all():
    preds, labels, mask = _binary_data(np.random.default_rng(4))
    owner, member = BinaryConfusionMetric("precision"), BinaryConfusionMetric("recall")
    member.share_states(owner)
    owner.update(preds, labels, mask)
    alone = BinaryConfusionMetric("recall")
    alone.update(preds, labels, mask)
    assert member.compute() == alone.compute() and member.states is owner.states
    owner.reset()  # in place: the member sees it
    assert math.isnan(member.compute())
    scores = torch.rand(50, dtype=torch.float64)
    targets, everyone = torch.rand(50), torch.ones(50, dtype=torch.bool)
    unscaled, scaled = MeanAbsoluteError(1.0), MeanAbsoluteError(4.0)  # the scale only enters compute
    scaled.share_states(unscaled)
    unscaled.update(scores, targets, everyone)
    assert scaled.compute() == pytest.approx(4 * unscaled.compute(), rel=1e-12)


def test_metrics_counting_different_things_refuse_to_share():
    with pytest.raises(ValueError, match="cannot share"):
        TopKAccuracy(3).share_states(TopKAccuracy(1))
    with pytest.raises(ValueError, match="cannot share"):
        ConfusionMatrixMetric("f1_score").share_states(BinaryConfusionMetric("f1_score"))
    with pytest.raises(ValueError, match="cannot share"):
        Perplexity().share_states(Perplexity())  # no state key: states of its own


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_token_metrics_accumulate_in_float64(dtype):
    """16,384 masked tokens with half-precision probabilities: exact counts and the perplexity of
    exactly those (rounded) probabilities; the log is taken in float64, so only the order of a
    float64 summation differs from the reference (rel 1e-9 is far above that, far below a half ulp)."""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(16, 1024, 50, generator=g), -1).to(dtype)
    labels = torch.randint(0, 50, (16, 1024), generator=g)
    mask = torch.ones(16, dtype=torch.bool)
    ppl, acc = Perplexity(), TokenAccuracy()
    ppl.update(probs, labels, mask)
    acc.update(torch.topk(probs.float(), 1, -1).indices, labels, mask)
    assert all(v.dtype == torch.float64 for m in (ppl, acc) for v in m.states.values())
    assert ppl.states["count"].item() == acc.states["count"].item() == 16384
    p = probs.double().gather(-1, labels.unsqueeze(-1))
    assert ppl.compute() == pytest.approx(math.exp(-p.log().mean().item()), rel=1e-9)


def test_perplexity_of_a_token_id_beyond_the_vocabulary_does_not_index_out_of_range():
    """The flow loss reports such a label (naming the task); the metric must not crash first
    (on CUDA an out-of-range gather is a device-side assert)."""
    m = Perplexity()
    m.update(torch.full((1, 2, 3), 1 / 3), torch.tensor([[1, 3]]), torch.ones(1, dtype=torch.bool))
    assert math.isfinite(m.compute())


# Per class ----------------------------------------------------------------------------------------------------------


def _per_class_table(results):
    """`{class index: (precision, recall, f1_score, support)}` from `Metric.per_class()`."""
    return {r.index: (r.scores["precision"], r.scores["recall"], r.scores["f1_score"], r.support) for r in results}


@pytest.mark.parametrize("num_classes", [7, None])
def test_per_class_classification_scores_match_sklearn(num_classes):
    rng = np.random.default_rng(8)
    probs, decoded, labels, mask = _classification_data(rng, n=150, c=7)
    labels[labels == 6] = 2  # class 6 is only predicted: precision 0, recall 0 by zero division, support 0
    labels[labels == 5] = 3
    metric = ConfusionMatrixMetric("f1_score", num_classes)
    _feed(metric, decoded, labels, mask)
    sel = ((labels >= 0) & mask).numpy()
    y, p = labels.numpy()[sel], decoded[:, 0].numpy()[sel]
    classes = np.union1d(y, p)
    pr, rc, f1, support = skm.precision_recall_fscore_support(y, p, labels=classes, zero_division=0)
    got = _per_class_table(metric.per_class())
    assert sorted(got) == classes.tolist()  # the classes the macro average runs over
    for k, c in enumerate(classes.tolist()):
        assert got[c] == pytest.approx((pr[k], rc[k], f1[k], support[k]), abs=1e-12), c
    # the macro scores are the means of the per-class rows
    assert metric.compute() == pytest.approx(np.mean([v[2] for v in got.values()]), abs=1e-12)
    assert _per_class_table(ConfusionMatrixMetric("recall").per_class()) == {}  # nothing seen


def test_per_class_multilabel_scores_match_sklearn_over_available_elements():
    rng = np.random.default_rng(9)
    n, c = 240, 4
    labels = (rng.random((n, c)) < 0.3).astype(np.float32)
    labels[:, 3] = 0  # class 3 never positive: recall and F1 0 by zero division, support 0
    preds = rng.random((n, c)) < 0.4
    mask = rng.random(n) < 0.75
    t, p, m = torch.from_numpy(labels), torch.from_numpy(preds), torch.from_numpy(mask)
    metric = MultilabelConfusionMetric("f1_score", c)
    micro = _feed(metric, p, t, m)
    # no missing element: scikit-learn's multilabel per-class report on the samples in S_t
    pr, rc, f1, support = skm.precision_recall_fscore_support(labels[mask], preds[mask], zero_division=0)
    got = _per_class_table(metric.per_class())
    assert sorted(got) == list(range(c))
    for k in range(c):
        assert got[k] == pytest.approx((pr[k], rc[k], f1[k], support[k]), abs=1e-12), k
    assert micro == pytest.approx(skm.f1_score(labels[mask], preds[mask], average="micro"), abs=1e-12)
    # missing elements: each class over its available elements; a class with none is NaN, support 0
    labels[rng.random((n, c)) < 0.2] = np.nan
    labels[:, 2] = np.nan
    t = torch.from_numpy(labels)
    metric = MultilabelConfusionMetric("accuracy")  # classes taken from the first update
    _feed(metric, p, t, m)
    got = _per_class_table(metric.per_class())
    for k in (0, 1, 3):
        sel = mask & ~np.isnan(labels[:, k])
        pr, rc, f1, support = skm.precision_recall_fscore_support(labels[sel, k], preds[sel, k], labels=[1],
                                                                  zero_division=0)
        assert got[k] == pytest.approx((pr[0], rc[0], f1[0], support[0]), abs=1e-12), k
    assert all(math.isnan(v) for v in got[2][:3]) and got[2][3] == 0
    sel = mask[:, None] & ~np.isnan(labels)
    assert metric.compute() == pytest.approx(skm.accuracy_score(labels[sel], preds[sel]), abs=1e-12)


def test_per_class_multilabel_states_merge_exactly():
    rng = np.random.default_rng(10)
    labels = torch.from_numpy((rng.random((60, 3)) < 0.5).astype(np.float32))
    preds, mask = torch.from_numpy(rng.random((60, 3)) < 0.5), torch.ones(60, dtype=torch.bool)
    whole = MultilabelConfusionMetric("f1_score")
    whole.update(preds, labels, mask)
    merged, part = MultilabelConfusionMetric("f1_score"), MultilabelConfusionMetric("f1_score")
    part.update(preds[:25], labels[:25], mask[:25])
    merged.merge(part)  # a metric that saw nothing takes the other's classes
    rest = MultilabelConfusionMetric("f1_score")
    rest.update(preds[25:], labels[25:], mask[25:])
    merged.merge(rest.states)
    assert all(torch.equal(merged.states[k], whole.states[k]) for k in whole.states)
    assert _per_class_table(merged.per_class()) == _per_class_table(whole.per_class())
    # the same micro values as the scalar counts it replaces for multilabel tasks
    scalar = BinaryConfusionMetric("f1_score")
    scalar.update(preds, labels, mask)
    assert whole.compute() == scalar.compute()


_RANK_SCRIPT = """
import sys, torch, torch.distributed as dist
from dnn_cool_catalyst.metrics import MultilabelConfusionMetric
rank, init = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
m = MultilabelConfusionMetric("f1_score")
if rank == 0:  # rank 1 sees nothing: its states stay scalar zeros
    m.update(torch.tensor([[True, False, True]]), torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([True]))
m.all_reduce()
print([m.states[k].tolist() for k in ("tp", "fp", "fn", "tn")])
dist.destroy_process_group()
"""


def test_per_class_multilabel_states_reduce_when_a_rank_saw_nothing(tmp_path):
    import subprocess
    import sys

    init = f"file://{tmp_path / 'pg'}"
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, str(r), init], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    expected = str([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert [o[0].strip() for o in outs] == [expected, expected]


# Labels with element dimensions (per-token tasks, issue 17): each element is one scored item ------------


def _token_case(rng, n=40, t=6):
    """Per-token labels `(N, T)` with padding (-1 / NaN), and a per-sample and a per-token mask."""
    lengths = rng.integers(1, t + 1, n)
    real = np.arange(t)[None, :] < lengths[:, None]
    per_sample = rng.random(n) < 0.7
    per_token = (rng.random((n, t)) < 0.8) & real
    return real, per_sample, per_token


@pytest.mark.parametrize("mask_kind", ["per_sample", "per_token"])
def test_metrics_score_labels_per_token_as_one_item_each(mask_kind):
    rng = np.random.default_rng(5)
    n, t, c = 40, 6, 4
    real, per_sample, per_token = _token_case(rng, n, t)
    mask = per_token if mask_kind == "per_token" else per_sample
    token_mask = mask if mask.ndim == 2 else np.repeat(mask[:, None], t, 1)
    # classification: decoded (N, T, C) ranked classes, labels (N, T), -1 at padding
    probs = rng.random((n, t, c))
    ranked = np.argsort(-probs, -1, kind="stable")
    labels = rng.integers(0, c, (n, t))
    labels[~real] = -1
    sel = token_mask & (labels >= 0)
    args = (torch.from_numpy(ranked), torch.from_numpy(labels), torch.from_numpy(mask))
    top2 = TopKAccuracy(2)
    top2.update(*args)
    hits = [labels[i, j] in ranked[i, j, :2] for i, j in zip(*np.nonzero(sel))]
    assert top2.compute() == pytest.approx(np.mean(hits))
    f1 = ConfusionMatrixMetric("f1_score")
    f1.update(*args)
    expected = skm.f1_score(labels[sel], ranked[..., 0][sel], average="macro", zero_division=0)
    assert f1.compute() == pytest.approx(expected)
    # regression: activated (N, T, 1), labels (N, T), NaN at padding
    values = rng.random((n, t, 1)).astype(np.float32)
    targets = rng.random((n, t)).astype(np.float32)
    targets[~real] = np.nan
    sel = token_mask & ~np.isnan(targets)
    mae = MeanAbsoluteError()
    mae.update(torch.from_numpy(values), torch.from_numpy(targets), torch.from_numpy(mask))
    assert mae.compute() == pytest.approx(np.abs(values[..., 0][sel].astype(np.float64) - targets[sel]).mean())
    # binary per token: decoded (N, T, 1)
    yes = rng.random((n, t, 1)) < 0.5
    truth = (rng.random((n, t)) < 0.4).astype(np.float32)
    truth[~real] = np.nan
    sel = token_mask & ~np.isnan(truth)
    acc = BinaryConfusionMetric("accuracy")
    acc.update(torch.from_numpy(yes), torch.from_numpy(truth), torch.from_numpy(mask))
    assert acc.compute() == pytest.approx(skm.accuracy_score(truth[sel], yes[..., 0][sel]))
    # multilabel per token: decoded and labels (N, T, L)
    tags = rng.random((n, t, 3)) < 0.5
    tag_labels = (rng.random((n, t, 3)) < 0.3).astype(np.float32)
    tag_labels[~real] = np.nan
    sel = token_mask & real
    micro = MultilabelConfusionMetric("f1_score")
    micro.update(torch.from_numpy(tags), torch.from_numpy(tag_labels), torch.from_numpy(mask))
    assert micro.compute() == pytest.approx(skm.f1_score(tag_labels[sel].astype(int), tags[sel], average="micro"))
