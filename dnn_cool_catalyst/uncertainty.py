"""MC-dropout uncertainty per task (Gal and Ghahramani, 2016), respecting preconditions.

Core (torch only; never Catalyst). The model runs `n` times on the same inputs with its dropout
layers active and every other module in eval mode (BatchNorm uses, and keeps, its running
statistics); each task gets the statistics of its activated outputs over the passes:

    u = dcc.uncertainty.mc_dropout(model, x, n=30, seed=0)
    u["door_locked"]["entropy"]              # (N,) predictive entropy, nats
    u["door_locked"]["mutual_information"]   # (N,) BALD: the part of the entropy due to the weights
    u["door_locked"]["applied"]              # (N,) fraction of passes in which the task applied

`FlowRunner.predict(loader, mc_samples=n)` / `inference.predict(..., mc_samples=n)` give the same
per sample of a loader, and `runner.evaluate(loader, mc_samples=n)` adds the mean `entropy` /
`variance` per task to the evaluation table.

Which statistics a task gets depends on its decoder, as for `ITask.describe_sample`: tasks that
decide by threshold (binary, multilabel: `decides_by_threshold`) are Bernoulli distributions, one
per value of the last dimension (a binary task is a 2-class distribution); tasks whose decoder
ranks the last dimension (`SortDecoder`: classification, masked language modeling) are categorical
distributions over it; any other task (bounded regression, a task of your own) gets the mean and
variance only.
"""
from __future__ import annotations

import contextlib
import operator
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from .errors import capped
from .functional import per_element_mask
from .interpreters.masks import compute_masks
from .interpreters.module import FlowModule
from .keys import ACTIVATED, ELEMENTS, GT, LOGITS, MASK
from .tasks.base import SortDecoder

#: The dropout modules that MC-dropout switches on (dropout through `F.dropout` inside a module of
#: your own, or `nn.MultiheadAttention(dropout=...)`, follows that module's `training` flag, which
#: stays False: wrap such dropout in one of these modules to sample it).
DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)

#: Keys of each task's mapping in `mc_dropout`'s result.
MEAN, VARIANCE, ENTROPY, MUTUAL_INFORMATION, APPLIED, APPLIES, DECODED_MEAN = (
    "mean", "variance", "entropy", "mutual_information", "applied", "applies", "decoded")

#: How many rows (samples times passes) one forward pass gets by default.
DEFAULT_ROWS = 1024

_CATEGORICAL, _BERNOULLI = "categorical", "bernoulli"


def predictive_kind(task: Any) -> Optional[str]:
    """`"bernoulli"` for a task whose outputs are yes/no decisions per value of the last dimension
    (`task.decides_by_threshold`: binary, multilabel), `"categorical"` for one whose decoder ranks
    the last dimension (`SortDecoder`: classification, masked language modeling), None for any other
    (regression, a task of your own): it gets no entropy."""
    if getattr(task, "decides_by_threshold", False):
        return _BERNOULLI
    if isinstance(getattr(task, "decoder", None), SortDecoder):
        return _CATEGORICAL
    return None


def entropy(p: Tensor, kind: str) -> Tensor:
    """Entropy in nats of probabilities `p`: over the last dimension for `"categorical"` (shape
    without it), of each value for `"bernoulli"` (same shape; a binary task's 2-class entropy)."""
    if kind == _CATEGORICAL:
        return -torch.special.xlogy(p, p).sum(-1)
    return -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p))


def dropout_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """`[(name, module)]` of the dropout layers (`DROPOUT_TYPES`) of `model` with `p > 0`."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, DROPOUT_TYPES) and float(m.p) > 0]


def flow_module(model: nn.Module) -> FlowModule:
    """The outermost `FlowModule` (`flow.torch()`) inside `model` (or `model` itself)."""
    for m in model.modules():  # pre-order: the outermost comes first
        if isinstance(m, FlowModule):
            return m
    raise TypeError(f"{type(model).__name__} contains no flow module (flow.torch()): MC-dropout needs the flow's "
                    "outputs per task; pass flow= (the TaskFlow) if the model computes them another way")


def check_dropout(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """`dropout_layers(model)`, or `ValueError` when there is none with `p > 0` (n passes would be one)."""
    layers = dropout_layers(model)
    if not layers:
        found = [name or type(m).__name__ for name, m in model.named_modules() if isinstance(m, DROPOUT_TYPES)]
        why = (f"its dropout layers ({capped(found)}) all have p=0" if found else
               f"it has no dropout layer ({', '.join(t.__name__ for t in DROPOUT_TYPES)})")
        raise ValueError(f"MC-dropout on {type(model).__name__}: {why}, so every pass would give the same outputs. "
                         "Train a model with dropout (e.g. nn.Dropout(0.2) after the backbone's features, or in "
                         "the heads) and sample that one")
    return layers


@contextlib.contextmanager
def dropout_mode(model: nn.Module) -> Iterator[None]:
    """Within: `model` in eval mode except its dropout layers (train mode); every module gets its
    own training flag back afterwards. Raises `ValueError` for a model without dropout (`check_dropout`)."""
    layers = check_dropout(model)
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        for _, m in layers:
            m.train()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def seeded_rng(model: nn.Module, seed: Optional[int]) -> Iterator[None]:
    """Within: torch's random streams (CPU, and the CUDA devices of `model`'s parameters) seeded
    with `seed`, forked from the global ones, which are as before afterwards; nothing when `seed`
    is None (the global streams are drawn from)."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(int(seed))
        yield


