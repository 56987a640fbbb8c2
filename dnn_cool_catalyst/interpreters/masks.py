"""Precondition masks (API.md section 4), from ground truth or from decoded predictions."""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
from torch import Tensor

from ..errors import InputError
from ..graph import FlowGraph, Literal


def compute_masks(graph: FlowGraph, batch_size: int, device: torch.device,
                  gt: Optional[Mapping[str, Tensor]] = None,
                  decoded: Optional[Mapping[str, Tensor]] = None) -> Dict[str, Tensor]:
    """`{path: bool (N,)}`: where each leaf's precondition is not FALSE.

    With `gt` (training, ground-truth evaluation) conditions are three-valued: `out.b` is FALSE
    where b's own precondition is FALSE, UNKNOWN where b's label is missing, else the label; `~`
    flips only known labels; `&` is Kleene's. Only "not FALSE" matters for masks, so a literal is
    `mask_b & (missing_b | label_b != negated)`. Without `gt`, `decoded` predictions are used and
    never unknown: `mask_b & (decoded_b != negated)`.
    """
    if gt is None and decoded is None:
        raise ValueError("compute_masks needs ground truth (gt) or decoded predictions")
    masks: Dict[str, Tensor] = {}
    unconditioned = set()  # paths whose mask is all true: a literal on them needs no `&`
    literal_values: Dict[Literal, Tensor] = {}
    ones = None
    for leaf in graph.leaves:
        m = None
        for lit in leaf.precondition:
            v = literal_values.get(lit)
            if v is None:
                v = _literal(graph, lit, gt, decoded)
                if lit.path not in unconditioned:
                    v = masks[lit.path] & v
                literal_values[lit] = v
            m = v if m is None else m & v
        if m is None:
            if ones is None:
                ones = torch.ones(batch_size, dtype=torch.bool, device=device)
            m = ones
            unconditioned.add(leaf.path)
        masks[leaf.path] = m
    return masks


def _literal(graph: FlowGraph, lit: Literal, gt, decoded) -> Tensor:
    """Where the literal is not FALSE, before `&` with the condition task's own mask."""
    task = graph.leaf(lit.path).task
    if gt is not None:
        if lit.path not in gt:
            raise InputError(f"x['gt'] has no labels for precondition task {lit.path!r} of flow {graph.name!r}; "
                             f"gt has {sorted(gt)}")
        return task.condition_not_false(gt[lit.path], lit.negated)
    _, value = task.condition(decoded[lit.path], from_labels=False)
    return ~value if lit.negated else value
