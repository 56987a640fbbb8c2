"""Deterministic synthetic "home-security camera" dataset.

The generator produces small RGB images of a room seen by a security camera
together with a hierarchical, partially annotated label table - the kind of data
a multi-task model with task preconditions is meant for:

* ``camera_blocked`` - the camera is covered (a nearly uniform dark image);
* ``door_open`` - only meaningful when the camera is not blocked;
* ``door_locked`` - only meaningful when the door is closed (a bright lock
  marker is drawn on locked doors);
* ``person_present`` - only meaningful when the door is open;
* face and body boxes, ``facial_characteristics`` (multilabel over
  :data:`FACIAL_CHARACTERISTICS`) and ``shirt_type`` (one of
  :data:`SHIRT_TYPES`) - only meaningful when a person is present.

Cells that do not apply are NaN.  On top of that every applicable annotation is
independently missing (NaN) with probability ``missing_rate``, parents included,
so some rows have e.g. ``camera_blocked`` missing while ``door_open`` is known.

Everything is drawn with numpy from per-sample seeds, so ``security(n, seed)``
is byte-for-byte reproducible and ``security(100, 0)`` is a prefix of
``security(200, 0)``.  Pillow is used only to write and read PNG files.

Of ``dnn_cool_catalyst`` this module imports only ``files`` (atomic writes of the
table and the images): no task, flow or Catalyst code.
"""

from __future__ import annotations

import numbers
import os
from typing import Iterable

import numpy as np
import pandas as pd

from .files import read_json, write_atomic, write_json

__all__ = ["security", "security_table", "load_images", "SHIRT_TYPES", "FACIAL_CHARACTERISTICS", "GENERATION_FILE"]

GENERATION_FILE = "generation.json"
"""Written last under ``root`` by :func:`security`: the parameters of the data the root holds."""

# Bumped whenever the drawing changes, so that data made by an older generator is not reused.
_GENERATOR_VERSION = 1

SHIRT_TYPES: tuple[str, ...] = (
    "t-shirt",
    "polo",
    "hoodie",
    "sweater",
    "tank-top",
    "dress-shirt",
    "jacket",
)
"""Names of the ``shirt_type`` classes; ``shirt_type == k`` means ``SHIRT_TYPES[k]``.

Each type is drawn as a distinct, saturated fill colour of the body box.
"""

FACIAL_CHARACTERISTICS: tuple[str, ...] = ("glasses", "beard", "hat")
"""Names of the ``facial_characteristics`` flags; index ``k`` in a label string means this tuple's ``[k]``.

Drawn inside the face box as: glasses = black band across the middle, beard =
dark-brown bottom band, hat = white top band.
"""

_COLUMNS = (
    "img",
    "camera_blocked",
    "door_open",
    "door_locked",
    "person_present",
    "face_x1",
    "face_y1",
    "face_w",
    "face_h",
    "body_x1",
    "body_y1",
    "body_w",
    "body_h",
    "facial_characteristics",
    "shirt_type",
)
_FLOAT_COLUMNS = _COLUMNS[1:13] + ("shirt_type",)

# Label distribution.
_P_BLOCKED = 0.20
_P_OPEN = 0.55  # given not blocked
_P_PERSON = 0.70  # given door open
_P_LOCKED = 0.50  # given door closed
_P_FACIAL = 0.40  # each flag independently

# Pixel noise added to every image: uniform integers in [-_NOISE, _NOISE].
_NOISE = 6

# Well separated, saturated colours (far from the greyish background and the door).
_SHIRT_COLORS = np.array(
    [
        (220, 30, 30),  # red
        (30, 170, 40),  # green
        (35, 60, 220),  # blue
        (235, 215, 30),  # yellow
        (190, 40, 200),  # magenta
        (30, 200, 210),  # cyan
        (245, 130, 20),  # orange
    ],
    dtype=np.int16,
)
_SKIN_LIGHT = np.array((235, 200, 170), dtype=np.float64)
_SKIN_DARK = np.array((160, 112, 80), dtype=np.float64)
_GLASSES_COLOR = np.array((12, 12, 12), dtype=np.int16)
_BEARD_COLOR = np.array((80, 40, 0), dtype=np.int16)
_HAT_COLOR = np.array((250, 250, 250), dtype=np.int16)
_FRAME_COLOR = np.array((95, 60, 35), dtype=np.int16)
_HANDLE_COLOR = np.array((45, 45, 45), dtype=np.int16)
_LOCK_COLOR = np.array((255, 235, 40), dtype=np.int16)

