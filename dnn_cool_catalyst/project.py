"""`Project`: tasks, inputs, labels and a persistent train/valid/test split from a pandas DataFrame.

The story's quick start (one row per image; labels in pixels, NaN where not annotated)::

    import dnn_cool_catalyst as dcc
    from dnn_cool_catalyst.story import add_security_flows, SHIRT_TYPES

    df = pd.read_csv("data/labels.csv", keep_default_na=False, na_values=["NaN"])
    project = dcc.Project(df, input_col="img", output_col=None,        # None: every other column
                          converters=dcc.Converters(
                              image_root="data", in_features=256,
                              types={"shirt_type": "category"},       # a float index with NaN
                              class_names={"shirt_type": SHIRT_TYPES},
                              scales={c: 64.0 for c in df if c.startswith(("face_", "body_"))}),
                          project_dir="runs/security")
    add_security_flows(project)                  # or @project.add_flow; heads read x.features
    model = dcc.BackboneModel(cnn, project.get_full_flow())   # cnn: images (N, 3, H, W) -> (N, 256)
    runner = project.runner(model, "baseline")   # logs in runs/security/baseline
    runner.train(loaders=project.loaders(batch_size=64), num_epochs=10)

Every output column becomes a task named after it, with a head of width `Converters.in_features`.
Labels are keyed by task path: a column feeds every path whose last component is its name.
Input columns become inputs named after them: image file names as a lazy `ImageFiles` sequence
(float (3, H, W) in [0, 1] per item), numbers as float32 arrays, text as str arrays.

Numeric input columns just work: when every input column is numeric (binary, continuous or
category) and none is called `features`, a flow reading `x.features` gets them stacked into one
float32 `(N, k)` vector, in the order of `input_col`, and the heads' width defaults to `k`::

    project = dcc.Project(df, input_col=["age", "height", "weight"], project_dir="runs/clinic")

    @project.add_flow                             # the other columns are tasks: sick, dose
    def full(flow, x, out):
        out += flow.sick(x.features)
        out += flow.dose(x.features) | out.sick
        return out

    runner = project.runner()                     # model: flow.torch(), the heads on x.features
    runner.train(loaders=project.loaders())
    runner.evaluate(project.loader("test"))

`Converters.in_features` (default None) sets the heads' width explicitly; None means `k` for
stacked numeric inputs, and `DEFAULT_IN_FEATURES` (256) otherwise (the features of a backbone).

Heads that read a feature the table does not hold (`x.features`) get it from the model: the
model computes it from the inputs and hands it to the flow's module, which is what
`BackboneModel` does (`backbone(x["img"])` -> `x["features"]`, `x["gt"]` passed through).
Datasets leave such features to the model instead of failing on them.

Several tables, each labelled for some tasks (the seed's "classifier on ImageNet, detector on
COCO"): pass `{source name: DataFrame}`. The tables share the input columns; the output columns
are their union, described once over every table's values (one converter set: class indices and
scales are the same in every source), and a column a table lacks is unlabelled for its rows
(`flow.get_dataset(..., partial=True)`). Each source gets its own seeded split; datasets and
loaders over several sources are `MixedDataset`s, mixed as `sampling` says::

    project = dcc.Project({"door_cam": df_a, "people": df_b}, input_col="img", project_dir="runs/two")
    loaders = project.loaders(batch_size=64, sampling="temperature", temperature=2.0)  # train mixes so
    runner.train(loaders=loaders, ...)          # metrics also per source: <source>/<path>/<metric>
    runner.evaluate(project.loader("test"))     # a `source` column: overall, then per source
"""
from __future__ import annotations

import hashlib
import json
import os
import zlib
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch
from torch import nn

from .converters import (DEFAULT_IN_FEATURES, KINDS, NUMERIC_KINDS, Column, Converters, ImageCache, ImageFiles,
                         TableError, _row_error)
from .dsl import TaskFlow, Tasks
from .errors import LabelError, capped, did_you_mean
from .files import read_json, write_json
from .keys import GT, INDEX, SOURCE

SPLITS = ("train", "valid", "test")
SPLIT_FILE = "split.json"
COLUMNS_FILE = "columns.json"
FEATURES = "features"  # x.features: a Project's numeric input columns stacked, float32 (N, k)
Rows = Union[None, str, slice, Sequence[int], np.ndarray]
Tables = Mapping[str, pd.DataFrame]
#: Two column names of different tables closer than this (difflib ratio) look like one misspelt.
MISSPELLING_RATIO = 0.8


