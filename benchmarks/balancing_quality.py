"""What each loss-balancing method buys: test metrics per task against `EqualWeighting`.

Methods are discovered from `dnn_cool_catalyst.balancing.__all__`: every concrete `Balancer`
with its defaults (a `GradientBalancer` that supports it also as `<name>-rep`, its representation
variant). Nothing is tuned per method: every method trains with the same model, data, optimizer,
epochs and seeds.

Case `synthetic`: a generated multi-task set (a random teacher network over 16 input features)
with a gate and seven tasks under it or beside it:

- `active` (binary, every sample labelled), the precondition of the tasks marked `| active`;
- `flag` (binary | active), `flag_rare` (binary, labelled on 10% of the samples);
- `level` (bounded regression | active, targets in a narrow band: losses ~1e-2 at the start),
  `level_rare` (bounded regression | active, labelled on 10%);
- `kind` (10-class classification | active, losses ~1), `kind_rare` (5 classes, labelled on 10%).

So the task losses differ in scale by about 100x and more (the script prints each task's mean loss
at initialisation and after equal-weights training) and three tasks have labels on a tenth of
the samples (a twentieth under `active`). A shared MLP backbone (16-64-64) and one linear head
per task, AdamW, a plain loop: `loss_fn(outputs, targets).backward()` for loss-weighting methods,
`loss_fn.backward(outputs, targets, shared_parameters=backbone)` for gradient methods;
`loss_fn.balancer.epoch_end()` after each epoch (DWA's periods). Each method runs with 3 seeds
(data, initialisation and order); the table shows the per-task test metric (mean over seeds:
accuracy for binary tasks and classifications, mean absolute error for regressions) and
Delta_m = mean over tasks of the relative improvement over EqualWeighting, sign-corrected (a
lower MAE is an improvement), in percent, from the seed-mean metrics; and the range of the
per-seed Delta_m (each seed against EqualWeighting of the same seed).

Case `story`: the demo's home-security story (`dnn_cool_catalyst.demo`): the same generated images,
split, conv net, optimizer (AdamW lr 3e-3, weight decay 1e-4, cosine schedule), batch size,
epochs (16), seed and checkpoint choice (best validation loss), now through
`FlowRunner(..., balancer=method)` (the balancer's parameters join the optimizer as a second group,
as `FlowRunner` does); decoders tuned on the validation split as the demo does; then the test
split's evaluation: the mean of the eight box MAEs (label units, a fraction of the image size, the
demo's `mean_absolute_error`), `facial_characteristics` accuracy, the four binary accuracies and
`shirt_type` accuracy. The goal of the issue: box MAE <= 0.02 with every other task at the
equal-weights level.

    python benchmarks/balancing_quality.py synthetic                    # every method, 3 seeds
    python benchmarks/balancing_quality.py story --methods equal uncertainty dwa famo
    python benchmarks/balancing_quality.py story --methods equal --epochs 2     # a quick check
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

import dnn_cool_catalyst as dcc
from dnn_cool_catalyst import balancing
from dnn_cool_catalyst.inference import evaluate

# Short names of the methods on the command line and in the tables; others are the class name lowercased.
SHORT = {"EqualWeighting": "equal", "UncertaintyWeighting": "uncertainty", "DynamicWeightAverage": "dwa",
         "RandomLossWeighting": "rlw", "GeometricLossStrategy": "gls"}


def discover_methods() -> Dict[str, Tuple[Callable[[], balancing.Balancer], bool]]:
    """`{name: (factory, is_gradient_method)}` for every concrete balancer in `balancing.__all__`
    (gradient methods that support it also as `<name>-rep`), EqualWeighting first."""
    found: Dict[str, Tuple[Callable[[], balancing.Balancer], bool]] = {}
    for cls_name in balancing.__all__:
        cls = getattr(balancing, cls_name)
        if (not isinstance(cls, type) or not issubclass(cls, balancing.Balancer) or inspect.isabstract(cls)
                or cls in (balancing.Balancer, balancing.GradientBalancer)):
            continue
        name = SHORT.get(cls_name, cls_name.lower())
        gradient = issubclass(cls, balancing.GradientBalancer)
        found[name] = (cls, gradient)
        if gradient and cls.supports_representation:
            found[name + "-rep"] = ((lambda c=cls: c(representation=True)), True)
    return dict(sorted(found.items(), key=lambda kv: kv[0] != "equal"))


def choose(methods: Dict, names) -> Dict:
    if not names:
        return methods
    unknown = [n for n in names if n not in methods]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; available: {', '.join(methods)}")
    if "equal" not in names:
        names = ["equal", *names]  # the baseline of every comparison
    return {n: methods[n] for n in names}


# ----------------------------------------------------------------------------------------------
# Case (a): synthetic
# ----------------------------------------------------------------------------------------------

# task -> (kind, classes, precondition "active", labelled fraction); metric direction follows the kind
SYNTHETIC = {
    "active": ("binary", 1, False, 1.0),
    "flag": ("binary", 1, True, 1.0),
    "flag_rare": ("binary", 1, False, 0.1),
    "level": ("regression", 1, True, 1.0),
    "level_rare": ("regression", 1, True, 0.1),
    "kind": ("classification", 10, True, 1.0),
    "kind_rare": ("classification", 5, False, 0.1),
}
IN_FEATURES, HIDDEN = 16, 64


def synthetic_flow(seed: int):
    torch.manual_seed(seed)
    tasks = []
    for name, (kind, k, _, _) in SYNTHETIC.items():
        head = nn.Linear(HIDDEN, k)
        if kind == "binary":
            tasks.append(dcc.BinaryClassificationTask(name, head))
        elif kind == "regression":
            tasks.append(dcc.BoundedRegressionTask(name, head))
        else:
            tasks.append(dcc.ClassificationTask(name, head))
    t = dcc.Tasks(tasks, inputs=["features"])

    @t.add_flow
    def synthetic(flow, x, out):
        for name, (_, _, gated, _) in SYNTHETIC.items():
            entry = getattr(flow, name)(x.features)
            out += (entry | out.active) if gated else entry
        return out

    return synthetic


def synthetic_data(n: int, seed: int):
    """Inputs and labels (task format) from a fixed random teacher (seed 1234) and noise from `seed`."""
    teacher = torch.Generator().manual_seed(1234)
    w1 = torch.randn(IN_FEATURES, 32, generator=teacher) / math.sqrt(IN_FEATURES)
    w2 = torch.randn(32, 24, generator=teacher) / math.sqrt(32)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN_FEATURES, generator=g)
    f = torch.tanh(x @ w1) @ w2 * 2.0  # (n, 24) teacher features
    noise = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    y = {
        "active": (f[:, 0] + 0.3 * noise(n) > 0).float(),
        "flag": (f[:, 1] + 0.3 * noise(n) > 0).float(),
        "flag_rare": (f[:, 2] + 0.3 * noise(n) > 0).float(),
        "level": 0.5 + 0.15 * torch.tanh(f[:, 3] + 0.2 * noise(n)),  # a narrow band: MSE ~1e-2 at the start
        "level_rare": 0.5 + 0.15 * torch.tanh(f[:, 4] + 0.2 * noise(n)),
        "kind": (f[:, 5:15] + 0.3 * noise(n, 10)).argmax(1),
        "kind_rare": (f[:, 15:20] + 0.3 * noise(n, 5)).argmax(1),
    }
    for name, (kind, _, _, fraction) in SYNTHETIC.items():
        if fraction < 1.0:
            drop = torch.rand(n, generator=g) >= fraction
            if kind == "classification":
                y[name] = torch.where(drop, torch.full_like(y[name], -1), y[name])
            else:
                y[name] = torch.where(drop, torch.full_like(y[name], float("nan")), y[name])
    return {"features": x}, {k: v.numpy() for k, v in y.items()}


class Net(nn.Module):
    """A shared MLP backbone, then the flow's heads on its features."""

    def __init__(self, flow, in_features: int, hidden: int):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.heads = flow.torch()

    def forward(self, x):
        return self.heads({"features": self.backbone(x["features"]), "gt": x["gt"]})


