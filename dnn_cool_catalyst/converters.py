"""DataFrame columns -> inputs, labels and tasks: type guessing, value conversion, default tasks.

Every column used by a `Project` gets a `Column`: its *kind* (one of `KINDS`, guessed by
`guess_kind` or told) and what conversion learnt from the data (class names, scale, image root).
A value converter turns the column into an array in the task's label format (missing marker NaN,
or -1 for categories); a task factory builds the task, with a head from a head factory.
`Converters` overrides any of these per column or per kind::

    Converters(types={"shirt_type": "category"},             # a float index column with NaN
               class_names={"shirt_type": SHIRT_TYPES},       # fixes the number of classes
               scales={"face_x1": 64.0},                      # labels = pixels / 64
               heads={"category": lambda name, n_in, n_out: nn.Sequential(nn.Dropout(0.2), nn.Linear(n_in, n_out))})

All conversion errors are `TableError`s naming the column and the row (the DataFrame's index label).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from .errors import capped, did_you_mean
from .tasks import BinaryClassificationTask, BoundedRegressionTask, ClassificationTask, ITask, MultilabelClassificationTask

KINDS = ("binary", "continuous", "category", "multilabel", "image", "text")
NUMERIC_KINDS = ("binary", "continuous", "category")  # input columns a Project can stack into x.features
DEFAULT_IN_FEATURES = 256  # the heads' input width when it cannot come from the data (a backbone's features)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

ValueConverter = Callable[[pd.Series, "Column"], Any]
TaskFactory = Callable[["Column", nn.Module], ITask]
HeadFactory = Callable[[str, int, int], nn.Module]


class TableError(ValueError):
    """The DataFrame does not fit: an unknown column, a value that does not fit its column's kind
    (named by column and row), a column with every value missing, or a split file that belongs to
    another table."""


@dataclass(frozen=True)
class Column:
    """What a project knows about one column: its kind and what conversion learnt from the data.

    `role` is "input" or "output". `class_names` (category, multilabel) fixes the number of
    classes; `scale` (continuous outputs) is what labels are divided by to lie in [0, 1] and what
    `BoundedRegressionTask` multiplies by when decoding; `root` (image) is the directory file
    names are relative to.
    """

    name: str
    kind: str
    role: str = "output"
    class_names: Optional[Tuple[str, ...]] = None
    scale: Optional[float] = None
    root: Optional[str] = None

    @property
    def n_outputs(self) -> int:
        """Width of the head's output: 1 for binary/continuous, the class count otherwise."""
        return len(self.class_names) if self.class_names is not None else 1


# Guessing ---------------------------------------------------------------------------------------

_INDEX_LIST = re.compile(r"^\s*(\d+\s*(,\s*\d+\s*)*)?$")


