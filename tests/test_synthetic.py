"""generated_tasks / generated_labels: the mix, the depth, the determinism and labels that follow the preconditions."""
import math

import pytest
import torch
from torch import nn

from dnn_cool_catalyst.graph import Literal
from dnn_cool_catalyst.synthetic import MAX_DEPTH, generated_labels, generated_tasks


def _depth(graph, path, memo):
    if path not in memo:
        lits = graph.leaf(path).precondition
        memo[path] = 1 + max((_depth(graph, lit.path, memo) for lit in lits), default=-1)
    return memo[path]


def test_generated_flow_has_the_mix_and_nests_three_deep():
    flow = generated_tasks(64, features=16, seed=3).get_full_flow()
    graph = flow.graph
    assert len(graph.leaves) == 64
    kinds = {type(leaf.task).__name__ for leaf in graph.leaves}
    assert kinds == {"BinaryClassificationTask", "BoundedRegressionTask", "ClassificationTask",
                     "MultilabelClassificationTask"}
    for leaf in graph.leaves:
        head = leaf.task.module
        assert type(head) is nn.Linear and head.in_features == 16 and leaf.input_key == ("features",)
        assert all(isinstance(lit, Literal) and graph.leaf(lit.path).task.can_condition for lit in leaf.precondition)
    widths = {type(leaf.task).__name__: leaf.task.module.out_features for leaf in graph.leaves}
    assert widths["ClassificationTask"] == 7 and widths["MultilabelClassificationTask"] == 5
    memo = {}
    depths = [_depth(graph, p, memo) for p in graph.paths]
    assert max(depths) == MAX_DEPTH
    literals = [lit for leaf in graph.leaves for lit in leaf.precondition]
    assert any(lit.negated for lit in literals) and any(not lit.negated for lit in literals)


def test_same_seed_same_flow_and_labels_other_seed_differs():
    a = generated_tasks(24, features=8, seed=5).get_full_flow()
    b = generated_tasks(24, features=8, seed=5).get_full_flow()
    c = generated_tasks(24, features=8, seed=6).get_full_flow()
    assert a.graph.paths == b.graph.paths
    assert [leaf.precondition for leaf in a.graph.leaves] == [leaf.precondition for leaf in b.graph.leaves]
    for la, lb in zip(a.graph.leaves, b.graph.leaves):
        assert torch.equal(la.task.module.weight, lb.task.module.weight)
    assert ([leaf.precondition for leaf in a.graph.leaves] != [leaf.precondition for leaf in c.graph.leaves]
            or a.graph.paths != c.graph.paths)
    ya, yb = generated_labels(a, 50, seed=1), generated_labels(b, 50, seed=1)
    assert all(torch.equal(ya[p].nan_to_num(-9), yb[p].nan_to_num(-9)) for p in ya)


def test_global_torch_rng_untouched():
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    generated_tasks(8, features=4, seed=0)
    assert torch.equal(torch.rand(3), expected)


def _labelled(y):
    return ~torch.isnan(y) if y.is_floating_point() and y.dim() == 1 else (
        (~torch.isnan(y)).any(-1) if y.is_floating_point() else y >= 0)


def test_labels_follow_preconditions_and_some_tasks_are_rare():
    flow = generated_tasks(48, features=8, seed=2).get_full_flow()
    n = 2000
    labels = generated_labels(flow, n, seed=4, rare_fraction=0.1)
    assert set(labels) == set(flow.graph.paths)
    for leaf in flow.graph.leaves:
        y = labels[leaf.path]
        assert y.shape[0] == n and y.dtype == leaf.task.prepare_labels(y).dtype
        for lit in leaf.precondition:
            # labelled only where the condition task's label (when present) says the literal holds
            c = labels[lit.path]
            contradicts = ~torch.isnan(c) & ((c > 0.5) == lit.negated)
            assert not (_labelled(y) & contradicts).any(), (leaf.path, str(lit))
    fractions = [float(_labelled(labels[p]).float().mean()) for p in flow.graph.paths if not flow.graph.leaf(p).precondition]
    assert any(f < 0.15 for f in fractions) and any(f > 0.9 for f in fractions)


def test_generated_flow_trains_end_to_end():
    flow = generated_tasks(12, features=8, seed=0).get_full_flow()
    labels = generated_labels(flow, 32, seed=0)
    data = flow.get_dataset({"features": torch.randn(32, 8)}, labels)
    x, y = next(iter(torch.utils.data.DataLoader(data, batch_size=32)))
    model = flow.torch().train()
    loss = flow.get_loss()(model(x), y)
    assert math.isfinite(float(loss.detach()))
    loss.backward()


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="at least one task"):
        generated_tasks(0)
    with pytest.raises(ValueError, match="rare_fraction"):
        generated_labels(generated_tasks(2, features=4).get_full_flow(), 10, rare_fraction=0.0)
