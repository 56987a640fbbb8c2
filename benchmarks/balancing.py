"""Train-step time of each loss-balancing method against `EqualWeighting`, in one run.

The network: the seed's home-security flow (`dnn_cool_catalyst.story`, full_flow: 16 tasks with
preconditions; labels from `security_labels`, so each batch leaves some tasks with few samples)
behind an MLP backbone 128-256-256, batches of 256, AdamW. A train step is zero_grad + forward +
loss + backward + AdamW step (the optimizer also holds the balancer's learnable parameters):

- loss-weighting methods: `loss_fn(outputs, targets).backward()`;
- gradient methods (`balancing.GradientBalancer`): `loss_fn.backward(outputs, targets,
  shared_parameters=<backbone parameters>)`, in the parameters variant and, where the method
  supports it, the representation variant (`<name>-rep`).

Methods are discovered from `dnn_cool_catalyst.balancing.__all__` (every concrete `Balancer`, with
its defaults). Each method has its own copy of the same initial network. Noise on a shared machine
hits all methods alike because they take turns: every round runs `--steps` steps of each method
(2 by default: a round lasts about a second, shorter than the machine's drifts; the order rotates
every round) and keeps each method's median step; the ratio printed is the
median over rounds of (the method's median step / EqualWeighting's median step of the same round).
Also printed: `flow.get_loss()` without a balancer (the plain weighted sum), the mean number of
tasks present per step (a gradient method on parameters costs one backward per present task), and
for gradient methods the ratio divided by that number. Goals of the issue: loss weighting <= 1.05x,
FAMO <= 1.10x.

    python benchmarks/balancing.py                  # CPU, 1 thread, batch 256
    python benchmarks/balancing.py --methods famo pcgrad --rounds 5
    python benchmarks/balancing.py --device cuda    # the same on a GPU (skipped without CUDA)
"""
from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from dnn_cool_catalyst import balancing
from dnn_cool_catalyst.story import security_labels, security_tasks

# Short names of the methods on the command line and in the table; others are the class name lowercased.
SHORT = {"EqualWeighting": "equal", "UncertaintyWeighting": "uncertainty", "DynamicWeightAverage": "dwa",
         "RandomLossWeighting": "rlw", "GeometricLossStrategy": "gls"}
PLAIN = "no balancer"


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


class FlowNet(nn.Module):
    """Backbone, then the flow's heads on the backbone's features."""

    def __init__(self, flow, in_features: int, hidden: int, features: int):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, features), nn.ReLU())
        self.heads = flow.torch()

    def forward(self, x):
        return self.heads({"features": self.backbone(x["features"]), "gt": x["gt"]})