# Splits (pure functions + one atomic file) -------------------------------------------------------

def make_split(n: int, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> Dict[str, np.ndarray]:
    """A seeded random partition of `range(n)` into train/valid/test positions (each sorted).

    Valid and test get `round(fraction * n)` rows each, train the rest.
    """
    fr = [float(f) for f in fractions]
    if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"split fractions are (train, valid, test), non-negative and summing to 1; got {tuple(fractions)}")
    perm = np.random.default_rng(seed).permutation(n)
    n_valid, n_test = int(round(fr[1] * n)), int(round(fr[2] * n))
    n_train = n - n_valid - n_test
    if n_train < 0:
        raise ValueError(f"split fractions {tuple(fractions)} leave no rows for training out of {n}")
    bounds = np.cumsum([0, n_train, n_valid, n_test])
    return {name: np.sort(perm[bounds[i]:bounds[i + 1]]).astype(np.int64) for i, name in enumerate(SPLITS)}


def table_fingerprint(df: pd.DataFrame) -> str:
    """A short hash of `df`'s values and row order (not its index), to tell tables apart."""
    hashed = pd.util.hash_pandas_object(df, index=False).to_numpy()
    return hashlib.sha256(hashed.tobytes() + str(list(df.columns)).encode()).hexdigest()[:16]


