"""Train step of flows with many tasks against the same network written by hand in plain PyTorch.

The flows: `dnn_cool_catalyst.synthetic.generated_tasks(T)` for T = 16, 64 and 256 tasks (binary,
bounded regression, 7-class classification, 5-label multilabel; preconditions `out.b` / `~out.b`
nested up to depth 3), labels from `generated_labels` (some tasks labelled on 10% of the samples
only), all heads `nn.Linear(features, k)` on a shared MLP backbone. The framework side is
`flow.torch()` (and `flow.torch(fuse=True)`: one GEMM for all heads) + `flow.get_loss()` on
batches from `flow.get_dataset(...)`; the plain side is what a user writes by hand: one
`nn.Linear` per head in an `nn.ModuleDict`, and in a loop over the tasks, the precondition mask
and the masked mean loss of each (coded below, independently of the package). All sides start from
the same weights (state dicts copied) and see the same batches; the script first checks that
they compute the same loss and gradients on one batch.

A train step is zero_grad + forward + loss + backward + AdamW step. The sides are timed in turn,
their order rotating every repetition so that machine noise hits all alike; the script prints the
median of each and the ratio to the hand-written step.

`--storage` adds two more hand-written sides that isolate how fused heads store their weights:
one GEMM over the per-head parameters concatenated on every forward (`torch.cat`), and one GEMM
over one concatenated Parameter (what `FusedLinear` does); both with the plain loop's loss.
`--compile` adds `torch.compile` of the forward + loss of the plain and the fused flow sides
(compiling 256 tasks takes minutes on a CPU).

    python benchmarks/many_tasks.py                        # CPU, 1 thread, batch 256, 16/64/256 tasks
    python benchmarks/many_tasks.py --tasks 16 256 --reps 40 --storage
    python benchmarks/many_tasks.py --device cuda          # the same on a GPU (skipped without CUDA)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from dnn_cool_catalyst.synthetic import generated_labels, generated_tasks
from dnn_cool_catalyst.tasks import (BinaryClassificationTask, BoundedRegressionTask, ClassificationTask,
                                     MultilabelClassificationTask)


def make_backbone(in_features: int, hidden: int, features: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, features), nn.ReLU())


# ----------------------------------------------------------------------------------------------
# The framework side: backbone + flow.torch(fuse=...), loss = flow.get_loss()
# ----------------------------------------------------------------------------------------------

class FlowNet(nn.Module):
    """Backbone, then the flow's heads on the backbone's features."""

    def __init__(self, flow, fuse: bool, in_features: int, hidden: int, features: int):
        super().__init__()
        self.backbone = make_backbone(in_features, hidden, features)
        self.heads = flow.torch(fuse=fuse)

    def forward(self, x):
        return self.heads({"features": self.backbone(x["features"]), "gt": x["gt"]})


# ----------------------------------------------------------------------------------------------
# The plain side, written by hand: a config list, one head per task, a loop
# ----------------------------------------------------------------------------------------------

def task_config(flow):
    """What the user's own code would hold: `(name, kind, width, [(condition task, negated)])` per
    task, in order (read off the generated flow so that both sides train the same network)."""
    kinds = {BinaryClassificationTask: "binary", BoundedRegressionTask: "regression",
             ClassificationTask: "classification", MultilabelClassificationTask: "multilabel"}
    return [(leaf.path, kinds[type(leaf.task)], leaf.task.module.out_features,
             [(lit.path, lit.negated) for lit in leaf.precondition]) for leaf in flow.graph.leaves]


class PlainNet(nn.Module):
    """`heads="linear"`: one nn.Linear per task (as a user writes it). `"cat"`: the same
    parameters, concatenated on every forward for one GEMM. `"concat"`: one concatenated
    Parameter for all heads, one GEMM."""

    def __init__(self, config, in_features: int, hidden: int, features: int, heads: str = "linear"):
        super().__init__()
        self.config, self.mode = config, heads
        self.sizes = [width for _, _, width, _ in config]
        self.backbone = make_backbone(in_features, hidden, features)
        if heads == "concat":
            self.weight = nn.Parameter(torch.empty(sum(self.sizes), features))
            self.bias = nn.Parameter(torch.empty(sum(self.sizes)))
        else:
            self.heads = nn.ModuleDict({name: nn.Linear(features, width) for name, _, width, _ in config})

    def forward(self, x):
        h = self.backbone(x)
        if self.mode == "linear":
            return {name: head(h) for name, head in self.heads.items()}
        if self.mode == "cat":
            w = torch.cat([head.weight for head in self.heads.values()])
            b = torch.cat([head.bias for head in self.heads.values()])
        else:
            w, b = self.weight, self.bias
        return dict(zip([name for name, _, _, _ in self.config], F.linear(h, w, b).split(self.sizes, dim=1)))


def _mean_where(loss, w):
    # mean over the selected entries; 0 (and zero gradient) when none is selected
    return (loss * w).sum() / w.sum().clamp_min(1)


def plain_loss(config, out, y):
    """Each task averaged over the samples it applies to and has a label for; a task applies
    unless its precondition is known to be false (a missing label does not exclude)."""
    applies, total = {}, 0.0
    for name, kind, _, conds in config:
        a = None
        for c, negated in conds:
            label = y[c]
            not_false = ~(label > 0.5) if negated else ~(label <= 0.5)  # NaN compares false
            term = not_false if applies[c] is None else applies[c] & not_false  # None: c always applies
            a = term if a is None else a & term
        applies[name] = a
        z, label = out[name], y[name]
        if kind == "classification":
            loss = F.cross_entropy(z, label.clamp_min(0), reduction="none")
            w = label >= 0
        elif kind == "multilabel":
            loss = F.binary_cross_entropy_with_logits(z, torch.nan_to_num(label), reduction="none")
            w = ~torch.isnan(label)
        elif kind == "binary":
            loss = F.binary_cross_entropy_with_logits(z.squeeze(1), torch.nan_to_num(label), reduction="none")
            w = ~torch.isnan(label)
        else:
            loss = (torch.sigmoid(z.squeeze(1)) - torch.nan_to_num(label)) ** 2
            w = ~torch.isnan(label)
        if a is not None:
            w = w & (a[:, None] if w.dim() == 2 else a)
        total = total + _mean_where(loss, w.float())
    return total


def copy_weights(flow_net: FlowNet, plain: PlainNet) -> None:
    """Give the plain net exactly the flow net's weights (the flow's state dict has the per-task
    names, fused or not)."""
    src = flow_net.state_dict()
    state = {k: v for k, v in src.items() if k.startswith("backbone.")}
    names = [name for name, _, _, _ in plain.config]
    if plain.mode == "concat":
        state["weight"] = torch.cat([src[f"heads.{n}.weight"] for n in names])
        state["bias"] = torch.cat([src[f"heads.{n}.bias"] for n in names])
    else:
        for n in names:
            for kind in ("weight", "bias"):
                state[f"heads.{n}.{kind}"] = src[f"heads.{n}.{kind}"]
    plain.load_state_dict(state)


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

def to_device(tree, device):
    if isinstance(tree, dict):
        return {k: to_device(v, device) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return tuple(to_device(v, device) for v in tree)
    return tree.to(device, non_blocking=True)


class Side:
    """One network with its loss and optimizer: `step(batch)` is one timed train step."""

    def __init__(self, name, model, loss_fn, batches, compiled=False):
        self.name, self.model, self.batches = name, model, batches
        self.forward_loss = (lambda x, y: loss_fn(model(x), y))
        if compiled:
            self.forward_loss = torch.compile(self.forward_loss)
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.times = []

    def loss(self, i):
        x, y = self.batches[i % len(self.batches)]
        return self.forward_loss(x, y)

    def step(self, i):
        self.opt.zero_grad(set_to_none=True)
        self.loss(i).backward()
        self.opt.step()


def gradients(model, names):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if n in names}


def check_same(reference: Side, other: Side, grad_pairs) -> float:
    """Same loss and same gradients on the first batch; returns the loss."""
    a, b = reference.loss(0), other.loss(0)
    # float32 sums of up to 256 terms in other orders (and one GEMM against many): ~1e-6 relative
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    reference.model.zero_grad(set_to_none=True)
    other.model.zero_grad(set_to_none=True)
    a.backward()
    b.backward()
    for get_a, get_b, what in grad_pairs:
        torch.testing.assert_close(get_b(other.model), get_a(reference.model), rtol=1e-4, atol=1e-6, msg=what)
    reference.model.zero_grad(set_to_none=True)
    other.model.zero_grad(set_to_none=True)
    return float(a.detach())


def head_grad(model, name):
    """The gradient of one head's weight in any of the layouts."""
    if isinstance(model, FlowNet):
        head = getattr(model.heads, name)
        if hasattr(head, "_group"):
            return head._group.weight.grad[head._group.rows(head.index)]
        return head.weight.grad
    if model.mode == "concat":
        names = [n for n, _, _, _ in model.config]
        i = names.index(name)
        start = sum(model.sizes[:i])
        return model.weight.grad[start:start + model.sizes[i]]
    return model.heads[name].weight.grad


