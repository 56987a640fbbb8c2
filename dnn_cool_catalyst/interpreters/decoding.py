"""`flow.get_activation()` and `flow.get_decoder()`: per-task functions applied by path."""
from __future__ import annotations

from typing import Any, Dict, Mapping

from torch import Tensor

from ..graph import FlowGraph


class FlowActivation:
    """`{path: logits} -> {path: activated}` (paths absent from the input are skipped)."""

    def __init__(self, graph: FlowGraph):
        self.graph = graph

    def __call__(self, logits: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        return {leaf.path: leaf.task.activate(logits[leaf.path]) for leaf in self.graph.leaves if leaf.path in logits}


class FlowDecoder:
    """`{path: activated} -> {path: decoded}` with the tasks' current (tuned) parameters.

    The decoders belong to the tasks, so parameters loaded here are also what `flow.torch()` uses
    to decode and to evaluate preconditions at inference.
    """

    def __init__(self, graph: FlowGraph):
        self.graph = graph

    def __call__(self, activated: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        return {leaf.path: leaf.task.decode(activated[leaf.path]) for leaf in self.graph.leaves if leaf.path in activated}

    def params(self) -> Dict[str, Dict[str, Any]]:
        """Current parameters of every task decoder that has some, `{path: params}` (JSON values)."""
        return {leaf.path: leaf.task.decoder.params() for leaf in self.graph.leaves if leaf.task.decoder.params()}

    def load_tuned(self, params: Mapping[str, Mapping[str, Any]]) -> None:
        """Apply `{path: params}`; unknown paths are an error naming them."""
        unknown = sorted(set(params) - set(self.graph.paths))
        if unknown:
            raise KeyError(f"tuned parameters for unknown task path(s) {unknown}; flow {self.graph.name!r} has {list(self.graph.paths)}")
        for leaf in self.graph.leaves:
            if leaf.path in params:
                leaf.task.decoder.load_tuned(dict(params[leaf.path]))
