"""dcc.MixedDataset: sources labelled for different tasks, mixed by a seeded sampler; batched
fetching with X["source"] / X["index"]; sampling frequencies; errors naming the source; the loss of
a mixed batch; sharding over processes (accelerate's batch shards and a plain gloo loop).

The gloo check runs this file as a script in a subprocess (the spawned workers import its
functions), as tests/runners/test_ddp.py does.
"""
import json
import math
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

import dnn_cool_catalyst as dcc
from dnn_cool_catalyst.story import security_labels, security_tasks

A_PATHS = ("camera_blocked", "door_open", "door_locked")
SIZES = {"a": 30, "b": 70, "c": 11}


def _sources(flow, sizes=SIZES, features=8):
    """Three sources of the security flow: `a` labels the door tasks, `b` the person tasks, `c` all."""
    n = sum(sizes.values())
    rng = np.random.default_rng(5)
    feats = rng.normal(size=(n, features)).astype(np.float32)
    labels = security_labels(n, seed=6, missing_rate=0.1)
    out, start = {}, 0
    for name, size in sizes.items():
        rows = slice(start, start + size)
        start += size
        wanted = {"a": lambda p: p in A_PATHS, "b": lambda p: p not in A_PATHS, "c": lambda p: True}[name]
        out[name] = flow.get_dataset({"features": feats[rows]}, {p: v[rows] for p, v in labels.items() if wanted(p)},
                                     partial=name != "c")
    return out


@pytest.fixture
def sources(security_flow):
    return _sources(security_flow)


def _pairs(batches):
    return [(int(s), int(i)) for x, _ in batches for s, i in zip(x["source"], x["index"])]


# Items and batches ---------------------------------------------------------------------------------------

def test_batches_carry_source_index_and_each_source_s_own_rows(sources):
    mixed = dcc.MixedDataset(sources)
    assert mixed.source_names == ("a", "b", "c") and len(mixed) == 111
    assert mixed.labelled_paths("a") == frozenset(A_PATHS) and mixed.labelled_paths("c") == sources["c"].labelled_paths
    batches = list(mixed.loader(batch_size=16, seed=1))
    assert [len(x["index"]) for x, _ in batches] == [16] * 6 + [15]
    for x, y in batches:
        assert x["source"].dtype == x["index"].dtype == torch.int64
        assert set(x["gt"]) == {"camera_blocked", "door_open", "person_present"}
        for row, (s, i) in enumerate(zip(x["source"].tolist(), x["index"].tolist())):
            want_x, want_y = sources[mixed.source_names[s]][i]
            assert torch.equal(x["features"][row], want_x["features"])
            for path, label in want_y.items():
                torch.testing.assert_close(y[path][row], label, equal_nan=True)
            for path, label in want_x["gt"].items():
                torch.testing.assert_close(x["gt"][path][row], label, equal_nan=True)
    # inputs read per source (join_inputs=False: one copy of them) give the same batches, in any key order
    apart = dcc.MixedDataset(sources, join_inputs=False)
    asked = mixed.epoch_keys(1)[:40].tolist()
    (xj, yj), (xs, ys) = mixed[asked], apart[asked]
    assert torch.equal(xj["features"], xs["features"]) and torch.equal(xj["source"], xs["source"])
    assert torch.equal(xj["index"], xs["index"]) and len(set(xs["source"].tolist())) == 3
    # a proportional epoch: every sample of every source exactly once
    assert sorted(_pairs(batches)) == [(s, i) for s, n in enumerate(SIZES.values()) for i in range(n)]
    # single items and describe
    x, y = mixed[mixed.key(1, 4)]
    assert int(x["source"]) == 1 and int(x["index"]) == 4
    sources["b"].name_samples(row=[f"b{i}" for i in range(70)])
    assert mixed.describe(1, 4) == {"row": "b4", "source": "b"} and mixed.describe(0, 2) == {"source": "a"}
    assert mixed.loader(batch_size=8).dataset is mixed


