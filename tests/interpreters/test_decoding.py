"""`flow.get_decoder()`: tuning on S_t only, the report format, applying and persisting params."""
import json

import numpy as np
import pytest
import torch
from torch import nn

import dnn_cool_catalyst as dcc
from dnn_cool_catalyst.story import security_labels, security_tasks
from dnn_cool_catalyst.interpreters.decoding import merge_report
from dnn_cool_catalyst.tuning import best_threshold

FACIAL = "person_regression.face_regression.facial_characteristics"


def _predictions(labels, seed):
    """Activated outputs that are informative about the labels (so tuning matters)."""
    rng = np.random.default_rng(seed)
    preds = {}
    for p, y in labels.items():
        y = np.asarray(y)
        if p.endswith("shirt_type"):
            preds[p] = torch.softmax(torch.randn(len(y), 7), -1)
        elif y.dtype.kind == "f":
            noisy = np.clip(np.nan_to_num(y, nan=0.5) * 0.4 + rng.random(y.shape) * 0.6, 0, 1)
            preds[p] = torch.from_numpy(noisy.astype(np.float32))
    return preds


def _s_t(flow, labels, path):
    """Reference S_t for the security flow (API.md section 4), written out by hand."""
    cb, do, pp = (np.asarray(labels[p]) for p in ("camera_blocked", "door_open", "person_present"))
    pre = {"camera_blocked": np.ones(len(cb), bool)}
    pre["door_open"] = ~(cb == 1)
    pre["door_locked"] = pre["door_open"] & ~(do == 1)
    pre["person_present"] = pre["door_open"] & ~(do == 0)
    person = pre["person_present"] & ~(pp == 0)
    y = np.asarray(labels[path])
    avail = ~np.isnan(y) if y.dtype.kind == "f" else y >= 0
    return pre.get(path, person)[:, None] & avail if y.ndim == 2 else pre.get(path, person) & avail


def test_tune_uses_only_samples_in_s_t_and_applies_the_result():
    flow = security_tasks(features=8).get_full_flow()
    labels = security_labels(400, seed=3, missing_rate=0.1)
    preds = _predictions(labels, seed=4)
    result = flow.get_decoder().tune(preds, labels)
    assert set(result) == {"camera_blocked", "door_open", "door_locked", "person_present", FACIAL}
    for path in ("door_locked", "person_present"):
        w = _s_t(flow, labels, path)
        expected = best_threshold(preds[path].numpy()[w], labels[path][w] > 0.5)
        assert result[path] == {"threshold": expected.threshold, "tuned": True, "metric": "accuracy",
                                "score": expected.score, "num_samples": int(w.sum())}
        assert flow.tasks[path].decoder.threshold == expected.threshold
    w = _s_t(flow, labels, FACIAL)
    for c in range(3):
        expected = best_threshold(preds[FACIAL].numpy()[w[:, c], c], labels[FACIAL][w[:, c], c] > 0.5)
        assert result[FACIAL]["threshold"][c] == expected.threshold
        assert result[FACIAL]["num_samples"][c] == int(w[:, c].sum())
    assert result[FACIAL]["untuned_classes"] == []
    json.dumps(result, allow_nan=False)  # plain JSON values only


def test_labels_outside_s_t_do_not_change_the_result():
    flow = security_tasks(features=8).get_full_flow()
    labels = security_labels(300, seed=5, missing_rate=0.1)
    preds = _predictions(labels, seed=6)
    first = flow.get_decoder().tune(preds, labels)
    changed = {p: np.array(v, copy=True) for p, v in labels.items()}
    outside = ~_s_t(flow, labels, "door_locked") & (changed["door_open"] == 1)
    assert outside.any()
    changed["door_locked"][outside] = 1.0  # labels where the precondition is false
    second = flow.get_decoder().tune(preds, changed)
    assert second["door_locked"] == first["door_locked"]