def train_loop(model: Net, loss_fn, gradient: bool, loader, epochs: int, lr: float, seed: int) -> None:
    """AdamW on the model and (without weight decay) the balancer's parameters; a plain loop."""
    opt = torch.optim.AdamW([{"params": list(model.parameters())},
                             {"params": list(loss_fn.parameters()), "weight_decay": 0.0}], lr=lr)
    torch.manual_seed(seed)
    model.train()
    loss_fn.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            out = model(x)
            if gradient:
                loss_fn.backward(out, y, shared_parameters=model.backbone.parameters())
            else:
                loss_fn(out, y).backward()
            opt.step()
        loss_fn.balancer.epoch_end()


def main_metric(table, path: str, kind: str) -> float:
    name = {"binary": "accuracy", "regression": "mean_absolute_error", "classification": "accuracy_1"}[kind]
    rows = table[(table.task_path == path) & (table.metric_name == name)]
    return float(rows.metric_res.iloc[0]) if len(rows) else float("nan")


def delta_m(metrics: Dict[str, float], base: Dict[str, float]) -> float:
    """Mean relative improvement over `base` in percent (lower is better for MAE)."""
    terms = []
    for path, (kind, _, _, _) in SYNTHETIC.items():
        sign = -1.0 if kind == "regression" else 1.0
        terms.append(sign * (metrics[path] - base[path]) / base[path])
    return 100.0 * sum(terms) / len(terms)


