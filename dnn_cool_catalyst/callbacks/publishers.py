"""Publishers: how one input of a sample is shown in TensorBoard (images as images, text as text).

A publisher has `accepts(value) -> bool` and `publish(runner, tag, value)`. `InterpretationCallback`
picks one per input key (its `publishers` mapping, `None` to skip a key) and otherwise asks its
`default_publishers` in turn. Add your own by writing a class with those two methods. A publisher
whose `publish` takes a `caption` keyword gets the ranked sample's label, prediction and loss (and
its row and file) as text: `ImagePublisher` draws it in a strip below the image (`with_caption`;
TensorBoard images carry no caption), `TextPublisher` writes it above the text.

Images go through `runner.log_image` (every Catalyst logger that shows images); text, PR curves
and other kinds go to the loggers that have a `log_text` / `log_pr_curve` method, such as
`dnn_cool_catalyst.runners.FlowTensorboardLogger`. Confusion matrices are drawn as small images
here (`confusion_matrix_image`, with Pillow) and logged as images.
"""
from __future__ import annotations

import functools
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


# Confusion matrices ---------------------------------------------------------------------------------------------------

_WHITE = np.array([255.0, 255.0, 255.0])
_DARK = np.array([8.0, 48.0, 107.0])  # dark blue: the largest count


def confusion_matrix_colours(matrix: Any) -> np.ndarray:
    """`(C, C, 3)` uint8 cell colours of a confusion matrix: white for 0, dark blue for the largest
    count, linear in between (so a cell is darker exactly when its count is larger)."""
    m = np.asarray(matrix, dtype=np.float64)
    top = float(m.max()) if m.size else 0.0
    share = m / top if top > 0 else np.zeros_like(m)
    return np.rint(_WHITE + share[..., None] * (_DARK - _WHITE)).astype(np.uint8)


def _short(name: str, limit: int) -> str:
    return name if len(name) <= limit else name[: limit - 2] + ".."