def guess_kind(series: pd.Series, max_categories: int = 50) -> str:
    """The kind of a column from its non-missing values.

    bool, or numbers that are all 0/1 -> binary; integers in [0, max_categories) -> category;
    other numbers -> continuous (a float column of whole numbers, such as pixel coordinates or a
    class index stored as float because of NaN, stays continuous unless told otherwise);
    a pandas categorical -> category; strings ending in an image extension -> image; strings of
    comma-separated class indices ("0,2"), when some value is empty or has a comma -> multilabel;
    other strings -> category if at most `max_categories` distinct values, else text;
    lists/tuples/sets of indices -> multilabel.

    A numeric column that is *almost binary* is refused (a `TableError` naming the column and the
    stray rows) instead of being guessed: one stray value would silently turn a binary task into a
    bounded regression (a float 3.0) or a 3-class category (an integer 2). Almost binary means:
    both 0 and 1 occur, the column has at least `ALMOST_BINARY_MIN_VALUES` (10) non-missing values,
    and the values outside {0, 1} (NaN is missing and does not count; -1 or inf do) are at least
    one and at most 1% of them (`ALMOST_BINARY_FRACTION`, but one stray value is always allowed,
    so 0/1 make up at least 90%) and at most `ALMOST_BINARY_MAX_ROWS` (100) rows. A column with
    more such values (a rare third class, counts 0..5) is guessed as before. Fix the values or name
    the kind in `Converters.types`, which skips guessing.
    """
    if isinstance(series.dtype, pd.CategoricalDtype):
        return "category"
    values = series.dropna()
    if len(values) == 0:
        raise TableError(f"column {series.name!r}: every value is missing; cannot guess its kind")
    if pd.api.types.is_bool_dtype(series.dtype):
        return "binary"
    if pd.api.types.is_numeric_dtype(series.dtype):
        arr = values.to_numpy(dtype=np.float64)
        if np.isin(arr, (0.0, 1.0)).all():
            return "binary"
        guess = "category" if pd.api.types.is_integer_dtype(series.dtype) and arr.min() >= 0 \
            and arr.max() < max_categories else "continuous"
        _refuse_almost_binary(values, arr, guess)
        return guess
    items = values.tolist()
    if all(isinstance(v, (bool, np.bool_)) for v in items):
        return "binary"
    if all(isinstance(v, str) for v in items):
        if all(v.lower().endswith(IMAGE_EXTENSIONS) for v in items):
            return "image"
        if all(_INDEX_LIST.match(v) for v in items) and any("," in v or not v.strip() for v in items):
            return "multilabel"
        return "category" if values.nunique() <= max_categories else "text"
    if all(isinstance(v, (list, tuple, set, frozenset, np.ndarray)) for v in items):
        return "multilabel"
    raise TableError(f"column {series.name!r}: cannot guess its kind from values such as {items[0]!r} "
                     f"({type(items[0]).__name__}); name it in Converters(types={{{series.name!r}: ...}}), one of {KINDS}")


ALMOST_BINARY_FRACTION = 0.01  # at most this share of a 0/1 column's values may be strays ...
ALMOST_BINARY_MAX_ROWS = 100  # ... and at most this many rows (more is a real class or real values)
ALMOST_BINARY_MIN_VALUES = 10  # below this, one stray value is 10% of the column: not "a few"


def _refuse_almost_binary(values: pd.Series, arr: np.ndarray, guess: str) -> None:
    """Raise when the non-missing numeric `values` (as float64 `arr`) are almost binary (see
    `guess_kind`): all but a few in {0, 1}. `guess` is the kind they would be guessed otherwise."""
    n = len(arr)
    stray = ~np.isin(arr, (0.0, 1.0))
    k = int(stray.sum())
    allowed = min(ALMOST_BINARY_MAX_ROWS, max(1, int(ALMOST_BINARY_FRACTION * n)))
    if n < ALMOST_BINARY_MIN_VALUES or not 1 <= k <= allowed or not ((arr == 0).any() and (arr == 1).any()):
        return
    name = values.name
    raise TableError(
        f"column {name!r} is almost binary: {k} of the {n} values {'is' if k == 1 else 'are'} not 0 or 1: "
        f"{_list_rows(values, np.flatnonzero(stray))}. A guess would make it {guess!r} instead of 'binary' "
        f"because of them. Fix those values (NaN marks a missing value), or name its kind: "
        f"Converters(types={{{name!r}: 'binary'}}) (or 'category' / 'continuous' if the values are right)")


# Value conversion -------------------------------------------------------------------------------

MAX_LISTED_ROWS = 10  # error messages list this many rows, then "and N more"


def _list_rows(series: pd.Series, positions: Sequence[int], k: int = MAX_LISTED_ROWS) -> str:
    """"row 'a' (3.0), row 'c' (2.0) and 240 more": the rows (by index label) at `positions`."""
    shown = [f"row {_plain(series.index[p])!r} ({_plain(series.iloc[p])!r})" for p in positions[:k]]
    return capped(shown + list(positions[k:]), k, quote=False)  # the rest are counted, not formatted


