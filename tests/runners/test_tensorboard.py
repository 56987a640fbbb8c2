"""FlowTensorboardLogger writes text and PR curves that TensorBoard reads back per loader."""
import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util.tensor_util import make_ndarray

from dnn_cool_catalyst.runners import FlowTensorboardLogger


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
