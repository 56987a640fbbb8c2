"""The story from one table against the story from two sources, side by side, on their common test
split (issue 13): each model's evaluation table with *every* label of the test rows (the two-source
model never saw a row labelled for all tasks), and the demo's quality bar.

Train both first (the two-source project splits each source as the whole table is split,
`demo.common_source_splits`, so both hold out the same test rows):

    catalyst-run --config configs/security.yml                          # -> <project_dir>/config_run
    catalyst-run --config configs/security.yml configs/two_sources.yml  # -> <project_dir>/two_sources
    python benchmarks/two_sources.py --project-dir demo_project

`configs/two_sources.yml` trains 32 epochs, as many labelled samples per task as the single
table's 16 (each source labels its tasks on half of the rows). For the same 16 epochs add an
overlay such as `settings: {epochs: 16, runner_name: two_sources_16}` and pass `--two two_sources_16`.

Both configs end with `runner.export` (`<logdir>/export`: weights and tuned thresholds), which is
what this script reads. It prints one line per task and metric: the single-table value, the
two-source value and whether each meets the bar where the demo has one.
"""
from __future__ import annotations

import argparse
import os

import pandas as pd
import torch

from dnn_cool_catalyst import inference
from dnn_cool_catalyst.demo import DemoSettings, quality_report, story_model, story_project
from dnn_cool_catalyst.tuning import load_tuned


def evaluate_export(project, settings: DemoSettings, export_dir: str) -> pd.DataFrame:
    """The evaluation table of the model exported in `export_dir` on the project's test split
    (preconditions from the labels), with its tuned thresholds."""
    model = story_model(project, settings)
    state = torch.load(os.path.join(export_dir, "weights.pth"), weights_only=True)
    model.load_state_dict(state)
    flow = project.get_full_flow()
    flow.get_decoder().load_tuned(load_tuned(os.path.join(export_dir, "tuned_params.json")))
    loader = project.loader("test", batch_size=settings.batch_size)
    return inference.evaluate(model.eval(), flow, loader, "gt", name="two_sources")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project-dir", default="demo_project")
    parser.add_argument("--single", default="config_run", help="runner name of the single-table run")
    parser.add_argument("--two", default="two_sources", help="runner name of the two-source run")
    parser.add_argument("--n", type=int, default=DemoSettings.n)
    parser.add_argument("--seed", type=int, default=DemoSettings.seed)
    args = parser.parse_args(argv)
    settings = DemoSettings(project_dir=args.project_dir, n=args.n, seed=args.seed)
    project = story_project(settings)  # the whole table and its split.json
    tables = {}
    for label, runner in (("single table", args.single), ("two sources", args.two)):
        export_dir = os.path.join(args.project_dir, runner, "export")
        if not os.path.isfile(os.path.join(export_dir, "weights.pth")):
            raise SystemExit(f"{export_dir}: no exported model; run the config first (see the docstring)")
        tables[label] = evaluate_export(project, settings, export_dir)
    bars = {}
    for label, table in tables.items():
        for path, metric, value, bar, ok in quality_report(table):
            bars[(label, path, metric)] = (bar, ok)
    merged = tables["single table"].merge(tables["two sources"], on=["task_path", "metric_name"],
                                          suffixes=("_single", "_two"))
    merged = merged[~merged.metric_name.str.contains("/")]  # overall rows; per-class rows are in the tables
    print(f"{'task':58s} {'metric':28s} {'n':>5s} {'single':>9s} {'two src':>9s}  bar")
    for r in merged.itertuples():
        bar = bars.get(("single table", r.task_path, r.metric_name))
        two_ok = bars.get(("two sources", r.task_path, r.metric_name))
        mark = "" if bar is None else f"{bar[0]:g}: {'ok' if bar[1] else 'MISSED'} / {'ok' if two_ok[1] else 'MISSED'}"
        print(f"{r.task_path:58s} {r.metric_name:28s} {r.num_samples_single:5d} {r.metric_res_single:9.4f} "
              f"{r.metric_res_two:9.4f}  {mark}")
    for label in tables:
        met = [ok for (lab, _, _), (_, ok) in bars.items() if lab == label]
        print(f"{label}: quality bar {sum(met)}/{len(met)} met")


if __name__ == "__main__":
    main()