def _row_error(series: pd.Series, bad: np.ndarray, what: str) -> TableError:
    positions = np.flatnonzero(bad)
    pos = int(positions[0])
    more = f": {_list_rows(series, positions)}" if len(positions) > 1 else ""
    return TableError(f"column {series.name!r}, row {_plain(series.index[pos])!r}: {_plain(series.iloc[pos])!r} {what}"
                      f" ({len(positions)} such row(s){more})")


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _numbers(series: pd.Series, column: "Column") -> np.ndarray:
    """float64 values, NaN where missing; a value that is not a number, or is infinite, is an error
    (an inf would make a guessed scale inf and every other label 0)."""
    if pd.api.types.is_numeric_dtype(series.dtype) and not isinstance(series.dtype, pd.CategoricalDtype):
        arr = series.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        arr = pd.to_numeric(series.astype(object), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        bad = np.isnan(arr) & ~series.isna().to_numpy()
        if bad.any():
            raise _row_error(series, bad, f"is not a number (column kind {column.kind!r})")
    infinite = np.isinf(arr)
    if infinite.any():
        raise _row_error(series, infinite, f"is not a finite number (column kind {column.kind!r}); replace it "
                                           f"with a finite value, or with NaN where the value is unknown")
    return arr


def to_binary(series: pd.Series, column: "Column") -> np.ndarray:
    """float32 (N,): 0/1, NaN where missing."""
    arr = _numbers(series, column)
    bad = ~(np.isnan(arr) | (arr == 0) | (arr == 1))
    if bad.any():
        raise _row_error(series, bad, "is not a binary value (0, 1, True, False or missing)")
    return arr.astype(np.float32)


def to_continuous(series: pd.Series, column: "Column") -> np.ndarray:
    """float32 (N,): value / scale in [0, 1] for outputs (raw values for inputs), NaN where missing."""
    arr = _numbers(series, column)
    if column.scale is None:
        return arr.astype(np.float32)
    bad = (arr < 0) | (arr > column.scale)
    if bad.any():
        raise _row_error(series, bad, f"is outside [0, {column.scale:g}] (bounded regression divides by "
                                      f"scale={column.scale:g}; set Converters(scales=...) or shift the column)")
    return (arr / column.scale).astype(np.float32)


def to_category(series: pd.Series, column: "Column") -> np.ndarray:
    """int64 (N,): class indices, -1 where missing. Numeric columns hold indices (-1 or NaN is
    missing); other columns hold class names (looked up in `column.class_names`)."""
    n = column.n_outputs
    missing = series.isna().to_numpy()
    if _holds_indices(series):
        arr = _numbers(series, column)
        missing = missing | (arr == -1)
        bad = ~missing & ((arr != np.round(arr)) | (arr < 0) | (arr >= n))
        if bad.any():
            raise _row_error(series, bad, f"is not a class index in [0, {n}) (or -1/NaN for missing)")
        return np.where(missing, -1, np.nan_to_num(arr)).astype(np.int64)
    lookup = {name: i for i, name in enumerate(column.class_names or ())}
    out = np.full(len(series), -1, dtype=np.int64)
    for pos, v in enumerate(series.tolist()):
        if missing[pos]:
            continue
        idx = lookup.get(str(v))
        if idx is None:
            bad = np.zeros(len(series), dtype=bool)
            bad[pos] = True
            raise _row_error(series, bad, f"is not one of the class names {_short(column.class_names)}")
        out[pos] = idx
    return out


def _holds_indices(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series.dtype) and not isinstance(series.dtype, pd.CategoricalDtype) \
        and not pd.api.types.is_bool_dtype(series.dtype)


def _short(names: Optional[Sequence[str]], k: int = 8) -> str:
    names = list(names or ())
    return repr(names) if len(names) <= k else repr(names[:k])[:-1] + f", ... ({len(names)} in all)]"


def parse_multilabel(series: pd.Series, class_names: Optional[Sequence[str]] = None) -> List[Optional[List[int]]]:
    """Per row, the list of class indices, or None where missing. Cells are strings like "0,2"
    ("" means no class; tokens may also be class names when `class_names` is given), sequences
    of indices, or a single whole number."""
    lookup = {name: i for i, name in enumerate(class_names or ())}
    missing = series.isna().to_numpy()
    rows: List[Optional[List[int]]] = []
    for pos, v in enumerate(series.tolist()):
        if missing[pos]:
            rows.append(None)
            continue
        if isinstance(v, str):
            tokens: Sequence[Any] = [t.strip() for t in v.split(",") if t.strip()]
        elif isinstance(v, (list, tuple, set, frozenset, np.ndarray)):
            tokens = list(v)
        else:
            tokens = [v]
        idx = []
        for t in tokens:
            i = _multilabel_index(t, lookup)
            if i is None:
                bad = np.zeros(len(series), dtype=bool)
                bad[pos] = True
                names = f" or a class name of {_short(class_names)}" if class_names else ""
                raise _row_error(series, bad, f"has {t!r}, which is not a class index (a whole number >= 0){names}")
            idx.append(i)
        rows.append(idx)
    return rows


def _multilabel_index(token: Any, lookup: Mapping[str, int]) -> Optional[int]:
    if isinstance(token, str):
        if token in lookup:
            return lookup[token]
        return int(token) if token.isdigit() else None
    if isinstance(token, (bool, np.bool_)):
        return None
    if isinstance(token, (int, np.integer)) or (isinstance(token, (float, np.floating)) and float(token).is_integer()):
        return int(token) if token >= 0 else None
    return None


def to_multilabel(series: pd.Series, column: "Column") -> np.ndarray:
    """float32 (N, C): 1 for the listed classes, 0 for the others, a NaN row where missing."""
    n = column.n_outputs
    out = np.zeros((len(series), n), dtype=np.float32)
    for pos, idx in enumerate(parse_multilabel(series, column.class_names)):
        if idx is None:
            out[pos] = np.nan
            continue
        too_big = [i for i in idx if i >= n]
        if too_big:
            bad = np.zeros(len(series), dtype=bool)
            bad[pos] = True
            raise _row_error(series, bad, f"has class index {too_big[0]}, but the column has {n} classes")
        out[pos, idx] = 1.0
    return out


def to_text(series: pd.Series, column: "Column") -> np.ndarray:
    """An object array of str (N,), "" where missing."""
    missing = series.isna().to_numpy()
    return np.array(["" if m else str(v) for v, m in zip(series.tolist(), missing)], dtype=object)


def to_images(series: pd.Series, column: "Column") -> "ImageFiles":
    """An `ImageFiles` sequence over `root/<value>`; every file must exist (checked here)."""
    missing = series.isna().to_numpy()
    if missing.any():
        raise _row_error(series, missing, "is missing; every row needs an image file")
    names = [os.fspath(v) if isinstance(v, (str, os.PathLike)) else v for v in series.tolist()]
    bad = np.array([not isinstance(v, str) for v in names])
    if bad.any():
        raise _row_error(series, bad, "is not a file name")
    paths = [os.path.join(column.root, v) if column.root is not None else v for v in names]
    absent = np.array([not os.path.isfile(p) for p in paths])
    if absent.any():
        pos = int(np.flatnonzero(absent)[0])
        raise TableError(f"column {series.name!r}, row {_plain(series.index[pos])!r}: image file {paths[pos]!r} does not "
                         f"exist ({int(absent.sum())} missing file(s); root={column.root!r})")
    return ImageFiles(paths)


def decode_image(path: str, mode: str = "RGB") -> np.ndarray:
    """The pixels of an image file as uint8 `(C, H, W)` (converted to `mode` first)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.array(im.convert(mode), dtype=np.uint8)  # a writable copy
    except (OSError, ValueError) as e:
        raise OSError(f"cannot read image {path!r}: {e}") from e
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _to_float(chw: np.ndarray) -> Tensor:
    """uint8 `(C, H, W)` -> a new float32 tensor in [0, 1] (the cached array stays untouched)."""
    return torch.from_numpy(chw).to(torch.float32).div_(255.0)


def load_image(path: str, mode: str = "RGB") -> Tensor:
    """A float tensor (C, H, W) in [0, 1] from an image file (converted to `mode` first)."""
    return _to_float(decode_image(path, mode))


IMAGE_CACHE_BYTES = 2 * 2 ** 30  # default budget of decoded images kept in memory (uint8: 4x less than float)


class ImageCache:
    """Decoded images (uint8 `(C, H, W)`) by file and mode, kept in memory up to `budget` bytes.

    Images are decoded on first access and kept while they fit; once the budget is spent, further
    images are decoded from disk at every access (the ones kept stay). `budget=0` keeps nothing.
    One cache is shared by an `ImageFiles` and its sub-sequences (a Project's splits share one).
    Under `DataLoader` workers each worker process fills its own copy (the parent's stays empty;
    `persistent_workers=True` keeps a worker's cache from one epoch to the next). A pickled cache
    (spawned workers) arrives empty, so the images are never copied between processes.
    """

    def __init__(self, budget: int = IMAGE_CACHE_BYTES):
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0:
            raise ValueError(f"the image cache budget is a number of bytes >= 0, got {budget!r}")
        self.budget = int(budget)
        self.used = 0
        self.full = False  # an image did not fit: some are decoded from disk at every access
        self._images: Dict[Tuple[str, str], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._images)

    def load(self, path: str, mode: str = "RGB") -> Tensor:
        """The image as float `(C, H, W)` in [0, 1], decoded once if it fits the budget."""
        key = (path, mode)
        arr = self._images.get(key)
        if arr is None:
            arr = decode_image(path, mode)
            if self.used + arr.nbytes <= self.budget:
                self._images[key] = arr
                self.used += arr.nbytes
            else:
                self.full = True
        return _to_float(arr)

    def __getstate__(self) -> Dict[str, Any]:
        return {**self.__dict__, "_images": {}, "used": 0, "full": False}


class ImageFiles:
    """A lazy sequence of images: `len(images)`; `images[i]` reads file i as float (C, H, W) in
    [0, 1]; `images[rows]` (a slice, index array or list) is the sub-sequence of those files.

    Decoded images are kept in memory by `cache` (an `ImageCache`, default: a new one with the
    default budget of `IMAGE_CACHE_BYTES`; shared with the sub-sequences), so that an epoch after
    the first reads no file while the images fit.
    `FlowDataset` accepts it as an input; a batch stacks the images, so they must share a size
    (a batch that mixes sizes is an `InputError` naming both files and both sizes).
    """

    def __init__(self, paths: Sequence[str], mode: str = "RGB", cache: Optional[ImageCache] = None):
        self.paths = list(paths)
        self.mode = mode
        self.cache = cache if cache is not None else ImageCache()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: Any):
        if isinstance(index, (int, np.integer)):
            return self.cache.load(self.paths[index], self.mode)
        if isinstance(index, slice):
            return ImageFiles(self.paths[index], self.mode, self.cache)
        positions = np.asarray(index.cpu() if isinstance(index, Tensor) else index)
        if positions.dtype == np.bool_:
            positions = np.flatnonzero(positions)
        return ImageFiles([self.paths[int(i)] for i in positions.reshape(-1)], self.mode, self.cache)

    def decoded_bytes(self) -> int:
        """An estimate of the memory all the images take decoded: the first file's size (read from
        its header, nothing decoded) times their number; 0 when there are none."""
        if not self.paths:
            return 0
        from PIL import Image

        try:
            with Image.open(self.paths[0]) as im:
                width, height = im.size
        except (OSError, ValueError) as e:
            raise OSError(f"cannot read image {self.paths[0]!r}: {e}") from e
        return width * height * len(Image.new(self.mode, (1, 1)).getbands()) * len(self.paths)

    def __repr__(self) -> str:
        first = f", first={self.paths[0]!r}" if self.paths else ""
        return f"ImageFiles({len(self)} files{first})"


VALUE_CONVERTERS: Dict[str, ValueConverter] = {
    "binary": to_binary, "continuous": to_continuous, "category": to_category,
    "multilabel": to_multilabel, "image": to_images, "text": to_text,
}


# Tasks ------------------------------------------------------------------------------------------

def linear_head(name: str, in_features: int, n_outputs: int) -> nn.Module:
    """The default head: `nn.Linear(in_features, n_outputs)`."""
    return nn.Linear(in_features, n_outputs)


def _no_task(column: Column, module: nn.Module) -> ITask:
    raise TableError(f"column {column.name!r} holds {column.kind} values and has no default task; give one: "
                     f"Converters(tasks={{{column.name!r}: lambda column, head: ...}})")


TASK_FACTORIES: Dict[str, TaskFactory] = {
    "binary": lambda c, head: BinaryClassificationTask(c.name, head),
    "continuous": lambda c, head: BoundedRegressionTask(c.name, head, scale=c.scale if c.scale is not None else 1.0),
    "category": lambda c, head: ClassificationTask(c.name, head, class_names=c.class_names),
    "multilabel": lambda c, head: MultilabelClassificationTask(c.name, head, class_names=c.class_names),
    "image": _no_task,
    "text": _no_task,
}


# Configuration ----------------------------------------------------------------------------------

@dataclass
class Converters:
    """Per-column and per-kind overrides of what a `Project` guesses and builds.

    `values`, `tasks` and `heads` are looked up by column name first, then by kind; anything not
    given uses the defaults (`VALUE_CONVERTERS`, `TASK_FACTORIES`, `linear_head`).
    """

    types: Dict[str, str] = field(default_factory=dict)  # column -> kind (one of KINDS); others are guessed
    class_names: Dict[str, Sequence[str]] = field(default_factory=dict)  # column -> class names; fixes the class count
    num_classes: Dict[str, int] = field(default_factory=dict)  # column -> class count when names are not given
    # (default: distinct names for string columns, max index + 1 for indices)
    scales: Dict[str, float] = field(default_factory=dict)  # continuous column -> scale (default: the column's max)
    values: Dict[str, ValueConverter] = field(default_factory=dict)  # column or kind -> (series, Column) -> array
    tasks: Dict[str, TaskFactory] = field(default_factory=dict)  # column or kind -> (Column, head) -> ITask
    heads: Dict[str, HeadFactory] = field(default_factory=dict)  # column or kind -> (name, in_features, n_outputs) -> module
    # width of the features the default heads read; None: the number of numeric input columns when
    # every input column is numeric (the Project stacks them into x.features), else 256 (a backbone's)
    in_features: Optional[int] = None
    image_root: Optional[str] = None  # image file names are relative to this directory (None: as given)
    # decoded images of a Project are kept in memory up to this many bytes (0: decode at every access)
    image_cache_bytes: int = IMAGE_CACHE_BYTES
    max_categories: int = 50  # guessing: at most this many distinct strings/integers make a category

    def value_converter(self, column: Column) -> ValueConverter:
        return self.values.get(column.name) or self.values.get(column.kind) or VALUE_CONVERTERS[column.kind]

    def task_factory(self, column: Column) -> TaskFactory:
        return self.tasks.get(column.name) or self.tasks.get(column.kind) or TASK_FACTORIES[column.kind]

    def head_factory(self, column: Column) -> HeadFactory:
        return self.heads.get(column.name) or self.heads.get(column.kind) or linear_head

    def check(self, columns: Sequence[str]) -> None:
        """Fail on a kind that does not exist or an override naming neither a column of the table
        (`columns`) nor a kind: a misspelt name would otherwise be ignored."""
        for col, kind in self.types.items():
            if kind not in KINDS:
                raise TableError(f"Converters.types[{col!r}] = {kind!r} is not a kind; kinds: {KINDS}")
        known = set(columns)
        for attr in ("types", "class_names", "num_classes", "scales"):
            for col in getattr(self, attr):
                if col not in known:
                    raise TableError(f"Converters.{attr} names {col!r}, which is not a column of the table"
                                     f"{did_you_mean(str(col), known, listed=0)}")
        for attr in ("values", "tasks", "heads"):
            for key in getattr(self, attr):
                if key not in known and key not in KINDS:
                    raise TableError(f"Converters.{attr} key {key!r} is neither a column nor a kind {KINDS}"
                                     f"{did_you_mean(str(key), known, listed=0)}")

    def describe(self, series: pd.Series, role: str, saved: Optional[Column] = None, source: str = "") -> Column:
        """The `Column` of `series`: its kind (told or guessed) and what conversion needs to know.

        `saved` is what an earlier project recorded for this column (its kind, class names and
        scale; `source` names the file, for messages). It is used instead of guessing, so that
        class indices and units stay the same across tables; told values (`types`,
        `class_names`, `num_classes`, `scales`) must agree with it, and the column's categories
        must be among the saved class names and its values within the saved scale (else a
        `TableError` naming both values and the file).
        """
        if saved is not None:
            return self._reuse(series, role, saved, source)
        name = str(series.name)
        kind = self.types.get(name) or guess_kind(series, self.max_categories)
        class_names = None
        scale = None
        if kind in ("category", "multilabel"):
            class_names = self._class_names(series, kind)
        elif kind == "continuous" and role == "output":
            scale = self._scale(series)
        if name in self.class_names and kind not in ("category", "multilabel"):
            raise TableError(f"column {name!r} is {kind}, but Converters.class_names names it; "
                             f"set Converters(types={{{name!r}: 'category'}}) or 'multilabel'")
        return Column(name, kind, role, class_names, scale, self.image_root if kind == "image" else None)

    def _reuse(self, series: pd.Series, role: str, saved: Column, source: str) -> Column:
        name = str(series.name)
        fresh = f"; drop that setting to use the saved value, or delete {source} to start afresh " \
                f"(models trained with the saved classes and scales then no longer match)"
        kind = saved.kind
        told = self.types.get(name)
        if told is not None and told != kind:
            raise TableError(f"column {name!r}: Converters.types says {told!r}, but {source} saved {kind!r}{fresh}")
        class_names = scale = None
        if kind in ("category", "multilabel"):
            class_names = saved.class_names
            if name in self.class_names and tuple(str(c) for c in self.class_names[name]) != class_names:
                raise TableError(f"column {name!r}: Converters.class_names says {[str(c) for c in self.class_names[name]]}"
                                 f", but {source} saved {list(class_names)}{fresh}")
            count = self.num_classes.get(name)
            if count is not None and count != len(class_names):
                raise TableError(f"column {name!r}: Converters.num_classes says {count}, but {source} saved "
                                 f"{len(class_names)} classes {_short(class_names)}{fresh}")
            _check_saved_classes(series, kind, class_names, source)
        elif name in self.class_names:
            raise TableError(f"column {name!r} is {kind} (saved in {source}), but Converters.class_names names it")
        elif kind == "continuous" and role == "output":
            if name in self.scales and saved.scale is not None and float(self.scales[name]) != saved.scale:
                raise TableError(f"column {name!r}: Converters.scales says {float(self.scales[name])!r}, but {source} "
                                 f"saved {saved.scale!r}{fresh}")
            scale = saved.scale if saved.scale is not None else self._scale(series)  # an input before
            arr = _numbers(series, Column(name, kind, role))
            above = arr > scale
            if above.any():
                raise _row_error(series, above, f"is above the scale {scale:g} saved in {source} (labels are divided "
                                                f"by it); fix the values, or delete {source} to start afresh (models "
                                                f"trained with the saved scale then no longer match)")
        return Column(name, kind, role, class_names, scale, self.image_root if kind == "image" else None)

    def _class_names(self, series: pd.Series, kind: str) -> Tuple[str, ...]:
        name = str(series.name)
        given = self.class_names.get(name)
        count = self.num_classes.get(name)
        if given is not None:
            given = tuple(str(c) for c in given)
            if len(set(given)) != len(given) or not given:
                raise TableError(f"column {name!r}: class names must be distinct and non-empty, got {list(given)}")
            if count is not None and count != len(given):
                raise TableError(f"column {name!r}: num_classes={count} but {len(given)} class names")
            return given
        if kind == "category" and isinstance(series.dtype, pd.CategoricalDtype):
            names = tuple(str(c) for c in series.dtype.categories)
        elif kind == "category" and not _holds_indices(series):
            names = tuple(sorted({str(v) for v in series.dropna().tolist()}))
        else:
            if kind == "category":
                arr = _numbers(series, Column(name, kind))
                arr = arr[~np.isnan(arr) & (arr != -1)]
                top = int(arr.max()) if arr.size else -1
            else:
                top = max((max(idx) for idx in parse_multilabel(series) if idx), default=-1)
            inferred = top + 1
            if count is not None and count < inferred:
                raise TableError(f"column {name!r}: num_classes={count}, but the column holds class index {top}")
            n = count if count is not None else inferred
            if n < 1:
                raise TableError(f"column {name!r}: no class index found to infer the number of classes; "
                                 f"set Converters(num_classes={{{name!r}: ...}})")
            names = tuple(str(i) for i in range(n))
        if count is not None and count != len(names):
            raise TableError(f"column {name!r}: num_classes={count}, but it has {len(names)} distinct values {_short(names)}")
        return names

    def _scale(self, series: pd.Series) -> float:
        name = str(series.name)
        if name in self.scales:
            scale = float(self.scales[name])
            if not scale > 0:
                raise TableError(f"Converters.scales[{name!r}] must be positive, got {scale}")
            return scale
        arr = _numbers(series, Column(name, "continuous"))
        top = float(np.nanmax(arr))
        if not top > 0:
            raise TableError(f"column {name!r}: continuous values are scaled by their maximum, which is {top:g}; "
                             f"set Converters(scales={{{name!r}: ...}})")
        return top


def _check_saved_classes(series: pd.Series, kind: str, class_names: Tuple[str, ...], source: str) -> None:
    """Refuse categories of `series` that are not among the `class_names` saved in `source`: a
    new name, or a class index beyond them, would change or break the class indices."""
    name = series.name
    fresh = (f"class indices must stay those of {source}: fix the values, or delete {source} to start afresh "
             f"(models trained with the saved classes then no longer fit)")
    n = len(class_names)
    if kind == "multilabel":
        try:
            rows = parse_multilabel(series, class_names)
        except TableError as e:
            raise TableError(f"{e}; {fresh}") from None
        top = np.array([max(idx) if idx else -1 for idx in rows])
        bad = top >= n
        if bad.any():
            pos = np.flatnonzero(bad)
            raise TableError(f"column {name!r} holds class index {int(top[pos].max())} ({_rows(series, pos)}), but "
                             f"{source} saved {n} classes {_short(class_names)}; {fresh}")
        return
    if _holds_indices(series):
        arr = _numbers(series, Column(str(name), kind))
        bad = ~np.isnan(arr) & (arr >= n)
        if bad.any():
            pos = np.flatnonzero(bad)
            raise TableError(f"column {name!r} holds class index {int(arr[pos].max())} ({_rows(series, pos)}), but "
                             f"{source} saved {n} classes {_short(class_names)}; {fresh}")
        return
    missing = series.isna().to_numpy()
    known = set(class_names)
    strings = [str(v) for v in series.tolist()]
    bad = np.array([not m and v not in known for v, m in zip(strings, missing)], dtype=bool)
    if bad.any():
        pos = np.flatnonzero(bad)
        unknown = sorted({strings[p] for p in pos})
        shown = capped(unknown, MAX_LISTED_ROWS)
        raise TableError(f"column {name!r} holds {shown} ({_rows(series, pos)}), which {'is' if len(unknown) == 1 else 'are'}"
                         f" not among the class names {_short(class_names)} saved in {source}; {fresh}")


def _rows(series: pd.Series, positions: Sequence[int], k: int = MAX_LISTED_ROWS) -> str:
    """"rows 3, 'b', 9 and 240 more": the index labels at `positions`."""
    labels = [repr(_plain(series.index[p])) for p in positions[:k]] + list(positions[k:])  # the rest are counted
    return f"row{'s' if len(positions) > 1 else ''} {capped(labels, k, quote=False)}"