# Order of the annotation groups that can go missing (one uniform draw each).
_MASK_GROUPS = (
    ("camera_blocked",),
    ("door_open",),
    ("door_locked",),
    ("person_present",),
    ("face_x1", "face_y1", "face_w", "face_h"),
    ("body_x1", "body_y1", "body_w", "body_h"),
    ("facial_characteristics",),
    ("shirt_type",),
)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _validate(n, seed, image_size, missing_rate) -> tuple[int, int, int, float]:
    n = _check_int("n", n, 1)
    seed = _check_int("seed", seed, 0)
    image_size = _check_int("image_size", image_size, 32)
    if (
        isinstance(missing_rate, bool)
        or not isinstance(missing_rate, numbers.Real)
        or not 0.0 <= float(missing_rate) < 1.0
    ):
        raise ValueError(f"missing_rate must be a number in [0, 1), got {missing_rate!r}")
    return n, seed, image_size, float(missing_rate)


def _string_dtype():
    """pandas' default string dtype (NaN for missing) on pandas >= 3, plain ``object`` before."""
    dtype = pd.api.types.pandas_dtype("str")
    return dtype if isinstance(dtype, pd.StringDtype) else object


def _image_name(i: int) -> str:
    # Does not depend on n, so names are stable under the prefix property.
    return f"{i:06d}.png"


def _px(fraction: float, size: int, minimum: int = 1) -> int:
    return max(minimum, int(round(fraction * size)))


def _draw_sample(rng: np.random.Generator, s: int, canvas: np.ndarray) -> dict:
    """Draw one sample into ``canvas`` (int16, (s, s, 3)) and return its complete labels."""
    labels: dict = {}
    blocked = rng.random() < _P_BLOCKED
    labels["camera_blocked"] = float(blocked)
    if blocked:
        canvas[:] = rng.integers(5, 46, size=3)
        return labels

    # Room: a muted colour with a linear gradient.
    grey = rng.uniform(70.0, 160.0)
    tint = rng.uniform(-15.0, 15.0, size=3)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    amplitude = rng.uniform(0.0, 25.0)
    coords = (np.arange(s) + 0.5) / s - 0.5
    ramp = amplitude * 2.0 * (np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None])
    canvas[:] = np.rint(grey + tint[None, None, :] + ramp[:, :, None]).astype(np.int16)

    # Door on the right-hand side, with a frame.
    frame = _px(1 / 32, s)
    dx1 = _px(rng.uniform(0.55, 0.62), s)
    dw = _px(rng.uniform(0.24, 0.30), s)
    dy1 = _px(rng.uniform(0.10, 0.20), s)
    dy2 = s - _px(0.03, s)
    canvas[dy1 - frame : dy2, dx1 - frame : dx1 + dw + frame] = _FRAME_COLOR
    door_open = rng.random() < _P_OPEN
    labels["door_open"] = float(door_open)
    if door_open:
        canvas[dy1:dy2, dx1 : dx1 + dw] = rng.integers(15, 36, size=3)
    else:
        wood = np.array(
            (rng.integers(150, 181), rng.integers(100, 121), rng.integers(55, 76)), dtype=np.int16
        )
        canvas[dy1:dy2, dx1 : dx1 + dw] = wood
        knob = _px(0.045, s, 2)
        hx = dx1 + _px(0.04, s)
        hy = (dy1 + dy2) // 2
        canvas[hy : hy + knob, hx : hx + knob] = _HANDLE_COLOR
        locked = rng.random() < _P_LOCKED
        labels["door_locked"] = float(locked)
        if locked:
            lock = _px(0.065, s, 2)
            ly = hy - knob - lock
            canvas[ly : ly + lock, hx : hx + lock] = _LOCK_COLOR
        return labels

    person = rng.random() < _P_PERSON
    labels["person_present"] = float(person)
    if not person:
        return labels

    # Person in front of everything: a face box directly above a body box.
    bw = _px(rng.uniform(0.26, 0.40), s)
    bh = _px(rng.uniform(0.30, 0.50), s)
    fw = _px(rng.uniform(0.18, 0.26), s)
    fh = _px(rng.uniform(0.20, 0.30), s)
    gap = int(rng.integers(0, _px(0.03, s) + 1))
    fy1 = int(rng.integers(0, s - (fh + gap + bh) + 1))
    by1 = fy1 + fh + gap
    bx1 = int(rng.integers(0, s - bw + 1))
    centre = bx1 + bw / 2 + rng.uniform(-0.15, 0.15) * bw
    fx1 = int(np.clip(round(centre - fw / 2), 0, s - fw))

    shirt = int(rng.integers(0, len(SHIRT_TYPES)))
    canvas[by1 : by1 + bh, bx1 : bx1 + bw] = _SHIRT_COLORS[shirt]

    t = rng.random()
    skin = np.rint(t * _SKIN_LIGHT + (1 - t) * _SKIN_DARK).astype(np.int16)
    face = canvas[fy1 : fy1 + fh, fx1 : fx1 + fw]
    face[:] = skin
    flags = rng.random(len(FACIAL_CHARACTERISTICS)) < _P_FACIAL
    glasses, beard, hat = (bool(f) for f in flags)
    hat_end = max(1, int(round(0.25 * fh)))
    glasses_start = int(round(0.35 * fh))
    glasses_end = max(glasses_start + 1, int(round(0.55 * fh)))
    beard_start = int(round(0.65 * fh))
    if hat:
        face[:hat_end] = _HAT_COLOR
    if glasses:
        face[glasses_start:glasses_end] = _GLASSES_COLOR
    if beard:
        face[beard_start:] = _BEARD_COLOR

    labels.update(
        face_x1=float(fx1),
        face_y1=float(fy1),
        face_w=float(fw),
        face_h=float(fh),
        body_x1=float(bx1),
        body_y1=float(by1),
        body_w=float(bw),
        body_h=float(bh),
        facial_characteristics=",".join(str(k) for k, f in enumerate(flags) if f),
        shirt_type=float(shirt),
    )
    return labels