@contextlib.contextmanager
def mc_dropout_mode(model: nn.Module, seed: Optional[int] = None) -> Iterator[None]:
    """`dropout_mode(model)` within `seeded_rng(model, seed)`: what `mc_dropout` runs its passes in."""
    with seeded_rng(model, seed), dropout_mode(model):
        yield


def _repeat(x: Any, k: int) -> Any:
    """Every tensor of a (nested) input mapping repeated `k` times along the batch dimension (the
    passes stacked: rows `j*N .. (j+1)*N - 1` are pass j); other values pass through unchanged."""
    if isinstance(x, Mapping):
        return {key: _repeat(v, k) for key, v in x.items()}
    if isinstance(x, Tensor) and x.dim() > 0 and k > 1:
        return x.repeat(k, *([1] * (x.dim() - 1)))
    return x


class _Moments:
    """Running sums over passes of one task: activated outputs, their squares, per-pass entropy
    and how often the task applied. Sums in float64 (float32 where the device has no float64),
    so `E[a^2] - E[a]^2` keeps the variance of outputs close to 0 or 1."""

    def __init__(self, kind: Optional[str]):
        self.kind = kind
        self.n = 0
        self.s1 = self.s2 = self.sh = self.applied = None

    def add(self, activated: Tensor, mask: Tensor) -> None:
        """`activated` `(k, N, ...)` and `mask` `(k, N)` (`(k, N, *E)` per element) of `k` passes."""
        dtype = torch.float32 if activated.device.type == "mps" else torch.float64
        a = activated.to(dtype)
        parts = [a.sum(0), (a * a).sum(0), mask.to(dtype).sum(0)]
        if self.kind is not None:
            parts.append(entropy(a, self.kind).sum(0))
        if self.s1 is None:
            self.s1, self.s2, self.applied = parts[:3]
            self.sh = parts[3] if self.kind is not None else None
        else:
            self.s1, self.s2, self.applied = self.s1 + parts[0], self.s2 + parts[1], self.applied + parts[2]
            if self.kind is not None:
                self.sh = self.sh + parts[3]
        self.n += a.shape[0]

    def result(self) -> Dict[str, Tensor]:
        mean = self.s1 / self.n
        out = {MEAN: mean, VARIANCE: (self.s2 / self.n - mean * mean).clamp_min(0), APPLIED: self.applied / self.n}
        if self.kind is not None:
            h = entropy(mean.clamp(0, 1), self.kind)
            out[ENTROPY] = h
            out[MUTUAL_INFORMATION] = (h - self.sh / self.n).clamp_min(0)  # rounding: never below 0
        return {k: v.float().cpu() for k, v in out.items()}


def per_sample(values: Tensor) -> Tensor:
    """`(N,)`: the mean over each sample's elements of a statistic (a multilabel task's entropy per
    class, a regression's variance per output, a token sequence's entropy per token)."""
    return values.reshape(values.shape[0], -1).float().mean(1) if values.dim() > 1 else values.float()


