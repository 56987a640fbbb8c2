"""Atomic file writes: every file the package leaves behind (tuned parameters, splits, logs,
generated images) goes to a temporary file in the same directory and is moved into place with
`os.replace`, so a reader (TensorBoard, a resumed run, a person) never sees half a file and an
interrupted write loses nothing already there.
"""
from __future__ import annotations

import json
import os
import uuid
from typing import IO, Any, Callable


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None], fsync: bool = False) -> str:
    """Call `write(fh)` on a temporary binary file beside `path`, then move it onto `path`.

    The temporary file is created with `open(..., "xb")` (the usual umask permissions, unlike
    `mkstemp`'s 0600) under a name unique to this process; `fsync=True` flushes it to disk first and the directory
    entry after the move (so that the new file, not an empty one, is there after a power loss).
    """
    path = os.fspath(path)
    directory, base = os.path.split(path)
    os.makedirs(directory or ".", exist_ok=True)
    tmp = os.path.join(directory, f".{base}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") as fh:
            write(fh)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if fsync:
            _fsync_directory(directory or ".")
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def _fsync_directory(directory: str) -> None:
    """Flush the directory entry of a renamed file (where the platform allows opening a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike, obj: Any, fsync: bool = False) -> str:
    """`obj` as indented JSON (plain JSON values only: NaN and infinities are refused)."""
    data = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False).encode("utf-8")
    return write_atomic(path, lambda fh: fh.write(data + b"\n"), fsync=fsync)


def read_json(path: str | os.PathLike) -> Any:
    """The JSON document at `path`; a malformed file is an error naming it."""
    path = os.fspath(path)
    with open(path, "r", encoding="utf-8") as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None


def write_csv(path: str | os.PathLike, frame) -> str:
    """A pandas DataFrame as CSV without its index."""
    data = frame.to_csv(index=False, lineterminator="\n").encode("utf-8")
    return write_atomic(path, lambda fh: fh.write(data))