def test_task_without_samples_keeps_its_threshold_and_says_so():
    flow = security_tasks(features=8).get_full_flow()
    labels = security_labels(100, seed=7)
    labels["door_locked"][:] = np.nan
    labels[FACIAL][:, 1] = np.nan
    decoder = flow.get_decoder()
    decoder.load_tuned({"door_locked": {"threshold": 0.25}})
    result = decoder.tune(_predictions(labels, seed=8), labels)
    assert result["door_locked"] == {"threshold": 0.25, "tuned": False, "reason": "no samples in S_t"}
    assert flow.tasks["door_locked"].decoder.threshold == 0.25
    facial = result[FACIAL]
    assert facial["tuned"] is True and facial["untuned_classes"] == [1]
    assert facial["threshold"][1] == 0.5 and facial["score"][1] is None and facial["num_samples"][1] == 0


def test_explicit_masks_metric_per_path_and_numpy_inputs():
    flow = security_tasks(features=8).get_full_flow()
    labels = security_labels(200, seed=9)
    preds = {p: v.numpy() for p, v in _predictions(labels, seed=10).items() if p in ("camera_blocked", "door_open")}
    masks = {p: np.arange(200) < 120 for p in preds}
    result = flow.get_decoder().tune(preds, labels, masks=masks, metric={"door_open": "f1"})
    assert set(result) == {"camera_blocked", "door_open"}
    assert result["camera_blocked"]["metric"] == "accuracy" and result["door_open"]["metric"] == "f1"
    w = (np.arange(200) < 120) & ~np.isnan(labels["door_open"])
    assert result["door_open"]["threshold"] == best_threshold(preds["door_open"][w], labels["door_open"][w] > 0.5,
                                                              "f1").threshold


def test_callable_metric_for_every_task():
    flow = security_tasks(features=8).get_full_flow()
    labels = security_labels(150, seed=11)

    def tpr_minus_fpr(tp, fp, fn, tn):
        return tp / np.maximum(tp + fn, 1) - fp / np.maximum(fp + tn, 1)

    result = flow.get_decoder().tune(_predictions(labels, seed=12), labels, metric=tpr_minus_fpr)
    assert {r["metric"] for r in result.values() if r["tuned"]} == {"tpr_minus_fpr"}


def test_tune_result_round_trips_through_json_and_reproduces_decoding(tmp_path):
    labels = security_labels(250, seed=13)
    flow = security_tasks(features=8).get_full_flow()
    preds = _predictions(labels, seed=14)
    result = flow.get_decoder().tune(preds, labels)
    decoded = flow.get_decoder()(preds)
    dcc.save_tuned(tmp_path / "tuned.json", result)

    other = security_tasks(features=8).get_full_flow()
    before = other.get_decoder()(preds)
    other.get_decoder().load_tuned(dcc.load_tuned(tmp_path / "tuned.json"))
    after = other.get_decoder()(preds)
    assert any(not torch.equal(before[p], after[p]) for p in result)
    assert all(torch.equal(decoded[p], after[p]) for p in decoded)
    assert other.get_decoder().params() == flow.get_decoder().params()


def test_tuned_thresholds_decode_half_precision_like_float32():
    task = dcc.BinaryClassificationTask("b", nn.Linear(2, 1))
    scores = torch.tensor([0.25, 0.2502, 0.75, 0.7505], dtype=torch.float16)
    labels = torch.tensor([0.0, 1.0, 0.0, 1.0])
    task.decoder.tune(scores, labels, torch.ones(4, dtype=torch.bool))
    expected = scores.float() > task.decoder.threshold
    assert torch.equal(task.decode(scores), expected)


def test_errors_name_the_task():
    flow = security_tasks(features=8).get_full_flow()
    labels = security_labels(50, seed=15)
    preds = _predictions(labels, seed=16)
    decoder = flow.get_decoder()
    with pytest.raises(KeyError, match="door_opn"):
        decoder.tune({"door_opn": preds["door_open"]}, labels)
    with pytest.raises(dcc.LabelError, match="door_open"):
        decoder.tune({"door_open": preds["door_open"]}, {p: v for p, v in labels.items() if p != "door_open"},
                     masks={"door_open": np.ones(50, bool)})
    with pytest.raises(dcc.LabelError, match="precondition task"):
        decoder.tune({"door_open": preds["door_open"]}, {"door_open": labels["door_open"]})
    with pytest.raises(dcc.LabelError, match="door_open.*49 labels"):
        decoder.tune({"door_open": preds["door_open"]}, {"door_open": labels["door_open"][:49]},
                     masks={"door_open": np.ones(50, bool)})
    with pytest.raises(ValueError, match="unknown tuning metric"):
        decoder.tune(preds, labels, metric="auc")
    with pytest.raises(ValueError, match="takes only 'threshold'"):
        decoder.load_tuned({"door_open": {"thresh": 0.3}})


