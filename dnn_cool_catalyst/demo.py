"""`make demo` / `python -m dnn_cool_catalyst.demo`: the home-security story end to end.

Generates the synthetic camera images and their annotation table, builds the story's flows on a
`Project`, trains a small conv net with `FlowRunner` on the CPU, tunes the decoders, evaluates
on the test split, prints the evaluation table and the tree explanations of two test images, and
says where the TensorBoard logs are.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch

from . import BackboneModel, Converters, Project, datasets
from .files import write_json
from .project import SPLITS, load_or_make_split, split_file, table_fingerprint
from .story import BODY_BOX, FACE_BOX, add_security_flows, security_cnn, two_source_tables

# The quality bar the demo is held to on the test split (issue: "the whole story end to end").
BAR_BINARY_ACCURACY = 0.95
BAR_BOX_MAE = 0.05  # label units: a fraction of the image size
BAR_SHIRT_ACCURACY = 0.9


def load_story_table(root: str, n: int, seed: int) -> pd.DataFrame:
    """The annotation table under `root`, generating images and `labels.csv` unless `root` holds
    exactly the data of `n` and `seed` (`datasets.security_table`)."""
    return datasets.security_table(root, n, seed=seed)


def build_project(df: Any, image_root: str, project_dir: str, features: int = 256, seed: int = 0) -> Project:
    """The story's project: one task per annotated column, images read lazily from `image_root`;
    `seed` draws the split and initialises the heads. `df` may be `{source: table}` (several sources)."""
    project = Project(
        df, input_col="img",
        converters=Converters(
            image_root=image_root, in_features=features,
            types={"shirt_type": "category", "facial_characteristics": "multilabel"},
            class_names={"shirt_type": list(datasets.SHIRT_TYPES),
                         "facial_characteristics": list(datasets.FACIAL_CHARACTERISTICS)},
            scales={c: 64.0 for c in FACE_BOX + BODY_BOX}),
        project_dir=project_dir, seed=seed)
    add_security_flows(project)
    return project


@dataclasses.dataclass
class DemoSettings:
    """What the demo and `configs/security.yml` are run with (YAML overlays change these fields)."""

    project_dir: str = "demo_project"  # data in <project_dir>/data, logs in <project_dir>/<runner_name>
    runner_name: str = "demo"
    n: int = 4000  # generated images (80% train, 10% valid, 10% test)
    seed: int = 0  # data, split, initialisation and shuffling
    epochs: int = 16
    batch_size: int = 64
    lr: float = 3e-3
    features: int = 256  # width of the backbone's output, read by every head as x.features
    dropout: float = 0.0  # dropout on the backbone's features (needed by mc_samples)
    mc_samples: int = 0  # MC-dropout passes for the evaluation's entropy/variance columns (0: none)
    attribution: str = ""  # heat maps beside the logged best/worst images: gradcam, saliency, integrated_gradients

    @property
    def mc_passes(self) -> Optional[int]:
        """`mc_samples`, or None when 0 (what `runner.evaluate(mc_samples=...)` takes)."""
        return self.mc_samples or None

    @property
    def attribution_method(self) -> Optional[str]:
        """`attribution`, or None when empty (what `InterpretationCallback(attribution=...)` takes)."""
        return self.attribution or None

    @property
    def data_dir(self) -> str:
        return os.path.join(self.project_dir, "data")

    @property
    def logdir(self) -> str:
        return os.path.join(self.project_dir, self.runner_name)


def story_project(settings: DemoSettings) -> Project:
    """The story's `Project` for `settings`, generating the data on first use."""
    df = load_story_table(settings.data_dir, settings.n, settings.seed)
    return build_project(df, settings.data_dir, settings.project_dir, settings.features, settings.seed)


def two_source_project(settings: DemoSettings) -> Project:
    """The story from two sources (`story.two_source_tables`: "door_cam" labels the door tasks,
    "people" the person tasks, disjoint halves of the generated rows): one `Project` over both;
    its loaders mix them (`MixedDataset`). Each source is split as the single-table story splits
    the whole table (`common_source_splits`), so both models are tested on the same rows."""
    df = load_story_table(settings.data_dir, settings.n, settings.seed)
    tables = two_source_tables(df, seed=settings.seed)
    common_source_splits(df, tables, settings.project_dir, settings.seed)
    return build_project(tables, settings.data_dir, settings.project_dir, settings.features, settings.seed)


