"""FlowTensorboardLogger writes text and PR curves that TensorBoard reads back per loader, the same
events tensorboardX writes, through tensorboardX's own event writer."""
import os

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util.tensor_util import make_ndarray

from dnn_cool_catalyst.runners import FlowTensorboardLogger
from dnn_cool_catalyst.runners.tensorboard import RunWriter, pr_curve_data


class _Runner:
    loader_key, epoch_step = "valid", 3


def test_text_and_pr_curves_per_loader_and_epoch(tmp_path):
    logger = FlowTensorboardLogger(logdir=str(tmp_path))
    logger.log_text("explanations/sample_0", "```\ntree\n```", runner=_Runner())
    logger.log_pr_curve("door_open/pr_curve", labels=np.array([1, 0, 1, 1]), scores=np.array([0.9, 0.2, 0.6, 0.4]),
                        runner=_Runner())
    logger.flush_log()
    logger.close_log()
    ea = EventAccumulator(str(tmp_path / "valid"), size_guidance={"tensors": 0})
    ea.Reload()
    assert {"explanations/sample_0/text_summary", "door_open/pr_curve"} <= set(ea.Tags()["tensors"])
    (event,) = ea.Tensors("door_open/pr_curve")
    assert event.step == 3
    curve = make_ndarray(event.tensor_proto)  # rows: tp, fp, tn, fn, precision, recall
    assert curve[0, 0] == 3 and curve[1, 0] == 1  # true positives and false positives at the lowest threshold
    (text,) = ea.Tensors("explanations/sample_0/text_summary")
    assert b"tree" in text.tensor_proto.string_val[0]


def test_scalar_tags_are_metric_keys_and_batch_values_are_marked(tmp_path):
    logger = FlowTensorboardLogger(logdir=str(tmp_path), log_batch_metrics=True)
    runner = type("R", (), {"loader_key": "train", "epoch_step": 2, "sample_step": 64})()
    logger.log_metrics({"loss": 0.5, "door_open/accuracy": 0.75}, scope="batch", runner=runner)
    logger.log_metrics({"loss": 0.4, "door_open/accuracy": 0.8}, scope="loader", runner=runner)
    logger.close_log()
    ea = EventAccumulator(str(tmp_path / "train"))
    ea.Reload()
    assert set(ea.Tags()["scalars"]) == {"loss", "door_open/accuracy", "loss/batch", "door_open/accuracy/batch"}
    assert [(e.step, e.value) for e in ea.Scalars("door_open/accuracy")] == [(2, 0.800000011920929)]  # float32
    assert [e.step for e in ea.Scalars("loss/batch")] == [64]