def run_synthetic(args) -> int:
    methods = choose(discover_methods(), args.methods)
    seeds = list(range(args.seeds))
    print(f"synthetic: {len(SYNTHETIC)} tasks, {args.n} training / {args.n_test} test samples, MLP "
          f"{IN_FEATURES}-{HIDDEN}-{HIDDEN}, batch {args.batch}, {args.epochs} epochs, AdamW lr {args.lr}, "
          f"seeds {seeds}; torch {torch.__version__}, {torch.get_num_threads()} thread(s)", flush=True)
    print(f"methods: {', '.join(methods)}", flush=True)
    results: Dict[str, List[Dict[str, float]]] = {m: [] for m in methods}
    losses_at: Dict[str, Dict[str, float]] = {}
    for seed in seeds:
        train_data = synthetic_data(args.n, seed)
        test_data = synthetic_data(args.n_test, 10_000 + seed)
        for name, (make, gradient) in methods.items():
            start = time.perf_counter()
            flow = synthetic_flow(seed)
            model = Net(flow, IN_FEATURES, HIDDEN)  # heads from synthetic_flow(seed), backbone continues the stream
            ds = flow.get_dataset(*train_data)
            loader = ds.loader(batch_size=args.batch, shuffle=True, generator=torch.Generator().manual_seed(seed))
            loss_fn = flow.get_loss(balancer=make())
            if seed == 0 and name == "equal":
                losses_at["init"] = mean_task_losses(model, flow, ds)
            train_loop(model, loss_fn, gradient, loader, args.epochs, args.lr, seed)
            if seed == 0 and name == "equal":
                losses_at["trained"] = mean_task_losses(model, flow, ds)
            test_loader = flow.get_dataset(*test_data).loader(batch_size=1024)
            table = evaluate(model, flow, test_loader, name="balancing_quality")
            results[name].append({p: main_metric(table, p, SYNTHETIC[p][0]) for p in SYNTHETIC})
            # each run as it ends, so that an interrupted run still says something
            cells = " ".join(f"{results[name][-1][p]:.4f}" for p in SYNTHETIC)
            dm = delta_m(results[name][-1], results["equal"][seed]) if len(results["equal"]) > seed else float("nan")
            print(f"  seed {seed} {name:<14s} {time.perf_counter() - start:6.1f}s  {cells}  Delta_m {dm:+.2f}", flush=True)

    if losses_at:
        print("\nper-task mean training loss (equal weights, seed 0): "
              + "  ".join(f"{p} {losses_at['init'][p]:.4g} -> {losses_at['trained'][p]:.4g}" for p in SYNTHETIC))
    base_mean = {p: statistics.fmean(r[p] for r in results["equal"]) for p in SYNTHETIC}
    header = f"{'method':<14s}" + "".join(f"{p:>12s}" for p in SYNTHETIC) + f"{'Delta_m %':>11s}  per-seed range"
    units = f"{'':<14s}" + "".join(f"{('MAE' if SYNTHETIC[p][0] == 'regression' else 'acc'):>12s}" for p in SYNTHETIC)
    print("\n" + header + "\n" + units)
    for name, runs in results.items():
        mean = {p: statistics.fmean(r[p] for r in runs) for p in SYNTHETIC}
        per_seed = [delta_m(r, b) for r, b in zip(runs, results["equal"])]
        cells = "".join(f"{mean[p]:12.4f}" for p in SYNTHETIC)
        print(f"{name:<14s}{cells}{delta_m(mean, base_mean):+11.2f}  [{min(per_seed):+.2f}, {max(per_seed):+.2f}]")
    return 0


def mean_task_losses(model: Net, flow, ds) -> Dict[str, float]:
    """Each task's masked mean loss over the whole dataset `ds` (one batch), unweighted."""
    x, y = next(iter(ds.loader(batch_size=len(ds))))
    was = model.training
    model.eval()
    with torch.no_grad():
        terms = flow.get_loss().terms(model(x), y)
    model.train(was)
    return {p: float(s / c.clamp_min(1)) for p, (s, c) in terms.items()}


# ----------------------------------------------------------------------------------------------
# Case (b): the story
# ----------------------------------------------------------------------------------------------

def story_metrics(table) -> Dict[str, float]:
    """The demo's evaluation table -> box MAE (mean of the eight), facial_characteristics accuracy,
    the binary accuracies and shirt_type accuracy."""
    from dnn_cool_catalyst.story import BINARY

    def leaf(path: str) -> str:
        return path.rsplit(".", 1)[-1]

    out: Dict[str, float] = {}
    maes = table[table.metric_name == "mean_absolute_error"]
    out["box_mae"] = float(maes.metric_res.mean())
    out["box_mae_max"] = float(maes.metric_res.max())
    for r in table.itertuples():
        if r.metric_name == "accuracy" and leaf(r.task_path) in BINARY + ("facial_characteristics",):
            out[leaf(r.task_path)] = float(r.metric_res)
        elif r.metric_name == "accuracy_1" and leaf(r.task_path) == "shirt_type":
            out["shirt_type"] = float(r.metric_res)
    return out


