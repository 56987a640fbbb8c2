"""`LoaderOutputs`: what several flow callbacks need from one loader, kept once and in one order.

Two needs are shared between `ThresholdTuningCallback`, `FlowMetricsCallback` and
`InterpretationCallback`:

- the activated outputs, labels and masks of some tasks over the whole loader (tuning fits on
  them; the metrics decode them at the loader's end and draw PR curves from them): one buffer keeps
  each batch once, whichever callback offers it first, moves it to the CPU in chunks and, under DDP,
  gathers it from every process once;
- steps that change the decoders at the loader's end (tuning with `apply=True`) must happen before
  any callback decodes there (deferred decoded metrics, interpretation captions and trees): a
  callback registers such a step with `start(..., before_decoding=step)`, and every callback calls
  `before_decoding(runner)` at its loader's end before it decodes. Each step runs once per loader,
  from whichever callback comes first, so the result does not depend on the callbacks' order.

One `LoaderOutputs` exists per runner and set of tasks (`shared_outputs`): callbacks of flows built
from the same `Tasks` share it, as they share the decoders; the callbacks never see each other.

Tasks with element dimensions (`ITask.element_dims`, labels `(N, T)`: one per token) keep their
elements: their masks are kept per element `(N, T)` (a per-sample mask broadcast over the tokens),
and batches whose number of tokens differs (a collate that pads each batch to its longest sample)
are joined padded to the longest, the added positions outside the mask (so tuning, the deferred
metrics and the PR curves, which run over the elements of `S_t`, never see them).

Life cycle per loader: every taking-part callback calls `start` in `on_loader_start` (the first
`start` after a loader that kept or finished something begins a new loader), `add` in
`on_batch_end`, `before_decoding` / `outputs` in `on_loader_end` and, last, `done`: once every
callback that started is done, the kept outputs are freed.
"""
from __future__ import annotations

import math
import weakref
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import distributed
from ..functional import element_dims, expand_mask
from ..keys import ACTIVATED, LOGITS, MASK
from .batch import ChunkBuffer, batch_parts, batch_size_of, gather_kept

Kept = Dict[str, Tuple[Tensor, Tensor, Tensor]]