def _write_png(path: str, image: np.ndarray) -> None:
    from PIL import Image

    write_atomic(path, lambda fh: Image.fromarray(image, mode="RGB").save(fh, format="PNG"))


def security(
    n: int,
    seed: int = 0,
    root: str | os.PathLike | None = None,
    image_size: int = 64,
    missing_rate: float = 0.05,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Generate ``n`` synthetic home-security camera samples.

    Returns ``(df, images)``: ``images`` is a uint8 array of shape
    ``(n, image_size, image_size, 3)`` (HWC, RGB) and ``df`` has one row per image
    with the columns ``img, camera_blocked, door_open, door_locked, person_present,
    face_x1, face_y1, face_w, face_h, body_x1, body_y1, body_w, body_h,
    facial_characteristics, shirt_type``.

    * ``img`` is the file name (``"000123.png"``), never missing.
    * Binary labels are floats 0/1; a label whose precondition does not hold
      (``door_open`` for a blocked camera, ``door_locked`` for an open door,
      ``person_present`` for a closed door, person columns without a person) is NaN.
    * Boxes are ``(x1, y1, w, h)`` in pixels, integral-valued floats, fully inside
      the image; the face lies above the body.
    * ``facial_characteristics`` is a string of comma-separated indices into
      :data:`FACIAL_CHARACTERISTICS` (``"0,2"``; ``""`` for none) and
      ``shirt_type`` an index into :data:`SHIRT_TYPES` stored as float.
    * Each applicable annotation (a whole box counts as one) is independently
      missing (NaN) with probability ``missing_rate``.  Masking never fills a
      cell that does not apply, and images and underlying labels do not depend
      on ``missing_rate``: a higher rate only blanks more cells.

    Sample ``i`` is drawn from its own seed ``[seed, i]``, so results are
    reproducible and ``security(m, seed)`` is a prefix of ``security(n, seed)``
    for ``m <= n``.

    With ``root``, the directory is created if needed, every image is written as
    ``root/<img>`` (PNG) and the table as ``root/labels.csv``, each atomically
    (temporary file in the same directory, then :func:`os.replace`).  Missing
    cells are written as ``NaN`` so that ``""`` (no facial characteristic)
    survives; read the table back losslessly with
    ``pd.read_csv(path, keep_default_na=False, na_values=["NaN"])``.

    A root is always regenerated, never reused: data made with another seed or
    size under the same root is replaced.  The parameters are recorded in
    ``root/generation.json`` (:data:`GENERATION_FILE`), which is removed before
    the first file is written and written (fsynced) after the last, so it exists
    only while the root holds one complete generation with exactly those
    parameters; images a previous generation recorded beyond ``n`` are removed.
    :func:`security_table` reuses a root only when that record matches.

    Raises ``ValueError`` unless ``n >= 1`` and ``seed >= 0`` are integers,
    ``image_size >= 32`` is an integer and ``0 <= missing_rate < 1``.
    """
    n, seed, image_size, missing_rate = _validate(n, seed, image_size, missing_rate)
    s = image_size

    images = np.empty((n, s, s, 3), dtype=np.uint8)
    canvas = np.empty((s, s, 3), dtype=np.int16)
    numeric = np.full((n, len(_FLOAT_COLUMNS)), np.nan)
    col_index = {c: k for k, c in enumerate(_FLOAT_COLUMNS)}
    facial = np.full(n, np.nan, dtype=object)

    for i in range(n):
        rng = np.random.default_rng([seed, i])
        labels = _draw_sample(rng, s, canvas)
        canvas += rng.integers(-_NOISE, _NOISE + 1, size=canvas.shape, dtype=np.int16)
        np.clip(canvas, 0, 255, out=canvas)
        images[i] = canvas
        # Always drawn, whatever the rate, so that masks are monotone in missing_rate.
        drop = rng.random(len(_MASK_GROUPS)) < missing_rate
        for group, dropped in zip(_MASK_GROUPS, drop):
            if dropped:
                continue
            for col in group:
                if col in labels:
                    if col == "facial_characteristics":
                        facial[i] = labels[col]
                    else:
                        numeric[i, col_index[col]] = labels[col]

    string = _string_dtype()
    data = {"img": pd.array([_image_name(i) for i in range(n)], dtype=string)}
    for col in _COLUMNS[1:]:
        if col == "facial_characteristics":
            data[col] = pd.array(facial, dtype=string)
        else:
            data[col] = numeric[:, col_index[col]]
    df = pd.DataFrame(data, columns=list(_COLUMNS))

    if root is not None:
        _write_root(os.fspath(root), df, images, _parameters(n, seed, image_size, missing_rate))
    return df, images


def _parameters(n: int, seed: int, image_size: int, missing_rate: float) -> dict:
    return {"generator": _GENERATOR_VERSION, "n": n, "seed": seed, "image_size": image_size,
            "missing_rate": missing_rate}


def _recorded(root: str) -> dict | None:
    """The parameters recorded under ``root``, or None (no record, or one that cannot be read)."""
    try:
        record = read_json(os.path.join(root, GENERATION_FILE))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write_root(root: str, df: pd.DataFrame, images: np.ndarray, parameters: dict) -> None:
    os.makedirs(root, exist_ok=True)
    record = os.path.join(root, GENERATION_FILE)
    previous = _recorded(root)
    if os.path.exists(record):
        os.remove(record)  # from here until the end, the root holds no complete generation
    for name, image in zip(df["img"], images):
        _write_png(os.path.join(root, name), image)
    old_n = previous.get("n") if previous is not None else None
    if isinstance(old_n, int) and old_n > len(df):  # images only the previous, larger generation had
        for i in range(len(df), old_n):
            try:
                os.remove(os.path.join(root, _image_name(i)))
            except FileNotFoundError:
                pass
    csv_text = df.to_csv(index=False, na_rep="NaN", lineterminator="\n").encode("utf-8")
    write_atomic(os.path.join(root, "labels.csv"), lambda fh: fh.write(csv_text), fsync=True)
    write_json(record, parameters, fsync=True)


def security_table(
    root: str | os.PathLike,
    n: int,
    seed: int = 0,
    image_size: int = 64,
    missing_rate: float = 0.05,
) -> pd.DataFrame:
    """The table of ``security(n, seed, root=root, ...)``, read from ``root/labels.csv``.

    The data under ``root`` is reused only when ``root/generation.json`` records
    exactly these parameters; otherwise (absent, another seed, size or rate, or
    an interrupted generation, which leaves no record) the root is regenerated
    first.  The table is read as ``pd.read_csv(..., keep_default_na=False,
    na_values=["NaN"])``, the same whether it was generated now or before.
    """
    n, seed, image_size, missing_rate = _validate(n, seed, image_size, missing_rate)
    root = os.fspath(root)
    if _recorded(root) != _parameters(n, seed, image_size, missing_rate):
        security(n, seed=seed, root=root, image_size=image_size, missing_rate=missing_rate)
    return pd.read_csv(os.path.join(root, "labels.csv"), keep_default_na=False, na_values=["NaN"])


def load_images(root: str | os.PathLike, names: Iterable[str]) -> np.ndarray:
    """Read the PNG files ``root/<name>`` back into a uint8 array ``(len(names), H, W, 3)``.

    Images are converted to RGB and must all have the same size (``ValueError``
    otherwise).  A missing file raises ``FileNotFoundError`` naming its path.
    With no names, an empty ``(0, 0, 0, 3)`` array is returned.
    """
    from PIL import Image

    root = os.fspath(root)
    arrays = []
    for name in names:
        path = os.path.join(root, os.fspath(name))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file not found: {path!r}")
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        if arrays and arr.shape != arrays[0].shape:
            raise ValueError(
                f"image {path!r} has shape {arr.shape}, expected {arrays[0].shape} like the first image"
            )
        arrays.append(arr)
    if not arrays:
        return np.empty((0, 0, 0, 3), dtype=np.uint8)
    return np.stack(arrays)
