"""Per-epoch time of FlowRunner's three callbacks against an epoch without them.

The workload: the seed's home-security flow (`dnn_cool_catalyst.story`, 16 tasks) behind a small
MLP backbone on random inputs, on the CPU. One epoch = a training loader (`--train` samples,
shuffled) and a validation loader (`--valid` samples), batches of `--batch`.

Configurations, all `FlowRunner.train` with the same model, data, seed and a TensorBoard logger:

- `none`: no flow callbacks (`flow_metrics=False, interpretation=False, threshold_tuning=False`);
- `metrics`, `interpretation`, `tuning`: one callback each;
- `all`: the three together (the default of `FlowRunner.train`);
- `plain`, for scale: the same epochs as a hand-written PyTorch loop (the flow module and loss,
  AdamW; no Catalyst, no metrics, no logger).

The speed of a shared machine drifts by 10-40% over seconds, so the configurations take turns
epoch by epoch: each trains in a thread of its own, and only one thread runs at a time (the others
wait at their epoch boundaries); the order of the turns rotates every round. An epoch is timed
from its start to the start of the next one (so the loggers' flush at its end is included) in CPU
time of its thread (`--clock wall` for the wall clock), and the first epoch of each training is
left out (warm-up). Over `--reps` trainings of `--epochs` epochs per configuration, the script
prints each configuration's fastest and median epoch, the fastest epoch's ratio to `none`'s (the
figure of the goal), the median over rounds of the ratio of its epoch to `none`'s epoch of the
same round (seconds apart, so they ran at about the same speed of the machine), and the time
spent inside the flow callbacks' own event handlers per epoch (measured around each handler)
relative to `none`'s median epoch: the direct cost.

    python benchmarks/callbacks_overhead.py                 # 1 thread, defaults below, about 3-4 minutes
    python benchmarks/callbacks_overhead.py --threads 2 --reps 3 --train 16384
    python benchmarks/callbacks_overhead.py --attribution saliency   # adds the `attribution` configuration

`--attribution METHOD` ("saliency", "integrated_gradients", "gradcam") adds a configuration
`attribution`: `InterpretationCallback(attribution=METHOD)`, heat maps of the 2 x top_k ranked
samples per task at each validation end. Heat maps need images: the inputs of every configuration
are then `(1, s, s)` images (s*s = `--raw`, a square of at least 64) that the backbone flattens
first (the same arithmetic), so `interpretation` also publishes its samples' images and the
difference between the two is the cost of the heat maps; with "gradcam" every backbone starts with
a 3x3 `nn.Conv2d(1, 1)` (GradCAM's layer).

    python benchmarks/callbacks_overhead.py --tasks 256     # a generated flow (dnn_cool_catalyst.synthetic)

`--tasks N` replaces the story's flow by `synthetic.generated_tasks(N)` (binary, bounded
regression, 7-class and 5-label tasks with preconditions up to depth 3, some tasks labelled on
10% of the samples) with `synthetic.generated_labels`.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import threading
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from catalyst import dl
from torch import nn

from dnn_cool_catalyst.callbacks import FlowMetricsCallback, InterpretationCallback, ThresholdTuningCallback
from dnn_cool_catalyst.runners import FlowRunner, FlowTensorboardLogger
from dnn_cool_catalyst.story import security_labels, security_tasks
from dnn_cool_catalyst.synthetic import generated_labels, generated_tasks

CONFIGS = ("none", "metrics", "interpretation", "tuning", "all")
CLOCK: Callable[[], float] = time.thread_time  # CPU time of the calling thread


class Backbone(nn.Module):
    def __init__(self, flow_module: nn.Module, raw: int, features: int, conv: bool = False):
        super().__init__()
        layers = [nn.Linear(raw, features), nn.ReLU(), nn.Linear(features, features), nn.ReLU()]
        # --attribution: images (1, s, s) flattened first; with gradcam a conv layer for GradCAM
        self.backbone = nn.Sequential(*([nn.Conv2d(1, 1, 3, padding=1)] if conv else []), nn.Flatten(), *layers)
        self.flow = flow_module

    def forward(self, x):
        return self.flow({"features": self.backbone(x["raw"]), "gt": x.get("gt")})


class Turns:
    """One participant runs at a time, in rounds; the order of the turns rotates every round."""

    def __init__(self, names: Sequence[str]):
        self._cond = threading.Condition()
        self._active = list(names)
        self._round = list(names)
        self._shift = 0
        self._aborted = False

    def wait(self, name: str) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._aborted or (bool(self._round) and self._round[0] == name))
            if self._aborted:
                raise RuntimeError("another configuration failed")

    def abort(self) -> None:
        """Release every waiting participant (with an error): one of them failed."""
        with self._cond:
            self._aborted = True
            self._cond.notify_all()

    def done(self, name: str, finished: bool = False) -> None:
        with self._cond:
            assert self._round[0] == name
            self._round.pop(0)
            if finished:
                self._active.remove(name)
            if not self._round and self._active:
                self._shift += 1
                k = self._shift % len(self._active)
                self._round = self._active[k:] + self._active[:k]
            self._cond.notify_all()


class EpochTimer(dl.Callback):
    """Times each epoch from its start to the next one's (or the end of the experiment), and hands
    the turn to the next configuration between epochs."""

    def __init__(self, name: str, turns: Turns):
        super().__init__(order=dl.CallbackOrder.Internal)
        self.name, self.turns = name, turns
        self.times: List[float] = []
        self._start: Optional[float] = None

    def _stop(self) -> None:
        if self._start is not None:
            self.times.append(CLOCK() - self._start)

    def on_epoch_start(self, runner):
        if self._start is not None:  # not the first epoch: the previous one ends here
            self._stop()
            self.turns.done(self.name)
            self.turns.wait(self.name)
        self._start = CLOCK()

    def on_experiment_end(self, runner):
        self._stop()  # after the last epoch's logging and flush


class Timed(dl.CallbackWrapper):
    """A callback whose event handlers are timed (per epoch, epoch-level events excluded)."""

    EVENTS = ("on_loader_start", "on_batch_start", "on_batch_end", "on_loader_end")

    def __init__(self, callback: dl.Callback):
        super().__init__(callback)
        self.per_epoch: List[float] = []
        for name in self.EVENTS:
            setattr(self, name, self._timed(getattr(callback, name)))

    def _timed(self, handler):
        def run(runner):
            start = CLOCK()
            handler(runner)
            self.per_epoch[-1] += CLOCK() - start
        return run

    def on_epoch_start(self, runner):
        self.per_epoch.append(0.0)
        self.callback.on_epoch_start(runner)


def build(args, seed: int = 0):
    torch.manual_seed(seed)
    tasks = generated_tasks(args.tasks, features=args.features) if args.tasks else security_tasks(features=args.features)
    flow = tasks.get_full_flow()
    return flow, Backbone(flow.torch(), args.raw, args.features, conv=args.attribution == "gradcam")


def make_data(args):
    rng = np.random.default_rng(0)
    n = args.train + args.valid
    inputs = {"raw": rng.normal(size=(n, args.raw)).astype(np.float32)}
    if args.attribution:  # images for the heat maps: (1, s, s)
        side = int(round(args.raw ** 0.5))
        if side * side != args.raw or side < 8:
            raise SystemExit(f"--attribution needs --raw to be a square of at least 64 (images s x s), got {args.raw}")
        inputs["raw"] = inputs["raw"].reshape(n, 1, side, side)
    if args.tasks:
        labels = {k: v.numpy() for k, v in generated_labels(build(args)[0], n, seed=1).items()}
    else:
        labels = security_labels(n, seed=1)
    split = lambda v, s: {k: a[s] for k, a in v.items()}  # noqa: E731
    return ((split(inputs, slice(0, args.train)), split(labels, slice(0, args.train))),
            (split(inputs, slice(args.train, n)), split(labels, slice(args.train, n))))


def loaders(flow, data, args):
    train, valid = data
    tr = flow.get_dataset(*train, with_index=True, computed=["features"])
    va = flow.get_dataset(*valid, with_index=True, computed=["features"])
    return {"train": tr.loader(batch_size=args.batch, shuffle=True), "valid": va.loader(batch_size=args.batch)}


def run_catalyst(config: str, data, args, turns: Turns, out: Dict[str, list]) -> None:
    """One training of `config`, taking turns; appends its epoch times and the time spent inside
    the flow callbacks' handlers in each epoch to `out` (the first epoch left out)."""
    turns.wait(config)
    flow, model = build(args)
    timer = EpochTimer(config, turns)
    with tempfile.TemporaryDirectory() as logdir:
        timed = []
        if config in ("metrics", "all"):
            timed.append(Timed(FlowMetricsCallback()))
        if config in ("interpretation", "all"):
            timed.append(Timed(InterpretationCallback(logdir=logdir)))
        if config == "attribution":
            timed.append(Timed(InterpretationCallback(logdir=logdir, attribution=args.attribution)))
        if config in ("tuning", "all"):
            timed.append(Timed(ThresholdTuningCallback(logdir=logdir)))
        runner = FlowRunner(flow, model=model)
        runner.train(loaders=loaders(flow, data, args), num_epochs=args.epochs, seed=0, callbacks=[timer] + timed,
                     loggers={"tensorboard": FlowTensorboardLogger(logdir=logdir)},
                     flow_metrics=False, interpretation=False, threshold_tuning=False)
    inside = [sum(t.per_epoch[e] for t in timed) for e in range(len(timer.times))]
    out["epochs"] += timer.times[1:]
    out["inside"] += inside[1:]
    turns.done(config, finished=True)


