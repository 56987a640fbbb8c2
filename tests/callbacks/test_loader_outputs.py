"""LoaderOutputs: the flow callbacks keep a loader's activated outputs once, tuning runs before any
of them decodes at the loader's end, and each works alone and in any order."""
import itertools
import math

import pandas as pd
import pytest
import torch

from dnn_cool_catalyst.callbacks import FlowMetricsCallback, InterpretationCallback, ThresholdTuningCallback
from dnn_cool_catalyst.callbacks.loader_outputs import LoaderOutputs, shared_outputs
from dnn_cool_catalyst.story import security_tasks

FACIAL = "person_regression.face_regression.facial_characteristics"


def _fresh_flow():
    torch.manual_seed(0)  # the same weights in every run, as the `small_flow` fixture
    return security_tasks(features=8).get_full_flow()


def _callbacks():
    return {"tuning": ThresholdTuningCallback(), "metrics": FlowMetricsCallback(),
            "interpretation": InterpretationCallback(top_k=2, explain=2, publishers={"features": None})}


class _Probe:
    """Reads the shared outputs at a loader's end, before the callbacks after it."""

    def __init__(self, flow):
        self.flow, self.sizes = flow, {}

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda runner: None
        raise AttributeError(name)

    def on_loader_end(self, runner):
        kept = shared_outputs(runner, self.flow).outputs()
        self.sizes[runner.loader_key] = {p: tuple(t.shape[0] for t in v) for p, v in kept.items()}


def _run(fake_runner_cls, small_data, names):
    """One epoch (train, valid) of a fresh flow with the named callbacks, in the given order."""
    flow = _fresh_flow()
    ds = flow.get_dataset(*small_data, with_index=True)
    runner = fake_runner_cls(flow)
    made = _callbacks()
    made["probe"] = _Probe(flow)
    callbacks = [made[n] for n in names]
    runner.start(callbacks)
    runner.epoch(callbacks, {"train": ds.loader(batch_size=32), "valid": ds.loader(batch_size=32)})
    return runner, made, flow


def _same(a, b):
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def test_results_do_not_depend_on_the_callbacks_order(fake_runner_cls, small_data):
    runs = {}
    for names in itertools.permutations(("tuning", "metrics", "interpretation")):
        runner, made, flow = _run(fake_runner_cls, small_data, names)
        runs[names] = (dict(runner.epoch_metrics["valid"]), made["tuning"].tuned,
                       made["interpretation"].results["valid"],
                       sorted(t for t in runner.logger.texts if t[0] == "valid"), flow.get_decoder().params())
    (first_names, first), *others = runs.items()
    for names, run in others:
        metrics, tuned, table, texts, params = run
        assert metrics.keys() == first[0].keys()
        assert all(_same(metrics[k], first[0][k]) for k in metrics), (names, first_names)
        assert tuned == first[1] and params == first[4]
        pd.testing.assert_frame_equal(table, first[2])
        assert texts == first[3], (names, first_names)  # captions and trees decode with the tuned thresholds


def test_decoded_metrics_and_captions_use_the_thresholds_tuned_on_the_loader(fake_runner_cls, small_data):
    """Metrics first, tuning last: before, the metrics decoded with the thresholds of before the
    loader; now the tuning runs when the metrics ask, before they decode."""
    runner, made, flow = _run(fake_runner_cls, small_data, ("metrics", "interpretation", "tuning"))
    got = runner.epoch_metrics["valid"]
    # the same loader measured again with the tuned thresholds in place and no tuning
    ds = flow.get_dataset(*small_data, with_index=True)
    again = fake_runner_cls(flow)
    metrics = FlowMetricsCallback()
    again.start([metrics])
    expected = again.run_loader([metrics], "valid", ds.loader(batch_size=32))
    assert made["tuning"].tuned["camera_blocked"]["threshold"] != 0.5
    for key in ("camera_blocked/accuracy", "door_open/f1_score", f"{FACIAL}/accuracy"):
        assert _same(got[key], expected[key]), key


def test_each_callback_works_alone(fake_runner_cls, small_data):
    _, together, _ = _run(fake_runner_cls, small_data, ("tuning", "metrics", "interpretation"))
    _, alone, _ = _run(fake_runner_cls, small_data, ("tuning",))
    assert alone["tuning"].tuned == together["tuning"].tuned
    runner, alone, _ = _run(fake_runner_cls, small_data, ("metrics",))
    assert "loss" in runner.epoch_metrics["valid"] and "door_open/accuracy" in runner.epoch_metrics["valid"]
    assert not any("/tuned/" in k for k in runner.epoch_metrics["valid"])
    runner, alone, _ = _run(fake_runner_cls, small_data, ("interpretation",))
    pd.testing.assert_frame_equal(alone["interpretation"].results["valid"], together["interpretation"].results["valid"])


def test_each_batch_is_kept_once_for_the_tuning_and_the_metrics(fake_runner_cls, small_data):
    runner, made, flow = _run(fake_runner_cls, small_data, ("probe", "tuning", "metrics"))
    n = len(small_data[1]["camera_blocked"])
    sizes = made["probe"].sizes["valid"]
    assert {"camera_blocked", FACIAL} <= set(sizes)
    assert all(s == (n, n, n) for s in sizes.values())
    assert made["probe"].sizes["train"] == {}  # neither keeps outputs of a loader that trains
    assert shared_outputs(runner, flow).outputs() == {}  # freed once every callback was done
    # one per runner and set of tasks: other tasks (other decoders) get their own
    assert shared_outputs(runner, flow) is shared_outputs(runner, flow)
    assert shared_outputs(runner, _fresh_flow()) is not shared_outputs(runner, flow)


class _Runner:
    def __init__(self, batches):
        self.batches = batches
        self.batch = None


def _batch(values):
    a = torch.tensor(values)
    mask = torch.ones(len(values), dtype=torch.bool)
    return {"inputs": {}, "targets": {"t": (a > 0.5).float()}, "outputs": {"activated": {"t": a}, "mask": {"t": mask}}}


def test_steps_run_once_per_loader_and_a_new_loader_starts_afresh():
    shared = LoaderOutputs({"t": None})
    runner, first, second, calls = _Runner([]), object(), object(), []
    shared.start(first, ["t"], before_decoding=lambda r: calls.append(("step", len(shared.outputs()["t"][0]))))
    shared.start(second, ["t"])
    for values in ([0.1, 0.9], [0.7]):
        runner.batch = _batch(values)
        shared.add(first, runner)
        shared.add(second, runner)  # the same batch: not kept again
    shared.before_decoding(runner)
    shared.before_decoding(runner)  # a second caller: the step has run
    assert calls == [("step", 3)]
    assert shared.outputs()["t"][0].tolist() == pytest.approx([0.1, 0.9, 0.7])
    shared.done(first)
    assert shared.outputs()["t"][0].shape == (3,)  # `second` is not done: still there
    shared.start(second, ["t"])  # the next loader (`second` never said it was done)
    runner.batch = _batch([0.3])
    shared.add(second, runner)
    shared.before_decoding(runner)
    assert calls == [("step", 3)]  # the step belonged to the previous loader
    assert shared.outputs()["t"][0].tolist() == pytest.approx([0.3])


def test_fresh_callbacks_hold_their_state_and_ignore_events_before_a_loader(fake_runner_cls, small_flow):
    runner = fake_runner_cls(small_flow)
    for cb in _callbacks().values():
        assert cb._active is False and cb._shared is None
        cb.on_batch_end(runner)
        cb.on_loader_end(runner)
    assert runner.loader_metrics == {}
