"""Precondition masks (API.md section 4), from ground truth or from decoded predictions."""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

from ..errors import InputError
from ..graph import Compound, FlowGraph, Literal


def compute_masks(graph: FlowGraph, batch_size: int, device: torch.device,
                  gt: Optional[Mapping[str, Tensor]] = None,
                  decoded: Optional[Mapping[str, Tensor]] = None) -> Dict[str, Tensor]:
    """`{path: bool (N,)}`: where each leaf's precondition is not FALSE.

    With `gt` (training, ground-truth evaluation) conditions are three-valued: `out.b` is FALSE
    where b's own precondition is FALSE, UNKNOWN where b's label is missing, else the label; `~`
    flips only known labels; `&` is Kleene's. Only "not FALSE" matters for masks, so a literal is
    `mask_b & (missing_b | label_b != negated)`. Without `gt`, `decoded` predictions are used and
    never unknown: `mask_b & (decoded_b != negated)`.

    Compounds (`a.or_else(b)`, `a ^ b`, and conjunctions inside them) are evaluated three-valued
    (`three_valued`): their mask is where they are not FALSE.
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
                if isinstance(lit, Compound):
                    _, false = three_valued(graph, lit, masks, gt, decoded)
                    v = ~false
                else:
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


def three_valued(graph: FlowGraph, cond, masks: Mapping[str, Tensor], gt, decoded) -> Tuple[Tensor, Tensor]:
    """`(true, false)` boolean `(N,)` of a condition (UNKNOWN where neither): a literal `out.b` is
    FALSE where b's precondition is FALSE (`masks[b]` false) or its label / decoded value says no
    (yes for `~out.b`), TRUE where b applies and says yes (no), UNKNOWN where b applies and its label
    is missing; `and` / `or` / `xor` are Kleene's (API.md section 4, extended in the README)."""
    if isinstance(cond, Literal):
        task = graph.leaf(cond.path).task
        if gt is not None:
            if cond.path not in gt:
                raise InputError(f"x['gt'] has no labels for precondition task {cond.path!r} of flow {graph.name!r}; "
                                 f"gt has {sorted(gt)}")
            known, value = task.condition(gt[cond.path], from_labels=True)
        else:
            known, value = task.condition(decoded[cond.path], from_labels=False)
        says = value != cond.negated
        applies = masks[cond.path]
        return applies & known & says, ~applies | (known & ~says)
    parts = [three_valued(graph, c, masks, gt, decoded) for c in cond.operands]
    trues = torch.stack([t for t, _ in parts])
    falses = torch.stack([f for _, f in parts])
    if cond.op == "and":
        return trues.all(0), falses.any(0)
    if cond.op == "or":
        return trues.any(0), falses.all(0)
    known = (trues | falses).all(0)
    odd = (trues.sum(0) % 2) == 1
    return known & odd, known & ~odd
