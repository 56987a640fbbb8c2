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
