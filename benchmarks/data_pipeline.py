"""Cost of getting training batches out of `flow.get_dataset(...)` against plain tensor indexing.

The data: N samples of a `(N, F)` float feature matrix and the labels of the seed's home-security
story (`dnn_cool_catalyst.story`: 14 tasks, 4 of them preconditions that also go to `X["gt"]`).
Three ways to get shuffled batches of 256 in the `(X, y)` layout a flow trains on:

- `ds.loader(batch_size=256, shuffle=True)`: whole-batch fetching (one gather per tensor),
- `DataLoader(ds, batch_size=256, shuffle=True)`: 256 single-sample items collated by torch,
- plain: a random permutation, then per batch `t[idx]` on the same tensors into dicts, as one
  would write by hand without a framework (the reference).

And the same table split into three sources of 50%, 30% and 20% of the rows (the first labelled
for the door tasks only, the second for the person tasks only, the third for all:
`get_dataset(..., partial=True)`), mixed by `dcc.MixedDataset(..., sampling="temperature",
temperature=2.0)`: `mixed.loader(batch_size=256, seed=...)`, an epoch of as many samples as the
table; by default (`join_inputs=True`) and with `join_inputs=False` (inputs read from each source
present in a batch). Goal: at most 1.5x the `ds.loader` figure (all against the same plain
indexing, in the same interleaved epochs).

Each pass is one epoch over all batches with `num_workers=0` (the fetching cost itself, in the
main process). Each way runs interleaved with plain indexing (the order flips every epoch), and
the script prints the median time per batch of both and their ratio.

    python benchmarks/data_pipeline.py
    python benchmarks/data_pipeline.py --samples 51200 --features 512 --epochs 100
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch.utils.data import DataLoader

import dnn_cool_catalyst as dcc
from dnn_cool_catalyst.story import security_labels, security_tasks

DOOR_TASKS = ("camera_blocked", "door_open", "door_locked")


def mixed_sources(flow, features, labels):
    """The table split into three sources: 50% labelled for the door tasks, 30% for the others,
    20% for all."""
    n = features.shape[0]
    cuts = [0, n // 2, n // 2 + (3 * n) // 10, n]
    wanted = (lambda p: p in DOOR_TASKS, lambda p: p not in DOOR_TASKS, lambda p: True)
    return {name: flow.get_dataset({"features": features[lo:hi]},
                                   {p: v[lo:hi] for p, v in labels.items() if keep(p)}, partial=True)
            for name, lo, hi, keep in zip(("doors", "people", "all"), cuts[:-1], cuts[1:], wanted)}


def plain_batches(features, labels, gt_keys, batch_size, generator):
    """The hand-written reference: a permutation and per-batch tensor indexing."""
    perm = torch.randperm(features.shape[0], generator=generator)
    for start in range(0, features.shape[0], batch_size):
        idx = perm[start:start + batch_size]
        x = {"features": features[idx], "gt": {k: labels[k][idx] for k in gt_keys}}
        y = {k: v[idx] for k, v in labels.items()}
        yield x, y


def epoch_time(batches) -> tuple[float, int]:
    """Seconds to exhaust an iterable of batches, and the number of batches."""
    t0 = time.perf_counter()
    count = 0
    for x, y in batches:
        count += 1
    return time.perf_counter() - t0, count


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=256 * 20)
    p.add_argument("--features", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=300, help="timed epochs of ds.loader, mixed.loader and plain indexing")
    p.add_argument("--item-epochs", type=int, default=8, help="timed epochs of the per-item DataLoader")
    p.add_argument("--warmup", type=int, default=2, help="untimed passes of each way")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    flow = security_tasks(features=args.features).get_full_flow()
    gen = torch.Generator().manual_seed(args.seed)
    features = torch.randn(args.samples, args.features, generator=gen)
    raw_labels = security_labels(args.samples, seed=args.seed)
    ds = flow.get_dataset({"features": features}, raw_labels)
    sources = mixed_sources(flow, features, raw_labels)
    mixed = dcc.MixedDataset(sources, sampling="temperature", temperature=2.0)
    apart = dcc.MixedDataset(sources, sampling="temperature", temperature=2.0, join_inputs=False)

    # The plain side gets the same tensors, already in their training dtypes (the dataset
    # converts once at construction; so would a person, outside the loop).
    labels = {k: v.clone() for k, v in ds.labels.items()}
    x0, y0 = ds[list(range(4))]
    gt_keys = list(x0["gt"])  # exactly the precondition tasks, as the dataset gives them
    x1, y1 = next(plain_batches(features, labels, gt_keys, 4, torch.Generator()))
    assert sorted(y1) == sorted(y0) and sorted(x1["gt"]) == sorted(x0["gt"]), "plain batches differ in layout"

    bs = args.batch_size
    ways = {
        "ds.loader (batched)": lambda g: ds.loader(batch_size=bs, shuffle=True, generator=g),
        "DataLoader(ds) per-item": lambda g: DataLoader(ds, batch_size=bs, shuffle=True, generator=g),
        "mixed.loader (3 sources)": lambda g: mixed.loader(batch_size=bs, seed=int(g.initial_seed())),
        "  join_inputs=False": lambda g: apart.loader(batch_size=bs, seed=int(g.initial_seed())),
        "plain tensor indexing": lambda g: plain_batches(features, labels, gt_keys, bs, g),
    }
    # same batches: check that the batched loader yields what indexing gives for its indices
    xb, yb = next(iter(ds.loader(batch_size=bs, shuffle=False)))
    torch.testing.assert_close(xb["features"], features[:bs])
    for k, v in labels.items():
        torch.testing.assert_close(yb[k], v[:bs], equal_nan=True)
    # ... and the mixed one: its sources are consecutive slices of the table, so a sample's row in
    # the table is its source's offset plus its index there
    xm, ym = next(iter(mixed.loader(batch_size=bs, seed=args.seed)))
    rows = torch.from_numpy(mixed.offsets).index_select(0, xm["source"]) + xm["index"]
    torch.testing.assert_close(xm["features"], features[rows])
    for name, source in mixed.sources.items():
        here = xm["source"] == mixed.source_names.index(name)
        for k in source.labelled_paths:
            torch.testing.assert_close(ym[k][here], labels[k][rows[here]], equal_nan=True)

    def compare(names, epochs):
        """Median seconds per batch of each way, epochs interleaved (order flipped every epoch)."""
        times = {name: [] for name in names}
        for epoch in range(args.warmup + epochs):
            for name in (names if epoch % 2 == 0 else names[::-1]):
                g = torch.Generator().manual_seed(args.seed + epoch)
                seconds, count = epoch_time(ways[name](g))
                if epoch >= args.warmup:
                    times[name].append(seconds / count)
        return {name: statistics.median(ts) for name, ts in times.items()}

    plain = "plain tensor indexing"
    n_batches = -(-args.samples // bs)
    print(f"data pipeline: security flow labels, {args.samples} samples x {args.features} features, "
          f"batch {bs} ({n_batches} per epoch), num_workers=0, {torch.get_num_threads()} thread(s), "
          f"torch {torch.__version__}", flush=True)
    # the fast ways are compared in many short interleaved epochs, the slow per-item way in a few
    # (each against its own plain runs, so that a burst of machine load hits both sides)
    # the two batched ways and plain indexing run in the same interleaved epochs, so that the mixed
    # loader's figure compares to ds.loader's under the same load
    batched, mixed_ways = "ds.loader (batched)", ["mixed.loader (3 sources)", "  join_inputs=False"]
    for names, epochs in (([batched, *mixed_ways, plain], args.epochs), (["DataLoader(ds) per-item", plain],
                                                                           args.item_epochs)):
        med = compare(names, epochs)
        for name in names[:-1]:
            print(f"  {name:25s} {med[name] * 1e6:9.1f} us/batch   plain {med[plain] * 1e6:7.1f} us/batch   "
                  f"ratio {med[name] / med[plain]:6.2f}   (median of {epochs} epochs)", flush=True)
        for name in mixed_ways:
            if name in med:
                print(f"  {name.strip()} / {batched}: {med[name] / med[batched]:.2f} (goal for the default <= 1.5)",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
