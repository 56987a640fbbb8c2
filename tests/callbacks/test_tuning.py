"""ThresholdTuningCallback against a fake runner: tunes on the whole validation loader, logs,
writes tuned_params.json atomically, applies (or not), restores on resume."""
import json
import math

import pytest
import torch

from dnn_cool_catalyst.callbacks import ThresholdTuningCallback
from dnn_cool_catalyst.callbacks.tuning import HISTORY_FILE, TUNED_PARAMS_FILE, HistoryFile, numeric_params
from dnn_cool_catalyst.tuning import load_tuned

TUNABLE = ["camera_blocked", "door_open", "door_locked", "person_present",
           "person_regression.face_regression.facial_characteristics"]


def tune_on_whole_dataset(flow, ds):
    model = flow.torch().eval()
    x, y = ds[list(range(len(ds)))]
    with torch.no_grad():
        out = model(x)
    decoder = flow.get_decoder()
    before = decoder.params()
    tuned = decoder.tune({p: out["activated"][p] for p in TUNABLE}, {p: y[p] for p in TUNABLE},
                         masks={p: out["mask"][p] for p in TUNABLE})
    decoder.load_tuned(before)
    return tuned


def approx_params(params):
    """Floats within float32 rounding: batches of another size change activations in the last bit."""
    def approx(v):
        if isinstance(v, float):
            return pytest.approx(v, rel=1e-5)
        if isinstance(v, list):
            return [approx(u) for u in v]
        return v
    return {p: {k: approx(v) for k, v in d.items()} for p, d in params.items()}


def test_tunes_on_the_whole_loader_writes_and_logs(small_flow, small_data, fake_runner_cls, tmp_path):
    ds = small_flow.get_dataset(*small_data, with_index=True)
    expected = tune_on_whole_dataset(small_flow, ds)
    runner = fake_runner_cls(small_flow, logdir=str(tmp_path))
    cb = ThresholdTuningCallback()
    runner.start([cb])
    runner.epoch([cb], {"train": ds.loader(batch_size=32, shuffle=True), "valid": ds.loader(batch_size=32, shuffle=True)})
    assert sorted(expected) == sorted(TUNABLE)
    assert cb.tuned == approx_params(expected)
    assert load_tuned(tmp_path / TUNED_PARAMS_FILE) == cb.tuned
    assert json.loads((tmp_path / HISTORY_FILE).read_text()) == {"1": cb.tuned}
    assert not list(tmp_path.glob(".*tmp"))  # nothing left from the atomic writes
    valid = runner.epoch_metrics["valid"]
    assert valid["camera_blocked/tuned/threshold"] == pytest.approx(expected["camera_blocked"]["threshold"])
    for name, t in zip(("glasses", "beard", "hat"), expected[TUNABLE[-1]]["threshold"]):
        assert valid[f"{TUNABLE[-1]}/tuned/threshold/{name}"] == pytest.approx(t)
    assert not any("/tuned/" in k for k in runner.epoch_metrics["train"])  # no tuning on train loaders
    # applied: the decoders now hold the tuned thresholds
    assert small_flow.get_decoder().params()["door_open"]["threshold"] == cb.tuned["door_open"]["threshold"]


def test_apply_false_leaves_decoders_alone(small_flow, small_data, fake_runner_cls):
    ds = small_flow.get_dataset(*small_data)
    before = small_flow.get_decoder().params()
    runner = fake_runner_cls(small_flow)
    cb = ThresholdTuningCallback(apply=False, metric="f1")
    runner.start([cb])
    runner.epoch([cb], {"valid": ds.loader(batch_size=64)})
    assert cb.tuned["door_open"]["metric"] == "f1"
    assert cb.tuned["door_open"]["threshold"] != before["door_open"]["threshold"]
    assert small_flow.get_decoder().params() == before


def test_resume_restores_the_last_tuned_epoch(small_flow, small_data, fake_runner_cls, tmp_path):
    ds = small_flow.get_dataset(*small_data)
    runner = fake_runner_cls(small_flow, logdir=str(tmp_path))
    cb = ThresholdTuningCallback()
    runner.start([cb])
    runner.epoch([cb], {"valid": ds.loader(batch_size=64)})
    after_epoch_1 = small_flow.get_decoder().params()
    history = json.loads((tmp_path / HISTORY_FILE).read_text())
    history["2"] = {"door_open": {"threshold": 0.123}}  # a later epoch, not reached by the checkpoint
    (tmp_path / HISTORY_FILE).write_text(json.dumps(history))
    small_flow.get_decoder().load_tuned({p: {"threshold": 0.5 if p != TUNABLE[-1] else [0.5] * 3} for p in TUNABLE})
    assert small_flow.get_decoder().params() != after_epoch_1

    resumed = fake_runner_cls(small_flow, logdir=str(tmp_path))
    cb2 = ThresholdTuningCallback()
    resumed.start([cb2])
    resumed.epoch_step = 2  # the checkpoint of epoch 1 was restored; the runner starts epoch 2
    cb2.on_epoch_start(resumed)
    assert small_flow.get_decoder().params() == after_epoch_1


def test_numeric_params_flattens_lists_and_skips_reports():
    params = {"threshold": [0.1, 0.2], "tuned": True, "metric": "accuracy", "score": [0.9, math.nan],
              "num_samples": [3, 4], "reason": None}
    assert numeric_params("p", params, ["a", "b"]) == {
        "p/tuned/threshold/a": 0.1, "p/tuned/threshold/b": 0.2, "p/tuned/score/a": 0.9,
        "p/tuned/score/b": pytest.approx(math.nan, nan_ok=True)}


def test_history_is_written_as_write_json_writes_it_and_refuses_nan(small_flow, small_data, fake_runner_cls, tmp_path):
    ds = small_flow.get_dataset(*small_data)
    (tmp_path / HISTORY_FILE).write_text(json.dumps({"0": {"door_open": {"threshold": 0.25}}}))  # left by an earlier run
    runner = fake_runner_cls(small_flow, logdir=str(tmp_path))
    cb = ThresholdTuningCallback()
    runner.start([cb])
    tuned = []
    for _ in range(3):
        runner.epoch([cb], {"valid": ds.loader(batch_size=64)})
        tuned.append(cb.tuned)
    text = (tmp_path / HISTORY_FILE).read_text()
    expected = {"0": {"door_open": {"threshold": 0.25}}, "1": tuned[0], "2": tuned[1], "3": tuned[2]}
    assert text == json.dumps(expected, indent=2) + "\n"
    history = HistoryFile({})
    with pytest.raises(ValueError):
        history["1"] = {"door_open": {"threshold": math.nan}}