STORY_COLUMNS = ("box_mae", "box_mae_max", "facial_characteristics", "shirt_type", "camera_blocked", "door_open",
                 "door_locked", "person_present")


def run_story(args) -> int:
    from dnn_cool_catalyst import demo

    methods = choose(discover_methods(), args.methods)
    base = demo.DemoSettings()
    epochs = args.epochs if args.epochs is not None else base.epochs
    root = args.project_dir or os.path.join(tempfile.gettempdir(), "dnn_cool_balancing_story")
    data_dir = os.path.join(root, "data")
    start = time.perf_counter()
    df = demo.load_story_table(data_dir, base.n, base.seed)  # generated once, reused while n and seed match
    print(f"story: the demo's data ({len(df)} images in {data_dir}, {time.perf_counter() - start:.0f}s), conv net, "
          f"AdamW lr {base.lr} wd 1e-4, cosine, batch {base.batch_size}, {epochs} epochs, seed {base.seed}, "
          f"best validation loss; torch {torch.__version__}, {torch.get_num_threads()} thread(s)", flush=True)
    print(f"methods: {', '.join(methods)}", flush=True)
    rows = {}
    for name, (make, _) in methods.items():
        start = time.perf_counter()
        settings = demo.DemoSettings(project_dir=os.path.join(root, name), epochs=epochs)
        project = demo.build_project(df, data_dir, settings.project_dir, settings.features, settings.seed)
        model = demo.story_model(project, settings)
        runner = project.runner(model, "run", balancer=make())
        quiet = io.StringIO()
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            warnings.simplefilter("ignore")
            runner.train(loaders=project.loaders(batch_size=settings.batch_size, seed=settings.seed),
                         optimizer=lambda params: torch.optim.AdamW(params, lr=settings.lr, weight_decay=1e-4),
                         scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs),
                         num_epochs=epochs, seed=settings.seed, load_best_on_end=True, overwrite=True,
                         verbose=False)
            runner.tune(project.loader("valid"))
            table = runner.evaluate(project.loader("test"), verbose=False)
        rows[name] = story_metrics(table)
        seconds = time.perf_counter() - start
        cells = "  ".join(f"{c} {rows[name].get(c, float('nan')):.4f}" for c in STORY_COLUMNS)
        print(f"  {name:<14s} {seconds:6.0f}s  {cells}", flush=True)

    eq = rows.get("equal")
    print(f"\n{'method':<14s}" + "".join(f"{c:>24s}" for c in STORY_COLUMNS))
    for name, m in rows.items():
        print(f"{name:<14s}" + "".join(f"{m.get(c, float('nan')):24.4f}" for c in STORY_COLUMNS))
    if eq is not None:
        print(f"\ngoal: box MAE <= 0.02 with every other task at the equal-weights level (accuracy within "
              f"{args.tolerance} of equal's)")
        for name, m in rows.items():
            others = [c for c in STORY_COLUMNS if c not in ("box_mae", "box_mae_max")]
            worse = [c for c in others if m.get(c, 0.0) < eq.get(c, 0.0) - args.tolerance]
            verdict = "met" if m["box_mae"] <= 0.02 and not worse else "not met"
            why = [] if m["box_mae"] <= 0.02 else [f"box MAE {m['box_mae']:.4f}"]
            why += [f"{c} {m[c]:.4f} < {eq[c]:.4f}" for c in worse]
            print(f"  {name:<14s} {verdict}" + (f" ({'; '.join(why)})" if why else ""))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("case", choices=["synthetic", "story"])
    p.add_argument("--methods", nargs="+", default=None,
                   help="method names (default: all discovered; equal is always added as the baseline)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (synthetic: 20; story: the demo's 16)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--seeds", type=int, default=3, help="synthetic: seeds per method")
    p.add_argument("--n", type=int, default=4000, help="synthetic: training samples")
    p.add_argument("--n-test", type=int, default=4000, help="synthetic: test samples")
    p.add_argument("--batch", type=int, default=128, help="synthetic: batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="synthetic: AdamW learning rate")
    p.add_argument("--project-dir", default=None,
                   help="story: where the data and the runs go (default: <tmp>/dnn_cool_balancing_story)")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="story: how far below equal's accuracy still counts as the equal-weights level")
    p.add_argument("--list", action="store_true", help="print the discovered methods and exit")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.list:
        print("\n".join(discover_methods()))
        return 0
    if args.case == "synthetic":
        if args.epochs is None:
            args.epochs = 20
        return run_synthetic(args)
    return run_story(args)


if __name__ == "__main__":
    sys.exit(main())
