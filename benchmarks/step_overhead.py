"""Train-step overhead of a flow against the same network written by hand in plain PyTorch.

The network: a small shared MLP backbone, then the heads of the seed's home-security story
(`dnn_cool_catalyst.story`: 4 binary tasks, 8 bounded regressions, a 3-label multilabel and a
7-class classification in the flows face_regression, body_regression, person_regression and
full_flow). The framework side is `flow.torch()` + `flow.get_loss()` on batches from
`flow.get_dataset(...)`; the plain side is an `nn.Module` with one `nn.Linear` per head and the
precondition masks and masked losses coded by hand below (independently of the package). Both
start from the same weights (state dict copied), see the same batches and use AdamW; the script
first checks that both compute the same loss and gradients on one batch.

A train step is zero_grad + forward + loss + backward + AdamW step. The two steps are timed
alternately (the order flips every repetition) so that machine noise hits both alike; the
script prints the median of each and their ratio (framework / plain).

    python benchmarks/step_overhead.py                    # CPU, 1 thread, batch 32 and 256
    python benchmarks/step_overhead.py --threads 2 --reps 400
    python benchmarks/step_overhead.py --device cuda      # the same on a GPU (skipped without CUDA)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from dnn_cool_catalyst.story import security_labels, security_tasks

BINARY = ("camera_blocked", "door_open", "door_locked", "person_present")
FACE = ("face_x1", "face_y1", "face_w", "face_h")
BODY = ("body_x1", "body_y1", "body_w", "body_h")


def make_backbone(in_features: int, hidden: int, features: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, features), nn.ReLU())


# ----------------------------------------------------------------------------------------------
# The framework side: backbone + flow.torch(), loss = flow.get_loss()
# ----------------------------------------------------------------------------------------------

class FlowNet(nn.Module):
    """Backbone, then the flow's heads on the backbone's features."""

    def __init__(self, flow, in_features: int, hidden: int, features: int):
        super().__init__()
        self.backbone = make_backbone(in_features, hidden, features)
        self.heads = flow.torch()

    def forward(self, x):
        return self.heads({"features": self.backbone(x["features"]), "gt": x["gt"]})


# ----------------------------------------------------------------------------------------------
# The plain side, written by hand
# ----------------------------------------------------------------------------------------------

class PlainNet(nn.Module):
    def __init__(self, in_features: int, hidden: int, features: int):
        super().__init__()
        self.backbone = make_backbone(in_features, hidden, features)
        self.camera_blocked = nn.Linear(features, 1)
        self.door_open = nn.Linear(features, 1)
        self.door_locked = nn.Linear(features, 1)
        self.person_present = nn.Linear(features, 1)
        self.face_x1 = nn.Linear(features, 1)
        self.face_y1 = nn.Linear(features, 1)
        self.face_w = nn.Linear(features, 1)
        self.face_h = nn.Linear(features, 1)
        self.body_x1 = nn.Linear(features, 1)
        self.body_y1 = nn.Linear(features, 1)
        self.body_w = nn.Linear(features, 1)
        self.body_h = nn.Linear(features, 1)
        self.facial_characteristics = nn.Linear(features, 3)
        self.shirt_type = nn.Linear(features, 7)

    def forward(self, x):
        h = self.backbone(x)
        out = {name: getattr(self, name)(h).squeeze(1) for name in BINARY + FACE + BODY}
        out["facial_characteristics"] = self.facial_characteristics(h)
        out["shirt_type"] = self.shirt_type(h)
        return out


def _mean_where(loss, w):
    # mean over the selected entries; 0 (and zero gradient) when none is selected
    return (loss * w).sum() / w.sum().clamp_min(1)


def _bce(logit, label, applies):
    w = (~torch.isnan(label) & applies).float()
    return _mean_where(F.binary_cross_entropy_with_logits(logit, torch.nan_to_num(label), reduction="none"), w)


def _mse_sigmoid(logit, label, applies):
    w = (~torch.isnan(label) & applies).float()
    return _mean_where((torch.sigmoid(logit) - torch.nan_to_num(label)) ** 2, w)


def _ce(logits, label, applies):
    w = ((label >= 0) & applies).float()
    return _mean_where(F.cross_entropy(logits, label.clamp_min(0), reduction="none"), w)


def plain_loss(out, y):
    """The story's loss: each task averaged over the samples it applies to and has a label for.
    A task applies unless its precondition is known to be false (missing labels do not exclude)."""
    cb, do, pp = y["camera_blocked"], y["door_open"], y["person_present"]
    face = "person_regression.face_regression."
    body = "person_regression.body_regression."
    door_open_applies = ~(cb == 1)                              # | ~camera_blocked
    door_locked_applies = door_open_applies & ~(do == 1)        # | ~door_open
    person_applies = door_open_applies & ~(do == 0)            # | door_open
    regression_applies = person_applies & ~(pp == 0)           # | person_present

    total = _bce(out["camera_blocked"], cb, torch.ones_like(door_open_applies))
    total = total + _bce(out["door_open"], do, door_open_applies)
    total = total + _bce(out["door_locked"], y["door_locked"], door_locked_applies)
    total = total + _bce(out["person_present"], pp, person_applies)
    for name in FACE:
        total = total + _mse_sigmoid(out[name], y[face + name], regression_applies)
    for name in BODY:
        total = total + _mse_sigmoid(out[name], y[body + name], regression_applies)
    total = total + _bce(out["facial_characteristics"], y[face + "facial_characteristics"],
                         regression_applies[:, None])
    total = total + _ce(out["shirt_type"], y[body + "shirt_type"], regression_applies)
    return total


def copy_weights(flow_net: FlowNet, plain: PlainNet) -> None:
    """Give the plain net exactly the flow net's weights."""
    prefix = {**{n: "" for n in BINARY}, **{n: "person_regression.face_regression." for n in FACE},
              **{n: "person_regression.body_regression." for n in BODY},
              "facial_characteristics": "person_regression.face_regression.",
              "shirt_type": "person_regression.body_regression."}
    src = flow_net.state_dict()
    state = {k: v for k, v in src.items() if k.startswith("backbone.")}
    for name, p in prefix.items():
        for kind in ("weight", "bias"):
            state[f"{name}.{kind}"] = src[f"heads.{p}{name}.{kind}"]
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