def test_keys_in_any_order_come_back_in_that_order_also_for_lazy_inputs():
    """The loader's batches list their keys sorted (grouped by source); any other order asked
    directly is kept, also for inputs that are sequences (read item by item, not stacked)."""
    flow = _tags_flow(2)
    sources = {}
    for name, n in (("p", 5), ("q", 7)):
        f = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3) + (100 if name == "q" else 0)
        sources[name] = flow.get_dataset({"f": f, "names": [f"{name}{i}" for i in range(n)]},
                                         {"gate": np.ones(n), "tags": np.full((n, 2), np.nan)})
    mixed = dcc.MixedDataset(sources)
    asked = [mixed.key(1, 6), mixed.key(0, 0), mixed.key(1, 2), mixed.key(0, 4), mixed.key(0, 1)]
    x, y = mixed[asked]
    assert x["names"] == ["q6", "p0", "q2", "p4", "p1"]
    assert x["source"].tolist() == [1, 0, 1, 0, 0] and x["index"].tolist() == [6, 0, 2, 4, 1]
    assert torch.equal(x["f"][:, 0], torch.tensor([118.0, 0.0, 106.0, 12.0, 3.0]))
    assert y["tags"].shape == (5, 2) and torch.isnan(y["tags"]).all()
    assert torch.equal(mixed[torch.tensor(asked)][0]["index"], x["index"])  # a tensor of keys too
    with pytest.raises(IndexError, match="out of range"):
        mixed[[-1]]
    # lazy inputs cannot be checked before they are read: a batch whose sources' items differ names them
    for name, n, width in (("p", 5, 2), ("q", 7, 3)):
        sources[name] = flow.get_dataset({"f": torch.zeros(n, 3), "names": [np.zeros(width)] * n},
                                         {"gate": np.ones(n), "tags": np.full((n, 2), np.nan)})
    mixed = dcc.MixedDataset(sources)
    with pytest.raises(dcc.InputError, match=r"input 'names' differs.*p: \(2,\), q: \(3,\)"):
        mixed[[0, 5]]


def test_every_proportional_epoch_is_each_sample_once_in_a_new_order(sources):
    mixed = dcc.MixedDataset(sources, seed=3)
    epochs = [mixed.epoch_keys(e).tolist() for e in range(4)]
    for keys in epochs:
        assert sorted(keys) == list(range(111))
    assert len({tuple(k) for k in epochs}) == 4


def test_the_same_seed_gives_the_same_batches_and_each_pass_is_the_next_epoch(sources):
    mixed = dcc.MixedDataset(sources, sampling="temperature", temperature=2.0, epoch_size=64)
    one, two = mixed.loader(batch_size=16, seed=7), mixed.loader(batch_size=16, seed=7)
    first = [_pairs(one) for _ in range(3)]
    assert first == [_pairs(two) for _ in range(3)]
    assert first[0] != first[1] != first[2]  # each pass draws the next epoch
    assert _pairs(mixed.loader(batch_size=16, seed=8)) != first[0]
    again = mixed.loader(batch_size=16, seed=7)
    again.sampler.sampler.set_epoch(2)  # as DistributedSampler.set_epoch
    assert _pairs(again) == first[2]
    # and the batch contents themselves, not only the keys
    for (xa, ya), (xb, yb) in zip(mixed.loader(batch_size=16, seed=7), mixed.loader(batch_size=16, seed=7)):
        assert torch.equal(xa["features"], xb["features"])


# Sampling frequencies --------------------------------------------------------------------------------------

def _expected(mode, sizes):
    n = np.array(list(sizes.values()), dtype=float)
    if mode == "proportional":
        return n / n.sum()
    if mode == "uniform":
        return np.full(len(n), 1 / len(n))
    if mode == "temperature":
        w = n ** (1 / 3.0)
        return w / w.sum()
    w = np.array([1.0, 0.0, 3.0])
    return w / w.sum()


