"""What a loader yields for a flow, checked and moved: `(X, y)` pairs (or `X` alone at inference).

Core (imports torch only, never Catalyst): `FlowRunner` and the plain inference functions
(`dnn_cool_catalyst.inference`) read their batches through here, so that a malformed batch fails
with the same message, naming the loader and the task or key, in a training run and outside one.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from .errors import InputError, LabelError
from .keys import GT


def split_batch(batch: Any, loader_key: Optional[str], allow_inputs_only: bool = False) -> Tuple[Mapping, Optional[Mapping]]:
    """`(X, y)` from a batch (`(X, None)` for a mapping `X` when `allow_inputs_only`); a
    `TypeError` naming the loader and what it yielded otherwise."""
    if isinstance(batch, Mapping) and allow_inputs_only:
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], Mapping) and isinstance(batch[1], Mapping):
        return batch[0], batch[1]
    if isinstance(batch, (tuple, list)):
        got = f"a {type(batch).__name__} of {len(batch)} item(s): ({', '.join(type(b).__name__ for b in batch[:4])})"
    else:
        got = f"a {type(batch).__name__}"
    raise TypeError(f"loader {loader_key!r} yielded {got}; FlowRunner needs (X, y) pairs: X a mapping of input "
                    f"features (with X['gt'] for the precondition tasks), y a mapping task path -> labels, "
                    f"as flow.get_dataset(inputs, labels) produces")


def check_first_batch(flow: Any, x: Mapping, y: Optional[Mapping], loader_key: Optional[str],
                      reads_inputs: bool) -> None:
    """Errors naming the task or key when a batch cannot feed the flow: labels missing for a task,
    no ground truth for a precondition task in a labelled batch, or (when the model is the flow
    module itself, `reads_inputs`) a feature the flow reads missing from X."""
    from .interpreters.module import read_input

    graph = flow.graph
    where = f"loader {loader_key!r}: the first batch"
    if y is not None:
        missing = [p for p in graph.paths if p not in y]
        if missing:
            raise LabelError(f"{where} has no labels (y) for task(s) {missing} of flow {graph.name!r}; y has {sorted(y)}")
    conditions = graph.condition_paths
    if conditions and y is not None:  # without labels (inference) masks come from the predictions
        gt = x.get(GT)
        if not isinstance(gt, Mapping):
            raise InputError(f"{where} has no X['gt'] (the labels of the precondition tasks {list(conditions)}); "
                             f"X has {sorted(x)}. Build it with flow.get_dataset(inputs, labels)")
        missing = [p for p in conditions if p not in gt]
        if missing:
            raise InputError(f"{where}: X['gt'] has no labels for precondition task(s) {missing}; it has {sorted(gt)}")
    if reads_inputs:
        problems = []
        for leaf in graph.leaves:
            try:
                read_input(x, leaf.input_key, leaf.path)
            except InputError as e:
                problems.append(str(e))
        if problems:
            raise InputError(f"{where} lacks inputs the flow reads: " + "; ".join(dict.fromkeys(problems)))


def inputs_batch_size(x: Mapping[str, Any]) -> int:
    """The number of samples in `X`: the first dimension of its first tensor (searched depth first)."""
    for value in x.values():
        if isinstance(value, Tensor):
            return int(value.shape[0])
        if isinstance(value, Mapping):
            return inputs_batch_size(value)
    raise ValueError("cannot tell the batch size of an X without tensors")


def to_device(tree: Any, device: torch.device) -> Any:
    """Nested mappings/sequences with every tensor moved to `device`."""
    if isinstance(tree, Tensor):
        return tree.to(device, non_blocking=True)
    if isinstance(tree, Mapping):
        return {k: to_device(v, device) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_device(v, device) for v in tree)
    return tree


def take_rows(tree: Any, n: int, batch: int) -> Any:
    """The first `n` samples of a batch of `batch` samples: tensors (and lists) of length `batch`
    are cut along the first dimension, mappings recursively, anything else kept."""
    if isinstance(tree, Tensor):
        return tree[:n] if tree.dim() > 0 and tree.shape[0] == batch else tree
    if isinstance(tree, Mapping):
        return {k: take_rows(v, n, batch) for k, v in tree.items()}
    if isinstance(tree, list) and len(tree) == batch:
        return tree[:n]
    return tree


def concat_rows(chunks: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
    """`{key: tensor}` batches joined along the first dimension (keys of the first chunk); `{}` for none."""
    return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]} if chunks else {}