def check_same(flow_net, flow_loss, plain, plain_batch, flow_batch) -> float:
    """Same loss and same gradients on one batch; returns the loss."""
    (x, y), (inp, labels) = flow_batch, plain_batch
    a = flow_loss(flow_net(x), y)
    b = plain_loss(plain(inp), labels)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    flow_net.zero_grad()
    plain.zero_grad()
    a.backward()
    b.backward()
    torch.testing.assert_close(flow_net.backbone[0].weight.grad, plain.backbone[0].weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(flow_net.heads.person_regression.body_regression.shirt_type.weight.grad,
                               plain.shirt_type.weight.grad, rtol=1e-4, atol=1e-6)
    flow_net.zero_grad(set_to_none=True)
    plain.zero_grad(set_to_none=True)
    return float(a.detach())


def run(batch_size: int, args, device: torch.device) -> tuple[float, float]:
    torch.manual_seed(args.seed)
    flow = security_tasks(features=args.features).get_full_flow()
    flow_net = FlowNet(flow, args.in_features, args.hidden, args.features).to(device)
    flow_loss = flow.get_loss()
    plain = PlainNet(args.in_features, args.hidden, args.features).to(device)
    copy_weights(flow_net, plain)

    n = batch_size * args.batches
    gen = torch.Generator().manual_seed(args.seed)
    inputs = torch.randn(n, args.in_features, generator=gen)
    labels = security_labels(n, seed=args.seed)
    ds = flow.get_dataset({"features": inputs}, labels)
    flow_batches, plain_batches = [], []
    for b in range(args.batches):
        idx = torch.arange(b * batch_size, (b + 1) * batch_size)
        x, y = to_device(ds[idx], device)
        flow_batches.append((x, y))
        plain_batches.append((x["features"], y))

    loss = check_same(flow_net, flow_loss, plain, plain_batches[0], flow_batches[0])

    opt_flow = torch.optim.AdamW(flow_net.parameters(), lr=1e-3)
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-3)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def flow_step(i):
        x, y = flow_batches[i % len(flow_batches)]
        opt_flow.zero_grad(set_to_none=True)
        flow_loss(flow_net(x), y).backward()
        opt_flow.step()

    def plain_step(i):
        inp, y = plain_batches[i % len(plain_batches)]
        opt_plain.zero_grad(set_to_none=True)
        plain_loss(plain(inp), y).backward()
        opt_plain.step()

    def timed(step, i):
        sync()
        t0 = time.perf_counter()
        step(i)
        sync()
        return time.perf_counter() - t0

    for i in range(args.warmup):
        flow_step(i)
        plain_step(i)
    t_flow, t_plain = [], []
    for i in range(args.reps):
        if i % 2:
            t_flow.append(timed(flow_step, i))
            t_plain.append(timed(plain_step, i))
        else:
            t_plain.append(timed(plain_step, i))
            t_flow.append(timed(flow_step, i))
    mf, mp = statistics.median(t_flow), statistics.median(t_plain)
    print(f"batch {batch_size:4d}: flow {mf * 1e3:8.3f} ms   plain {mp * 1e3:8.3f} ms   "
          f"ratio {mf / mp:5.3f}   (first-batch loss {loss:.4f}, equal on both sides)", flush=True)
    return mf, mp


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU intra-op threads)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 256])
    p.add_argument("--reps", type=int, default=300, help="timed steps of each side per batch size")
    p.add_argument("--warmup", type=int, default=30)
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
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"step overhead: security flow, MLP {args.in_features}-{args.hidden}-{args.features}, AdamW; "
          f"{name}; torch {torch.__version__}; median of {args.reps} steps after {args.warmup} warm-up", flush=True)
    for bs in args.batch_sizes:
        run(bs, args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