def common_source_splits(df: pd.DataFrame, tables: dict, project_dir: str, seed: int,
                         fractions=(0.8, 0.1, 0.1), input_cols=("img",)) -> None:
    """Write each source's split file (`split_<source>.json`, unless it exists) from the split of
    the whole table (`split.json`, made first if absent, exactly as the single-table `Project` makes
    it): a row is in the same part (train, valid or test) in both projects, so a model trained on
    the sources and one trained on the whole table share their test rows. `tables` hold rows of
    `df` under their index labels (`story.two_source_tables`)."""
    cols = list(input_cols)
    os.makedirs(project_dir, exist_ok=True)
    whole = load_or_make_split(split_file(project_dir, None), len(df), fractions, seed, table_fingerprint(df[cols]))
    part = np.empty(len(df), dtype=object)
    for name, rows in whole.items():
        part[rows] = name
    for source, table in tables.items():
        path = split_file(project_dir, source)
        if os.path.exists(path):
            continue  # Project checks it against the table, and says how to start again
        where = part[df.index.get_indexer(table.index)]
        local = {name: np.flatnonzero(where == name) for name in SPLITS}
        write_json(path, {"num_rows": len(table), "fingerprint": table_fingerprint(table[cols]),
                          "fractions": [float(f) for f in fractions], "seed": seed,
                          **{name: rows.tolist() for name, rows in local.items()}})


def story_model(project: Project, settings: DemoSettings) -> BackboneModel:
    """`security_cnn` feeding the project's full flow, initialised from `settings.seed`."""
    torch.manual_seed(settings.seed)
    return BackboneModel(security_cnn(settings.features, dropout=settings.dropout), project.get_full_flow())


def quality_report(table: pd.DataFrame) -> list:
    """`[(task_path, metric_name, value, bar, ok)]` for the demo's quality bar."""
    rows = []
    for r in table.itertuples():
        leaf = r.task_path.rsplit(".", 1)[-1]
        if r.metric_name == "accuracy" and leaf in ("camera_blocked", "door_open", "door_locked", "person_present"):
            rows.append((r.task_path, r.metric_name, r.metric_res, BAR_BINARY_ACCURACY, r.metric_res >= BAR_BINARY_ACCURACY))
        elif r.metric_name == "mean_absolute_error":
            rows.append((r.task_path, r.metric_name, r.metric_res, BAR_BOX_MAE, r.metric_res <= BAR_BOX_MAE))
        elif r.metric_name == "accuracy_1" and leaf == "shirt_type":
            rows.append((r.task_path, r.metric_name, r.metric_res, BAR_SHIRT_ACCURACY, r.metric_res >= BAR_SHIRT_ACCURACY))
    return rows


def main(argv=None) -> int:
    defaults = DemoSettings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in dataclasses.fields(DemoSettings):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=field.type if callable(field.type) else
                            type(getattr(defaults, field.name)), default=getattr(defaults, field.name))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = vars(parser.parse_args(argv))
    torch.set_num_threads(args.pop("threads") or os.cpu_count() or 1)
    settings = DemoSettings(**args)
    start = time.time()

    project = story_project(settings)
    df = project.df
    print(f"data: {len(df)} images and labels in {settings.data_dir} ({time.time() - start:.1f}s)")
    flow = project.get_full_flow()
    model = story_model(project, settings)
    runner = project.runner(model, settings.runner_name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs)
    callbacks = {}
    if settings.attribution_method:  # heat maps beside the logged best/worst images
        from .callbacks import InterpretationCallback  # the demo's Catalyst side, as project.runner
        callbacks["interpretation"] = InterpretationCallback(attribution=settings.attribution_method)
    runner.train(loaders=project.loaders(batch_size=settings.batch_size, seed=settings.seed), optimizer=optimizer,
                 scheduler=scheduler, num_epochs=settings.epochs, seed=settings.seed, load_best_on_end=True,
                 overwrite=True, callbacks=callbacks)  # each demo run starts afresh in settings.logdir
    print(f"trained {settings.epochs} epochs ({time.time() - start:.0f}s)")

    runner.tune(project.loader("valid"))
    print("\nThe test split:")
    table = runner.evaluate(project.loader("test"), mc_samples=settings.mc_passes)  # prints the table, one line per task

    print("\nTree explanations of two test images (preconditions from the predictions):")
    x, _ = next(iter(project.get_dataset("test").loader(batch_size=2)))
    model.eval()
    with torch.no_grad():
        outputs = model({"img": x["img"]})
    ids = [df["img"].iloc[i] for i in project.rows("test")[:2]]
    for tree in flow.get_treelib_explainer()(outputs, ids=ids):
        print(tree.show(stdout=False))

    report = quality_report(table)
    failed = [r for r in report if not r[4]]
    print(f"Quality bar: {len(report) - len(failed)}/{len(report)} met"
          + "".join(f"\n  MISSED {p} {m} = {v:.4f} (bar {b})" for p, m, v, b, _ in failed))
    print(f"\nLogs, checkpoints, tuned_params.json and evaluation.csv: {settings.logdir}\n"
          f"TensorBoard: .venv/bin/tensorboard --logdir {os.path.join(settings.logdir, 'tensorboard')}  "
          f"(then open http://localhost:6006)\nTotal time: {time.time() - start:.0f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