class LoaderOutputs:
    """The activated outputs, labels and masks of the requested tasks over one loader, kept once
    for every callback that asks, and the loader-end steps that must run before decoding (see the
    module docstring).

    Args:
        tasks: `{path: task}` of the flow (to activate logits when a batch has no activated outputs).
    """

    def __init__(self, tasks: Dict[str, Any]):
        self.tasks = dict(tasks)
        self._buffer = ChunkBuffer()
        self._paths: List[str] = []
        self._kept: Dict[str, List[Tuple[Tensor, Tensor, Tensor]]] = defaultdict(list)
        self._offered: Dict[int, int] = {}  # per callback taking part: how many batches it offered
        self._open: set = set()  # the callbacks taking part that are not done
        self._added = 0
        self._steps: Dict[int, Callable[[Any], None]] = {}
        self._joined: Optional[Kept] = None
        self._fresh = True
        self._elements: Dict[str, int] = {p: element_dims(t) for p, t in self.tasks.items() if element_dims(t)}
        self._element_shapes: Optional[Tuple[Any, ...]] = None  # of the per-token tasks buffered

    def reset(self) -> None:
        """Forget the previous loader: kept outputs, requests, pending steps."""
        self._buffer.clear()
        self._paths = []
        self._kept = defaultdict(list)
        self._offered = {}
        self._open = set()
        self._added = 0
        self._steps = {}
        self._joined = None
        self._fresh = True
        self._element_shapes = None

    def start(self, who: Any, paths: Sequence[str] = (), buffer_elements: int = 2 ** 24,
              before_decoding: Optional[Callable[[Any], None]] = None) -> None:
        """`who` (a callback) takes part in the current loader: the outputs of `paths` are kept,
        in chunks of at most `buffer_elements` elements (the smallest any taking part asks for), and
        `before_decoding(runner)` runs once at the loader's end before anything decodes."""
        if not self._fresh:  # the first start of a new loader
            self.reset()
        if paths:
            wanted = int(buffer_elements)
            self._buffer.max_elements = min(self._buffer.max_elements, wanted) if self._paths else wanted
        self._paths += [p for p in paths if p not in self._paths]
        self._offered[id(who)] = 0
        self._open.add(id(who))
        if before_decoding is not None:
            self._steps[id(who)] = before_decoding

    def add(self, who: Any, runner: Any) -> None:
        """Offer the current batch (`runner.batch`); it is kept when `who` is the first to offer it.
        Every callback offers the batches of the loader in order, so the `k`-th offer of each is the
        `k`-th batch."""
        self._fresh = False
        offered = self._offered.get(id(who), 0) + 1
        self._offered[id(who)] = offered
        if offered <= self._added or not self._paths:
            return
        self._added += 1
        inputs, targets, outputs = batch_parts(runner, type(who).__name__)
        source = ACTIVATED if outputs.get(ACTIVATED) else LOGITS
        paths = [p for p in self._paths if p in outputs.get(source, {})]
        shapes = tuple((tuple(targets[p].shape[1:1 + self._elements[p]]), outputs[MASK][p].dim())
                       for p in paths if p in self._elements)
        if shapes != self._element_shapes:  # another number of tokens: the buffer joins equal shapes only
            self._move_to_cpu()
            self._element_shapes = shapes
        self._buffer.add(batch_size_of(targets, inputs), {source: {p: outputs[source][p] for p in paths},
                                                          "targets": {p: targets[p] for p in paths},
                                                          MASK: {p: outputs[MASK][p] for p in paths}})
        if self._buffer.full:
            self._move_to_cpu()

    @torch.no_grad()
    def _move_to_cpu(self) -> None:
        if not len(self._buffer):
            return
        chunk = self._buffer.take()
        activated, logits = chunk.get(ACTIVATED), chunk.get(LOGITS)
        for p in (activated if activated is not None else logits):
            a = activated[p] if activated is not None else self.tasks[p].activate(logits[p])
            y, m = chunk["targets"][p], chunk[MASK][p]
            k = self._elements.get(p, 0)
            if k and m.dim() < 1 + k:  # per element, so that chunks of other token counts pad alike
                m = expand_mask(m, y).expand(y.shape[: 1 + k])
            self._kept[p].append((a.cpu(), y.cpu(), m.cpu()))

    def before_decoding(self, runner: Any) -> None:
        """Run the pending loader-end steps (each once per loader, in the order they were
        registered); call it before decoding anything at a loader's end."""
        self._fresh = False
        steps, self._steps = list(self._steps.values()), {}
        for step in steps:
            step(runner)

    def outputs(self) -> Kept:
        """`{path: (activated, labels, mask)}` of the whole loader on the CPU (under DDP: of every
        process, in rank order), the same objects for every caller of the loader: read them, do not
        change them. Under DDP every process must call it (all do, as they run the same callbacks)."""
        self._fresh = False
        if self._joined is None:
            self._move_to_cpu()
            kept = self._kept
            if distributed.world_size() > 1:
                kept = gather_kept(kept)
            self._kept = defaultdict(list)
            self._joined = {p: self._join(p, chunks) for p, chunks in kept.items() if chunks}
        return self._joined

    def _join(self, path: str, chunks: List[Tuple[Tensor, Tensor, Tensor]]) -> Tuple[Tensor, Tensor, Tensor]:
        """`(activated, labels, mask)` of `path` over all chunks; chunks of a per-token task with
        other numbers of tokens padded to the most (activated 0, labels the task's missing
        marker, mask False there)."""
        k = self._elements.get(path, 0)
        sizes = {c[1].shape[1:1 + k] for c in chunks} if k else set()
        if len(sizes) <= 1:
            return tuple(torch.cat(parts) for parts in zip(*chunks))
        longest = tuple(max(s[i] for s in sizes) for i in range(k))
        missing = getattr(self.tasks[path], "missing", 0)
        padded = [(_pad_elements(a, k, longest, 0), _pad_elements(y, k, longest, missing),
                   _pad_elements(m, k, longest, False)) for a, y, m in chunks]
        return tuple(torch.cat(parts) for parts in zip(*padded))

    def done(self, who: Any) -> None:
        """`who` is finished with this loader (the end of its `on_loader_end`); when every callback
        that started is, the kept outputs are freed."""
        self._fresh = False
        self._open.discard(id(who))
        if not self._open:
            self.reset()


def _pad_elements(t: Tensor, k: int, longest: Tuple[int, ...], fill: Any) -> Tensor:
    """`t` `(N, *E, ...)` with its `k` element dimensions grown to `longest`, new positions `fill`."""
    if tuple(t.shape[1:1 + k]) == longest:
        return t
    if isinstance(fill, float) and math.isnan(fill) and not t.dtype.is_floating_point:
        fill = 0  # integer labels marked missing otherwise: outside the mask anyway
    out = torch.full((t.shape[0], *longest, *t.shape[1 + k:]), fill, dtype=t.dtype)
    out[(slice(None), *(slice(0, n) for n in t.shape[1:1 + k]))] = t
    return out


# One per runner and set of tasks; gone with the runner.
_SHARED: "weakref.WeakKeyDictionary[Any, Dict[Tuple[int, ...], LoaderOutputs]]" = weakref.WeakKeyDictionary()


def shared_outputs(runner: Any, flow: Any) -> LoaderOutputs:
    """The `LoaderOutputs` of `runner` for the tasks of `flow` (created on first use)."""
    leaves = flow.graph.leaves
    key = tuple(id(leaf.task) for leaf in leaves)  # decoders belong to tasks: same tasks, same steps
    per_runner = _SHARED.setdefault(runner, {})
    if key not in per_runner:
        per_runner[key] = LoaderOutputs({leaf.path: leaf.task for leaf in leaves})
    return per_runner[key]
