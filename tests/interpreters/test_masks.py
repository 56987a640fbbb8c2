"""compute_masks in one pass (issue 15): the same booleans as the per-task loop it replaced, on
random flows (literals, negations, nested flows, `or_else` / `^` compounds, a condition task with
its own `condition`), from ground truth and from decoded predictions, and at 256 tasks."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import dnn_cool_catalyst as dcc
from dnn_cool_catalyst.errors import InputError
from dnn_cool_catalyst.graph import Compound
from dnn_cool_catalyst.interpreters.masks import _literal, compute_masks, mask_plan, three_valued
from dnn_cool_catalyst.synthetic import generated_labels, generated_tasks
from dnn_cool_catalyst.tasks.binary import first_column

F_DIM = 3


def per_task_masks(graph, batch_size, device, gt=None, decoded=None):
    """The loop compute_masks ran before issue 15, kept as the reference: one task at a time."""
    masks, unconditioned, literal_values, ones = {}, set(), {}, None
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


class ThresholdCondition(dcc.BinaryClassificationTask):
    """A condition task with its own rule (yes above 0.8): evaluated per literal, not stacked."""

    def condition(self, values, from_labels):
        v = first_column(values)
        if from_labels:
            return ~torch.isnan(v), v > 0.8
        return torch.ones_like(v, dtype=torch.bool), v.bool()

    def condition_not_false(self, labels, negated):
        known, value = self.condition(labels, True)
        return ~known | (value != negated)


def random_flow(rng, n_entries, compounds):
    """A flow of binary / regression tasks and one nested flow, with random literal, negated and
    (when `compounds`) `or_else` / `^` preconditions; some binary tasks are `ThresholdCondition`s."""
    spec, counter = [], iter(range(10_000))
    tasks = []

    def entries(k, prefix):
        out, binaries = [], []
        for _ in range(k):
            name = f"{prefix}{next(counter)}"
            kind = "binary" if not binaries or rng.random() < 0.6 else "regression"
            if kind == "binary":
                cls = ThresholdCondition if rng.random() < 0.25 else dcc.BinaryClassificationTask
                tasks.append(cls(name, nn.Linear(F_DIM, 1)))
            else:
                tasks.append(dcc.BoundedRegressionTask(name, nn.Linear(F_DIM, 1)))
            conds = []
            if binaries and rng.random() < 0.8:
                for _ in range(int(rng.integers(1, 3))):
                    a, b = (str(rng.choice(binaries)) for _ in range(2))
                    form = int(rng.integers(0, 4 if compounds and a != b else 2))
                    conds.append((form, a, b))
            out.append((name, conds))
            if kind == "binary":
                binaries.append(name)
        return out

    inner = entries(int(rng.integers(1, 4)), "i")
    outer = entries(n_entries, "t")
    inner_cond = (0, outer[0][0], outer[0][0]) if tasks[len(inner)].can_condition else None
    t = dcc.Tasks(tasks)

    def condition(out, form, a, b):
        ca, cb = getattr(out, a), getattr(out, b)
        return (ca, ~ca, ca.or_else(~cb), ca ^ cb)[form]

    def make(spec):
        def func(flow, x, out):
            for name, conds in spec:
                entry = getattr(flow, name)(x.features)
                for c in conds:
                    entry = entry | condition(out, *c)
                out += entry
            return out
        return func

    t.add_flow(make(inner), flow_name="inner")

    def root(flow, x, out):
        make(outer)(flow, x, out)
        entry = flow.inner(x)
        if inner_cond is not None:
            entry = entry | condition(out, *inner_cond)
        out += entry
        return out

    return t.add_flow(root, flow_name="root")


def random_gt(rng, flow, n, missing):
    gt = {}
    for path in flow.graph.condition_paths:
        y = rng.random(n).round().astype(np.float32)
        y[rng.random(n) < missing] = np.nan
        gt[path] = torch.from_numpy(y)
    return gt


def assert_same(got, expected):
    assert list(got) == list(expected)  # flow order
    for path, m in expected.items():
        assert got[path].dtype == torch.bool and torch.equal(got[path], m), path


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_entries=st.integers(1, 9), compounds=st.booleans(),
       missing=st.sampled_from([0.0, 0.3, 1.0]), n=st.integers(0, 9))
def test_one_pass_masks_equal_the_per_task_loop(seed, n_entries, compounds, missing, n):
    rng = np.random.default_rng(seed)
    flow = random_flow(rng, n_entries, compounds)
    gt = random_gt(rng, flow, n, missing)
    cpu = torch.device("cpu")
    assert_same(compute_masks(flow.graph, n, cpu, gt=gt), per_task_masks(flow.graph, n, cpu, gt=gt))
    # labels of shape (N, 1), as a DataLoader may collate them, in float64
    gt2 = {p: y.double().unsqueeze(1) for p, y in gt.items()}
    assert_same(compute_masks(flow.graph, n, cpu, gt=gt2), per_task_masks(flow.graph, n, cpu, gt=gt))
    # mixed shapes and dtypes (a user's collate): stacked with promotion, or one by one
    gt3 = {p: (y.half().unsqueeze(1) if i % 2 else y) for i, (p, y) in enumerate(gt.items())}
    assert_same(compute_masks(flow.graph, n, cpu, gt=gt3), per_task_masks(flow.graph, n, cpu, gt=gt3))
    decoded = {p: torch.from_numpy(rng.random((n, 1)) < 0.5) for p in flow.graph.paths}
    assert_same(compute_masks(flow.graph, n, cpu, decoded=decoded), per_task_masks(flow.graph, n, cpu, decoded=decoded))
    decoded = {p: (d.squeeze(1) if i % 3 else d.float() * 0.7) for i, (p, d) in enumerate(decoded.items())}
    assert_same(compute_masks(flow.graph, n, cpu, decoded=decoded), per_task_masks(flow.graph, n, cpu, decoded=decoded))


def test_generated_256_tasks_from_labels_and_from_decoded():
    flow = generated_tasks(256, features=4, seed=1).get_full_flow()
    labels = generated_labels(flow, 300, seed=2)
    gt = {p: labels[p] for p in flow.graph.condition_paths}
    cpu = torch.device("cpu")
    expected = per_task_masks(flow.graph, 300, cpu, gt=gt)
    assert_same(compute_masks(flow.graph, 300, cpu, gt=gt), expected)
    assert not all(bool(m.all()) for m in expected.values())  # the masks are not trivially true
    decoded = {p: torch.rand(300, 1) < 0.5 for p in flow.graph.paths}
    assert_same(compute_masks(flow.graph, 300, cpu, decoded=decoded), per_task_masks(flow.graph, 300, cpu, decoded=decoded))
    # the plan holds no Python loop per task at call time: one literal row per binary condition
    # task and polarity, every literal-only leaf gathered at once
    plan = mask_plan(flow.graph)
    assert plan.pure_paths == flow.graph.paths and not plan.other_leaves and not plan.other_literals


def test_plan_is_derived_once_and_graph_equality_unchanged():
    flow = generated_tasks(6, features=4, seed=0).get_full_flow()
    assert mask_plan(flow.graph) is mask_plan(flow.graph)
    assert "_mask_plan" not in repr(flow.graph)


def test_missing_gt_still_names_the_task():
    flow = generated_tasks(12, features=4, seed=0).get_full_flow()
    with pytest.raises(InputError, match="no labels for precondition"):
        compute_masks(flow.graph, 2, torch.device("cpu"), gt={})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_masks_on_cuda_equal_cpu():
    flow = generated_tasks(64, features=4, seed=3).get_full_flow()
    labels = generated_labels(flow, 50, seed=1)
    gt = {p: labels[p] for p in flow.graph.condition_paths}
    cpu = compute_masks(flow.graph, 50, torch.device("cpu"), gt=gt)
    cuda = compute_masks(flow.graph, 50, torch.device("cuda"), gt={p: y.cuda() for p, y in gt.items()})
    for p in cpu:
        assert cuda[p].is_cuda and torch.equal(cuda[p].cpu(), cpu[p])
