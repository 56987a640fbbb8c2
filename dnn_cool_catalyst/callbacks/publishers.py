"""Publishers: how one input of a sample is shown in TensorBoard (images as images, text as text).

A publisher has `accepts(value) -> bool` and `publish(runner, tag, value)`. `InterpretationCallback`
picks one per input key (its `publishers` mapping, `None` to skip a key) and otherwise asks its
`default_publishers` in turn. Add your own by writing a class with those two methods. A publisher
whose `publish` takes a `caption` keyword gets the ranked sample's label, prediction and loss (and
its row and file) as text: `ImagePublisher` draws it in a strip below the image (`with_caption`;
TensorBoard images carry no caption), `TextPublisher` writes it above the text.

Images go through `runner.log_image` (every Catalyst logger that shows images); text, PR curves
and other kinds go to the loggers that have a `log_text` / `log_pr_curve` method, such as
`dnn_cool_catalyst.runners.FlowTensorboardLogger`.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
from torch import Tensor


def log_text(runner: Any, tag: str, text: str) -> int:
    """Send markdown `text` to every logger of `runner` that has `log_text`; returns how many took it."""
    n = 0
    for logger in (getattr(runner, "loggers", None) or {}).values():
        fn = getattr(logger, "log_text", None)
        if callable(fn):
            fn(tag=tag, text=text, runner=runner)
            n += 1
    return n


def log_pr_curve(runner: Any, tag: str, labels: np.ndarray, scores: np.ndarray) -> int:
    """Send a precision-recall curve (0/1 `labels`, `scores` in [0, 1]) to the loggers that have
    `log_pr_curve`; returns how many took it."""
    n = 0
    for logger in (getattr(runner, "loggers", None) or {}).values():
        fn = getattr(logger, "log_pr_curve", None)
        if callable(fn):
            fn(tag=tag, labels=labels, scores=scores, runner=runner)
            n += 1
    return n


def _as_numpy(value: Any) -> Optional[np.ndarray]:
    if isinstance(value, Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    return None


class ImagePublisher:
    """Shows an image: `(C, H, W)` or `(H, W, C)` with 1, 3 or 4 channels, or a `(H, W)` uint8 array.

    Floats in [0, 1] are scaled by 255; other float ranges are min-max normalised.
    `min_size` keeps small feature maps from being taken for images by type.
    """

    def __init__(self, min_size: int = 8):
        self.min_size = int(min_size)

    def accepts(self, value: Any) -> bool:
        arr = _as_numpy(value)
        if arr is None or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            return False
        return self._layout(arr) is not None

    def _layout(self, arr: np.ndarray) -> Optional[str]:
        if arr.ndim == 2 and arr.dtype == np.uint8 and min(arr.shape) >= self.min_size:
            return "HW"
        if arr.ndim == 3:
            if arr.shape[0] in (1, 3, 4) and min(arr.shape[1:]) >= self.min_size:
                return "CHW"
            if arr.shape[-1] in (1, 3, 4) and min(arr.shape[:2]) >= self.min_size:
                return "HWC"
        return None

    def to_hwc_uint8(self, value: Any) -> np.ndarray:
        """The image as a `(H, W, 3)` uint8 array."""
        arr = _as_numpy(value)
        layout = self._layout(arr) if arr is not None else None
        if layout is None:
            raise ValueError(f"ImagePublisher: not an image: {type(value).__name__} "
                             f"{getattr(value, 'shape', '')}")
        if layout == "HW":
            arr = arr[..., None]
        elif layout == "CHW":
            arr = np.moveaxis(arr, 0, -1)
        if arr.shape[-1] == 4:
            arr = arr[..., :3]
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        if arr.dtype != np.uint8:
            arr = arr.astype(np.float64)
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            if lo < 0.0 or hi > 1.0:
                arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
            arr = np.clip(np.nan_to_num(arr) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(arr)

    def publish(self, runner: Any, tag: str, value: Any, caption: Optional[str] = None) -> None:
        """Log the image; a `caption` (TensorBoard images carry none) is drawn in a strip below it."""
        image = self.to_hwc_uint8(value)
        runner.log_image(tag=tag, image=with_caption(image, caption) if caption else image, scope="loader")


def with_caption(image: np.ndarray, caption: str, margin: int = 2) -> np.ndarray:
    """`image` (H, W, 3) uint8 with `caption` drawn below it in a black strip, one text line per
    caption line (Pillow's default font); the result is as wide as the wider of the image and the
    text, the image at the top left."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    lines = caption.splitlines() or [""]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def drawable(line: str) -> str:
        try:  # the bitmap font (Pillow without FreeType) knows Latin-1 only
            probe.textbbox((0, 0), line, font=font)
            return line
        except UnicodeError:
            return line.encode("latin-1", "replace").decode("latin-1")

    lines = [drawable(line) for line in lines]
    boxes = [probe.textbbox((0, 0), line or " ", font=font) for line in lines]
    line_height = max([probe.textbbox((0, 0), "Ag|", font=font)[3]] + [b[3] for b in boxes]) + margin
    h, w = image.shape[:2]
    width = max(w, max(b[2] for b in boxes) + 2 * margin)
    canvas = Image.new("RGB", (width, h + line_height * len(lines) + margin), (0, 0, 0))
    canvas.paste(Image.fromarray(np.ascontiguousarray(image[..., :3])), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for j, line in enumerate(lines):
        draw.text((margin, h + margin + j * line_height), line, fill=(255, 255, 255), font=font)
    return np.asarray(canvas, dtype=np.uint8)


class TextPublisher:
    """Shows a string (or bytes, decoded as UTF-8) as text, in a code block so that it is shown verbatim."""

    def accepts(self, value: Any) -> bool:
        return isinstance(value, (str, bytes))

    def publish(self, runner: Any, tag: str, value: Any, caption: Optional[str] = None) -> None:
        """Log the text; a `caption` goes above it, one line per caption line."""
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        above = "".join(f"{line}  \n" for line in caption.splitlines()) + "\n" if caption else ""
        log_text(runner, tag, above + "```\n" + text.replace("```", "'''") + "\n```")


class TensorSummaryPublisher:
    """Shows any tensor or array as a short text (shape, dtype, a few values); not a default."""

    def __init__(self, max_values: int = 16):
        self.max_values = int(max_values)

    def accepts(self, value: Any) -> bool:
        return _as_numpy(value) is not None

    def publish(self, runner: Any, tag: str, value: Any) -> None:
        arr = _as_numpy(value)
        flat = np.asarray(arr).reshape(-1)[: self.max_values]
        more = " ..." if arr.size > self.max_values else ""
        log_text(runner, tag, f"`{arr.dtype}{list(arr.shape)}`: {np.array2string(flat, precision=4)}{more}")


def default_publishers() -> Sequence[Any]:
    """The publishers tried by type when no publisher is given for an input key."""
    return (ImagePublisher(), TextPublisher())


__all__ = ["ImagePublisher", "TensorSummaryPublisher", "TextPublisher", "default_publishers", "log_pr_curve", "log_text"]
