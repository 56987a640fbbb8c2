"""Exact threshold search: optimality against brute force, documented ties, JSON persistence."""
import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from dnn_cool_catalyst import TunedParamsError, best_threshold, load_tuned, save_tuned, threshold_sweep
from dnn_cool_catalyst.tuning import METRICS, best_cut, best_thresholds, metric_function


def _counts(scores, labels, t):
    pred = scores > t  # NumPy casts the Python float to the scores' dtype, as torch does
    return (np.sum(pred & labels), np.sum(pred & ~labels), np.sum(~pred & labels), np.sum(~pred & ~labels))


def _metric_at(scores, labels, t, metric):
    tp, fp, fn, tn = (np.array([v], dtype=np.float64) for v in _counts(scores, labels, t))
    return float(metric_function(metric)[1](tp, fp, fn, tn)[0])


def _brute_force_best(scores, labels, metric):
    """Best metric over every decision `scores > t`: t below all scores, or t = each distinct score."""
    cuts = [np.nextafter(scores.min(), -np.inf)] + sorted(set(scores.tolist()))
    vals = [_metric_at(scores, labels, float(t), metric) for t in cuts]
    vals = [-np.inf if np.isnan(v) else v for v in vals]
    return max(vals)


scores_and_labels = st.integers(1, 40).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 12), min_size=n, max_size=n),  # few distinct values: many ties
    st.lists(st.booleans(), min_size=n, max_size=n),
    st.sampled_from([np.float32, np.float64]),
    st.floats(-3, 3),
))


@settings(max_examples=150, deadline=None)
@given(data=scores_and_labels, metric=st.sampled_from(["accuracy", "f1", "balanced_accuracy", "youden"]))
def test_tuned_threshold_reaches_the_brute_force_best(data, metric):
    ints, labels, dtype, shift = data
    scores = (np.asarray(ints, dtype=np.float64) / 7 + shift).astype(dtype)
    labels = np.asarray(labels, dtype=bool)
    tuned = best_threshold(scores, labels, metric)
    best = _brute_force_best(scores, labels, metric)
    reached = _metric_at(scores, labels, tuned.threshold, metric)
    reached = -np.inf if np.isnan(reached) else reached
    assert reached == pytest.approx(best, abs=1e-12)
    if np.isfinite(best):
        assert tuned.score == pytest.approx(best, abs=1e-12)
    assert tuned.num_samples == len(scores)
    # the pruned sweep picks exactly what the full sweep picks, tie rule included
    full = threshold_sweep(scores, labels)
    assert tuned.threshold == full.threshold(best_cut(full, metric)[0])
    # the same decisions through torch (float32 tensors compare in float32, like NumPy)
    dec = (torch.from_numpy(scores) > tuned.threshold).numpy()
    assert np.array_equal(dec, scores > tuned.threshold)


@settings(max_examples=60, deadline=None)
@given(data=scores_and_labels)
def test_sweep_counts_equal_direct_counts_at_every_cut(data):
    ints, labels, dtype, shift = data
    scores = (np.asarray(ints, dtype=np.float64) / 7 + shift).astype(dtype)
    labels = np.asarray(labels, dtype=bool)
    sweep = threshold_sweep(scores, labels)
    assert len(sweep) == len(np.unique(scores)) + 1
    for j in range(len(sweep)):
        expected = _counts(scores, labels, sweep.threshold(j))
        assert (sweep.tp[j], sweep.fp[j], sweep.fn[j], sweep.tn[j]) == expected


def test_accuracy_metric_agrees_with_sklearn_at_the_tuned_threshold():
    rng = np.random.default_rng(0)
    scores = rng.random(500).astype(np.float32)
    labels = rng.random(500) < scores  # informative scores
    tuned = best_threshold(scores, labels)
    assert tuned.score == pytest.approx(skm.accuracy_score(labels, scores > tuned.threshold))


def test_thresholds_are_midpoints_between_adjacent_distinct_scores():
    scores = np.array([0.1, 0.2, 0.7, 0.9], dtype=np.float32)
    labels = np.array([False, False, True, True])
    tuned = best_threshold(scores, labels)
    assert tuned.threshold == float(np.float32(0.2) + (np.float32(0.7) - np.float32(0.2)) / np.float32(2))
    assert tuned.score == 1.0


