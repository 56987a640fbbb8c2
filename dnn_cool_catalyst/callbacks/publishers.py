"""Publishers: how one input of a sample is shown in TensorBoard (images as images, text as text).

A publisher has `accepts(value) -> bool` and `publish(runner, tag, value)`. `InterpretationCallback`
picks one per input key (its `publishers` mapping, `None` to skip a key) and otherwise asks its
`default_publishers` in turn. Add your own by writing a class with those two methods.

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

    def publish(self, runner: Any, tag: str, value: Any) -> None:
        runner.log_image(tag=tag, image=self.to_hwc_uint8(value), scope="loader")


class TextPublisher:
    """Shows a string (or bytes, decoded as UTF-8) as text, in a code block so that it is shown verbatim."""

    def accepts(self, value: Any) -> bool:
        return isinstance(value, (str, bytes))

    def publish(self, runner: Any, tag: str, value: Any) -> None:
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        log_text(runner, tag, "```\n" + text.replace("```", "'''") + "\n```")


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