def _events(directory):
    """The events of the one event file in `directory` (checksums verified by TensorBoard's reader),
    without their wall time."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboardX.proto.event_pb2 import Event

    (name,) = [f for f in os.listdir(directory) if f.startswith("events.out.tfevents.")]
    out = []
    for raw in RawEventFileLoader(os.path.join(directory, name)).Load():
        event = Event.FromString(raw)
        event.ClearField("wall_time")
        out.append(event.SerializeToString())
    return out


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")  # tensorboardX on the NaN score
def test_the_same_events_as_tensorboardx_writes(tmp_path):
    from tensorboardX import SummaryWriter

    rng = np.random.default_rng(0)
    labels, scores = rng.random(500) > 0.5, rng.random(500)
    scores[:3] = [np.nan, 0.0, 1.0]
    metrics = {f"task_{i}/metric_{j}": float(rng.random()) for i in range(12) for j in range(4)}
    logger = FlowTensorboardLogger(logdir=str(tmp_path / "flow"))
    runner = _Runner()
    logger.log_metrics(metrics, scope="loader", runner=type("R", (), {"loader_key": "valid", "epoch_step": 3})())
    logger.log_text("explanations/sample_0", "```\n" + "tree " * 400 + "\n```", runner=runner)  # > 1 KiB
    logger.log_pr_curve("door_open/pr_curve", labels=labels, scores=scores, runner=runner)
    image = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    logger.log_image("shirt_type/confusion_matrix", image, runner=runner)
    logger.flush_log()  # everything is on disk at a flush, before close
    written = _events(tmp_path / "flow" / "valid")
    logger.close_log()

    reference = SummaryWriter(str(tmp_path / "tbx"))
    for key, value in metrics.items():
        reference.add_scalar(key, value, 3)  # `<path>/<metric>`, no /epoch
    reference.add_text("explanations/sample_0", "```\n" + "tree " * 400 + "\n```", global_step=3)
    reference.add_pr_curve("door_open/pr_curve", labels, np.clip(scores, 0, 1), global_step=3)
    reference.add_image("shirt_type/confusion_matrix", image, global_step=3, dataformats="HWC")
    reference.close()
    assert written == _events(tmp_path / "tbx")
    assert len(written) == 1 + len(metrics) + 3


def test_tensorboardx_checksums_with_the_native_crc32c():
    # The speed of the event files rests on this: tensorboardX 2.6.5 computes each record's CRC-32C
    # with the `crc32c` package when it imports (`tensorboardX.crc32c._crc32c_native`), else byte by
    # byte in Python. The private name is read here only, to fail if tensorboardX stops using it.
    import crc32c
    import tensorboardX.crc32c

    assert tensorboardX.crc32c._crc32c_native is crc32c.crc32c


def test_run_writer_scalars_are_add_scalar_events_and_a_closed_writer_opens_a_new_file(tmp_path):
    from tensorboardX import SummaryWriter

    values = {"loss": 0.25, "door_open/accuracy": np.float32(0.75), "n": 3}
    ours, reference = RunWriter(str(tmp_path / "ours")), SummaryWriter(str(tmp_path / "tbx"))
    ours.add_scalars(values, 5)
    for tag, value in values.items():
        reference.add_scalar(tag, value, 5)
    ours.close()
    reference.close()
    assert _events(tmp_path / "ours") == _events(tmp_path / "tbx")
    ours.add_scalars({"loss": 0.5}, 6)  # after close: a new event file, as tensorboardX's writers do
    ours.close()
    ea = EventAccumulator(str(tmp_path / "ours"))
    ea.Reload()
    # (tensorboardX names event files by the second: a file opened within the same second replaces the first)
    assert (6, 0.5) in [(e.step, e.value) for e in ea.Scalars("loss")]


def test_run_writer_flushes_every_flush_secs(tmp_path):
    writer = RunWriter(str(tmp_path), flush_secs=0)  # every event is due
    writer.add_scalars({"loss": 0.5}, 1)
    assert [e.step for e in _loaded(tmp_path)] == [0, 1]  # on disk before any flush or close
    writer.close()


def test_pr_curve_data_is_tensorboardx_curve():
    from tensorboardX.summary import compute_curve

    rng = np.random.default_rng(2)
    for n, thresholds in ((0, 127), (7, 2), (3000, 127), (70000, 50)):
        labels, scores = rng.random(n) > 0.3, rng.random(n)
        np.testing.assert_array_equal(pr_curve_data(labels, scores, thresholds),
                                      compute_curve(labels, scores, num_thresholds=thresholds))
    with_nan = np.array([0.2, np.nan, 0.9])
    np.testing.assert_array_equal(pr_curve_data([1, 0, 1], with_nan), pr_curve_data([1, 1], [0.2, 0.9]))


def _loaded(directory):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    (name,) = [f for f in os.listdir(directory) if f.startswith("events.out.tfevents.")]
    return list(EventFileLoader(os.path.join(str(directory), name)).Load())


def test_pending_events_are_written_at_exit_by_one_handler_for_all_writers(tmp_path):
    import subprocess
    import sys

    code = ("import atexit, sys\nfrom dnn_cool_catalyst.runners import FlowTensorboardLogger\n"
            "registered, register = [], atexit.register\n"
            "atexit.register = lambda f, *a, **k: (registered.append(f), register(f, *a, **k))[1]  # a spy\n"
            "logger = FlowTensorboardLogger(sys.argv[1])\n"
            "for loader in ('train', 'valid'):  # two event files, never flushed nor closed\n"
            "    runner = type('R', (), {'loader_key': loader, 'epoch_step': 7})()\n"
            "    logger.log_metrics({'loss': 0.5}, 'loader', runner)\n"
            "print([f.__qualname__ for f in registered])\n")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=120, capture_output=True,
                            text=True)
    assert result.stdout.split("\n")[-2] == "['_close_open_writers']"
    for loader in ("train", "valid"):
        ea = EventAccumulator(str(tmp_path / loader))
        ea.Reload()
        assert [(e.step, e.value) for e in ea.Scalars("loss")] == [(7, 0.5)]


def test_a_logger_closed_and_used_again_writes_new_event_files(tmp_path):
    class Runner:
        loader_key, epoch_step, num_epochs = None, 1, 1
        _valid_loader, _valid_metric, _minimize_valid_metric = "valid", "loss", True

    logger = FlowTensorboardLogger(logdir=str(tmp_path))
    for epoch in (1, 2):  # two runs with one logger, each closed at its end
        Runner.epoch_step = epoch
        logger.log_hparams({"run": epoch}, runner=Runner())
        logger.log_metrics({"_epoch_": {"lr": 0.1}, "valid": {"loss": 1.0 / epoch}}, scope="epoch", runner=Runner())
        logger.close_log()
    # (tensorboardX names event files by the second: a file opened within the same second replaces the first)
    for run, tag, value in (("_epoch_", "lr", 0.1), ("hparams", "best/valid/loss", 0.5)):
        ea = EventAccumulator(str(tmp_path / run))
        ea.Reload()
        assert (2, pytest.approx(value)) in [(e.step, e.value) for e in ea.Scalars(tag)]


def test_images_outside_a_loader_are_refused_with_the_tag(tmp_path):
    logger = FlowTensorboardLogger(logdir=str(tmp_path))
    runner = type("R", (), {"loader_key": None, "epoch_step": 1})()
    with pytest.raises(ValueError, match="shirt_type/confusion_matrix.*loader_key is None"):
        logger.log_image("shirt_type/confusion_matrix", np.zeros((2, 2, 3), dtype=np.uint8), runner=runner)
    logger.close_log()


def test_confusion_matrix_images_are_read_back_per_loader(tmp_path):
    import io

    from PIL import Image

    from dnn_cool_catalyst.callbacks import confusion_matrix_image, log_confusion_matrix

    class Runner(_Runner):
        def __init__(self, logger):
            self.loggers = {"tensorboard": logger}

        def log_image(self, tag, image, scope=None):  # as Catalyst's runner: every logger
            for lg in self.loggers.values():
                lg.log_image(tag=tag, image=image, runner=self, scope=scope)

    logger = FlowTensorboardLogger(logdir=str(tmp_path))
    matrix = np.array([[5, 1], [0, 7]])
    assert log_confusion_matrix(Runner(logger), "shirt_type/confusion_matrix", matrix, ["polo", "hoodie"])
    logger.flush_log()
    logger.close_log()
    ea = EventAccumulator(str(tmp_path / "valid"), size_guidance={"images": 0})
    ea.Reload()
    (event,) = ea.Images("shirt_type/confusion_matrix")
    expected = confusion_matrix_image(matrix, ["polo", "hoodie"])
    assert event.step == 3 and (event.height, event.width) == expected.shape[:2]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB")),
                                  expected)  # PNG: lossless


def _hparams_plugin(directory):
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    ea = EventAccumulator(str(directory))
    ea.Reload()
    return ea, {tag: HParamsPluginData.FromString(content) for tag, content in ea.PluginTagToContent("hparams").items()}


def test_hparams_reach_the_hparams_plugin_with_the_best_epoch(data, flow_and_model, loaders_for, tmp_path):
    from dnn_cool_catalyst.runners import FlowRunner

    flow, model = flow_and_model()
    runner = FlowRunner(flow, model=model)
    runner.train(loaders=loaders_for(flow, data, batch_size=16), num_epochs=3, logdir=str(tmp_path), lr=0.02,
                 hparams={"model": {"width": 8}, "note": "first try"})
    ea, plugin = _hparams_plugin(tmp_path / "tensorboard" / "hparams")
    assert set(plugin) == {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"}
    started = plugin["_hparams_/session_start_info"].session_start_info.hparams
    assert {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in started.items()} == {
        "flow": flow.name, "num_tasks": len(flow.graph.paths), "optimizer": "AdamW", "lr": 0.02, "batch_size": 16,
        "num_epochs": 3, "seed": 42, "valid_metric": "loss", "model/width": 8, "note": "first try"}
    tags = {m.name.tag for m in plugin["_hparams_/experiment"].experiment.metric_infos}
    assert tags == {"best/train/loss", "best/valid/loss", "best/epoch"}
    valid = [runner.experiment_metrics[e]["valid"]["loss"] for e in (1, 2, 3)]
    best = min(range(3), key=valid.__getitem__)
    assert [e.step for e in ea.Scalars("best/valid/loss")] == [1, 2, 3]
    assert ea.Scalars("best/valid/loss")[-1].value == pytest.approx(valid[best], rel=1e-6)  # float32 in the file
    assert ea.Scalars("best/epoch")[-1].value == best + 1


def test_hparams_name_the_valid_metric_and_the_last_epoch_without_one(tmp_path):
    logger = FlowTensorboardLogger(logdir=str(tmp_path / "a"))

    class Runner:
        loader_key, epoch_step, num_epochs = None, 1, 2
        _valid_loader, _valid_metric, _minimize_valid_metric = "valid", "t/f1_score", False

    logger.log_hparams({"width": 4}, runner=Runner())
    for epoch, score in ((1, 0.5), (2, 0.25)):
        Runner.epoch_step = epoch
        logger.log_metrics({"_epoch_": {}, "valid": {"loss": 1.0 / epoch, "t/f1_score": score}}, scope="epoch",
                           runner=Runner())
    logger.close_log()
    ea, plugin = _hparams_plugin(tmp_path / "a" / "hparams")
    assert {m.name.tag for m in plugin["_hparams_/experiment"].experiment.metric_infos} == {
        "best/valid/loss", "best/valid/t/f1_score", "best/epoch"}
    assert ea.Scalars("best/valid/t/f1_score")[-1].value == 0.5 and ea.Scalars("best/epoch")[-1].value == 1  # maximised

    Runner._valid_metric = None  # a runner that does not rank epochs
    logger = FlowTensorboardLogger(logdir=str(tmp_path / "b"))
    logger.log_hparams({}, runner=Runner())
    logger.log_metrics({"_epoch_": {}, "valid": {"loss": 0.5}}, scope="epoch", runner=Runner())
    logger.close_log()
    ea, _ = _hparams_plugin(tmp_path / "b" / "hparams")
    assert set(ea.Tags()["scalars"]) == {"final/valid/loss", "final/epoch"}
