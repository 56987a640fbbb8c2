"""Shared fixtures: small synthetic flows and data (no state shared between tests)."""
import numpy as np
import pytest
import torch
from torch import nn

import dnn_cool_catalyst as dcc

from dnn_cool_catalyst.story import security_labels, security_tasks


@pytest.fixture
def security_flow():
    torch.manual_seed(0)
    return security_tasks(features=8).get_full_flow()


@pytest.fixture
def security_data():
    n = 96
    rng = np.random.default_rng(1)
    return {"features": rng.normal(size=(n, 8)).astype(np.float32)}, security_labels(n, seed=2, missing_rate=0.1)


def decision_margin(flow, activated):
    """The smallest distance, over every task and sample, between an activated value and the point
    where its decoded value would change: `|activated - threshold|` for thresholded tasks, the gap
    between two neighbouring sorted log-probabilities for ranked ones (classes, tokens: the gap of
    their logits, which is what a rounding difference in the logits moves). Continuous decoders
    have no such point and are skipped."""
    from dnn_cool_catalyst.tasks.base import SortDecoder, ThresholdDecoder

    margins = [np.inf]
    for leaf in flow.graph.leaves:
        if leaf.path not in activated:
            continue
        value = activated[leaf.path]
        value = value.detach().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
        a = value.to(torch.float64)
        decoder = leaf.task.decoder
        if isinstance(decoder, ThresholdDecoder):
            t = torch.as_tensor(decoder.threshold, dtype=torch.float64)
            margins.append(float((a - t).abs().min()) if a.numel() else np.inf)
        elif isinstance(decoder, SortDecoder) and a.shape[-1] > 1 and a.numel():
            ranked = a.clamp_min(1e-300).log().sort(dim=-1).values
            margins.append(float((ranked[..., 1:] - ranked[..., :-1]).min()))
    return min(margins)


@pytest.fixture
def assert_clear_decisions():
    """`assert_clear_decisions(flow, activated, margin=1e-5)`: every decision is at least `margin`
    away from flipping.

    Outputs of the same sample computed in batches of other compositions (shuffled vs ordered, a
    batch split over replicas or ranks) differ by float32 rounding, ~1e-8 here: a matmul's
    summation order depends on how the batch is blocked. Tests that compare *decisions* (decoded
    values, masks, counts) exactly across such runs first assert this margin on seeded data, so the
    exact comparison cannot be broken by a rounding difference on another machine."""

    def check(flow, activated, margin=1e-5):
        got = decision_margin(flow, activated)
        assert got >= margin, (f"an activation lies {got:.3g} from a decision boundary; decisions compared across "
                               f"batch compositions could flip: change the seed of this test's data")

    return check


@pytest.fixture
def assert_clear_ranking():
    """`assert_clear_ranking(per_sample, k, rel=1e-4)`: for every task of `{path: (N,) losses}`
    (NaN outside `S_t`), the `k` highest and `k` lowest losses are separated from their neighbours
    by more than `rel` (relative), so the best/worst samples chosen from losses computed in other
    batch compositions or processes (rounding ~1e-7 relative) are the same samples."""

    def check(per_sample, k, rel=1e-4):
        for path, losses in per_sample.items():
            if path == "overall":
                continue
            value = losses.detach().cpu().double().numpy() if isinstance(losses, torch.Tensor) else np.asarray(losses, np.float64)
            value = np.sort(value[~np.isnan(value)])[::-1]
            n = value.size
            edges = [i for i in range(n - 1) if i < k or i >= n - k - 1]
            for i in edges:
                gap = value[i] - value[i + 1]
                assert gap > rel * max(abs(value[i]), 1e-3), (
                    f"task {path!r}: losses {value[i]:.9g} and {value[i + 1]:.9g} at ranks {i + 1}, {i + 2} are within "
                    f"rounding of a tie; the chosen samples could differ: change the seed of this test's data")

    return check


@pytest.fixture
def nested_kind_flow():
    """`nested_kind_flow(width, features=3)`: a flow `outer` with a binary `gate` and, under it, a
    sub-flow `inner` holding a classification task `kind` whose head has `width` outputs."""

    def make(width, features=3):
        tasks = dcc.Tasks([dcc.BinaryClassificationTask("gate", nn.Linear(features, 1)),
                           dcc.ClassificationTask("kind", nn.Linear(features, width))])

        @tasks.add_flow
        def inner(flow, x, out):
            out += flow.kind(x.f)
            return out

        @tasks.add_flow
        def outer(flow, x, out):
            out += flow.gate(x.f)
            out += flow.inner(x) | out.gate
            return out

        return outer

    return make


def make_two_security_sources(flow, n_a=70, n_b=50, seed=5):
    """A proportional `MixedDataset` of the story's flow (8 features) over two sources: "door_cam"
    labels the door tasks only, "people" the person tasks only (`partial=True`); samples named
    `row = "<source>-<index>"`. Its loader gives every sample once per epoch, sources interleaved."""
    rng = np.random.default_rng(seed)
    door = {"camera_blocked", "door_open", "door_locked"}
    datasets = {}
    for name, n, keep in (("door_cam", n_a, door), ("people", n_b, set(flow.graph.paths) - door)):
        labels = security_labels(n, seed=seed + n, missing_rate=0.1)
        if name == "people":  # its door labels are missing (unknown preconditions): every sample counts
            labels["person_present"] = (rng.random(n) < 0.7).astype(np.float32)
        x = {"features": rng.normal(size=(n, 8)).astype(np.float32)}
        ds = flow.get_dataset(x, {p: v for p, v in labels.items() if p in keep}, partial=True)
        datasets[name] = ds.name_samples(row=[f"{name}-{i}" for i in range(n)])
    return dcc.MixedDataset(datasets, seed=seed)


@pytest.fixture
def two_security_sources():
    """`make_two_security_sources`, as a fixture."""
    return make_two_security_sources


def _gated_flow(value_weight=1.0):
    """A small gated flow: `value` and `tags` apply where the binary `gate` is 1, `kind` where it is 0
    (all read `x.f` of width 3)."""
    torch.manual_seed(0)
    tasks = dcc.Tasks([
        dcc.BinaryClassificationTask("gate", nn.Linear(3, 1)),
        dcc.BoundedRegressionTask("value", nn.Linear(3, 1), weight=value_weight),
        dcc.MultilabelClassificationTask("tags", nn.Linear(3, 2)),
        dcc.ClassificationTask("kind", nn.Linear(3, 4)),
    ])

    @tasks.add_flow
    def full(flow, x, out):
        out += flow.gate(x.f)
        out += flow.value(x.f) | out.gate
        out += flow.tags(x.f) | out.gate
        out += flow.kind(x.f) | ~out.gate
        return out

    return full


@pytest.fixture
def gated_flow():
    """`gated_flow(value_weight=1.0)` -> a fresh gated flow (`_gated_flow`), seeded."""
    return _gated_flow