@functools.lru_cache(maxsize=8192)
def _text_mask(text: str, rotated: bool = False) -> np.ndarray:
    """`(h, w)` uint8 coverage of `text` in Pillow's default font, drawn at the origin as
    `ImageDraw.text((0, 0), ...)` draws it (its bounding box's offset included); `rotated`: turned
    90 degrees counter-clockwise (reading upwards). Cached: a loader's confusion matrices repeat
    the same counts and class names, and rendering text is most of the cost of an image."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)
    canvas = Image.new("L", (max(right, 1), max(bottom, 1)), 0)
    ImageDraw.Draw(canvas).text((0, 0), text, fill=255, font=font)
    mask = np.asarray(canvas, dtype=np.uint8)
    mask = np.ascontiguousarray(np.rot90(mask) if rotated else mask)
    mask.setflags(write=False)
    return mask


@functools.lru_cache(maxsize=8192)
def _text_size(text: str):
    """`(width, height)` of `text`'s bounding box in Pillow's default font (cached, as `_text_mask`)."""
    from PIL import Image, ImageDraw, ImageFont

    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text,
                                                                              font=ImageFont.load_default())
    return right - left, bottom - top


def _stamp(img: np.ndarray, x: int, y: int, mask: np.ndarray, colour) -> None:
    """Blend `colour` into `img` (H, W, 3) uint8 at `(x, y)` with the coverage `mask` (clipped at the edges)."""
    h, w = mask.shape
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, img.shape[1]), min(y + h, img.shape[0])
    if x0 >= x1 or y0 >= y1:
        return
    alpha = mask[y0 - y:y1 - y, x0 - x:x1 - x, None].astype(np.float32) / 255.0
    region = img[y0:y1, x0:x1].astype(np.float32)
    img[y0:y1, x0:x1] = np.rint(region + alpha * (np.asarray(colour, dtype=np.float32) - region)).astype(np.uint8)


def confusion_matrix_image(matrix: Any, class_names: Optional[Sequence[str]] = None, max_labelled: int = 30,
                           cell: Optional[int] = None) -> np.ndarray:
    """A confusion matrix as an RGB image `(H, W, 3)` uint8, rows = truth, columns = prediction.

    Cells are coloured by `confusion_matrix_colours`. With at most `max_labelled` classes each cell
    shows its count and the classes are named along both axes (`class_names`, cut to 16
    characters, else their indices; truth on the left, predictions on top, the corner says which is
    which); the cells then take the bottom-right `C * cell` pixels, `cell` (default: wide enough for
    the largest count) pixels a side, a 1-pixel light grid at each cell's top and left. Larger
    matrices are drawn as colours only, a few pixels a cell, to keep the image small. Texts are
    drawn in Pillow's default font from cached coverage masks (`_text_mask`), so that a loader with
    hundreds of classification tasks draws its images in milliseconds.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"a confusion matrix is square (C, C), got shape {m.shape}")
    c = m.shape[0]
    colours = confusion_matrix_colours(m)
    if c == 0 or c > max_labelled:
        side = cell or max(1, min(8, 512 // max(c, 1)))
        img = np.repeat(np.repeat(colours, side, axis=0), side, axis=1)
        return img if c else np.full((1, 1, 3), 255, dtype=np.uint8)
    size = _text_size
    names = [_short(str(class_names[k]) if class_names is not None and k < len(class_names) else str(k), 16)
             for k in range(c)]
    counts = [[f"{v:.0f}" for v in row] for row in m.tolist()]
    text_h = max(size("0123456789Wg")[1], 1)
    side = cell or max(22, max(size(t)[0] for row in counts for t in row) + 8, text_h + 8)
    names_w = max(size(n)[0] for n in names)
    # the corner names the axes as a table's corner does: "prediction" at its top right, "truth" at its bottom left
    left = max(names_w, size("prediction")[0]) + 10
    top = max(names_w + 10, 2 * text_h + 12)
    img = np.full((top + c * side, left + c * side, 3), 255, dtype=np.uint8)
    block = np.repeat(np.repeat(colours, side, axis=0), side, axis=1)
    block[::side, :] = block[:, ::side] = 225  # light grid: each cell's top row and left column
    img[top:, left:] = block
    black, white = (0, 0, 0), (255, 255, 255)
    largest = float(m.max())
    for i in range(c):
        y = top + i * side
        w, _ = size(names[i])
        _stamp(img, left - 5 - w, y + (side - text_h) // 2, _text_mask(names[i]), black)  # truth
        # predictions: names read upwards above their columns (drawn 1 pixel in, then turned)
        label = _text_mask(names[i], rotated=True)
        _stamp(img, left + i * side + (side - (text_h + 4)) // 2, top - 5 - (w + 2) + 1, label, black)
        for j in range(c):
            w, _ = size(counts[i][j])
            dark = largest > 0 and m[i, j] / largest > 0.5
            _stamp(img, left + j * side + (side - w) // 2 + 1, y + (side - text_h) // 2, _text_mask(counts[i][j]),
                   white if dark else black)
    grey = (110, 110, 110)
    _stamp(img, left - 5 - size("prediction")[0], 2, _text_mask("prediction"), grey)
    _stamp(img, 3, top - text_h - 6, _text_mask("truth"), grey)
    return img


def log_confusion_matrix(runner: Any, tag: str, matrix: Any, class_names: Optional[Sequence[str]] = None) -> bool:
    """Send `confusion_matrix_image(matrix, class_names)` through `runner.log_image` (the loggers
    that show images); drawn only when the runner has loggers. Returns whether it was drawn."""
    if not (getattr(runner, "loggers", None) or {}):
        return False
    runner.log_image(tag=tag, image=confusion_matrix_image(matrix, class_names), scope="loader")
    return True


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


__all__ = ["ImagePublisher", "TensorSummaryPublisher", "TextPublisher", "confusion_matrix_colours",
           "confusion_matrix_image", "default_publishers", "log_confusion_matrix", "log_pr_curve", "log_text"]
