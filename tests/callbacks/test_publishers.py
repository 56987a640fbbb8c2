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


class _ImageRunner(_Runner):
    def __init__(self):
        super().__init__()
        self.images = []

    def log_image(self, tag, image, scope=None):
        self.images.append((tag, image))


def test_captions_go_below_images_and_above_text():
    from dnn_cool_catalyst.callbacks.publishers import with_caption

    runner = _ImageRunner()
    image = np.full((3, 32, 48), 0.5, np.float32)
    ImagePublisher().publish(runner, "plain", image)
    ImagePublisher().publish(runner, "captioned", image, caption="label: polo\nprediction: tee (0.7)\nloss: 1.2")
    (_, plain), (_, captioned) = runner.images
    assert plain.shape == (32, 48, 3)
    strip = captioned[32:]
    assert captioned.shape[0] > 32 and captioned.shape[1] >= 48  # wider when the text is wider than the image
    np.testing.assert_array_equal(captioned[:32, :48], plain)
    assert strip.any() and (strip.max(axis=(1, 2)) > 0).sum() > 12  # text drawn on several rows of the strip
    # one text line per caption line: three lines make a taller strip than one
    assert with_caption(plain, "a\nb\nc").shape[0] > with_caption(plain, "a").shape[0] > 32
    assert with_caption(plain, "label: \u2713 caf\u00e9").shape[0] > 32  # any character: no error
    TextPublisher().publish(runner, "t", "body", caption="label: 1\nloss: 2")
    assert runner.loggers["with_text"].calls[-1] == ("text", "t", "label: 1  \nloss: 2  \n\n```\nbody\n```")


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