def load_or_make_split(path: Optional[str], n: int, fractions: Sequence[float], seed: int,
                       fingerprint: str) -> Dict[str, np.ndarray]:
    """The split saved at `path` if there is one (checked against the table), else a new one,
    saved there. `path=None` keeps it in memory only."""
    fractions = [float(f) for f in fractions]
    if path is None or not os.path.exists(path):
        split = make_split(n, fractions, seed)
        if path is not None:
            write_json(path, {"num_rows": n, "fingerprint": fingerprint, "fractions": fractions, "seed": seed,
                                      **{k: v.tolist() for k, v in split.items()}})
        return split
    try:
        with open(path, encoding="utf-8") as fh:
            saved = json.load(fh)
        rows, fp = int(saved["num_rows"]), saved["fingerprint"]
        split = {k: np.asarray(saved[k], dtype=np.int64).reshape(-1) for k in SPLITS}
        old_fractions, old_seed = [float(f) for f in saved["fractions"]], int(saved["seed"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TableError(f"split file {path!r} is unreadable ({type(e).__name__}: {e}); delete it to make a new split") from None
    fix = f"delete {path!r} to make a new split for this table"
    if rows != n:
        raise TableError(f"split file {path!r} was made for a table of {rows} rows, but this DataFrame has {n}; "
                         f"use the same table or {fix}")
    if fp != fingerprint:
        raise TableError(f"split file {path!r} was made for a different table (same length, but the input columns "
                         f"differ in values or row order); use the same table or {fix}")
    if not np.allclose(old_fractions, fractions) or old_seed != seed:
        raise TableError(f"split file {path!r} was made with fractions={old_fractions}, seed={old_seed}, but this "
                         f"project asks for fractions={fractions}, seed={seed}; pass those or {fix}")
    every = np.concatenate(list(split.values()))
    if len(every) != n or not np.array_equal(np.sort(every), np.arange(n)):
        raise TableError(f"split file {path!r} is not a partition of the {n} rows; {fix}")
    return split


def seeded_head(factory: Any, name: str, n_in: int, n_out: int, seed: int) -> nn.Module:
    """`factory(name, n_in, n_out)` initialised from `seed` and the column's name, whatever the
    global random state: the same project gives the same heads in any session, and adding a column
    leaves the other heads as they were. The global generator is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(f"{seed}:{name}".encode("utf-8")))
        return factory(name, n_in, n_out)


# Column descriptions (one atomic file) ------------------------------------------------------------

def load_columns(path: Optional[str]) -> Dict[str, Column]:
    """The column descriptions saved at `path` (`{name: Column}` with kind, class names and scale),
    or none when there is no such file. A malformed file is an error naming it."""
    if path is None or not os.path.exists(path):
        return {}
    fix = "delete it to describe the columns afresh from the next table"
    try:
        entries = read_json(path)["columns"]
        if not isinstance(entries, dict):
            raise TypeError(f"'columns' is a {type(entries).__name__}, not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TableError(f"column file {path!r} is unreadable ({type(e).__name__}: {e}); {fix}") from None
    columns = {}
    for name, entry in entries.items():
        try:
            kind, class_names, scale = entry["kind"], entry.get("class_names"), entry.get("scale")
            if kind not in KINDS:
                raise ValueError(f"kind {kind!r} is not one of {KINDS}")
            if kind in ("category", "multilabel"):
                if not isinstance(class_names, list) or not class_names or not all(isinstance(c, str) for c in class_names):
                    raise ValueError(f"a {kind} column needs a non-empty list of class names, got {class_names!r}")
            elif class_names is not None:
                raise ValueError(f"a {kind} column has no class names, got {class_names!r}")
            if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                      or not 0 < scale < float("inf")):
                raise ValueError(f"scale must be a positive number, got {scale!r}")
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            raise TableError(f"column file {path!r}, column {name!r}: {e}; {fix}") from None
        columns[name] = Column(name, kind, class_names=tuple(class_names) if class_names is not None else None,
                               scale=float(scale) if scale is not None else None)
    return columns


def save_columns(path: str, columns: Mapping[str, Column]) -> None:
    """Write `columns` (kind, class names, scale per column) to `path` as JSON, atomically."""
    write_json(path, {"columns": {name: {"kind": c.kind, "class_names": list(c.class_names) if c.class_names else None,
                                         "scale": c.scale} for name, c in columns.items()}})


# The model helper -------------------------------------------------------------------------------

class BackboneModel(nn.Module):
    """`backbone(x[input_key])` -> `x[feature_key]`, then the flow's module (heads and masks).

    The usual model for a `Project` whose inputs are images and whose heads read `x.features`:
    `BackboneModel(cnn, project.get_full_flow())`. Other inputs and `x["gt"]` pass through to the
    flow unchanged. Submodules: `backbone` and `flow` (so `model.flow.door_open` is a head).
    """

    def __init__(self, backbone: nn.Module, flow: TaskFlow, input_key: str = "img", feature_key: str = "features"):
        super().__init__()
        self.backbone = backbone
        self.flow = flow.torch()
        self.input_key = input_key
        self.feature_key = feature_key

    def forward(self, x: Mapping[str, Any]):
        if self.input_key not in x:
            raise KeyError(f"BackboneModel reads x[{self.input_key!r}], but the batch has {sorted(x)}")
        inner = {k: v for k, v in x.items() if k != self.input_key}
        inner[self.feature_key] = self.backbone(x[self.input_key])
        return self.flow(inner)


# The project ------------------------------------------------------------------------------------

def _size(n: int) -> str:
    return f"{n / 2 ** 20:.0f} MiB" if n >= 2 ** 20 else f"{n / 2 ** 10:.0f} KiB"


def _saved_form(column: Column, saved: Optional[Column]) -> Column:
    """What `columns.json` keeps of `column`: kind, class names and scale (a scale learnt while the
    column was an output is kept when it is an input now)."""
    scale = column.scale if column.scale is not None else (saved.scale if saved is not None else None)
    return Column(column.name, column.kind, class_names=column.class_names, scale=scale)


def split_file(project_dir: Optional[str], source: Optional[str]) -> Optional[str]:
    """Where the split of a project (`split.json`), or of one of its sources (`split_<source>.json`), is kept."""
    if project_dir is None:
        return None
    return os.path.join(project_dir, SPLIT_FILE if source is None else f"split_{source}.json")


def check_tables(tables: Tables) -> Dict[str, pd.DataFrame]:
    """The tables of a several-source `Project`, checked: names are non-empty strings that can
    name a file, each value a non-empty DataFrame with unique column names."""
    if not tables:
        raise TableError("Project takes a DataFrame or a non-empty mapping {source name: DataFrame}")
    checked = {}
    for name, df in tables.items():
        if not isinstance(name, str) or not name or os.sep in name or name in (".", ".."):
            raise TableError(f"source names must be plain non-empty strings (they name files and metrics), got {name!r}")
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"Project: table {name!r} is a {type(df).__name__}, not a pandas DataFrame")
        if len(df) == 0:
            raise TableError(f"table {name!r} has no rows")
        if not df.columns.is_unique:
            raise TableError(f"table {name!r} has duplicate column names: "
                             f"{sorted(set(df.columns[df.columns.duplicated()]))}")
        checked[name] = df
    return checked


def check_column_names(tables: Mapping[str, pd.DataFrame], input_cols: Sequence[str],
                       output_cols: Optional[Sequence[str]]) -> None:
    """Errors naming the table: an input column a table lacks; with the output columns guessed
    (`output_cols` None), a column of some tables whose name is one letter or so away from a column
    of the *other* tables (`door_opn` in one, `door_open` in another: one task would be split in two
    half-labelled ones). Give `output_col` to keep such columns apart on purpose."""
    for name, df in tables.items():
        missing = [c for c in input_cols if c not in df.columns]
        if missing:
            raise TableError(f"table {name!r} has no input column(s) {missing}{did_you_mean(str(missing[0]), df.columns, 0)}; "
                             f"every table needs the input columns {list(input_cols)}")
    if output_cols is not None:
        return
    import difflib

    holders: Dict[str, List[str]] = {}
    for name, df in tables.items():
        for c in df.columns:
            if c not in input_cols:
                holders.setdefault(c, []).append(name)
    for c, where in holders.items():
        for d, other in holders.items():
            if c < d and not set(where) & set(other) \
                    and difflib.SequenceMatcher(None, str(c), str(d)).ratio() >= MISSPELLING_RATIO:
                raise TableError(f"column {c!r} of table(s) {where} and column {d!r} of table(s) {other} look like one "
                                 f"column spelt two ways (each table has only one of them): rename one, or give "
                                 f"output_col to make two tasks of them on purpose")


def check_column_values(tables: Mapping[str, pd.DataFrame], column: str) -> None:
    """An error naming the tables when a column holds numbers in one table and text (or other
    objects) in another: one task cannot take both."""
    kinds = {}
    for name, df in tables.items():
        if column in df.columns and df[column].notna().any():
            values = df[column].dropna()
            numeric = pd.api.types.is_numeric_dtype(values.dtype) or pd.api.types.is_bool_dtype(values.dtype)
            kinds[name] = "numbers" if numeric else f"{type(values.iloc[0]).__name__} values such as {values.iloc[0]!r}"
    if len({v == "numbers" for v in kinds.values()}) > 1:
        shown = "; ".join(f"table {name!r}: {what}" for name, what in kinds.items())
        raise TableError(f"column {column!r} holds different kinds of values in different tables ({shown}); "
                         f"make them agree (or name the columns differently)")


class Project(Tasks):
    """A `Tasks` built from a DataFrame: one task per output column, inputs from the input
    column(s), a persistent train/valid/test split, datasets and a runner.

    `input_col`: a column name or list of names (each becomes the input `x[<name>]`);
    `output_col`: the label columns (None: every other column), each a task named after it;
    `converters`: overrides of guessed kinds, conversions, tasks and heads (`Converters`);
    `project_dir`: where the split (`split.json`), the column descriptions (`columns.json`) and
    runner logdirs live (None: both in memory, no runner); `split`: (train, valid, test)
    fractions; `seed`: the split's seed and the heads' initialisation (`seeded_head`:
    independent of the global random state).
    Numeric input columns are stacked into `x.features` (see the module docstring) and size the
    heads unless `Converters.in_features` is given; a missing value in them is an error naming the
    column and rows when a dataset is built.
    A saved split is reused; one made for another table, or other fractions, is an error.

    Several sources: `df` may be `{source name: DataFrame}` (see the module docstring). The
    tables must share the input columns; `output_col=None` takes the union of their other columns
    (a name spelt two ways in two tables is an error naming both, see `check_column_names`; a
    column with numbers in one table and text in another is an error naming both). `self.df` is
    then the tables stacked (in the given order, absent cells missing), `self.sources` their names
    and `self.source_rows[name]` their row positions in it; each source is split with `split` and
    `seed` on its own (`split_<source>.json`), and `self.splits` are the unions. `get_dataset`,
    `loader` and `loaders` then build `MixedDataset`s (one `partial=True` dataset per source
    holding rows of the selection, each labelled for the columns its table has). With one
    DataFrame, `self.sources` is None and everything is as described above.
    The first Project built in a `project_dir` saves each column's kind, class names and scale
    (guessed or told) in `columns.json`; later ones reuse them instead of guessing, so class
    indices and units stay the same whatever rows a table holds. A table whose categories are not
    among the saved class names, whose values exceed a saved scale, or a told kind, class list or
    scale that differs from the saved one is an error naming the column, both values and the file
    (delete `columns.json` to start afresh). Columns not described yet are added to the file.

    Why the constructor writes files (and only into `project_dir`, only after the table is
    accepted): the split and the column descriptions are what makes two Projects over one
    `project_dir` the same project. Every later Project there, in this process or another (a
    resumed run, the evaluation script, a DDP worker), must see the same validation rows and class
    indices from its first use on, before any run starts; saving them later (at `runner()` or
    `train`) would let Projects built in between make their own. `project_dir=None` writes nothing.
    """

    def __init__(self, df: pd.DataFrame, input_col: Union[str, Sequence[str]],
                 output_col: Union[None, str, Sequence[str]] = None, converters: Optional[Converters] = None,
                 project_dir: Optional[Union[str, os.PathLike]] = None,
                 split: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0):
        self.tables: Optional[Dict[str, pd.DataFrame]] = None
        self.sources: Optional[Tuple[str, ...]] = None
        self.source_rows: Dict[str, np.ndarray] = {}
        if isinstance(df, Mapping):
            self.tables = check_tables(df)
            self.sources = tuple(self.tables)
            check_column_names(self.tables, [input_col] if isinstance(input_col, str) else list(input_col),
                               None if output_col is None else ([output_col] if isinstance(output_col, str)
                                                                else list(output_col)))
            # the union of columns, in order of first appearance; a column a table lacks is missing there
            df = pd.concat(list(self.tables.values()), axis=0, join="outer", sort=False)
            sizes = np.cumsum([0] + [len(t) for t in self.tables.values()])
            self.source_rows = {name: np.arange(sizes[i], sizes[i + 1], dtype=np.int64)
                                for i, name in enumerate(self.sources)}
        elif not isinstance(df, pd.DataFrame):
            raise TypeError(f"Project takes a pandas DataFrame (or {{source name: DataFrame}}), got {type(df).__name__}")
        if len(df) == 0:
            raise TableError("the DataFrame has no rows")
        if not df.columns.is_unique:
            raise TableError(f"the DataFrame has duplicate column names: {sorted(set(df.columns[df.columns.duplicated()]))}")
        self.df = df
        self.converters = converters if converters is not None else Converters()
        self.input_cols = self._names(input_col, "input_col")
        if output_col is None:
            output_col = [c for c in df.columns if c not in self.input_cols]
        self.output_cols = self._names(output_col, "output_col")
        if self.tables is not None:
            for c in self.output_cols:
                check_column_values(self.tables, c)
        both = sorted(set(self.input_cols) & set(self.output_cols))
        if both:
            raise TableError(f"column(s) {both} are both input and output")
        if not self.output_cols:
            raise TableError("no output column: give output_col")
        reserved = (GT, INDEX) if self.tables is None else (GT, INDEX, SOURCE)  # X["source"]: MixedDataset's
        for c in self.input_cols:
            if c in reserved:
                raise TableError(f"input column {c!r} has a reserved name (x[{c!r}] is set by the dataset)")
        for c in self.output_cols:
            if not c.isidentifier():
                raise TableError(f"output column {c!r} cannot name a task: rename it to a Python identifier")
        self.converters.check([str(c) for c in df.columns])
        self.project_dir = os.fspath(project_dir) if project_dir is not None else None
        columns_path = os.path.join(self.project_dir, COLUMNS_FILE) if self.project_dir is not None else None
        saved = load_columns(columns_path)

        self.image_cache = ImageCache(self.converters.image_cache_bytes)
        self.columns: Dict[str, Column] = {}
        self.input_data: Dict[str, Any] = {}
        self.label_data: Dict[str, Any] = {}
        tasks = []
        for role, cols in (("input", self.input_cols), ("output", self.output_cols)):
            if role == "output":
                self.feature_cols, self.in_features = self._features()
            for c in cols:
                series = df[c]
                if series.isna().all():
                    raise TableError(f"{role} column {c!r}: every value is missing")
                column = self.converters.describe(self._described(c), role, saved.get(str(c)), repr(columns_path))
                self.columns[c] = column
                values = self.converters.value_converter(column)(series, column)
                if len(values) != len(df):
                    raise TableError(f"the value converter of column {c!r} returned {len(values)} values for {len(df)} rows")
                if role == "input":
                    if isinstance(values, ImageFiles):  # one memory budget for all image columns
                        values.cache = self.image_cache
                    self.input_data[c] = values
                    continue
                head = seeded_head(self.converters.head_factory(column), c, self.in_features, column.n_outputs, seed)
                task = self.converters.task_factory(column)(column, head)
                self.label_data[c] = task.prepare_labels(values).numpy()  # fails early, naming the task
                tasks.append(task)
        super().__init__(tasks)

        if self.project_dir is not None:
            os.makedirs(self.project_dir, exist_ok=True)
        if self.tables is None:
            self.splits: Dict[str, np.ndarray] = load_or_make_split(
                split_file(self.project_dir, None), len(df), split, seed, table_fingerprint(df[self.input_cols]))
        else:  # one seeded split per source, in its own file; the project's splits are their unions
            self.source_splits: Dict[str, Dict[str, np.ndarray]] = {}
            for name, table in self.tables.items():
                local = load_or_make_split(split_file(self.project_dir, name), len(table), split, seed,
                                           table_fingerprint(table[self.input_cols]))
                self.source_splits[name] = {k: self.source_rows[name][v] for k, v in local.items()}
            self.splits = {k: np.concatenate([s[k] for s in self.source_splits.values()]) for k in SPLITS}
        # saved only once the whole table is accepted, so a refused table changes nothing
        merged = {**saved, **{name: _saved_form(c, saved.get(name)) for name, c in self.columns.items()}}
        if columns_path is not None and merged != saved:
            save_columns(columns_path, merged)
        self._announce_image_cache()

    def _announce_image_cache(self) -> None:
        """One line saying whether the decoded images will be kept in memory (`Converters.image_cache_bytes`)."""
        images = [v for v in self.input_data.values() if isinstance(v, ImageFiles)]
        budget = self.image_cache.budget
        if not images or budget == 0:
            return
        need = sum(v.decoded_bytes() for v in images)
        if need <= budget:
            print(f"Project: keeping decoded images in memory ({_size(need)}, decoded on first use)")
        else:
            print(f"Project: images exceed the cache budget ({_size(need)} > Converters.image_cache_bytes = "
                  f"{_size(budget)}): decoding from disk (the first {_size(budget)} of them stay in memory)")

    def _described(self, c: str) -> pd.Series:
        """The values a column's kind is guessed from: the column, or with several tables the tables
        that have it, stacked (the missing cells of the others would turn whole numbers into floats)."""
        if self.tables is None:
            return self.df[c]
        return pd.concat([t[c] for t in self.tables.values() if c in t.columns], ignore_index=True).rename(c)

    def _names(self, cols: Union[str, Sequence[str]], arg: str) -> List[str]:
        names = [cols] if isinstance(cols, str) else list(cols)
        known = set(self.df.columns)
        tables = f" of tables {list(self.tables)}" if self.tables is not None else ""
        for c in names:
            if c not in known:
                raise TableError(f"{arg}: unknown column {c!r}{did_you_mean(str(c), known, listed=0)} "
                                 f"(columns{tables}: {capped(self.df.columns, 30)})")
        if len(set(names)) != len(names):
            raise TableError(f"{arg} names a column twice: {names}")
        return names

    def _features(self) -> Tuple[List[str], int]:
        """The input columns stacked into `x.features` (all of them, in `input_col` order, when
        every one is numeric and none is called `features`; else none) and the heads' input width
        (`Converters.in_features`, or the number of stacked columns, or `DEFAULT_IN_FEATURES`)."""
        numeric = all(self.columns[c].kind in NUMERIC_KINDS for c in self.input_cols)
        cols = list(self.input_cols) if numeric and FEATURES not in self.input_cols else []
        width = self.converters.in_features
        if width is None:
            width = len(cols) if cols else DEFAULT_IN_FEATURES
        return cols, int(width)

    def __repr__(self) -> str:
        kinds = ", ".join(f"{c.name}: {c.kind}" for c in self.columns.values())
        if self.sources is not None:
            sizes = ", ".join(f"{name}: {len(self.source_rows[name])}" for name in self.sources)
            return f"Project({len(self.df)} rows from {len(self.sources)} sources ({sizes}); {kinds})"
        return f"Project({len(self.df)} rows; {kinds})"

    # Rows, inputs, labels, datasets --------------------------------------------------------------
    def rows(self, rows: Rows = None) -> np.ndarray:
        """Row positions: all rows (None), a split ("train", "valid", "test"), or positions/a mask."""
        n = len(self.df)
        if rows is None:
            return np.arange(n)
        if isinstance(rows, str):
            if rows not in self.splits:
                raise KeyError(f"no split {rows!r}; splits: {list(self.splits)}")
            return self.splits[rows]
        if isinstance(rows, slice):
            return np.arange(n)[rows]
        pos = np.asarray(rows)
        if pos.dtype == np.bool_:
            if pos.shape != (n,):
                raise IndexError(f"a boolean row mask must have shape ({n},), got {pos.shape}")
            return np.flatnonzero(pos)
        if pos.dtype.kind not in "iu":
            raise IndexError(f"rows must be a split name, a slice, integer positions or a boolean mask, got dtype {pos.dtype}")
        pos = pos.reshape(-1).astype(np.int64)
        if pos.size and (pos.min() < -n or pos.max() >= n):
            raise IndexError(f"row positions must lie in [0, {n}); got {int(pos.min())}..{int(pos.max())}")
        return pos % n if pos.size else pos

    def get_inputs(self, rows: Rows = None, flow: Optional[TaskFlow] = None) -> Dict[str, Any]:
        """`{input column: converted values}` of the rows (images stay lazy `ImageFiles`), plus
        `features` (the numeric input columns stacked, float32 `(N, k)`) when `flow` (default: the
        full flow, if one was added) reads `x.features` and the project stacks its inputs."""
        pos = self.rows(rows)
        inputs = {c: v[pos] for c, v in self.input_data.items()}
        if flow is None and self.flows:
            flow = self.get_full_flow()
        if self.feature_cols and flow is not None and any(k[:1] == (FEATURES,) for k in flow.graph.input_keys):
            inputs[FEATURES] = self._stack(pos)
        return inputs

    def _stack(self, pos: np.ndarray) -> np.ndarray:
        """The numeric input columns of the rows at `pos` as one float32 `(N, k)` array; a missing
        value is an error naming the column and its rows (a NaN feature would make every loss NaN)."""
        parts = []
        for c in self.feature_cols:
            values = np.asarray(self.input_data[c])[pos]
            missing = values == -1 if self.columns[c].kind == "category" else np.isnan(values)
            if missing.any():
                series = self.df[c].iloc[pos]
                raise _row_error(series, missing, f"is missing; input column {c!r} is part of x.features (the "
                                                  f"numeric input columns {self.feature_cols} stacked), which needs "
                                                  f"every value: fill them (e.g. df[{c!r}].fillna(...)) or drop the rows")
            parts.append(values.astype(np.float32))
        return np.stack(parts, axis=1) if parts else np.zeros((len(pos), 0), dtype=np.float32)

    def get_labels(self, rows: Rows = None, flow: Optional[TaskFlow] = None) -> Dict[str, np.ndarray]:
        """`{task path: labels}` of the rows for every task of `flow` (default: the full flow);
        a column feeds every path whose last component is its name."""
        flow = flow if flow is not None else self.get_full_flow()
        pos = self.rows(rows)
        labels = {}
        for path in flow.graph.paths:
            name = path.rsplit(".", 1)[-1]
            if name not in self.label_data:
                raise LabelError(f"task {path!r} of flow {flow.name!r} has no output column {name!r}; "
                                 f"output columns: {self.output_cols}")
            labels[path] = self.label_data[name][pos]
        return labels

    def sample_names(self, rows: Rows = None) -> Dict[str, List[Any]]:
        """What names each of the rows for people, as its datasets carry it (`FlowDataset.describe`,
        shown by the interpretation callback): `row`, the DataFrame's index label, and for image
        input columns the file read (`file`; `file_<column>` when there are several)."""
        pos = self.rows(rows)
        names: Dict[str, List[Any]] = {"row": self.df.index[pos].tolist()}
        images = [c for c in self.input_cols if self.columns[c].kind == "image"]
        for c in images:
            paths = getattr(self.input_data[c], "paths", None)  # the files as read (under image_root)
            files = [paths[int(i)] for i in pos] if paths is not None else self.df[c].iloc[pos].tolist()
            names["file" if len(images) == 1 else f"file_{c}"] = files
        return names

    def get_dataset(self, rows: Rows = None, flow: Optional[TaskFlow] = None, sampling: Any = "proportional",
                    temperature: Optional[float] = None, epoch_size: Optional[int] = None, seed: int = 0, **kwargs):
        """`flow.get_dataset(inputs, labels)` over the rows (a split name, positions, or all);
        feature names the flow reads that are not input columns are left to the model.

        Several sources: a `MixedDataset` (`sampling`, `temperature`, `epoch_size`, `seed` as
        there) of one `partial=True` dataset per source that has rows in the selection, labelled
        for the columns of its table; each names its samples by the row labels of its own table."""
        flow = flow if flow is not None else self.get_full_flow()
        if self.sources is None:
            return flow.get_dataset(self.get_inputs(rows, flow), self.get_labels(rows, flow),
                                    **kwargs).name_samples(**self.sample_names(rows))
        from .mixed import MixedDataset

        pos = self.rows(rows)
        parts = {}
        for name in self.sources:
            mine = pos[np.isin(pos, self.source_rows[name])]
            if not len(mine):
                continue
            have = set(self.tables[name].columns)
            labels = {p: v for p, v in self.get_labels(mine, flow).items() if p.rsplit(".", 1)[-1] in have}
            parts[name] = flow.get_dataset(self.get_inputs(mine, flow), labels, partial=True,
                                           **kwargs).name_samples(**self.sample_names(mine))
        if not parts:
            raise ValueError(f"no rows selected ({rows!r}): a dataset needs rows of at least one source")
        return MixedDataset(parts, sampling=sampling, temperature=temperature, epoch_size=epoch_size, seed=seed)

    def loader(self, rows: Rows = None, batch_size: int = 256, shuffle: bool = False, seed: int = 0,
               flow: Optional[TaskFlow] = None, sampling: Any = "proportional", temperature: Optional[float] = None,
               epoch_size: Optional[int] = None, **kwargs):
        """A whole-batch `DataLoader` over the rows (a split name, positions, or all), carrying
        `X["index"]`; shuffled with a generator seeded by `seed` when `shuffle`.

        Several sources: `MixedDataset.loader` of `get_dataset(rows, ..., sampling, temperature,
        epoch_size, seed)`, batches carrying `X["source"]` too. Its order is always drawn from
        `seed` (`shuffle` does not apply); with the default `sampling="proportional"` an epoch is
        every selected row once, as evaluation needs."""
        if self.sources is not None:
            ds = self.get_dataset(rows, flow, sampling=sampling, temperature=temperature, epoch_size=epoch_size,
                                  seed=seed)
            return ds.loader(batch_size=batch_size, seed=seed, **kwargs)
        import torch

        gen = torch.Generator().manual_seed(seed) if shuffle else None
        ds = self.get_dataset(rows, flow)
        return ds.loader(batch_size=batch_size, shuffle=shuffle, generator=gen, **kwargs)

    def loaders(self, batch_size: int = 32, flow: Optional[TaskFlow] = None, seed: int = 0,
                splits: Iterable[str] = ("train", "valid"), sampling: Any = "proportional",
                temperature: Optional[float] = None, epoch_size: Optional[int] = None, **kwargs) -> Dict[str, Any]:
        """`{split: DataLoader}` (train shuffled with a seeded generator), for `runner.train(loaders=...)`.

        Several sources: the train loader mixes them as `sampling`, `temperature` and
        `epoch_size` say (`MixedDataset`); the others take every row once (proportional), so that
        their metrics, overall and per source, are over the whole split. A project of one table
        has nothing to mix: a `sampling`, `temperature` or `epoch_size` other than the defaults
        is an error there, not silently ignored."""
        if self.sources is None:
            given = [name for name, value, default in (("sampling", sampling, "proportional"), ("temperature", temperature, None),
                                                       ("epoch_size", epoch_size, None)) if value != default]
            if given:
                raise TypeError(f"Project.loaders: {', '.join(given)} choose how several sources are mixed, but this "
                                "project has one table; pass a mapping of tables, Project({name: df, ...}), to mix sources")
            return {name: self.loader(name, batch_size, shuffle=name == "train", seed=seed, flow=flow, **kwargs)
                    for name in splits}
        return {name: self.loader(name, batch_size, seed=seed, flow=flow, **kwargs,
                                  **(dict(sampling=sampling, temperature=temperature, epoch_size=epoch_size)
                                     if name == "train" else {}))
                for name in splits}

    # Training --------------------------------------------------------------------------------------
    def runner(self, model: Optional[nn.Module] = None, runner_name: str = "runner", **kwargs):
        """A `dnn_cool_catalyst.runners.FlowRunner` for the full flow, logging to `project_dir/runner_name`."""
        if self.project_dir is None:
            raise ValueError("project.runner needs a project_dir (its logdir is project_dir/runner_name)")
        if not runner_name or os.sep in runner_name or runner_name in (".", ".."):
            raise ValueError(f"runner_name must be a plain directory name, got {runner_name!r}")
        from .runners import FlowRunner  # Catalyst is imported only when a runner is asked for

        return FlowRunner(self.get_full_flow(), model=model, logdir=os.path.join(self.project_dir, runner_name), **kwargs)


__all__ = ["BackboneModel", "ImageFiles", "Project", "SPLITS", "load_columns", "load_or_make_split", "make_split",
           "save_columns", "table_fingerprint"]