@pytest.mark.parametrize("mode", ["proportional", "uniform", "temperature", "weights"])
def test_sampling_frequencies_within_binomial_tolerance(sources, mode):
    kwargs = {"temperature": {"temperature": 3.0}, "weights": {}}.get(mode, {})
    sampling = {"a": 1.0, "b": 0.0, "c": 3.0} if mode == "weights" else mode
    epoch_size, epochs = 97, 60  # 97: no source's expected count is whole, so the rounding is exercised
    mixed = dcc.MixedDataset(sources, sampling=sampling, epoch_size=epoch_size, seed=11, **kwargs)
    p = _expected(mode, SIZES)
    np.testing.assert_allclose(list(mixed.probabilities.values()), p, rtol=1e-12)
    keys = torch.cat([mixed.epoch_keys(e) for e in range(epochs)]).numpy()
    assert all(len(mixed.epoch_keys(e)) == epoch_size for e in range(3))
    which = np.searchsorted(mixed.offsets, keys, side="right") - 1
    draws = len(keys)
    counts = np.bincount(which, minlength=3)
    # Binomial(draws, p_i) has standard deviation sqrt(draws p (1 - p)); 4 of them miss a correct
    # sampler with probability ~6e-5 per source. The sampler's counts per epoch are
    # floor/ceil(epoch_size * p_i) (stratified), which varies less than the binomial: conservative.
    tolerance = 4 * np.sqrt(draws * p * (1 - p))
    assert np.all(np.abs(counts - draws * p) <= tolerance), (counts, draws * p, tolerance)
    # stratified: every epoch's count is epoch_size * p_i rounded down or up
    for e in range(5):
        c = np.array(list(mixed.source_counts(e).values()))
        assert np.all((c == np.floor(epoch_size * p)) | (c == np.ceil(epoch_size * p))) and c.sum() == epoch_size
    # within a source, without replacement until exhausted: after D draws, every sample has been
    # drawn floor(D / n) or ceil(D / n) times
    for s, n in enumerate(SIZES.values()):
        per_sample = np.bincount(keys[which == s] - mixed.offsets[s], minlength=n)
        d = counts[s]
        assert set(per_sample.tolist()) <= {d // n, -(-d // n)}, (s, sorted(set(per_sample.tolist())))
    if mode == "weights":
        assert counts[1] == 0  # weight 0: never drawn


def test_temperature_one_is_proportional_and_a_large_one_nearly_uniform(sources):
    p1 = dcc.MixedDataset(sources, sampling="temperature", temperature=1.0).probabilities
    np.testing.assert_allclose(list(p1.values()), _expected("proportional", SIZES), rtol=1e-12)
    big = dcc.MixedDataset(sources, sampling="temperature", temperature=1e6).probabilities
    np.testing.assert_allclose(list(big.values()), [1 / 3] * 3, rtol=1e-5)
    tiny = dcc.MixedDataset(sources, sampling="temperature", temperature=1e-3).probabilities  # n^1000: no overflow
    assert tiny["b"] == pytest.approx(1.0)


# Errors ------------------------------------------------------------------------------------------------------

def _tags_flow(classes):
    tasks = dcc.Tasks([dcc.BinaryClassificationTask("gate", nn.Linear(3, 1)),
                       dcc.MultilabelClassificationTask("tags", nn.Linear(3, classes))])

    @tasks.add_flow
    def full(flow, x, out):
        out += flow.gate(x.f)
        out += flow.tags(x.f) | out.gate
        return out

    return full


def test_errors_name_the_source_and_the_task_or_input(security_flow, sources):
    a, b = sources["a"], sources["b"]
    flow = _tags_flow(5)
    f = np.zeros((4, 3), np.float32)
    five = flow.get_dataset({"f": f}, {"gate": np.ones(4), "tags": np.zeros((4, 5))})
    six = flow.get_dataset({"f": f}, {"gate": np.ones(4), "tags": np.zeros((4, 6))})
    with pytest.raises(dcc.LabelError, match=r"task 'tags'.*\(N, 6\).*source 'more'.*\(N, 5\).*source 'less'"):
        dcc.MixedDataset({"less": five, "more": six})
    with pytest.raises(dcc.InputError, match=r"source 'other' was built by flow 'full'.*source 'a'.*same flow"):
        dcc.MixedDataset({"a": a, "other": five})
    inputs = {"features": np.zeros((5, 8), np.float32)}
    with pytest.raises(dcc.InputError, match=r"source 'wide'.*other inputs keys.*lacks 'features'.*'wide_features'"):
        dcc.MixedDataset({"a": a, "wide": security_flow.get_dataset({"wide_features": inputs["features"]}, {},
                                                                       partial=True)})
    with pytest.raises(dcc.InputError, match=r"input 'features'.*\(9,\).*source 'nine'.*\(8,\).*source 'a'"):
        dcc.MixedDataset({"a": a, "nine": security_flow.get_dataset({"features": np.zeros((5, 9), np.float32)}, {},
                                                                       partial=True)})
    with pytest.raises(dcc.InputError, match=r"source 'empty' has no samples"):
        dcc.MixedDataset({"a": a, "empty": security_flow.get_dataset({"features": np.zeros((0, 8), np.float32)}, {},
                                                                        partial=True)})
    with pytest.raises(TypeError, match=r"source 'raw' is a dict"):
        dcc.MixedDataset({"a": a, "raw": {"features": 1}})
    with pytest.raises(TypeError, match="non-empty mapping"):
        dcc.MixedDataset({})
    with pytest.raises(ValueError, match=r"unknown sampling 'temprature'; did you mean 'temperature'"):
        dcc.MixedDataset({"a": a, "b": b}, sampling="temprature")
    with pytest.raises(ValueError, match=r"temperature=T.*got None"):
        dcc.MixedDataset({"a": a, "b": b}, sampling="temperature")
    with pytest.raises(ValueError, match=r"temperature=T.*got -1"):
        dcc.MixedDataset({"a": a, "b": b}, sampling="temperature", temperature=-1)
    with pytest.raises(ValueError, match=r"temperature=2.0 applies only to sampling='temperature'"):
        dcc.MixedDataset({"a": a, "b": b}, temperature=2.0)
    with pytest.raises(ValueError, match=r"unknown source 'bb'; did you mean 'b'"):
        dcc.MixedDataset({"a": a, "b": b}, sampling={"a": 1, "bb": 1})
    with pytest.raises(ValueError, match=r"lack source\(s\) 'b'"):
        dcc.MixedDataset({"a": a, "b": b}, sampling={"a": 1})
    with pytest.raises(ValueError, match=r"weight of source 'b'.*>= 0, got -2"):
        dcc.MixedDataset({"a": a, "b": b}, sampling={"a": 1, "b": -2})
    with pytest.raises(ValueError, match=r"weight of source 'b'.*got nan"):
        dcc.MixedDataset({"a": a, "b": b}, sampling={"a": 1, "b": math.nan})
    with pytest.raises(ValueError, match="every sampling weight is 0"):
        dcc.MixedDataset({"a": a, "b": b}, sampling={"a": 0, "b": 0})
    with pytest.raises(ValueError, match="epoch_size must be a whole number >= 1, got 0"):
        dcc.MixedDataset({"a": a, "b": b}, epoch_size=0)
    with pytest.raises(ValueError, match="seed must be a whole number >= 0"):
        dcc.MixedDataset({"a": a, "b": b}).loader(batch_size=4, seed=-1)
    with pytest.raises(KeyError, match=r"no source 'c'"):
        dcc.MixedDataset({"a": a, "b": b}).labelled_paths("c")
    mixed = dcc.MixedDataset({"a": a, "b": b})
    with pytest.raises(IndexError, match="out of range for a mixture of 100"):
        mixed[[0, 100]]


# The loss of a mixed batch ---------------------------------------------------------------------------------

def _head_grads(flow, model, x, y):
    model.zero_grad()
    flow.get_loss()(model(x), y).backward()
    return {leaf.path: torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                                  for p in leaf.task.module.parameters()]) for leaf in flow.graph.leaves}


