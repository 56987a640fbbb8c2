"""DataParallel memory balancing: reducing inside replicas and merging gives the whole batch's
loss, gradients, metrics and per-sample losses, for batches split exactly as `scatter` splits them."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
from catalyst import dl
from catalyst.core.logger import ILogger
from torch import nn

import dnn_cool_catalyst as dcc
from dnn_cool_catalyst.callbacks.batch import EXPLAIN, LOSS_TERMS, METRIC_STATES, OUTPUTS, PER_SAMPLE_LOSS
from dnn_cool_catalyst.interpreters.loss import FlowLoss
from dnn_cool_catalyst.story import security_labels, security_tasks
from dnn_cool_catalyst.runners import (
    BalancedDataParallel,
    BalancedDataParallelEngine,
    FlowRunner,
    ReplicaReducer,
    merge_replicas,
)

VOCAB, TOKENS = 11, 4


def _flow():
    torch.manual_seed(0)
    tasks = dcc.Tasks([
        dcc.BinaryClassificationTask("gate", nn.Linear(3, 1)),
        dcc.BoundedRegressionTask("value", nn.Linear(3, 1)),
        dcc.MultilabelClassificationTask("tags", nn.Linear(3, 2)),
        dcc.ClassificationTask("kind", nn.Linear(3, 4)),
        dcc.MaskedLanguageModelingTask("mlm", nn.Linear(5, VOCAB)),
    ])

    @tasks.add_flow
    def full(flow, x, out):
        out += flow.gate(x.f)
        out += flow.value(x.f) | out.gate
        out += flow.tags(x.f) | out.gate
        out += flow.kind(x.f) | ~out.gate
        out += flow.mlm(x.tokens) | out.gate
        return out

    return full


def _batch(gate, seed=0):
    """A batch with the given gate labels (1: value, tags and mlm apply; 0: kind applies)."""
    g = torch.Generator().manual_seed(seed)
    n = len(gate)
    gate = torch.tensor(gate, dtype=torch.float32)
    tags = (torch.rand(n, 2, generator=g) > 0.5).float()
    tags[0, 1] = float("nan")  # a missing element
    tokens = torch.randint(0, VOCAB, (n, TOKENS), generator=g)
    tokens[torch.rand(n, TOKENS, generator=g) > 0.6] = -100
    kind = torch.randint(0, 4, (n,), generator=g)
    kind[-1] = -1  # a missing label
    x = {"f": torch.randn(n, 3, generator=g), "tokens": torch.randn(n, TOKENS, 5, generator=g),
         "gt": {"gate": gate}, "index": torch.arange(n)}
    y = {"gate": gate, "value": torch.rand(n, generator=g), "tags": tags, "kind": kind, "mlm": tokens}
    return x, y


# What nn.DataParallel does on GPUs, done on the CPU: scatter splits every tensor with
# `Tensor.chunk(n_devices)` (so 5 samples on 4 devices give chunks of 2, 2, 1: three replicas),
# copies other values to every replica; gather concatenates along dim 0.

def scatter_like(tree, devices):
    if isinstance(tree, torch.Tensor):
        return list(tree.chunk(devices))
    if isinstance(tree, dict) and tree:
        parts = {k: scatter_like(v, devices) for k, v in tree.items()}
        n = min(len(v) for v in parts.values())
        return [{k: v[i] for k, v in parts.items()} for i in range(n)]
    return [tree] * devices


def gather_like(results):
    first = results[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(results)
    if isinstance(first, dict):
        return {k: gather_like([r[k] for r in results]) for k in first}
    if isinstance(first, tuple):
        return tuple(gather_like(list(parts)) for parts in zip(*results))
    return first


def _whole_batch(flow, module, x, y):
    out = module(x)
    loss = flow.get_loss()(out, y)
    metrics = flow.get_metrics()
    metrics.update(out, y)
    return out, loss, metrics, flow.get_per_sample_loss()(out, y)


def _grads(module):
    return {k: p.grad.clone() for k, p in module.named_parameters()}


def _assert_metrics_equal(a, b):
    """Metrics of the whole batch against those merged from replicas (chunks of the batch): the
    states are sums and counts; float32 sums over other chunkings round differently (relative
    error below n x 2^-24 ~ 1e-6 for these few dozen samples), counts of decisions are exact as
    long as no decision is within rounding of flipping (asserted where chunks are compared)."""
    for k, v in a.items():
        assert math.isnan(v) == math.isnan(b[k]) and (math.isnan(v) or v == pytest.approx(b[k], rel=1e-5, abs=1e-7)), k


GATES = {
    "uneven_13_on_4": ([1, 0, 1, 1, 0, 1, 0, 0, 1, 1, 0, 1, 1], 4),  # chunks 4, 4, 4, 1
    "5_on_4_gives_3_replicas": ([1, 0, 1, 1, 0], 4),  # chunks 2, 2, 1
    "a_chunk_without_gated_tasks": ([0, 0, 0, 0, 1, 0, 1, 1], 2),  # value, tags, mlm: none in chunk 1
    "a_chunk_without_kind": ([1, 1, 1, 0, 0, 1], 2),  # kind: none in chunk 1
}


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("case", list(GATES))
def test_replicas_merge_to_the_whole_batch(case, fuse, assert_clear_decisions):
    gate, devices = GATES[case]
    flow = _flow()
    module = flow.torch(fuse=fuse).train()
    assert bool(fuse and module.fused_heads) == fuse  # gate, value, tags, kind: one GEMM when fused
    x, y = _batch(gate)
    out, loss, metrics, per_sample = _whole_batch(flow, module, x, y)
    loss.backward()
    expected_grads = _grads(module)
    module.zero_grad()

    reducer = ReplicaReducer(flow, explain=3)
    chunks = list(zip(scatter_like(x, devices), scatter_like(y, devices)))
    assert len(chunks) == math.ceil(len(gate) / math.ceil(len(gate) / devices))
    merged = merge_replicas(gather_like([reducer(module, xi, yi) for xi, yi in chunks]))
    merged_loss = FlowLoss.combine(merged[LOSS_TERMS], flow.get_loss().weights)
    # Chunks of the batch against the whole: matmuls and sums round differently per chunking
    # (~1e-8 on these unit-scale values); gradients are sums over up to 13 samples of O(1) terms,
    # so rtol 1e-5 with atol 1e-6 for entries that cancel to near zero.
    assert_clear_decisions(flow, flow.get_activation()(out["logits"]))
    torch.testing.assert_close(merged_loss, loss, rtol=1e-5, atol=1e-6)
    merged_loss.backward()
    for k, g in _grads(module).items():
        torch.testing.assert_close(g, expected_grads[k], rtol=1e-5, atol=1e-6, msg=k)

    replica_metrics = flow.get_metrics()
    replica_metrics.merge(merged[METRIC_STATES])
    _assert_metrics_equal(metrics.compute(), replica_metrics.compute())
    assert replica_metrics.num_samples() == metrics.num_samples()

    for p, v in per_sample.items():  # in batch order, NaN outside S_t (rounding as above)
        torch.testing.assert_close(merged[PER_SAMPLE_LOSS][p], v.detach(), equal_nan=True, rtol=1e-5, atol=1e-6)
    for p, m in out["mask"].items():
        assert torch.equal(merged[OUTPUTS]["mask"][p], m)
    assert set(merged[OUTPUTS]["activated"]) == {"gate", "tags"}  # the tunable tasks, small
    torch.testing.assert_close(merged[OUTPUTS]["activated"]["tags"], torch.sigmoid(out["logits"]["tags"]).detach(),
                               rtol=1e-5, atol=1e-6)
    assert merged[EXPLAIN]["index"].tolist() == [0, 1, 2]
    torch.testing.assert_close(merged[EXPLAIN]["logits"]["mlm"], out["logits"]["mlm"][:3].detach(), rtol=1e-5, atol=1e-6)


def test_fused_heads_give_the_unfused_balanced_results():
    x, y = _batch([1, 0, 1, 1, 0, 1, 0, 1])
    results = []
    for fuse in (False, True):
        flow = _flow()  # seeded: the same weights
        model = BalancedDataParallel(flow.torch(fuse=fuse).train(), flow, device_ids=[], explain=2)
        reduced = model(x, y)
        reduced["loss"].backward()
        results.append((reduced, model.state_dict(), flow))
    (plain, plain_sd, _), (fused, fused_sd, flow) = results
    assert list(plain_sd) == list(fused_sd)  # the same checkpoint names
    # one GEMM against one per head: another blocking of float32 dot products over 3 features
    torch.testing.assert_close(fused["loss"], plain["loss"], rtol=1e-6, atol=1e-6)
    for p, v in plain[PER_SAMPLE_LOSS].items():
        torch.testing.assert_close(fused[PER_SAMPLE_LOSS][p], v, equal_nan=True, rtol=1e-6, atol=1e-6)
    for k, v in plain[METRIC_STATES].items():
        torch.testing.assert_close(fused[METRIC_STATES][k], v, rtol=1e-6, atol=1e-6)
    group = flow.torch().fused_heads[0]
    for i, path in enumerate(("gate", "value", "tags", "kind")):
        torch.testing.assert_close(group.weight.grad[group.rows(i)], results[0][2].torch()._modules[path].weight.grad,
                                   rtol=1e-6, atol=1e-6)


def test_only_small_tensors_are_gathered():
    flow = _flow()
    x, y = _batch([1, 0, 1, 1, 0, 1, 1, 0])
    reduced = ReplicaReducer(flow)(flow.torch(), x, y)
    assert EXPLAIN not in reduced  # explain=0
    logits_elements = sum(t.numel() for t in flow.torch()(x)["logits"].values())
    gathered = [t for t in _tensors(reduced)]
    assert all(t.shape[0] in (1, 8) for t in gathered)  # one row of states, or one entry per sample
    assert max(t.numel() for t in gathered if t.shape[0] == 8) == 16  # tags (8, 2): no vocabulary-sized tensor
    assert sum(t.numel() for t in gathered if t.shape[0] == 8) < logits_elements


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)
    elif isinstance(tree, tuple):
        for v in tree:
            yield from _tensors(v)


def test_balanced_data_parallel_in_place_equals_the_module_and_its_loss():
    flow = _flow()
    module = flow.torch().train()
    x, y = _batch([1, 0, 1, 1, 0, 1])
    model = BalancedDataParallel(module, flow, device_ids=[])
    reduced = model(x, y)
    # no GPUs: the module runs in place on the whole batch, the same operations as the plain call
    torch.testing.assert_close(reduced["loss"], flow.get_loss()(module(x), y))
    assert reduced["loss"].requires_grad
    plain = model(x)  # without labels: the module's outputs, as nn.DataParallel
    assert set(plain) == {"logits", "mask"} and plain["logits"]["mlm"].shape == (6, TOKENS, VOCAB)
    assert set(model.state_dict()) == {f"module.{k}" for k in module.state_dict()}
    with pytest.raises(KeyError, match="unknown task path"):
        ReplicaReducer(flow, keep=["nope"])


def test_engine_wraps_the_model_and_needs_a_flow():
    flow = _flow()
    engine = BalancedDataParallelEngine(flow=flow)
    model = engine.prepare(flow.torch())
    assert isinstance(model, BalancedDataParallel) and model.module is flow.torch()
    assert engine.prepare(model) is model  # not wrapped twice
    with pytest.raises(ValueError, match="needs the flow"):
        BalancedDataParallelEngine().prepare(nn.Linear(2, 2))


class _TextRecorder(ILogger):
    def __init__(self):
        super().__init__(log_batch_metrics=False, log_epoch_metrics=False)
        self.texts = {}

    def log_text(self, tag, text, runner=None):
        self.texts[tag] = text


def _train(balance, tmp_path, data):
    flow, model = _security_flow_and_model()
    ds = flow.get_dataset(*data, with_index=True)
    loaders = {"train": ds.loader(batch_size=16), "valid": ds.loader(batch_size=24)}
    recorder = _TextRecorder()
    runner = FlowRunner(flow, model=model, balance_dataparallel_memory=balance)
    runner.train(loaders=loaders, num_epochs=2, logdir=str(tmp_path / ("balanced" if balance else "plain")),
                 loggers={"texts": recorder}, **({} if balance else {"engine": dl.CPUEngine()}))
    return runner, recorder


def _security_flow_and_model():
    torch.manual_seed(0)
    flow = security_tasks(features=8).get_full_flow()
    return flow, flow.torch()


@pytest.fixture
def security_features():
    n = 72
    rng = np.random.default_rng(3)
    return {"features": rng.normal(size=(n, 8)).astype(np.float32)}, security_labels(n, seed=4, missing_rate=0.1)


def test_balanced_runner_trains_and_measures_as_the_plain_one(tmp_path, security_features):
    # On a CPU-only machine the balanced model runs in place on whole batches (no replicas): the same
    # batches and the same operations as the plain run, so weights, tables and files are compared
    # exactly (default tolerances for floats); a rounding difference here would be a real change.
    plain, plain_texts = _train(False, tmp_path, security_features)
    balanced, balanced_texts = _train(True, tmp_path, security_features)
    assert isinstance(balanced.model, BalancedDataParallel) and balanced.model.reducer.explain == 3
    for epoch in (1, 2):
        for loader in ("train", "valid"):
            _assert_metrics_equal(plain.experiment_metrics[epoch][loader], balanced.experiment_metrics[epoch][loader])
    for a, b in zip(plain.model.parameters(), balanced.model.module.parameters()):
        torch.testing.assert_close(a, b)
    tables = [pd.read_csv(tmp_path / d / "interpretation_valid.csv") for d in ("plain", "balanced")]
    pd.testing.assert_frame_equal(tables[0], tables[1])
    assert [(tmp_path / d / "tuned_params.json").read_text() for d in ("plain", "balanced")].count(
        (tmp_path / "plain" / "tuned_params.json").read_text()) == 2
    explained = {k: v for k, v in plain_texts.texts.items() if k.startswith("explanations/")}
    assert explained and explained == {k: v for k, v in balanced_texts.texts.items() if k.startswith("explanations/")}
    loader = balanced.flow.get_dataset(*security_features, with_index=True).loader(batch_size=32)
    pd.testing.assert_frame_equal(balanced.evaluate(loader, save=False), plain.evaluate(loader, save=False))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("fuse", [False, True])
def test_two_gpus_reduce_to_the_whole_batch(fuse):
    flow = _flow()
    module = flow.torch(fuse=fuse).cuda().train()
    x, y = _batch([1, 0, 1, 1, 0, 1, 0, 0, 1, 1, 0, 1, 1])
    to = lambda t: {k: to(v) for k, v in t.items()} if isinstance(t, dict) else t.cuda()  # noqa: E731
    x, y = to(x), to(y)
    out, loss, metrics, per_sample = _whole_batch(flow, module, x, y)
    loss.backward()
    expected_grads = _grads(module)
    module.zero_grad()
    model = BalancedDataParallel(module, flow, device_ids=[0, 1], explain=2)
    reduced = model(x, y)
    # two GPUs against one: chunked matmuls round differently, and GPU kernels (TF32 off by default
    # for matmuls in torch >= 1.12) differ from each other by ~1e-7 relative
    torch.testing.assert_close(reduced["loss"], loss, rtol=1e-5, atol=1e-6)
    reduced["loss"].backward()
    for k, g in _grads(module).items():
        torch.testing.assert_close(g, expected_grads[k], rtol=1e-4, atol=1e-6, msg=k)
    merged = flow.get_metrics()
    merged.merge(reduced[METRIC_STATES])
    _assert_metrics_equal(metrics.compute(), merged.compute())
    for p, v in per_sample.items():
        torch.testing.assert_close(reduced[PER_SAMPLE_LOSS][p], v.detach(), equal_nan=True, rtol=1e-5, atol=1e-6)
    assert all(t.device == torch.device("cuda", 0) for t in _tensors(reduced))
    assert reduced[EXPLAIN]["index"].tolist() == [0, 1]


def _token_tagging():
    """`tests/token_tagging.py`: a token-tagging flow (per-token tasks, per-token preconditions)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "token_tagging.py"
    spec = importlib.util.spec_from_file_location("token_tagging", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("devices", [2, 3])
def test_replicas_merge_per_token_masks_and_metrics_to_the_whole_batch(devices, assert_clear_decisions):
    tt = _token_tagging()
    flow = tt.token_flow(seed=2)
    x, y, _ = tt.token_data(11, 5, seed=4)
    x["gt"] = {p: y[p] for p in ("has_entities", "is_entity")}
    module = flow.torch().train()
    with torch.no_grad():
        out, loss, metrics, per_sample = _whole_batch(flow, module, x, y)
    assert out["mask"]["entity_type"].shape == (11, 5)  # per token
    reducer = ReplicaReducer(flow, keep=["is_entity", "tags"])
    with torch.no_grad():
        merged = merge_replicas(gather_like([reducer(module, xi, yi) for xi, yi in
                                             zip(scatter_like(x, devices), scatter_like(y, devices))]))
    # chunks against the whole batch: float32 rounding only (as in test_replicas_merge_to_the_whole_batch)
    assert_clear_decisions(flow, flow.get_activation()(out["logits"]))
    merged_loss = FlowLoss.combine(merged[LOSS_TERMS], flow.get_loss().weights)
    torch.testing.assert_close(merged_loss, loss, rtol=1e-5, atol=1e-6)
    replica_metrics = flow.get_metrics()
    replica_metrics.merge(merged[METRIC_STATES])
    _assert_metrics_equal(metrics.compute(), replica_metrics.compute())
    assert replica_metrics.num_samples() == metrics.num_samples()
    assert replica_metrics.num_samples()["is_entity"] > 11  # tokens
    for p, m in out["mask"].items():
        assert torch.equal(merged[OUTPUTS]["mask"][p], m)
    for p, v in per_sample.items():
        torch.testing.assert_close(merged[PER_SAMPLE_LOSS][p], v, equal_nan=True, rtol=1e-5, atol=1e-6)
    assert merged[OUTPUTS]["activated"]["is_entity"].shape[:2] == (11, 5)
