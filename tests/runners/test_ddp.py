"""DDP on the CPU (gloo, 2 processes): the flow loss scales itself so that DDP's averaged
gradients are the global batch's, and FlowRunner on Catalyst's DDP engine trains, measures and
tunes exactly as one process on the whole batch.

The plain-PyTorch check runs this file as a script in a subprocess (its worker function must be
importable by the spawned processes), and so does the torchrun check (under torchrun); the
FlowRunner check spawns from the test process (everything the runner holds comes from the package).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import dnn_cool_catalyst as dcc

# Plain PyTorch DDP: flow.get_loss() under a process group ------------------------------------------

# rank 0 gets 5 samples, rank 1 gets 3; the gate is false on all of rank 1's samples, so the gated
# tasks (value, tags) have no sample there, and kind (under ~gate) has only one on rank 0.
GATE = [1, 1, 0, 1, 1, 0, 0, 0]
SHARDS = [slice(0, 5), slice(5, 8)]


def _flow():
    torch.manual_seed(0)
    tasks = dcc.Tasks([
        dcc.BinaryClassificationTask("gate", nn.Linear(3, 1)),
        dcc.BoundedRegressionTask("value", nn.Linear(3, 1)),
        dcc.MultilabelClassificationTask("tags", nn.Linear(3, 2)),
        dcc.ClassificationTask("kind", nn.Linear(3, 4)),
    ])

    @tasks.add_flow
    def full(flow, x, out):
        out += flow.gate(x.f)
        out += flow.value(x.f) | out.gate
        out += flow.tags(x.f) | out.gate
        out += flow.kind(x.f) | ~out.gate
        return out

    return full


def _batch(rows=slice(None)):
    g = torch.Generator().manual_seed(1)
    n = len(GATE)
    gate = torch.tensor(GATE, dtype=torch.float32)
    x = {"f": torch.randn(n, 3, generator=g), "gt": {"gate": gate}}
    y = {"gate": gate, "value": torch.rand(n, generator=g), "tags": (torch.rand(n, 2, generator=g) > 0.5).float(),
         "kind": torch.randint(0, 4, (n,), generator=g)}
    cut = lambda t: {k: cut(v) for k, v in t.items()} if isinstance(t, dict) else t[rows]  # noqa: E731
    return cut(x), cut(y)


def _grads_on_rank(rank, world, out_dir, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for scaled in (True, False):
            flow = _flow()
            model = nn.parallel.DistributedDataParallel(flow.torch().train())  # no find_unused_parameters
            x, y = _batch(SHARDS[rank])
            loss = flow.get_loss(distributed=scaled)(model(x), y)
            loss.backward()
            grads = {k: p.grad.detach().clone() for k, p in flow.torch().named_parameters()}
            torch.save(grads, os.path.join(out_dir, f"grads_{'scaled' if scaled else 'local'}_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn_gradient_workers(out_dir):
    from dnn_cool_catalyst.runners.engines import free_port

    mp.spawn(_grads_on_rank, args=(len(SHARDS), out_dir, free_port()), nprocs=len(SHARDS), join=True)


def test_ddp_averaged_gradients_equal_the_global_batch(tmp_path):
    script = subprocess.run([sys.executable, __file__, "grads", str(tmp_path)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert script.returncode == 0, script.stdout[-2000:] + script.stderr[-3000:]
    flow = _flow()
    module = flow.torch().train()
    x, y = _batch()
    flow.get_loss()(module(x), y).backward()  # no process group here: the plain loss
    expected = {k: p.grad for k, p in module.named_parameters()}
    load = lambda name: torch.load(tmp_path / name, weights_only=True)  # noqa: E731
    for rank in range(len(SHARDS)):
        scaled = load(f"grads_scaled_{rank}.pt")
        assert set(scaled) == set(expected)  # every head got a gradient on every rank
        # each rank's shard against the whole batch: float32 sums over other sample subsets, then
        # gloo's all-reduce of the two ranks' gradients (~1e-8 absolute on these O(0.1) values)
        for k, g in expected.items():
            torch.testing.assert_close(scaled[k], g, rtol=1e-5, atol=1e-7, msg=k)
    local = load("grads_local_0.pt")  # each rank's own masked means, averaged: not the global batch
    assert any(not torch.allclose(local[k], g, rtol=1e-4, atol=1e-6) for k, g in expected.items())


def test_the_loss_is_plain_without_a_process_group_and_compiles():
    flow = _flow()
    module = flow.torch().train()
    x, y = _batch()
    loss_fn = flow.get_loss()
    eager = loss_fn(module(x), y)
    torch.testing.assert_close(eager, flow.get_loss(distributed=False)(module(x), y))
    compiled = torch.compile(lambda a, b: loss_fn(module(a), b), fullgraph=True, backend="aot_eager")(x, y)
    # traced graphs may fuse or reorder the reductions: rounding of a float32 loss of order 1
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


# accelerate's padding copies ---------------------------------------------------------------------


@pytest.mark.parametrize("total,batch_size,world,split", [
    (72, 16, 2, False), (64, 16, 2, False), (6, 16, 2, False), (50, 8, 3, False), (40, 8, 2, True), (13, 4, 2, True),
])
def test_padding_layout_keeps_every_sample_once(total, batch_size, world, split):
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

    from dnn_cool_catalyst.runners.runner import ddp_padding_layout

    kept = []
    for rank in range(world):
        inner = BatchSampler(SequentialSampler(range(total)), batch_size, drop_last=False)
        shard = BatchSamplerShard(inner, num_processes=world, process_index=rank, split_batches=split)
        layout = ddp_padding_layout(DataLoader(range(total), batch_sampler=shard))
        batches = list(shard)
        assert layout is not None and len({len(b) for b in batches}) == 1  # even batches, padded
        for step, batch in enumerate(batches):
            kept += batch[: layout.real_rows(step, len(batch))]
    assert sorted(kept) == list(range(total))


def test_unshare_tensors_gives_private_copies():
    from dnn_cool_catalyst.runners.engines import unshare_tensors

    module = nn.BatchNorm1d(3).share_memory()
    params = list(module.parameters())
    before = [t.clone() for t in module.state_dict().values()]
    unshare_tensors(module)
    assert not any(t.is_shared() for t in module.state_dict().values())
    assert list(module.parameters())[0] is params[0]  # an optimizer holding them still steps them
    assert all(torch.equal(a, b) for a, b in zip(before, module.state_dict().values()))


def test_engine_under_torchrun_runs_in_this_process(monkeypatch):
    from dnn_cool_catalyst.runners import DistributedDataParallelEngine

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    engine = DistributedDataParallelEngine()
    assert engine.spawn(lambda local_rank, world_size: (local_rank, world_size)) == (1, 2)
    assert not engine.spawned


# FlowRunner on Catalyst's DDP engine ----------------------------------------------------------------

N, BATCH = 72, 16  # 72 is not a multiple of 2 x 16: accelerate pads, the runner drops the copies


def _security(batch_size):
    from dnn_cool_catalyst.story import security_labels, security_tasks

    torch.manual_seed(0)
    flow = security_tasks(features=8).get_full_flow()
    rng = np.random.default_rng(0)
    ds = flow.get_dataset({"features": rng.normal(size=(N, 8)).astype(np.float32)},
                          security_labels(N, seed=1, missing_rate=0.1), with_index=True)
    return flow, {"train": ds.loader(batch_size=batch_size), "valid": ds.loader(batch_size=batch_size)}


def test_flow_runner_ddp_equals_one_process_on_the_global_batch(tmp_path, assert_clear_ranking):
    from catalyst import dl

    from dnn_cool_catalyst.runners import DistributedDataParallelEngine, FlowRunner

    flow, loaders = _security(BATCH)  # per process; a global batch is 2 x BATCH
    ddp = FlowRunner(flow)
    engine = DistributedDataParallelEngine(num_node_workers=2, process_group_kwargs={"backend": "gloo"})
    ddp.train(loaders=loaders, engine=engine, num_epochs=2, logdir=str(tmp_path / "ddp"))
    assert engine.spawned
    one_flow, one_loaders = _security(2 * BATCH)
    one = FlowRunner(one_flow)
    one.train(loaders=one_loaders, engine=dl.CPUEngine(), num_epochs=2, logdir=str(tmp_path / "one"))

    # Two processes on half batches against one on whole batches: forward passes and sums round
    # differently (~1e-8), all-reduced gradients too, and 2 epochs of AdamW (lr 1e-3, steps nearly
    # sign-like) carry that on at about the same size; parameters, logged values and thresholds
    # of order 1 get rtol 1e-5 / atol 1e-6. The interpretation table picks samples by loss: first
    # asserted to have no near-ties that such rounding could swap.
    for (name, a), b in zip(ddp.model.named_parameters(), one.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    for loader in ("train", "valid"):
        a, b = (pd.read_csv(tmp_path / run / "csv_logger" / f"{loader}.csv") for run in ("ddp", "one"))
        assert list(a.columns) == list(b.columns) and len(a) == 2
        for column in a.columns:
            assert np.allclose(a[column], b[column], rtol=1e-5, atol=1e-6, equal_nan=True), (loader, column)
    tuned = [json.loads((tmp_path / run / "tuned_params.json").read_text()) for run in ("ddp", "one")]
    # ... and the tuned thresholds, also loaded back into this process's decoders
    for a, b in ((tuned[0], tuned[1]), (ddp.flow.get_decoder().params(), one.flow.get_decoder().params())):
        assert a.keys() == b.keys() and a
        for path, params in a.items():
            assert params.keys() == b[path].keys()
            for key, value in params.items():
                if isinstance(value, str):
                    assert value == b[path][key], (path, key)
                else:
                    assert np.allclose(value, b[path][key], rtol=1e-5, atol=1e-6), (path, key)
    x, y = next(iter(_security(N)[1]["valid"]))
    one.model.eval()
    with torch.no_grad():
        assert_clear_ranking(one.flow.get_per_sample_loss()(one.model(x), y), 5)
    interpretation = [pd.read_csv(tmp_path / run / "interpretation_valid.csv") for run in ("ddp", "one")]
    pd.testing.assert_frame_equal(interpretation[0], interpretation[1], rtol=1e-5, atol=1e-6)
    stray = [f for f in os.listdir(tmp_path / "ddp") if f.endswith(".tmp")]
    assert not stray


def _torchrun_worker(logdir):
    """One process of `torchrun --nproc-per-node 2 test_ddp.py torchrun <logdir>`."""
    from dnn_cool_catalyst.runners import DistributedDataParallelEngine, FlowRunner

    flow, loaders = _security(BATCH)
    runner = FlowRunner(flow)
    engine = DistributedDataParallelEngine()
    runner.train(loaders=loaders, engine=engine, num_epochs=1, logdir=logdir)
    assert not engine.spawned and not dist.is_initialized()  # ran here; the group is gone after training
    runner.tune(loaders["valid"])
    runner.evaluate(loaders["valid"])
    with open(os.path.join(logdir, f"done_{os.environ['RANK']}.txt"), "w") as fh:
        fh.write(str(float(next(runner.model.parameters()).sum())))


def test_torchrun_processes_train_together_and_rank0_writes(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    script = subprocess.run([torchrun, "--nproc-per-node", "2", __file__, "torchrun", str(tmp_path)],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert script.returncode == 0, script.stdout[-2000:] + script.stderr[-3000:]
    done = [(tmp_path / f"done_{rank}.txt").read_text() for rank in (0, 1)]
    assert done[0] == done[1]  # the same trained weights in both processes (one training, not two)
    for name in ("tuned_params.json", "evaluation.csv", "interpretation_valid.csv", "checkpoints/runner.last.pth"):
        assert (tmp_path / name).is_file(), name


if __name__ == "__main__":  # subprocesses of the tests above
    if sys.argv[1] == "torchrun":
        _torchrun_worker(sys.argv[2])
    else:
        _spawn_gradient_workers(sys.argv[2])
