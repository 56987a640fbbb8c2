"""FlowMetricsCallback against a fake runner: exact loader-level values, per-batch losses,
deferred decoding, PR curves, loader selection."""
import math

import numpy as np

import pytest
import torch

from dnn_cool_catalyst.callbacks import FlowMetricsCallback


def whole_loader_reference(flow, ds, train_mode=False, assert_clear_decisions=None):
    """Metrics and losses computed on the whole dataset as one batch (with `assert_clear_decisions`,
    checked first to be decisions that rounding cannot flip)."""
    model = flow.torch()
    model.train(train_mode)
    x, y = ds[list(range(len(ds)))]
    with torch.no_grad():
        out = model(x)
        metrics = flow.get_metrics()
        metrics.update(out, y)
        loss = flow.get_loss()
        terms = loss.terms(out, y)
    if assert_clear_decisions is not None:
        assert_clear_decisions(flow, flow.get_activation()(out["logits"]))
    values = dict(metrics.compute())
    for p, (s, c) in terms.items():
        values[f"{p}/loss"] = float(s / c) if c > 0 else math.nan
    values["loss"] = float(loss.combine(terms, loss.weights))
    return values, metrics.num_samples()


def assert_same(actual, expected):
    """Loader values against the one-batch reference. The same samples in batches of other sizes:
    float32 sums of up to 120 terms in another order (relative error below 120 x 2^-24 ~ 7e-6) and
    logits rounded differently by the blocked matmul (~1e-8); counts are exact once
    `assert_clear_decisions` holds."""
    assert set(expected) <= set(actual)
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(actual[key]), key
        else:
            assert actual[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("loader_key,buffer_elements,terms", [("valid", 2 ** 24, True), ("train", 2 ** 24, True),
                                                               ("valid", 1, True), ("train", 2 ** 24, "stacked")])
def test_loader_values_equal_one_batch_over_the_whole_loader(small_flow, small_data, fake_runner_cls, loader_key,
                                                             buffer_elements, terms, assert_clear_decisions):
    ds = small_flow.get_dataset(*small_data)
    runner = fake_runner_cls(small_flow, with_terms=terms)  # terms as a dict, or stacked as FlowRunner leaves them
    cb = FlowMetricsCallback(buffer_elements=buffer_elements)  # 1: metrics updated after every batch
    runner.start([cb])
    # Batches of unequal size whose masks differ: a mean of batch means would not match.
    got = runner.run_loader([cb], loader_key, ds.loader(batch_size=50))
    expected, _ = whole_loader_reference(small_flow, ds, train_mode=loader_key == "train",
                                         assert_clear_decisions=assert_clear_decisions)
    assert_same(got, expected)
    assert {f"{p}/loss" for p in small_flow.graph.paths} <= set(got)


def test_per_task_losses_of_each_batch(small_flow, small_data, fake_runner_cls):
    ds = small_flow.get_dataset(*small_data)
    runner = fake_runner_cls(small_flow)
    cb = FlowMetricsCallback()
    runner.start([cb])
    runner.run_loader([cb], "valid", ds.loader(batch_size=40))
    assert len(runner.batch_history) == 3
    loss_fn = small_flow.get_loss()
    x, y = ds[list(range(40, 80))]
    with torch.no_grad():
        terms = loss_fn.terms(small_flow.torch().eval()(x), y)
    second = runner.batch_history[1]
    for p, (s, c) in terms.items():
        value = float(second[f"{p}/loss"])
        assert (math.isnan(value) if c == 0 else value == pytest.approx(float(s / c), rel=1e-6))


def test_criterion_without_terms_gives_sample_weighted_loss(small_flow, small_data, fake_runner_cls):
    ds = small_flow.get_dataset(*small_data)
    runner = fake_runner_cls(small_flow, with_terms=False)
    cb = FlowMetricsCallback()
    runner.start([cb])
    got = runner.run_loader([cb], "valid", ds.loader(batch_size=50))
    sizes = [50, 50, 20]
    batch_losses = [float(h["loss"]) for h in runner.batch_history]
    assert got["loss"] == pytest.approx(sum(s * v for s, v in zip(sizes, batch_losses)) / 120)
    expected, _ = whole_loader_reference(small_flow, ds)
    # batches of 50 against one of 120: float32 sums in another order (see assert_same)
    assert got["door_open/loss"] == pytest.approx(expected["door_open/loss"], rel=1e-5, abs=1e-7)


class SetThresholdAtLoaderEnd:
    """A callback that changes a threshold at a loader's end and runs before the metrics there (the
    tuning callback instead runs through `LoaderOutputs.before_decoding`, in any order)."""

    def __init__(self, flow, path, threshold):
        self.flow, self.path, self.threshold = flow, path, threshold

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda runner: None
        raise AttributeError(name)

    def on_loader_end(self, runner):
        self.flow.get_decoder().load_tuned({self.path: {"threshold": self.threshold}})


@pytest.mark.parametrize("deferred", [True, False])
def test_decoded_metrics_use_thresholds_set_at_the_loader_end(small_flow, small_data, fake_runner_cls, deferred,
                                                              assert_clear_decisions):
    ds = small_flow.get_dataset(*small_data)
    runner = fake_runner_cls(small_flow)
    cb = FlowMetricsCallback(deferred_decoding=deferred)
    runner.start([cb])
    before, _ = whole_loader_reference(small_flow, ds, assert_clear_decisions=assert_clear_decisions)
    got = runner.run_loader([SetThresholdAtLoaderEnd(small_flow, "camera_blocked", 1.0), cb], "valid",
                            ds.loader(batch_size=32))
    after, _ = whole_loader_reference(small_flow, ds)  # now everything is decoded negative
    assert after["camera_blocked/recall"] == 0.0 < before["camera_blocked/recall"]
    expected = after if deferred else before
    for name in ("accuracy", "precision", "recall", "f1_score"):
        key = f"camera_blocked/{name}"
        # counts of decisions: exact across batch sizes once no decision is within 1e-5 of flipping
        assert (math.isnan(got[key]) and math.isnan(expected[key])) or got[key] == pytest.approx(expected[key]), key


def test_pr_curves_per_binary_task_on_loaders_that_do_not_train(small_flow, small_data, fake_runner_cls):
    ds = small_flow.get_dataset(*small_data)
    runner = fake_runner_cls(small_flow)
    cb = FlowMetricsCallback()
    runner.start([cb])
    runner.run_loader([cb], "train", ds.loader(batch_size=32))
    assert runner.logger.pr_curves == []
    runner.run_loader([cb], "valid", ds.loader(batch_size=32))
    _, counts = whole_loader_reference(small_flow, ds)
    curves = {tag: (labels, scores) for _, tag, labels, scores in runner.logger.pr_curves}
    binary = ["camera_blocked", "door_open", "door_locked", "person_present"]
    facial = "person_regression.face_regression.facial_characteristics"
    names = small_flow.tasks[facial].class_names
    assert sorted(curves) == sorted([f"{p}/pr_curve" for p in binary] + [f"{facial}/pr_curve/{k}" for k in names])
    for p in binary:
        labels, scores = curves[f"{p}/pr_curve"]
        assert len(labels) == len(scores) == counts[p]  # only samples in S_t
        assert ((scores >= 0) & (scores <= 1)).all()
    # multilabel: one curve per class, over that class's available labels of the samples in S_t
    x, y = ds[list(range(len(ds)))]
    with torch.no_grad():
        out = small_flow.torch().eval()(x)
    sel = out["mask"][facial].numpy()
    for k, name in enumerate(names):
        labels, scores = curves[f"{facial}/pr_curve/{name}"]
        column = y[facial][:, k].numpy()
        keep = sel & ~np.isnan(column)
        np.testing.assert_array_equal(labels, column[keep] > 0.5)
        np.testing.assert_allclose(scores, out["activated"][facial][:, k].numpy()[keep], rtol=1e-6)


def test_a_confusion_matrix_image_per_classification_task_on_loaders_that_do_not_train(small_flow, small_data,
                                                                                       fake_runner_cls):
    from dnn_cool_catalyst.callbacks.publishers import confusion_matrix_image

    ds = small_flow.get_dataset(*small_data)
    runner = fake_runner_cls(small_flow)
    cb = FlowMetricsCallback()
    runner.start([cb])
    runner.run_loader([cb], "train", ds.loader(batch_size=32))
    assert runner.logger.images == []
    runner.run_loader([cb], "valid", ds.loader(batch_size=32))
    shirt = "person_regression.body_regression.shirt_type"
    (image,) = [(key, img) for key, tag, img in runner.logger.images if tag == f"{shirt}/confusion_matrix"]
    assert image[0] == "valid" and len(runner.logger.images) == 1
    # drawn from the loader's confusion matrix: rows = labels, columns = top-1 predictions over S_t
    x, y = ds[list(range(len(ds)))]
    with torch.no_grad():
        out = small_flow.torch().eval()(x)
    sel = (out["mask"][shirt] & (y[shirt] >= 0)).numpy()
    c = len(small_flow.tasks[shirt].class_names)
    matrix = np.zeros((c, c))
    np.add.at(matrix, (y[shirt].numpy()[sel], out["decoded"][shirt][:, 0].numpy()[sel]), 1)
    np.testing.assert_array_equal(image[1], confusion_matrix_image(matrix, small_flow.tasks[shirt].class_names))
    cb = FlowMetricsCallback(confusion_matrices=False)
    runner.start([cb])
    runner.logger.images.clear()
    runner.run_loader([cb], "valid", ds.loader(batch_size=32))
    assert runner.logger.images == []


def test_only_selected_loaders_are_measured(small_flow, small_data, fake_runner_cls):
    ds = small_flow.get_dataset(*small_data)
    runner = fake_runner_cls(small_flow)
    cb = FlowMetricsCallback(loaders=["valid"], log_batch_losses=False)
    runner.start([cb])
    assert runner.run_loader([cb], "train", ds.loader(batch_size=64)) == {}
    assert "loss" in runner.run_loader([cb], "valid", ds.loader(batch_size=64))
    assert all(set(h) == {"loss"} for h in runner.batch_history)


def test_missing_batch_layout_is_named(small_flow, fake_runner_cls):
    runner = fake_runner_cls(small_flow)
    cb = FlowMetricsCallback()
    runner.start([cb])
    runner.loader_key, runner.is_train_loader = "valid", False
    cb.on_loader_start(runner)
    runner.batch = {"logits": torch.zeros(2)}
    with pytest.raises(KeyError, match="FlowMetricsCallback needs runner.batch with 'outputs'"):
        cb.on_batch_end(runner)


def test_the_flow_may_be_given_as_a_dotted_path(fake_runner_cls, small_flow):
    cb = FlowMetricsCallback(flow="dnn_cool_catalyst.story.security_tasks")
    runner = fake_runner_cls(small_flow)
    cb.on_experiment_start(runner)
    assert cb._flow.name == "full_flow" and cb._flow is not small_flow
    with pytest.raises(ValueError, match="FlowMetricsCallback: no flow"):
        FlowMetricsCallback().on_experiment_start(object())


def test_a_custom_kind_that_decides_by_threshold_gets_a_pr_curve(fake_runner_cls):
    import dnn_cool_catalyst as dcc
    from torch import nn
    from torch.nn import functional as F

    from dnn_cool_catalyst.tasks import Decoder

    class Above(Decoder):  # a decoder of the user's own, with a tunable cut
        def decode(self, activated):
            return activated > 0.3

        def params(self):
            return {"cut": 0.3}

    class Gate(dcc.Task):
        @property
        def decides_by_threshold(self):
            return True

    torch.manual_seed(0)
    gate = Gate(name="gate", module=nn.Linear(4, 1), activation=torch.sigmoid, decoder=Above(),
                loss=lambda z, y: F.binary_cross_entropy_with_logits(z.reshape(y.shape), y.nan_to_num(),
                                                                     reduction="none"))
    tasks = dcc.Tasks([gate])

    @tasks.add_flow
    def full(flow, x, out):
        out += flow.gate(x.features)
        return out

    rng = np.random.default_rng(0)
    labels = (rng.random(40) > 0.5).astype(np.float32)
    labels[:5] = np.nan
    ds = tasks.get_full_flow().get_dataset({"features": rng.normal(size=(40, 4)).astype(np.float32)},
                                           {"gate": labels})
    runner = fake_runner_cls(tasks.get_full_flow())
    cb = FlowMetricsCallback()
    runner.start([cb])
    runner.run_loader([cb], "valid", ds.loader(batch_size=16))
    [(key, tag, got, scores)] = runner.logger.pr_curves
    assert (key, tag) == ("valid", "gate/pr_curve")
    np.testing.assert_array_equal(got, labels[5:] > 0.5)  # the available labels only
    assert len(scores) == 35


@pytest.mark.parametrize("loader_key,buffer_elements", [("valid", 2 ** 24), ("train", 2 ** 24), ("valid", 1)])
def test_per_source_metrics_equal_the_metrics_of_each_source_alone(small_flow, fake_runner_cls, two_security_sources,
                                                                  loader_key, buffer_elements, assert_clear_decisions):
    mixed = two_security_sources(small_flow)
    runner = fake_runner_cls(small_flow)
    cb = FlowMetricsCallback(buffer_elements=buffer_elements)
    runner.start([cb])
    # batches mixing both sources, of unequal size (120 samples in batches of 32)
    got = runner.run_loader([cb], loader_key, mixed.loader(batch_size=32))
    metric_names = {tm.name for tm in small_flow.get_metrics()}
    for name in mixed.source_names:
        alone, _ = whole_loader_reference(small_flow, mixed.sources[name], train_mode=loader_key == "train",
                                          assert_clear_decisions=assert_clear_decisions)
        labelled = mixed.labelled_paths(name)
        # every metric of every task the source labels, and its loss on a loader that does not train
        measured = metric_names | ({"loss"} if loader_key != "train" else set())
        expected = {f"{name}/{key}": v for key, v in alone.items()
                    if key.rsplit("/", 1)[0] in labelled and key.rsplit("/", 1)[1] in measured}
        assert expected
        assert_same(got, expected)
        logged = {k for k in got if k.startswith(f"{name}/")}
        assert logged == set(expected)  # nothing for the tasks the source does not label
    # the overall metrics are those of the whole mixture
    x, y = zip(*(mixed.sources[n][list(range(len(mixed.sources[n])))] for n in mixed.source_names))
    with torch.no_grad():
        small_flow.torch().train(loader_key == "train")
        metrics = small_flow.get_metrics()
        for xs, ys in zip(x, y):
            metrics.update(small_flow.torch()(xs), ys)
    assert_same(got, metrics.compute())


@pytest.mark.parametrize("loader_key", ["valid", "train"])
def test_per_source_losses_on_loaders_that_do_not_train(small_flow, fake_runner_cls, two_security_sources,
                                                        loader_key):
    mixed = two_security_sources(small_flow)
    runner = fake_runner_cls(small_flow)
    cb = FlowMetricsCallback()
    runner.start([cb])
    got = runner.run_loader([cb], loader_key, mixed.loader(batch_size=32))
    losses = {k for k in got if k.endswith("/loss") and k.split("/")[0] in mixed.source_names}
    if loader_key == "train":  # per-source losses cost a loss evaluation per source: not while training
        assert not losses
        return
    assert losses == {f"{name}/{p}/loss" for name in mixed.source_names for p in mixed.labelled_paths(name)}
    assert "door_cam/door_open/loss" in losses and "people/door_open/loss" not in losses
    # a task labelled by one source only: its loss there is the overall one (the same samples; float32
    # sums of up to 120 terms in another order, see assert_same)
    assert got["door_cam/door_open/loss"] == pytest.approx(got["door_open/loss"], rel=1e-5)
    path = "person_regression.face_regression.face_x1"
    assert got[f"people/{path}/loss"] == pytest.approx(got[f"{path}/loss"], rel=1e-5)


def test_a_plain_loader_logs_no_per_source_metrics(small_flow, small_data, fake_runner_cls, two_security_sources):
    ds = small_flow.get_dataset(*small_data)
    runner = fake_runner_cls(small_flow)
    cb = FlowMetricsCallback()
    runner.start([cb])
    got = runner.run_loader([cb], "valid", ds.loader(batch_size=50))
    assert all(k.split("/")[0] not in ("door_cam", "people") for k in got)
    mixed = two_security_sources(small_flow)
    cb = FlowMetricsCallback(per_source=False)
    runner.start([cb])
    got = runner.run_loader([cb], "valid", mixed.loader(batch_size=50))
    assert all(k.split("/")[0] not in mixed.source_names for k in got)


def test_a_mixed_loader_whose_batches_lack_the_source_is_named(small_flow, fake_runner_cls, two_security_sources):
    mixed = two_security_sources(small_flow)
    runner = fake_runner_cls(small_flow)
    cb = FlowMetricsCallback()
    runner.start([cb])

    class NoSource:
        dataset = mixed

        def __iter__(self):
            for x, y in mixed.loader(batch_size=40):
                del x["source"]
                yield x, y

    with pytest.raises(KeyError, match=r"loader 'valid' mixes sources \(\['door_cam', 'people'\]\).*X\['source'\]"):
        runner.run_loader([cb], "valid", NoSource())


_DDP_SOURCES_SCRIPT = """
import importlib.util, json, sys
import torch, torch.distributed as dist

def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

rank, world, init, out, tests = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
fakes = load("root_conftest", tests + "/conftest.py")
runners = load("callbacks_conftest", tests + "/callbacks/conftest.py")
from dnn_cool_catalyst.callbacks import FlowMetricsCallback
from dnn_cool_catalyst.story import security_tasks

if world > 1:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
torch.manual_seed(0)
flow = security_tasks(features=8).get_full_flow()
mixed = fakes.make_two_security_sources(flow)

runner = runners.FakeRunner(flow)
cb = FlowMetricsCallback()
runner.start([cb])
# under the process group each rank draws every world-th sample of the same epoch (120 samples: no padding)
got = runner.run_loader([cb], "valid", mixed.loader(batch_size=16, distributed=True))
json.dump({k: float(v) for k, v in got.items()}, open(out, "w"))
if world > 1:
    dist.destroy_process_group()
"""


def test_per_source_metrics_under_ddp_equal_one_process_on_the_whole_mixture(tmp_path):
    import json
    import pathlib
    import subprocess
    import sys

    tests = str(pathlib.Path(__file__).resolve().parents[1])
    init = f"file://{tmp_path / 'pg'}"

    def run(world):
        procs = [subprocess.Popen([sys.executable, "-c", _DDP_SOURCES_SCRIPT, str(r), str(world), init,
                                   str(tmp_path / f"w{world}_r{r}.json"), tests],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
        outs = [p.communicate(timeout=300) for p in procs]
        assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outs]
        return [json.loads((tmp_path / f"w{world}_r{r}.json").read_text()) for r in range(world)]

    (alone,) = run(1)
    ranks = run(2)
    per_source = {k for k in alone if k.split("/")[0] in ("door_cam", "people")}
    assert {k.split("/")[0] for k in per_source} == {"door_cam", "people"}
    for got in ranks:  # every process holds the global values
        assert set(got) == set(alone)
        for key in sorted(alone):
            # the same samples in other batches: float32 sums in another order (see assert_same);
            # decisions are counted exactly
            if math.isnan(alone[key]):
                assert math.isnan(got[key]), key
            else:
                assert got[key] == pytest.approx(alone[key], rel=1e-5, abs=1e-7), key


class ReducedInReplicas(SetThresholdAtLoaderEnd):
    """Leaves the batch's metric states in `runner.batch` as DataParallel memory balancing does."""

    def __init__(self, flow):
        self.flow = flow

    def on_loader_end(self, runner):
        pass

    def on_batch_end(self, runner):
        from dnn_cool_catalyst.callbacks.batch import METRIC_STATES, OUTPUTS, TARGETS

        metrics = self.flow.get_metrics()
        metrics.update(runner.batch[OUTPUTS], runner.batch[TARGETS])
        runner.batch[METRIC_STATES] = metrics.states()


def test_per_source_metrics_are_left_out_with_a_warning_when_replicas_reduced_the_states(small_flow, fake_runner_cls,
                                                                                        two_security_sources):
    mixed = two_security_sources(small_flow)
    runner = fake_runner_cls(small_flow)
    cb = FlowMetricsCallback(deferred_decoding=False, pr_curves=False)
    runner.start([cb])
    with pytest.warns(UserWarning, match=r"loader 'valid' mixes sources, but its metric states were reduced inside "
                                         r"DataParallel replicas"):
        got = runner.run_loader([ReducedInReplicas(small_flow), cb], "valid", mixed.loader(batch_size=32))
    assert "door_open/accuracy" in got and not any(k.split("/")[0] in mixed.source_names for k in got)