def _rows(tree, rows):
    return {k: _rows(v, rows) for k, v in tree.items()} if isinstance(tree, dict) else tree[rows]


def test_a_source_without_labels_for_a_task_adds_nothing_to_its_loss_or_gradient(security_flow, sources):
    flow = security_flow
    mixed = dcc.MixedDataset({"a": sources["a"], "b": sources["b"]})
    x, y = mixed[mixed.epoch_keys(0)[:64].tolist()]
    only_b = x["source"] == 1
    assert 0 < int(only_b.sum()) < 64
    model = flow.torch().train()
    loss_fn = flow.get_loss()
    xb, yb = _rows(x, only_b), _rows(y, only_b)
    xa, ya = _rows(x, ~only_b), _rows(y, ~only_b)
    mixed_grads, b_grads, a_grads = (_head_grads(flow, model, *batch) for batch in ((x, y), (xb, yb), (xa, ya)))
    for path in flow.graph.paths:
        labelled_by_b = path in mixed.labelled_paths("b")
        absent = a_grads if labelled_by_b else b_grads  # the source that does not label it
        assert torch.count_nonzero(absent[path]) == 0, path  # exactly 0, no NaN
        # the same masked mean over the same samples; logits of a row computed in a batch of another
        # size may differ by float32 rounding (~1e-8 on these O(1) values), hence atol 1e-6
        torch.testing.assert_close(mixed_grads[path], (b_grads if labelled_by_b else a_grads)[path],
                                   rtol=1e-5, atol=1e-6, msg=path)
    # the labels of the two sources are disjoint: the mixed loss is the sum of the two sources' losses
    with torch.no_grad():
        torch.testing.assert_close(loss_fn(model(x), y), loss_fn(model(xa), ya) + loss_fn(model(xb), yb),
                                   rtol=1e-5, atol=1e-6)