BAD_THRESHOLDS = {  # the values the issue lists, and neighbours of them, as Python values
    "NaN": float("nan"), "-inf": float("-inf"), "inf": float("inf"), "string": "0.7", "None": None,
    "boolean": True, "empty list": [], "NaN in a list": [0.5, float("nan")], "nested list": [[0.5]],
}


@pytest.mark.parametrize("value", BAD_THRESHOLDS.values(), ids=BAD_THRESHOLDS.keys())
@pytest.mark.parametrize("path", ["door_open", FACIAL])
def test_load_tuned_refuses_bad_thresholds_and_applies_nothing(path, value):
    flow = security_tasks(features=8).get_full_flow()
    decoder = flow.get_decoder()
    before = decoder.params()
    with pytest.raises(dcc.TunedParamsError, match=rf"task '{path}'.*threshold"):
        decoder.load_tuned({"camera_blocked": {"threshold": 0.75}, path: {"threshold": value}})
    assert decoder.params() == before  # the good entry before the bad one is not applied either


def test_load_tuned_checks_the_number_of_thresholds():
    flow = security_tasks(features=8).get_full_flow()
    decoder = flow.get_decoder()
    classes = len(flow.tasks[FACIAL].class_names)
    with pytest.raises(dcc.TunedParamsError, match=r"task 'door_open'.*one number.*list of 2"):
        decoder.load_tuned({"door_open": {"threshold": [0.3, 0.6]}})
    with pytest.raises(dcc.TunedParamsError, match=rf"task '{FACIAL}'.*{classes}.*list of 2"):
        decoder.load_tuned({FACIAL: {"threshold": [0.3, 0.6]}})
    with pytest.raises(dcc.TunedParamsError, match="door_open.*in 'saved.json'"):
        decoder.load_tuned({"door_open": {"threshold": "0.7"}}, source="saved.json")
    decoder.load_tuned({"door_open": {"threshold": 1}, FACIAL: {"threshold": [0.25] * classes}})
    assert decoder.params()["door_open"] == {"threshold": 1.0}
    assert decoder.params()[FACIAL] == {"threshold": [0.25] * classes}
    decoder.load_tuned({FACIAL: {"threshold": 0.5}})  # one threshold for every class, as before tuning
    assert decoder.params()[FACIAL] == {"threshold": 0.5}
    with pytest.raises(ValueError, match="finite"):
        dcc.BinaryClassificationTask("b", nn.Linear(2, 1), threshold=float("nan"))


def test_load_tuned_names_an_unknown_path_with_a_close_match():
    decoder = security_tasks(features=8).get_full_flow().get_decoder()
    with pytest.raises(dcc.TunedParamsError, match=r"'door_opn' in 'saved.json'.*did you mean 'door_open'.*known"):
        decoder.load_tuned({"door_opn": {"threshold": 0.5}}, source="saved.json")
    with pytest.raises(dcc.TunedParamsError, match=r"task 'door_open'.*must be a mapping.*NoneType"):
        decoder.load_tuned({"door_open": None})


def test_threshold_rules_survive_pickling():
    import pickle

    flow = pickle.loads(pickle.dumps(security_tasks(features=8).get_full_flow()))  # as DDP workers get it
    with pytest.raises(dcc.TunedParamsError, match="door_open.*one number"):
        flow.get_decoder().load_tuned({"door_open": {"threshold": [0.5]}})
    with pytest.raises(dcc.TunedParamsError, match="facial_characteristics.*list of 3"):
        flow.get_decoder().load_tuned({FACIAL: {"threshold": [0.5]}})


