"""Atomic writes of the files that the callbacks and the runner leave in a logdir.

Every file is written to a temporary file in the same directory and moved into place with
`os.replace`, so a reader (TensorBoard, a resumed run, a person) never sees half a file.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable, IO

import pandas as pd


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> str:
    """Call `write(fh)` on a temporary binary file beside `path`, then move it onto `path`."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any) -> str:
    """`obj` as indented JSON (plain JSON values only: NaN and infinities are refused)."""
    data = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False).encode("utf-8")
    return write_atomic(path, lambda fh: fh.write(data + b"\n"))


def read_json(path: str | os.PathLike) -> Any:
    """The JSON document at `path`; a malformed file is an error naming it."""
    path = os.fspath(path)
    with open(path, "r", encoding="utf-8") as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None


def write_csv(path: str | os.PathLike, frame: pd.DataFrame) -> str:
    """`frame` as CSV without its index."""
    data = frame.to_csv(index=False, lineterminator="\n").encode("utf-8")
    return write_atomic(path, lambda fh: fh.write(data))