def run_plain(data, args, turns: Turns, out: Dict[str, list]) -> None:
    """The same epochs as a bare PyTorch loop: forward, flow loss, backward, AdamW; valid forward + loss."""
    turns.wait("plain")
    flow, model = build(args)
    loss_fn = flow.get_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for epoch in range(args.epochs):
        if epoch:
            turns.done("plain")
            turns.wait("plain")
        torch.manual_seed(epoch)
        ld = loaders(flow, data, args)
        start = CLOCK()
        model.train()
        for x, y in ld["train"]:
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            for x, y in ld["valid"]:
                loss_fn(model(x), y)
        times.append(CLOCK() - start)
    out["epochs"] += times[1:]
    turns.done("plain", finished=True)


def run_all(data, args, order: Sequence[str]) -> Dict[str, Dict[str, list]]:
    """One training per configuration (and the plain loop), in threads that take turns."""
    results = {name: {"epochs": [], "inside": []} for name in order}
    turns = Turns(order)
    errors: List[BaseException] = []

    def guarded(target, *a):
        try:
            target(*a)
        except BaseException as e:  # noqa: BLE001 - reported in the main thread
            errors.append(e)
            turns.abort()

    threads = [threading.Thread(target=guarded, args=(run_plain, data, args, turns, results[name])) if name == "plain"
               else threading.Thread(target=guarded, args=(run_catalyst, name, data, args, turns, results[name]))
               for name in order]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"a configuration failed: {errors[0]!r}") from errors[0]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=8192)
    parser.add_argument("--valid", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--raw", type=int, default=64)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=13, help="epochs per training (the first is left out)")
    parser.add_argument("--reps", type=int, default=3, help="trainings per configuration")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tasks", type=int, default=0, help="a generated flow of this many tasks (0: the story's 16)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--attribution", choices=("saliency", "integrated_gradients", "gradcam"), default=None,
                        help="add the configuration `attribution` (InterpretationCallback with heat maps)")
    args = parser.parse_args()
    global CONFIGS
    if args.attribution:
        CONFIGS = CONFIGS + ("attribution",)
    global CLOCK
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    data = make_data(args)
    epochs: Dict[str, List[float]] = {c: [] for c in ("plain",) + CONFIGS}
    inside: Dict[str, List[float]] = {c: [] for c in CONFIGS}
    order = ["plain", *CONFIGS]
    for rep in range(args.reps):
        with contextlib.redirect_stdout(io.StringIO()):
            results = run_all(data, args, order)
        for name, r in results.items():
            epochs[name] += r["epochs"]
            if name in inside:
                inside[name] += r["inside"]
        order = order[1:] + order[:1]
    base_min, base_median = min(epochs["none"]), statistics.median(epochs["none"])
    workload = f"generated flow ({args.tasks} tasks)" if args.tasks else "security flow (16 tasks)"
    print(f"{workload}, {args.train} train + {args.valid} valid samples, batch {args.batch}, "
          f"backbone {args.raw}->{args.features}, {args.threads} thread(s), {args.reps} runs x {args.epochs - 1} timed "
          f"epochs per configuration, taking turns epoch by epoch, {args.clock} time")
    print(f"{'configuration':<16}{'epoch min':>11}{'median':>9}{'min/none':>10}{'paired':>8}{'in callbacks':>14}"
          f"{'/ none':>8}")
    paired = {}
    for config in ("plain",) + CONFIGS:
        lo, mid = min(epochs[config]), statistics.median(epochs[config])
        # epochs of the same training round, rep by rep (each list is in the order they ran)
        paired[config] = statistics.median(a / b for a, b in zip(epochs[config], epochs["none"]))
        spent = statistics.median(inside[config]) if config in inside else float("nan")
        print(f"{config:<16}{lo:>11.3f}{mid:>9.3f}{lo / base_min:>10.3f}{paired[config]:>8.3f}{spent:>14.3f}"
              f"{spent / base_median:>8.3f}")
    direct = statistics.median(inside["all"]) / base_median
    whole = min(epochs["all"]) / base_min - 1
    print(f"all three callbacks: {100 * direct:.1f}% of an epoch spent inside them, {100 * whole:.1f}% longer fastest "
          f"epoch (goal: at most 15%), {100 * (paired['all'] - 1):.1f}% longer epoch paired by round (median)")
    if args.attribution:
        extra = (statistics.median(inside["attribution"]) - statistics.median(inside["interpretation"])) / base_median
        print(f"attribution={args.attribution}: interpretation with heat maps {paired['attribution']:.3f}x an epoch "
              f"without callbacks (paired), without {paired['interpretation']:.3f}x; the heat maps cost "
              f"{100 * extra:.1f}% of an epoch")


if __name__ == "__main__":
    main()
