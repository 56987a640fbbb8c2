"""Publishers: which values they take and what they send to which loggers."""
import numpy as np
import torch

from dnn_cool_catalyst.callbacks import ImagePublisher, TensorSummaryPublisher, TextPublisher, log_pr_curve, log_text


class _Logger:
    def __init__(self):
        self.calls = []

    def log_text(self, tag, text, runner):
        self.calls.append(("text", tag, text))


class _Runner:
    def __init__(self):
        self.loggers = {"with_text": _Logger(), "plain": object()}


def test_publishers_accept_what_they_can_show():
    image = ImagePublisher()
    assert image.accepts(np.zeros((3, 16, 16), np.float32)) and image.accepts(torch.zeros(16, 16, 1))
    assert not image.accepts(np.zeros(256)) and not image.accepts(np.zeros((3, 4, 4))) and not image.accepts("x")
    hwc = image.to_hwc_uint8(torch.linspace(-1, 1, 16 * 16).reshape(1, 16, 16))
    assert hwc.shape == (16, 16, 3) and hwc.min() == 0 and hwc.max() == 255
    assert image.to_hwc_uint8(np.full((8, 8, 3), 0.5, np.float32)).max() == 128
    assert TextPublisher().accepts("a") and TextPublisher().accepts(b"a") and not TextPublisher().accepts(np.zeros(3))


def test_text_goes_only_to_loggers_that_take_it():
    runner = _Runner()
    assert log_text(runner, "a/b", "hello") == 1
    assert log_pr_curve(runner, "a/pr", np.array([1]), np.array([0.5])) == 0
    TextPublisher().publish(runner, "t", b"x```y")
    TensorSummaryPublisher(max_values=2).publish(runner, "s", torch.arange(5))
    calls = runner.loggers["with_text"].calls
    assert calls[0] == ("text", "a/b", "hello")
    assert calls[1] == ("text", "t", "```\nx\'\'\'y\n```")
    assert calls[2][2].startswith("`int64[5]`: [0 1]") and calls[2][2].endswith("...")
