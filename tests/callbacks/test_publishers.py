"""Publishers: which values they take and what they send to which loggers."""
import numpy as np
import pytest
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


def test_confusion_matrix_image_cells_darken_with_their_counts():
    from dnn_cool_catalyst.callbacks.publishers import confusion_matrix_colours, confusion_matrix_image

    matrix = np.array([[50, 3, 0], [4, 120, 7], [0, 12, 33]])
    img = confusion_matrix_image(matrix, ["hoodie", "dress-shirt", "t-shirt"], cell=30)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert img.shape[0] > 3 * 30 and img.shape[1] > 3 * 30  # the cells plus room for the names
    assert max(img.shape) < 400  # a small image
    # the cells are the bottom-right 3 x 30 pixels a side; a pixel near each cell's top-left corner
    # (inside the 1-pixel grid, away from the centred count) has the cell's colour
    top, left = img.shape[0] - 90, img.shape[1] - 90
    corner = np.array([[img[top + 30 * i + 3, left + 30 * j + 3] for j in range(3)] for i in range(3)])
    np.testing.assert_array_equal(corner, confusion_matrix_colours(matrix))
    brightness = corner.astype(int).sum(-1).reshape(-1)
    order = np.argsort(matrix.reshape(-1), kind="stable")
    assert (np.diff(brightness[order]) <= 0).all()  # larger count, darker cell
    assert brightness[matrix.reshape(-1).argmax()] < brightness[matrix.reshape(-1).argmin()]
    assert tuple(corner[0, 2]) == (255, 255, 255)  # a zero is white
    # each count is written in its cell: the cell is not one flat colour, dark cells in light text
    for i, j in [(0, 0), (1, 1), (0, 2)]:
        cell = img[top + 30 * i + 1:top + 30 * (i + 1), left + 30 * j + 1:left + 30 * (j + 1)].astype(int).sum(-1)
        assert cell.min() < cell.max()
    dark = img[top + 31:top + 60, left + 31:left + 60].astype(int).sum(-1)
    assert dark.max() > 600  # "120" in white on dark blue
    # the names are written left of and above the cells
    assert img[top:, :left].min() < 128 and img[:top, left:].min() < 128


def test_confusion_matrix_image_of_many_classes_is_colours_only():
    from dnn_cool_catalyst.callbacks.publishers import confusion_matrix_colours, confusion_matrix_image

    matrix = np.arange(64 * 64).reshape(64, 64)
    img = confusion_matrix_image(matrix)
    assert img.shape == (64 * 8, 64 * 8, 3)
    np.testing.assert_array_equal(img[::8, ::8], confusion_matrix_colours(matrix))
    assert confusion_matrix_image(np.zeros((0, 0))).shape == (1, 1, 3)
    with pytest.raises(ValueError, match="square"):
        confusion_matrix_image(np.zeros((2, 3)))