def test_adjacent_float32_scores_are_still_separated_exactly():
    lo = np.float32(0.5)
    hi = np.nextafter(lo, np.float32(1))
    scores = np.array([lo, hi], dtype=np.float32)
    tuned = best_threshold(scores, np.array([False, True]))
    assert tuned.score == 1.0
    assert tuned.threshold == float(lo)  # the midpoint would round up to `hi`
    assert (torch.from_numpy(scores) > tuned.threshold).tolist() == [False, True]


def test_degenerate_inputs_give_documented_thresholds():
    s = np.full(6, 0.3, dtype=np.float32)
    # constant scores: all positive or all negative, whichever is more accurate, positive on a tie
    majority_pos = best_threshold(s, np.array([1, 1, 1, 1, 0, 0], bool))
    assert majority_pos.threshold == float(np.nextafter(np.float32(0.3), np.float32(-np.inf)))
    assert best_threshold(s, np.array([1, 0, 0, 0, 0, 0], bool)).threshold == float(np.float32(0.3))
    assert best_threshold(s, np.array([1, 1, 1, 0, 0, 0], bool)).threshold < float(np.float32(0.3))
    # one class only: the decision that is right everywhere
    rng = np.random.default_rng(1)
    scores = rng.random(50).astype(np.float32)
    assert best_threshold(scores, np.zeros(50, bool)).threshold == float(scores.max())
    assert best_threshold(scores, np.ones(50, bool)).threshold < float(scores.min())
    # F1 is 0 at every cut without positives: the tie goes to the most accurate cut, not "all positive"
    assert best_threshold(scores, np.zeros(50, bool), "f1").threshold == float(scores.max())


def test_ties_pick_the_most_accurate_then_the_lowest_threshold():
    scores = np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32)
    labels = np.array([True, False, True, False])
    sweep = threshold_sweep(scores, labels)
    acc = METRICS["accuracy"](sweep.tp, sweep.fp, sweep.fn, sweep.tn)
    best = np.flatnonzero(acc == acc.max())
    assert best_threshold(scores, labels).threshold == sweep.threshold(int(best[0]))


def test_negative_scores_and_signed_zero():
    scores = np.array([-2.0, -0.0, 0.0, 1.5, -1.0], dtype=np.float32)
    labels = np.array([False, True, True, True, False])
    sweep = threshold_sweep(scores, labels)
    assert len(sweep) == 5  # -0.0 and 0.0 are one score
    tuned = best_threshold(scores, labels)
    assert tuned.score == 1.0 and -1.0 < tuned.threshold < 0.0


def test_float64_scores_that_are_not_float32():
    rng = np.random.default_rng(2)
    scores = rng.random(300)
    labels = rng.random(300) < scores
    tuned = best_threshold(scores, labels, "balanced_accuracy")
    assert tuned.score == pytest.approx(_brute_force_best(scores, labels, "balanced_accuracy"))


def test_custom_metric_callable_on_confusion_counts():
    rng = np.random.default_rng(3)
    scores = rng.random(200).astype(np.float32)
    labels = rng.random(200) < scores

    def recall_at_precision_80(tp, fp, fn, tn):
        precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
        return np.where(precision >= 0.8, tp / (tp + fn), -1.0)

    tuned = best_threshold(scores, labels, recall_at_precision_80)
    assert tuned.score == pytest.approx(_brute_force_best(scores, labels, recall_at_precision_80))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="unknown tuning metric 'auc'"):
        best_threshold(np.ones(3, np.float32), np.ones(3, bool), "auc")
    with pytest.raises(ValueError, match="finite"):
        best_threshold(np.array([0.1, np.nan], np.float32), np.ones(2, bool))
    with pytest.raises(ValueError, match="at least one"):
        threshold_sweep(np.zeros(0, np.float32), np.zeros(0, bool))
    with pytest.raises(ValueError, match="one value per cut point"):
        best_threshold(np.ones(3, np.float32), np.ones(3, bool), lambda tp, fp, fn, tn: 1.0)


def test_best_thresholds_per_class_skip_unavailable_elements():
    rng = np.random.default_rng(4)
    scores = rng.random((100, 3)).astype(np.float32)
    labels = (rng.random((100, 3)) < scores).astype(np.float32)
    available = rng.random((100, 3)) < 0.7
    available[:, 2] = False
    labels[~available] = np.nan
    tuned = best_thresholds(scores, labels, available)
    assert tuned[2] is None
    for c in range(2):
        w = available[:, c]
        assert tuned[c] == best_threshold(scores[w, c], labels[w, c] > 0.5)