def run(n_tasks: int, args, device: torch.device) -> None:
    torch.manual_seed(args.seed)
    features = args.features
    flows = {fuse: generated_tasks(n_tasks, features=features, seed=args.seed).get_full_flow() for fuse in (False, True)}
    flow = flows[False]
    config = task_config(flow)

    n = args.batch_size * args.batches
    gen = torch.Generator().manual_seed(args.seed)
    inputs = torch.randn(n, args.in_features, generator=gen)
    labels = generated_labels(flow, n, seed=args.seed)
    ds = flow.get_dataset({"features": inputs}, labels)
    flow_batches, plain_batches = [], []
    for b in range(args.batches):
        idx = torch.arange(b * args.batch_size, (b + 1) * args.batch_size)
        x, y = to_device(ds[idx], device)
        flow_batches.append((x, y))
        plain_batches.append((x["features"], y))

    torch.manual_seed(args.seed + 1)
    nets = {fuse: FlowNet(flows[fuse], fuse, args.in_features, args.hidden, features).to(device) for fuse in (False, True)}
    nets[True].load_state_dict(nets[False].state_dict())  # the same weights (per-task names on both)
    plain_loss_fn = lambda out, y: plain_loss(config, out, y)  # noqa: E731
    modes = ["linear"] + (["cat", "concat"] if args.storage else [])
    plains = {}
    for mode in modes:
        plains[mode] = PlainNet(config, args.in_features, args.hidden, features, heads=mode).to(device)
        copy_weights(nets[False], plains[mode])

    sides = [Side("hand-written", plains["linear"], plain_loss_fn, plain_batches),
             Side("flow", nets[False], flows[False].get_loss(), flow_batches),
             Side("flow fuse=True", nets[True], flows[True].get_loss(), flow_batches)]
    if args.storage:
        sides += [Side("hand, cat per forward", plains["cat"], plain_loss_fn, plain_batches),
                  Side("hand, one Parameter", plains["concat"], plain_loss_fn, plain_batches)]
    if args.compile:
        compiled_plain = PlainNet(config, args.in_features, args.hidden, features).to(device)
        copy_weights(nets[False], compiled_plain)
        flow_c = generated_tasks(n_tasks, features=features, seed=args.seed).get_full_flow()
        net_c = FlowNet(flow_c, True, args.in_features, args.hidden, features).to(device)
        net_c.load_state_dict(nets[False].state_dict())
        sides += [Side("hand-written, compiled", compiled_plain, plain_loss_fn, plain_batches, compiled=True),
                  Side("flow fuse=True, compiled", net_c, flow_c.get_loss(), flow_batches, compiled=True)]

    probe = config[-1][0]
    pairs = [(lambda m: m.backbone[0].weight.grad, lambda m: m.backbone[0].weight.grad, "backbone"),
             (lambda m: head_grad(m, probe), lambda m: head_grad(m, probe), probe)]
    t0 = time.perf_counter()
    loss = None
    for side in sides[1:]:
        loss = check_same(sides[0], side, pairs)
    setup = time.perf_counter() - t0

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(args.warmup):
        for side in sides:
            side.step(i)
    for i in range(args.reps):
        k = i % len(sides)
        for side in sides[k:] + sides[:k]:  # rotate the order: noise hits every side alike
            sync()
            t = time.perf_counter()
            side.step(i)
            sync()
            side.times.append(time.perf_counter() - t)
    base = statistics.median(sides[0].times)
    print(f"{n_tasks:4d} tasks (first-batch loss {loss:.4f}, equal on every side; checks {setup:.1f} s):", flush=True)
    for side in sides:
        m = statistics.median(side.times)
        print(f"    {side.name:28s} {m * 1e3:9.2f} ms   ratio {m / base:5.3f}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU intra-op threads)")
    p.add_argument("--tasks", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--reps", type=int, default=60, help="timed steps of each side per flow")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batches", type=int, default=4, help="distinct batches cycled through")
    p.add_argument("--in-features", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--features", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--storage", action="store_true", help="also time the two storages of fused weights by hand")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the hand-written and fused sides")
    args = p.parse_args(argv)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available; skipping the GPU benchmark.")
        return 0
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"many tasks: generated flows, MLP {args.in_features}-{args.hidden}-{args.features}, batch {args.batch_size}, "
          f"AdamW; {name}; torch {torch.__version__}; median of {args.reps} steps after {args.warmup} warm-up",
          flush=True)
    for n_tasks in args.tasks:
        run(n_tasks, args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