def test_tune_without_predictions_says_what_to_pass():
    """The seed's `flow.get_decoder().tune()` ("just call") was a TypeError about missing positional
    arguments; a decoder records no predictions, so the error names the two spellings that work,
    and no decoder changes."""
    flow = security_tasks(features=8).get_full_flow()
    decoder = flow.get_decoder()
    before = decoder.params()
    for call in (lambda: decoder.tune(), lambda: decoder.tune({"camera_blocked": torch.rand(4)})):
        with pytest.raises(TypeError, match=r"decoder.tune\(activated, targets\).*runner.infer\(loader\).*"
                                            r"runner.tune\(loader\)"):
            call()
    assert decoder.params() == before
    # the spelling the message gives works on the module's outputs and the dataset's labels
    labels = security_labels(64, seed=3, missing_rate=0.1)
    x, y = flow.get_dataset({"features": torch.randn(64, 8)}, labels)[list(range(64))]
    with torch.no_grad():
        activated = flow.torch().eval()(x)["activated"]
    assert decoder.tune(activated, y)["camera_blocked"]["tuned"] is True


def test_fit_is_pure_and_tune_is_fit_then_load_tuned():
    labels = security_labels(300, seed=21, missing_rate=0.1)
    preds = _predictions(labels, seed=22)
    flow = security_tasks(features=8).get_full_flow()
    decoder = flow.get_decoder()
    before = decoder.params()
    params, report = decoder.fit(preds, labels, metric="f1")
    assert decoder.params() == before  # nothing applied
    assert set(params) == set(report) == set(before)
    assert all(set(v) == {"threshold"} for v in params.values())  # parameters only: the report is apart
    assert report["door_open"]["metric"] == "f1" and report["door_open"]["tuned"] is True
    assert params["door_open"] != before["door_open"]
    decoder.load_tuned(params)
    assert decoder.params() == params
    other = security_tasks(features=8).get_full_flow()
    assert other.get_decoder().tune(preds, labels, metric="f1") == merge_report(params, report)
    assert other.get_decoder().params() == params


@pytest.mark.parametrize("shape", [(60,), (60, 3)])
def test_threshold_decoder_fit_leaves_the_decoder_alone(shape):
    rng = np.random.default_rng(23)
    scores = torch.from_numpy(rng.random(shape).astype(np.float32))
    labels = (torch.rand(shape, generator=torch.Generator().manual_seed(1)) < scores).float()
    decoder = dcc.MultilabelClassificationTask("m", nn.Linear(2, 3)).decoder if len(shape) == 2 else \
        dcc.BinaryClassificationTask("b", nn.Linear(2, 1)).decoder
    params, report = decoder.fit(scores, labels, torch.ones(shape, dtype=torch.bool))
    assert decoder.threshold == 0.5 and params["threshold"] != 0.5
    assert report["tuned"] is True and "threshold" not in report
    assert decoder.tune(scores, labels, torch.ones(shape, dtype=torch.bool)) == {**params, **report}
    assert decoder.params() == params


def test_a_failing_task_leaves_every_decoder_as_it_was():
    """Tuning fits every task before it applies any: an error in the last task (here outputs of
    the wrong width) no longer leaves the first ones tuned."""
    labels = security_labels(100, seed=24)
    preds = _predictions(labels, seed=25)
    preds[FACIAL] = preds[FACIAL][:, :2]
    flow = security_tasks(features=8).get_full_flow()
    before = flow.get_decoder().params()
    with pytest.raises(ValueError, match=f"tuning task '{FACIAL}'"):
        flow.get_decoder().tune(preds, labels)
    assert flow.get_decoder().params() == before


def test_flows_of_one_tasks_registry_share_tuned_thresholds():
    """Decoders belong to the tasks: documented sharing between flows (and their runners) of one
    `Tasks`; a second `Tasks` is independent."""
    tasks = security_tasks(features=8)
    full, again = tasks.get_full_flow(), tasks.get_full_flow()
    separate = security_tasks(features=8).get_full_flow()
    full.get_decoder().load_tuned({"door_open": {"threshold": 0.25}})
    assert again.get_decoder().params()["door_open"] == {"threshold": 0.25}
    assert separate.get_decoder().params()["door_open"] == {"threshold": 0.5}