def test_save_and_load_round_trip_atomically(tmp_path):
    params = {"door_open": {"threshold": 0.4375, "tuned": True, "score": None},
              "a.b.facial": {"threshold": [0.1, 0.9, 0.5]}}
    path = tmp_path / "sub" / "tuned.json"
    save_tuned(path, params)
    assert load_tuned(path) == params
    assert json.loads(path.read_text()) == params
    save_tuned(path, {"door_open": {"threshold": 0.6}})  # replaces the file as a whole
    assert load_tuned(str(path)) == {"door_open": {"threshold": 0.6}}
    assert os.listdir(path.parent) == ["tuned.json"]  # no temporary file left behind


def test_save_refuses_what_is_not_plain_json_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "tuned.json"
    save_tuned(path, {"t": {"threshold": 0.5}})
    with pytest.raises(ValueError, match="task 't'"):
        save_tuned(path, {"t": {"threshold": float("nan")}})
    with pytest.raises(ValueError, match="task 'u'"):
        save_tuned(path, {"u": {"threshold": np.float32(0.5)}})
    with pytest.raises(TypeError):
        save_tuned(path, {"t": 0.5})
    with pytest.raises(TunedParamsError, match="task 'v'.*string '0.7'"):
        save_tuned(path, {"v": {"threshold": "0.7"}})
    assert load_tuned(path) == {"t": {"threshold": 0.5}}
    assert os.listdir(tmp_path) == ["tuned.json"]


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tuned(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"t": {"threshold": 0.5},\n oops}')
    with pytest.raises(ValueError, match=r"bad.json.*line 2"):
        load_tuned(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text("[0.5]")
    with pytest.raises(ValueError, match="wrong.json"):
        load_tuned(wrong)


# Every bad value the issue lists (and neighbours of them), as the JSON text of a threshold.
BAD_THRESHOLDS = {
    "NaN": "NaN",
    "-Infinity": "-Infinity",
    "Infinity": "Infinity",
    "overflowing number": "1e400",
    "string": '"0.7"',
    "null": "null",
    "boolean": "true",
    "empty list": "[]",
    "NaN in a list": "[0.5, NaN]",
    "nested list": "[[0.5]]",
}


@pytest.mark.parametrize("text", BAD_THRESHOLDS.values(), ids=BAD_THRESHOLDS.keys())
def test_load_refuses_thresholds_that_are_not_finite_numbers(tmp_path, text):
    path = tmp_path / "tuned.json"
    path.write_text('{"camera_blocked": {"threshold": 0.5},\n "door_open": {"threshold": %s, "tuned": true}}' % text)
    with pytest.raises(TunedParamsError, match=r"task 'door_open' in '.*tuned\.json'.*threshold") as info:
        load_tuned(path)
    assert "camera_blocked" not in str(info.value)


def test_load_refuses_nan_and_infinity_anywhere_and_entries_that_are_not_objects(tmp_path):
    path = tmp_path / "tuned.json"
    path.write_text('{"door_open": {"threshold": 0.5, "score": NaN}}')
    with pytest.raises(TunedParamsError, match=r"task 'door_open' in '.*tuned\.json'.*score.*NaN"):
        load_tuned(path)
    path.write_text('{"door_open": null}')
    with pytest.raises(TunedParamsError, match=r"task 'door_open' in '.*tuned\.json'.*null"):
        load_tuned(path)
    path.write_text('{"door_open": {"threshold": 0.25}, "a.b.facial": {"threshold": [0.1, 1, 0.5], "score": null}}')
    assert load_tuned(path) == {"door_open": {"threshold": 0.25},
                                "a.b.facial": {"threshold": [0.1, 1, 0.5], "score": None}}


def test_best_thresholds_take_every_element_of_a_fully_available_class_and_any_metric():
    rng = np.random.default_rng(5)
    scores = rng.random((80, 2))  # float64: the sorted sweep, not the float32 keys
    labels = rng.random((80, 2)) < scores
    available = np.ones((80, 2), bool)
    available[:40, 1] = False
    tuned = best_thresholds(scores, labels, available, "f1")
    assert tuned[0] == best_threshold(scores[:, 0], labels[:, 0], "f1")
    assert tuned[1] == best_threshold(scores[40:, 1], labels[40:, 1], "f1")
    with pytest.raises(ValueError, match=r"one shape \(N, C\)"):
        best_thresholds(scores[:, 0], labels[:, 0], available[:, 0])
