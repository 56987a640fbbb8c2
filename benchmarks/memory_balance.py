"""What DataParallel memory balancing saves on the main device, for a flow with a large output.

The workload: a text flow whose `mlm` task (`MaskedLanguageModelingTask`) predicts a `--vocab`
token vocabulary (default 30,000) at every position of `--batch` sequences of `--tokens` tokens,
gated by a binary task `is_text`, beside a classification `topic` (also gated). The model embeds
the token ids (`nn.Embedding(vocab, hidden)`) and calls the flow module. One step = forward, flow
loss, metric update, per-sample losses (what `FlowRunner` and its callbacks need), backward.

Two ways, in the same run, on the same batch:

- `plain` (hand-written baseline): `nn.DataParallel(model)` gathers the outputs of every replica
  to the main device, which then computes the flow loss, `FlowMetrics.update` and the per-sample
  losses on the whole batch's logits;
- `balanced`: `BalancedDataParallel(model, flow)`: each replica reduces its loss terms, metric
  states and per-sample losses; only those reach the main device.

On a machine with two or more GPUs (`--device cuda`, the default when there are): the peak memory
allocated on `cuda:0` during a step, both ways (median time per step too), and a check that both
give the same loss. Elsewhere (CPU, or a single GPU, where DataParallel gathers nothing): the bytes
that would be gathered to the main device per step both ways, for `--replicas` replicas, with the
batch split as `scatter` splits it and the replicas run one after the other here; and a check that
the merged loss and metrics equal the whole batch's.

    python benchmarks/memory_balance.py                       # CPU: gathered bytes per step
    python benchmarks/memory_balance.py --device cuda --batch 64 --tokens 128
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any, Dict, List

import torch
from torch import nn

import dnn_cool_catalyst as dcc
from dnn_cool_catalyst.interpreters.loss import FlowLoss
from dnn_cool_catalyst.runners import BalancedDataParallel, ReplicaReducer, merge_replicas
from dnn_cool_catalyst.runners.balance import LOSS_TERMS, METRIC_STATES


def text_flow(vocab: int, hidden: int):
    tasks = dcc.Tasks([
        dcc.BinaryClassificationTask("is_text", nn.Linear(hidden, 1)),
        dcc.MaskedLanguageModelingTask("mlm", nn.Linear(hidden, vocab)),
        dcc.ClassificationTask("topic", nn.Linear(hidden, 8)),
    ])

    @tasks.add_flow
    def text(flow, x, out):
        out += flow.is_text(x.pooled)
        out += flow.mlm(x.tokens) | out.is_text
        out += flow.topic(x.pooled) | out.is_text
        return out

    return text


class TextModel(nn.Module):
    """Token ids -> embeddings -> the flow module (`tokens` per position, `pooled` per sequence)."""

    def __init__(self, flow_module: nn.Module, vocab: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.flow = flow_module

    def forward(self, x):
        h = self.embed(x["ids"])
        return self.flow({"tokens": h, "pooled": h.mean(1), "gt": x.get("gt")})


def make_batch(n: int, tokens: int, vocab: int, device: Any, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    is_text = (torch.rand(n, generator=g) > 0.2).float()
    is_text[:: 7] = float("nan")  # some sequences without the label
    mlm = torch.randint(0, vocab, (n, tokens), generator=g)
    mlm[torch.rand(n, tokens, generator=g) > 0.15] = -100  # 15% of the positions are masked tokens
    x = {"ids": torch.randint(0, vocab, (n, tokens), generator=g), "gt": {"is_text": is_text}}
    y = {"is_text": is_text, "mlm": mlm, "topic": torch.randint(0, 8, (n,), generator=g)}
    to = lambda t: {k: to(v) for k, v in t.items()} if isinstance(t, dict) else t.to(device)  # noqa: E731
    return to(x), to(y)


def nbytes(tree: Any) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(nbytes(v) for v in tree.values())
    if isinstance(tree, (tuple, list)):
        return sum(nbytes(v) for v in tree)
    return 0


def chunks_like_scatter(tree: Any, n: int) -> List[Any]:
    """`tree` split as `torch.nn.parallel.scatter` splits it (`Tensor.chunk` along dim 0)."""
    if isinstance(tree, torch.Tensor):
        return list(tree.chunk(n))
    parts = {k: chunks_like_scatter(v, n) for k, v in tree.items()}
    count = min(len(v) for v in parts.values())
    return [{k: v[i] for k, v in parts.items()} for i in range(count)]


def fmt(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:,.1f} {unit}"
        b /= 1024
    return str(b)


# CPU: gathered bytes ---------------------------------------------------------------------------


def gathered_bytes(args) -> None:
    torch.manual_seed(0)
    flow = text_flow(args.vocab, args.hidden)
    model = TextModel(flow.torch(), args.vocab, args.hidden).train()
    x, y = make_batch(args.batch, args.tokens, args.vocab, "cpu")
    chunks = list(zip(chunks_like_scatter(x, args.replicas), chunks_like_scatter(y, args.replicas)))

    # plain DataParallel gathers every replica's outputs (training mode: logits and masks)
    plain_out = [model(xi) for xi, _ in chunks]
    plain = sum(nbytes(o) for o in plain_out)
    whole = model(x)
    loss = flow.get_loss()(whole, y)
    metrics = flow.get_metrics()
    metrics.update(whole, y)
    del plain_out

    reducer = ReplicaReducer(flow)
    reduced = [reducer(model, xi, yi) for xi, yi in chunks]
    balanced = sum(nbytes(r) for r in reduced)
    merged = merge_replicas({k: _cat([r[k] for r in reduced]) for k in reduced[0]})
    merged_loss = FlowLoss.combine(merged[LOSS_TERMS], flow.get_loss().weights)
    assert torch.allclose(merged_loss, loss, rtol=1e-5), (float(merged_loss), float(loss))
    check = flow.get_metrics()
    check.merge(merged[METRIC_STATES])
    for k, v in metrics.compute().items():
        w = check.compute()[k]
        assert (math.isnan(v) and math.isnan(w)) or abs(v - w) <= 1e-6 * max(1.0, abs(v)), (k, v, w)

    print(f"batch {args.batch} x {args.tokens} tokens, vocabulary {args.vocab:,}, {len(chunks)} replicas "
          f"(CPU: replicas run one after the other; loss and metrics checked equal to the whole batch's)")
    print(f"{'':>10} {'gathered per step':>18}")
    print(f"{'plain':>10} {fmt(plain):>18}")
    print(f"{'balanced':>10} {fmt(balanced):>18}")
    print(f"ratio plain / balanced: {plain / balanced:,.0f}x")


def _cat(parts: List[Any]) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, dict):
        return {k: _cat([p[k] for p in parts]) for k in first}
    if isinstance(first, tuple):
        return tuple(_cat(list(z)) for z in zip(*parts))
    return first


# CUDA: peak memory on the main device ----------------------------------------------------------


def peak_memory(args) -> None:
    devices = list(range(torch.cuda.device_count()))
    torch.manual_seed(0)
    flow = text_flow(args.vocab, args.hidden)
    model = TextModel(flow.torch(), args.vocab, args.hidden).cuda().train()
    x, y = make_batch(args.batch, args.tokens, args.vocab, "cuda:0")
    plain = nn.DataParallel(model, device_ids=devices)
    balanced = BalancedDataParallel(model, flow, device_ids=devices)
    loss_fn, per_sample = flow.get_loss(), flow.get_per_sample_loss()
    metrics = flow.get_metrics()

    def plain_step():
        out = plain(x)
        loss = loss_fn(out, y)
        metrics.update(out, y)
        per_sample(out, y)
        loss.backward()
        return float(loss)

    def balanced_step():
        reduced = balanced(x, y)
        reduced["loss"].backward()
        metrics.merge(reduced[METRIC_STATES])
        return float(reduced["loss"])

    results: Dict[str, Dict[str, Any]] = {}
    steps = {"plain": plain_step, "balanced": balanced_step}
    for name in ("plain", "balanced", "plain", "balanced"):  # twice each: the first run warms up
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(0)
        before = torch.cuda.memory_allocated(0)
        times, losses = [], []
        for _ in range(args.steps):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            losses.append(steps[name]())
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        results[name] = {"peak": torch.cuda.max_memory_allocated(0) - before, "ms": 1e3 * statistics.median(times),
                         "loss": losses[0]}
    assert math.isclose(results["plain"]["loss"], results["balanced"]["loss"], rel_tol=1e-4), results
    print(f"batch {args.batch} x {args.tokens} tokens, vocabulary {args.vocab:,}, {len(devices)} GPUs "
          f"({torch.cuda.get_device_name(0)}); same loss both ways")
    print(f"{'':>10} {'peak on cuda:0':>16} {'ms/step':>9}")
    for name, r in results.items():
        print(f"{name:>10} {fmt(r['peak']):>16} {r['ms']:9.1f}")
    print(f"peak ratio plain / balanced: {results['plain']['peak'] / results['balanced']['peak']:.2f}x, "
          f"time ratio balanced / plain: {results['balanced']['ms'] / results['plain']['ms']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--vocab", type=int, default=30_000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--replicas", type=int, default=4, help="replicas simulated on the CPU")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per way (CUDA)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    several_gpus = torch.cuda.is_available() and torch.cuda.device_count() >= 2
    if args.device == "cuda" and not several_gpus:
        print(f"--device cuda needs two or more GPUs (found {torch.cuda.device_count()}); "
              f"printing the gathered bytes instead")
    if args.device != "cpu" and several_gpus:
        peak_memory(args)
    else:
        gathered_bytes(args)


if __name__ == "__main__":
    main()
