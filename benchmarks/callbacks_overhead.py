"""Per-epoch time of FlowRunner's three callbacks against an epoch without them.

The workload: the seed's home-security flow (`dnn_cool_catalyst.story`, 16 tasks) behind a small
MLP backbone on random inputs, on the CPU. One epoch = a training loader (`--train` samples,
shuffled) and a validation loader (`--valid` samples), batches of `--batch`.

Configurations, all `FlowRunner.train` with the same model, data, seed and a TensorBoard logger:

- `none`: no flow callbacks (`flow_metrics=False, interpretation=False, threshold_tuning=False`);
- `metrics`, `interpretation`, `tuning`: one callback each;
- `all`: the three together (the default of `FlowRunner.train`).

Each run trains `--epochs` epochs; an epoch is timed from `on_epoch_start` to `on_epoch_end` in
CPU time of the process (`--clock wall` for the wall clock; with one thread they agree on an idle
machine, and CPU time is much less disturbed by other processes on a shared one), the
first epoch is left out (warm-up). Over `--reps` runs (the order of the configurations rotates
between repetitions) the script prints each configuration's fastest and median epoch, the
fastest epoch's ratio to `none`'s, and the time spent inside the flow callbacks' own event
handlers per epoch (measured around each handler), relative to `none`'s median epoch: the
direct cost, far less disturbed by other load than a difference of two epoch times. For scale, the
same epoch is also timed as a hand-written PyTorch loop (the flow module and loss, AdamW, no
Catalyst, no metrics): `plain`.

    python benchmarks/callbacks_overhead.py                 # 1 thread, defaults below
    python benchmarks/callbacks_overhead.py --threads 2 --reps 5 --train 16384
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
import warnings
from typing import Dict, List, Tuple

import numpy as np
import torch
from catalyst import dl
from torch import nn

from dnn_cool_catalyst.callbacks import FlowMetricsCallback, InterpretationCallback, ThresholdTuningCallback
from dnn_cool_catalyst.runners import FlowRunner, FlowTensorboardLogger
from dnn_cool_catalyst.story import security_labels, security_tasks

CONFIGS = ("none", "metrics", "interpretation", "tuning", "all")
CLOCK = time.process_time  # CPU time of this process: on a shared machine, less noisy than the wall clock


class Backbone(nn.Module):
    def __init__(self, flow_module: nn.Module, raw: int, features: int):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(raw, features), nn.ReLU(), nn.Linear(features, features), nn.ReLU())
        self.flow = flow_module

    def forward(self, x):
        return self.flow({"features": self.backbone(x["raw"]), "gt": x.get("gt")})


class EpochTimer(dl.Callback):
    def __init__(self):
        super().__init__(order=dl.CallbackOrder.Internal)
        self.times: List[float] = []
        self._start = 0.0

    def on_epoch_start(self, runner):
        self._start = CLOCK()

    def on_epoch_end(self, runner):
        self.times.append(CLOCK() - self._start)


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
    flow = security_tasks(features=args.features).get_full_flow()
    return flow, Backbone(flow.torch(), args.raw, args.features)


def make_data(args):
    rng = np.random.default_rng(0)
    n = args.train + args.valid
    inputs = {"raw": rng.normal(size=(n, args.raw)).astype(np.float32)}
    labels = security_labels(n, seed=1)
    split = lambda v, s: {k: a[s] for k, a in v.items()}  # noqa: E731
    return ((split(inputs, slice(0, args.train)), split(labels, slice(0, args.train))),
            (split(inputs, slice(args.train, n)), split(labels, slice(args.train, n))))


def loaders(flow, data, args):
    train, valid = data
    tr = flow.get_dataset(*train, with_index=True, computed=["features"])
    va = flow.get_dataset(*valid, with_index=True, computed=["features"])
    return {"train": tr.loader(batch_size=args.batch, shuffle=True), "valid": va.loader(batch_size=args.batch)}


def run_catalyst(config: str, data, args) -> Tuple[List[float], List[float]]:
    """Epoch times, and the time spent inside the flow callbacks' handlers in each epoch."""
    flow, model = build(args)
    timer = EpochTimer()
    with tempfile.TemporaryDirectory() as logdir:
        timed = []
        if config in ("metrics", "all"):
            timed.append(Timed(FlowMetricsCallback()))
        if config in ("interpretation", "all"):
            timed.append(Timed(InterpretationCallback(logdir=logdir)))
        if config in ("tuning", "all"):
            timed.append(Timed(ThresholdTuningCallback(logdir=logdir)))
        callbacks = [timer] + timed
        runner = FlowRunner(flow, model=model)
        with contextlib.redirect_stdout(io.StringIO()):
            runner.train(loaders=loaders(flow, data, args), num_epochs=args.epochs, seed=0, callbacks=callbacks,
                         loggers={"tensorboard": FlowTensorboardLogger(logdir=logdir)},
                         flow_metrics=False, interpretation=False, threshold_tuning=False)
    inside = [sum(t.per_epoch[e] for t in timed) for e in range(len(timer.times))]
    return timer.times[1:], inside[1:]


def run_plain(data, args) -> List[float]:
    """The same epochs as a bare PyTorch loop: forward, flow loss, backward, AdamW; valid forward + loss."""
    flow, model = build(args)
    loss_fn = flow.get_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for epoch in range(args.epochs):
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
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=8192)
    parser.add_argument("--valid", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--raw", type=int, default=64)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    data = make_data(args)
    epochs: Dict[str, List[float]] = {c: [] for c in CONFIGS + ("plain",)}
    inside: Dict[str, List[float]] = {c: [] for c in CONFIGS}
    order = list(CONFIGS)
    for rep in range(args.reps):
        for config in order:
            times, spent = run_catalyst(config, data, args)
            epochs[config] += times
            inside[config] += spent
        epochs["plain"] += run_plain(data, args)
        order = order[1:] + order[:1]
    base_min, base_median = min(epochs["none"]), statistics.median(epochs["none"])
    print(f"security flow (16 tasks), {args.train} train + {args.valid} valid samples, batch {args.batch}, "
          f"backbone {args.raw}->{args.features}, {args.threads} thread(s), {args.reps} runs x {args.epochs - 1} timed "
          f"epochs, {args.clock} time")
    print(f"{'configuration':<16}{'epoch min':>11}{'median':>9}{'min/none':>10}{'in callbacks':>14}{'/ none':>8}")
    for config in ("plain",) + CONFIGS:
        lo, mid = min(epochs[config]), statistics.median(epochs[config])
        spent = statistics.median(inside[config]) if config in inside else float("nan")
        print(f"{config:<16}{lo:>11.3f}{mid:>9.3f}{lo / base_min:>10.3f}{spent:>14.3f}{spent / base_median:>8.3f}")
    direct = statistics.median(inside["all"]) / base_median
    whole = min(epochs["all"]) / base_min - 1
    print(f"all three callbacks: {100 * direct:.1f}% of an epoch spent inside them, {100 * whole:.1f}% longer fastest "
          f"epoch (goal: at most 15%)")


if __name__ == "__main__":
    main()