def to_device(tree, device):
    if isinstance(tree, dict):
        return {k: to_device(v, device) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return tuple(to_device(v, device) for v in tree)
    return tree.to(device, non_blocking=True)


class Contender:
    """One method's network (the same initial weights for all), loss, optimizer and step."""

    def __init__(self, name: str, make: Optional[Callable[[], balancing.Balancer]], gradient: bool, args, device):
        self.name, self.gradient = name, gradient
        torch.manual_seed(args.seed)  # every contender starts from the same weights: its own flow, heads and backbone
        self.flow = security_tasks(features=args.features).get_full_flow()
        self.net = FlowNet(self.flow, args.in_features, args.hidden, args.features).to(device)
        self.loss_fn = (self.flow.get_loss() if make is None else self.flow.get_loss(balancer=make())).to(device)
        self.shared = list(self.net.backbone.parameters())
        groups = [{"params": list(self.net.parameters())}]
        if list(self.loss_fn.parameters()):
            groups.append({"params": list(self.loss_fn.parameters()), "weight_decay": 0.0})
        self.opt = torch.optim.AdamW(groups, lr=1e-3)
        self.times: List[float] = []

    def step(self, batch) -> None:
        x, y = batch
        self.opt.zero_grad(set_to_none=True)
        out = self.net(x)
        if self.gradient:
            self.loss_fn.backward(out, y, shared_parameters=self.shared)
        else:
            self.loss_fn(out, y).backward()
        self.opt.step()


def present_per_batch(contender: Contender, batches) -> List[int]:
    """How many of the flow's tasks have a non-empty `S_t` in each batch."""
    with torch.no_grad():
        return [sum(int(c) > 0 for _, c in contender.loss_fn.terms(contender.net(x), y).values()) for x, y in batches]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU intra-op threads)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--methods", nargs="+", default=None,
                   help="method names (default: every one discovered; equal is always added as the baseline)")
    p.add_argument("--rounds", type=int, default=150, help="rounds; each runs --steps steps of every method")
    p.add_argument("--steps", type=int, default=2, help="timed steps of each method per round")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps of each method first")
    p.add_argument("--batches", type=int, default=8, help="distinct batches cycled through")
    p.add_argument("--in-features", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--features", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available; skipping the GPU benchmark.")
        return 0
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    methods = discover_methods()
    if args.methods:
        unknown = [m for m in args.methods if m not in methods]
        if unknown:
            raise SystemExit(f"unknown method(s) {unknown}; available: {', '.join(methods)}")
        methods = {m: methods[m] for m in ["equal", *[m for m in args.methods if m != "equal"]]}

    contenders = [Contender(name, make, gradient, args, device) for name, (make, gradient) in methods.items()]
    contenders.append(Contender(PLAIN, None, False, args, device))
    flow = contenders[0].flow
    n = args.batch_size * args.batches
    gen = torch.Generator().manual_seed(args.seed)
    inputs = torch.randn(n, args.in_features, generator=gen)
    ds = flow.get_dataset({"features": inputs}, security_labels(n, seed=args.seed))
    batches = []
    for b in range(args.batches):
        x, y = ds[torch.arange(b * args.batch_size, (b + 1) * args.batch_size)]
        x.pop("index", None)  # not read by the model
        batches.append(to_device((x, y), device))
    present = present_per_batch(contenders[0], batches)
    mean_present = statistics.fmean(present)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"balancing step time: security flow ({len(flow.get_loss()._leaves)} tasks), MLP {args.in_features}-"
          f"{args.hidden}-{args.features}, batch {args.batch_size}, AdamW; {name}; torch {torch.__version__}; "
          f"{args.rounds} rounds x {args.steps} steps per method after {args.warmup} warm-up; tasks present per "
          f"batch: {present}", flush=True)
    print(f"methods: {', '.join(c.name for c in contenders)}", flush=True)

    for c in contenders:
        for i in range(args.warmup):
            c.step(batches[i % len(batches)])
    rounds: List[Dict[str, float]] = []
    for r in range(args.rounds):
        order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
        medians = {}
        for c in order:
            times = []
            for i in range(args.steps):
                batch = batches[(r * args.steps + i) % len(batches)]
                sync()
                t0 = time.perf_counter()
                c.step(batch)
                sync()
                times.append(time.perf_counter() - t0)
            medians[c.name] = statistics.median(times)
        rounds.append(medians)

    print(f"\n{'method':<14s}{'kind':>10s}{'step ms':>10s}{'ratio':>8s}{'present':>9s}{'ratio/present':>15s}")
    ratios = {}
    for c in contenders:
        ms = statistics.median(m[c.name] for m in rounds) * 1e3
        ratio = statistics.median(m[c.name] / m["equal"] for m in rounds)
        ratios[c.name] = ratio
        kind = "gradient" if c.gradient else ("plain" if c.name == PLAIN else "weighting")
        per = f"{ratio / mean_present:15.3f}" if c.gradient else f"{'':15s}"
        print(f"{c.name:<14s}{kind:>10s}{ms:10.3f}{ratio:8.3f}{mean_present:9.2f}{per}", flush=True)

    weighting = [c.name for c in contenders if not c.gradient and c.name not in ("equal", "famo", PLAIN)]
    worst = max(weighting, key=ratios.get) if weighting else None
    if worst is not None:
        print(f"\ngoal loss weighting <= 1.05x: {'met' if ratios[worst] <= 1.05 else 'NOT met'} "
              f"(highest: {worst} {ratios[worst]:.3f})")
    if "famo" in ratios:
        print(f"goal FAMO <= 1.10x: {'met' if ratios['famo'] <= 1.10 else 'NOT met'} ({ratios['famo']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