# Several processes -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("epoch_size,batch_size", [(111, 16), (96, 16), (40, 8)])
def test_accelerate_shards_deal_disjoint_batches_and_runner_drops_its_copies(sources, epoch_size, batch_size):
    """FlowRunner's path: `compat.batch_fetching_loader`, then accelerate's `BatchSamplerShard`
    (what `prepare_data_loader` wraps the loader's batch sampler in under DDP), then the padding
    layout with which FlowRunner cuts accelerate's copies off."""
    from types import SimpleNamespace

    from accelerate.data_loader import BatchSamplerShard

    from dnn_cool_catalyst.runners.compat import batch_fetching_loader
    from dnn_cool_catalyst.runners.padding import ddp_padding_layout

    mixed = dcc.MixedDataset(sources, sampling="uniform", epoch_size=epoch_size, seed=2)
    world, real, steps = 2, [], []
    for rank in range(world):
        loader = batch_fetching_loader(mixed.loader(batch_size=batch_size))
        assert loader.dataset.dataset is mixed  # _BatchFetch keeps it in `.dataset`
        shard = BatchSamplerShard(loader.batch_sampler, num_processes=world, process_index=rank, even_batches=True)
        layout = ddp_padding_layout(SimpleNamespace(batch_sampler=shard))
        assert layout is not None and layout.total == epoch_size
        batches = list(shard)
        steps.append(len(batches))
        for step, keys in enumerate(batches):
            real += keys[:layout.real_rows(step, len(keys))]
    assert steps[0] == steps[1]
    assert Counter(real) == Counter(mixed.epoch_keys(0).tolist())  # every sample of the epoch once over both ranks


def _runner_loaders(batch_size):
    torch.manual_seed(0)
    flow = security_tasks(features=8).get_full_flow()
    mixed = dcc.MixedDataset(_sources(flow), sampling="temperature", temperature=2.0, epoch_size=100, seed=9)
    return flow, {"train": mixed.loader(batch_size=batch_size), "valid": mixed.loader(batch_size=batch_size)}


