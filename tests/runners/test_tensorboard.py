"""FlowTensorboardLogger writes text and PR curves that TensorBoard reads back per loader, the same
events tensorboardX writes, with checksums computed in one pass."""
import os

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util.tensor_util import make_ndarray

from dnn_cool_catalyst.runners import FlowTensorboardLogger
from dnn_cool_catalyst.runners.tensorboard import masked_crc32c, pr_curve_data


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
    logger.flush_log()  # everything is on disk at a flush, before close
    written = _events(tmp_path / "flow" / "valid")
    logger.close_log()

    reference = SummaryWriter(str(tmp_path / "tbx"))
    for key, value in metrics.items():
        reference.add_scalar(key, value, 3)  # `<path>/<metric>`, no /epoch
    reference.add_text("explanations/sample_0", "```\n" + "tree " * 400 + "\n```", global_step=3)
    reference.add_pr_curve("door_open/pr_curve", labels, np.clip(scores, 0, 1), global_step=3)
    reference.close()
    assert written == _events(tmp_path / "tbx")
    assert len(written) == 1 + len(metrics) + 2


def test_vectorised_checksums_match_tensorboardx():
    from tensorboardX.record_writer import masked_crc32c as reference

    rng = np.random.default_rng(1)
    lengths = [0, 1, 3, 4, 5, 8, 42, 1023, 1024, 1025, 2048, 3000, 9000]
    messages = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in lengths] + [b"\x00" * 2000, b"\xff" * 1500]
    assert masked_crc32c(messages) == [reference(m) for m in messages]


def test_pr_curve_data_is_tensorboardx_curve():
    from tensorboardX.summary import compute_curve

    rng = np.random.default_rng(2)
    for n, thresholds in ((0, 127), (7, 2), (3000, 127), (70000, 50)):
        labels, scores = rng.random(n) > 0.3, rng.random(n)
        np.testing.assert_array_equal(pr_curve_data(labels, scores, thresholds),
                                      compute_curve(labels, scores, num_thresholds=thresholds))
    with_nan = np.array([0.2, np.nan, 0.9])
    np.testing.assert_array_equal(pr_curve_data([1, 0, 1], with_nan), pr_curve_data([1, 1], [0.2, 0.9]))


def test_pending_events_are_written_at_exit(tmp_path):
    import subprocess
    import sys

    code = ("import sys\nfrom tensorboardX.proto.event_pb2 import Event\n"
            "from dnn_cool_catalyst.runners.tensorboard import EventFile\n"
            "EventFile(sys.argv[1]).add_event(Event(step=7))  # never flushed nor closed\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=120)
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    (name,) = os.listdir(tmp_path)
    assert [e.step for e in EventFileLoader(str(tmp_path / name)).Load()] == [0, 7]


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
