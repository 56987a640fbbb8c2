"""`make demo` / `python -m dnn_cool_catalyst.demo`: the security flow trained with a plain PyTorch loop.

Features are synthesised from the story's labels plus noise (a stand-in for an image backbone),
so the run takes seconds; it prints the per-task metrics on a held-out split.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn

from .story import security_labels, security_tasks


def synthetic_features(labels, dim: int, seed: int) -> np.ndarray:
    """Noisy random projections of the (filled-in) labels: learnable, not trivially."""
    rng = np.random.default_rng(seed)
    cols = []
    for v in labels.values():
        v = np.asarray(v, dtype=np.float64).reshape(len(v), -1)
        cols.append(np.nan_to_num(np.where(v < 0, np.nan, v), nan=-1.0))
    raw = np.concatenate(cols, axis=1)
    proj = rng.normal(size=(raw.shape[1], dim)) / np.sqrt(raw.shape[1])
    return (raw @ proj + 0.05 * rng.normal(size=(raw.shape[0], dim))).astype(np.float32)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    labels = security_labels(args.n, seed=args.seed, missing_rate=0.05)
    inputs = {"features": synthetic_features(labels, 64, args.seed)}
    flow = security_tasks(features=128).get_full_flow()
    backbone = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU())
    heads = flow.torch()

    def model(x):
        return heads({**x, "features": backbone(x["features"])})

    n_train = int(0.8 * args.n)
    train_ds = flow.get_dataset({k: v[:n_train] for k, v in inputs.items()}, {k: v[:n_train] for k, v in labels.items()})
    test_ds = flow.get_dataset({k: v[n_train:] for k, v in inputs.items()}, {k: v[n_train:] for k, v in labels.items()})
    params = list(backbone.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    loss_fn = flow.get_loss()
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        heads.train()
        total, batches = 0.0, 0
        for x, y in train_ds.loader(batch_size=128, shuffle=True, generator=g):
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        if epoch % 10 == 0 or epoch == args.epochs - 1:
            print(f"epoch {epoch:3d}  train loss {total / batches:.4f}")
    heads.eval()
    metrics = flow.get_metrics()
    with torch.no_grad():
        for x, y in test_ds.loader(batch_size=512):
            metrics.update(model(x), y)
    counts = metrics.num_samples()
    print(f"\n{'task/metric':<75} {'value':>8} {'samples':>8}")
    for tm in metrics:
        print(f"{tm.key:<75} {tm.metric.compute():8.4f} {counts[tm.path]:8d}")


if __name__ == "__main__":
    main()