def sample_passes(model: nn.Module, x: Mapping[str, Any], n: int, graph: Any,
                  passes_per_forward: Optional[int] = None) -> Dict[str, Dict[str, Tensor]]:
    """`mc_dropout`'s result for a model already in `mc_dropout_mode` (no mode switch, no seeding:
    for callers that sample many batches under one mode, such as `inference.predict`)."""
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"MC-dropout: n (the number of passes) must be an int, got {n!r}") from None
    if n < 2:
        raise ValueError(f"MC-dropout needs n >= 2 passes to estimate a spread, got {n}")
    if not isinstance(x, Mapping):
        raise TypeError(f"MC-dropout takes the model's input mapping X (e.g. {{'img': images}}), got {type(x).__name__}")
    x = {k: v for k, v in x.items() if k != GT}  # as at inference: preconditions from the decoded predictions
    leaves = list(graph.leaves)
    moments = {leaf.path: _Moments(predictive_kind(leaf.task)) for leaf in leaves}
    batch: Optional[int] = None
    chunk = passes_per_forward
    done = 0
    with torch.no_grad():
        while done < n:
            if chunk is None:  # the first pass tells the batch size
                k = 1
            else:
                k = max(1, min(int(chunk), n - done))
            try:
                out = model(_repeat(x, k))
            except torch.OutOfMemoryError:
                if k == 1:
                    raise
                chunk = max(1, k // 2)  # fewer passes per forward: slower, same statistics
                continue
            logits = out[LOGITS]
            rows = next(iter(logits.values())).shape[0]
            if batch is None:
                batch = rows // k
                if chunk is None:
                    chunk = max(1, DEFAULT_ROWS // max(batch, 1))
            activated = out.get(ACTIVATED)
            if activated is None:
                activated = {leaf.path: leaf.task.activate(logits[leaf.path]) for leaf in leaves}
            for leaf in leaves:
                a = activated[leaf.path]
                mask = per_element_mask(leaf.task, out[MASK][leaf.path], a)
                moments[leaf.path].add(a.reshape(k, batch, *a.shape[1:]), mask.reshape(k, batch, *mask.shape[1:]))
            done += k
    result = {p: m.result() for p, m in moments.items()}
    decoded = {leaf.path: leaf.task.decode(result[leaf.path][MEAN]) for leaf in leaves}
    elements = x.get(ELEMENTS)  # the padding marker: padding positions never apply
    applies = compute_masks(graph, batch, torch.device("cpu"), decoded=decoded,
                            elements=elements.cpu() if isinstance(elements, Tensor) else None)
    for leaf in leaves:
        result[leaf.path][DECODED_MEAN] = decoded[leaf.path]
        result[leaf.path][APPLIES] = per_element_mask(leaf.task, applies[leaf.path], result[leaf.path][MEAN])
    return result


def mc_dropout(model: nn.Module, x: Mapping[str, Any], n: int = 30, seed: Optional[int] = None, *,
               flow: Any = None, passes_per_forward: Optional[int] = None) -> Dict[str, Dict[str, Tensor]]:
    """MC-dropout over one batch of inputs `x` (the model's input mapping; `x["gt"]` is ignored).

    `model`: `flow.torch()` or a module around it (e.g. `BackboneModel`) with dropout layers
    (`DROPOUT_TYPES`); they sample, every other module runs in eval mode (BatchNorm's running
    statistics are used and left unchanged), and each module gets its own mode back afterwards.
    `n` passes, `passes_per_forward` of them stacked in one forward (default: as many as fit in
    `DEFAULT_ROWS` rows; halved on an out-of-memory error). `seed`: the passes' dropout masks come
    from a torch random stream seeded with it, forked from the global one (left as it was), so the
    same seed, inputs and `passes_per_forward` give the same result; None draws from the global stream.
    `flow`: the `TaskFlow` (default: the flow module found inside `model`).

    Returns `{task path: {...}}` of CPU tensors, batch dimension first:

    - `"mean"`: the mean activated output over the passes (probabilities for classifiers);
    - `"variance"`: its variance over the passes (divided by n), per class where there are classes;
    - `"entropy"` (classifiers only): the predictive entropy of the mean, in nats: per sample over
      the classes for a categorical task, per value for a Bernoulli one (binary: `(N,)` or `(N, 1)`
      as the task's outputs, multilabel `(N, C)`);
    - `"mutual_information"` (classifiers only): BALD, the entropy of the mean minus the mean
      entropy of the passes: the disagreement between passes (epistemic), same shape as `"entropy"`;
    - `"applied"` `(N,)`: the fraction of passes in which the task applied, its precondition
      evaluated on that pass's decoded predictions, as at inference (a gate that flips between
      passes is itself a sign of doubt);
    - `"decoded"`: the mean decoded with the task's current (tuned) decoder, and `"applies"` `(N,)`
      bool: the precondition on those decoded means (API.md section 4, inference).

    A task with element dimensions (`element_dims=1`, one output per token) gets its statistics
    per element, `(N, T, ...)` as its outputs (a binary one's entropy `(N, T, 1)` for `(N, T, 1)`
    logits, a classification's `(N, T)`), and `"applied"` / `"applies"` per element `(N, T)`, its
    precondition evaluated per token (a per-sample precondition is broadcast over the tokens);
    padding positions (`x["elements"]` False) never apply.

    Raises `ValueError` for a model without dropout (every pass would be the same).
    """
    graph = flow.graph if flow is not None else flow_module(model).graph
    with mc_dropout_mode(model, seed):
        return sample_passes(model, x, n, graph, passes_per_forward)


__all__ = ["APPLIED", "APPLIES", "DECODED_MEAN", "DEFAULT_ROWS", "DROPOUT_TYPES", "ENTROPY", "MEAN",
           "MUTUAL_INFORMATION", "VARIANCE", "check_dropout", "dropout_layers", "dropout_mode", "entropy",
           "flow_module", "mc_dropout", "mc_dropout_mode", "per_element_mask", "per_sample", "predictive_kind",
           "sample_passes", "seeded_rng"]