def test_flow_runner_ddp_on_a_mixed_loader_equals_one_process_on_the_global_batch(tmp_path):
    """FlowRunner on Catalyst's DDP engine shards the mixed loader once (accelerate deals the
    epoch's batches; no second sharding): 2 processes on batches of 16 train as one on 32."""
    from catalyst import dl

    from dnn_cool_catalyst.runners import DistributedDataParallelEngine, FlowRunner

    flow, loaders = _runner_loaders(16)
    ddp = FlowRunner(flow)
    engine = DistributedDataParallelEngine(num_node_workers=2, process_group_kwargs={"backend": "gloo"})
    ddp.train(loaders=loaders, engine=engine, num_epochs=2, logdir=str(tmp_path / "ddp"))
    assert engine.spawned
    one_flow, one_loaders = _runner_loaders(32)
    one = FlowRunner(one_flow)
    one.train(loaders=one_loaders, engine=dl.CPUEngine(), num_epochs=2, logdir=str(tmp_path / "one"))
    # as tests/runners/test_ddp.py: half batches on two processes against whole ones on one round
    # differently (~1e-8), carried through 2 epochs of AdamW at about that size: rtol 1e-5 / atol 1e-6
    for (name, a), b in zip(ddp.model.named_parameters(), one.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    import pandas as pd

    for loader in ("train", "valid"):  # the same samples counted once each: equal loader metrics
        a, b = (pd.read_csv(tmp_path / run / "csv_logger" / f"{loader}.csv") for run in ("ddp", "one"))
        assert list(a.columns) == list(b.columns) and len(a) == 2
        for column in a.columns:
            assert np.allclose(a[column], b[column], rtol=1e-5, atol=1e-6, equal_nan=True), (loader, column)


def _gloo_mixture(flow, epoch_size):
    if epoch_size == 0:  # proportional, every sample once per epoch (111 of them: odd)
        return dcc.MixedDataset(_sources(flow), seed=4)
    return dcc.MixedDataset(_sources(flow), sampling="temperature", temperature=2.0, epoch_size=epoch_size, seed=4)


GLOO_EPOCH_SIZES = (0, 96)  # 0: proportional over all 111 samples (odd: padded); 96: temperature, even


def _gloo_worker(rank, world, out_dir, port):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # the global RNG differs per rank (as under Catalyst): the sampler must not use it
        for epoch_size in GLOO_EPOCH_SIZES:
            mixed = _gloo_mixture(security_tasks(features=8).get_full_flow(), epoch_size)
            loader = mixed.loader(batch_size=8, distributed=True)
            epochs = [[[mixed.key(s, i) for s, i in zip(x["source"].tolist(), x["index"].tolist())] for x, _ in loader]
                      for _ in range(2)]
            with open(os.path.join(out_dir, f"rank{rank}_{epoch_size}.json"), "w") as fh:
                json.dump({"epochs": epochs, "len": len(loader)}, fh)
    finally:
        dist.destroy_process_group()


def _spawn_gloo(out_dir):
    import torch.multiprocessing as mp

    from dnn_cool_catalyst.runners.engines import free_port

    mp.spawn(_gloo_worker, args=(2, out_dir, free_port()), nprocs=2, join=True)


def test_plain_gloo_loop_ranks_draw_disjoint_samples_with_equal_steps(tmp_path, security_flow):
    script = subprocess.run([sys.executable, __file__, "gloo", str(tmp_path)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert script.returncode == 0, script.stdout[-2000:] + script.stderr[-3000:]
    for epoch_size in GLOO_EPOCH_SIZES:
        _check_gloo_ranks(tmp_path, security_flow, epoch_size)


def _check_gloo_ranks(tmp_path, security_flow, epoch_size):
    ranks = [json.loads((tmp_path / f"rank{r}_{epoch_size}.json").read_text()) for r in (0, 1)]
    mixed = _gloo_mixture(security_flow, epoch_size)
    for epoch in range(2):
        steps = [len(r["epochs"][epoch]) for r in ranks]
        assert steps[0] == steps[1] == ranks[0]["len"] == ranks[1]["len"] == math.ceil(math.ceil(len(mixed) / 2) / 8)
        keys = [[k for batch in r["epochs"][epoch] for k in batch] for r in ranks]
        whole = mixed.epoch_keys(epoch).tolist()  # the one-process epoch of the same seed
        if len(whole) % 2:  # padded to a multiple of the world size with the epoch's first sample (DistributedSampler)
            assert Counter(keys[0] + keys[1]) == Counter(whole + whole[:1])
            assert set(keys[0]) & set(keys[1]) == {whole[0]}
        else:  # the ranks split the epoch's draws between them
            assert Counter(keys[0] + keys[1]) == Counter(whole)


if __name__ == "__main__":  # the subprocess of the gloo test
    if sys.argv[1] == "gloo":
        _spawn_gloo(sys.argv[2])
