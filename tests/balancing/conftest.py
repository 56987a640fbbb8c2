"""Fixtures of the balancing tests: batches of the gated flow (`gated_flow`, tests/conftest.py:
`value` and `tags` apply where `gate` is 1, `kind` where it is 0), a shared backbone before its
heads, and every method (handed out as fixtures: tests are imported with
--import-mode=importlib)."""
import pytest
import torch
from torch import nn

from dnn_cool_catalyst import balancing

METHODS = {
    "equal": balancing.EqualWeighting,
    "uncertainty": balancing.UncertaintyWeighting,
    "dwa": balancing.DynamicWeightAverage,
    "dwa_per_step": lambda: balancing.DynamicWeightAverage(period=1),
    "rlw": balancing.RandomLossWeighting,
    "gls": balancing.GeometricLossStrategy,
    "famo": balancing.FAMO,
    "pcgrad": balancing.PCGrad,
    "mgda": balancing.MGDA,
    "mgda_ub": lambda: balancing.MGDA(representation=True),
    "cagrad": balancing.CAGrad,
    "cagrad_rep": lambda: balancing.CAGrad(representation=True),
    "imtl": balancing.IMTL,
    "imtl_rep": lambda: balancing.IMTL(representation=True),
    "gradnorm": balancing.GradNorm,
    "gradnorm_rep": lambda: balancing.GradNorm(representation=True),
    "dbmtl": balancing.DBMTL,
}


def _batch(gate, seed=0, missing=False):
    """`gate` per sample; `missing=True`: every label missing (no task present)."""
    g = torch.Generator().manual_seed(seed)
    n = len(gate)
    gate_t = torch.tensor(gate, dtype=torch.float32)
    y = {"gate": gate_t, "value": torch.rand(n, generator=g), "tags": (torch.rand(n, 2, generator=g) > 0.5).float(),
         "kind": torch.randint(0, 4, (n,), generator=g)}
    if missing:
        y = {"gate": torch.full((n,), float("nan")), "value": torch.full((n,), float("nan")),
             "tags": torch.full((n, 2), float("nan")), "kind": torch.full((n,), -1)}
    x = {"f": torch.randn(n, 3, generator=g), "gt": {"gate": y["gate"]}}
    return x, y


class _SharedModel(nn.Module):
    """A shared layer (`backbone`) before the flow's heads: the heads read `tanh(backbone(x.f))`."""

    def __init__(self, flow):
        super().__init__()
        torch.manual_seed(1)
        self.backbone = nn.Linear(3, 3)
        self.flow = flow.torch()

    def forward(self, x):
        return self.flow({"f": torch.tanh(self.backbone(x["f"])), "gt": x["gt"]})


@pytest.fixture
def shared_model():
    """`shared_model(flow)` -> a model with a shared `backbone` before the flow's heads (what the
    gradient methods balance)."""
    return _SharedModel


@pytest.fixture(params=sorted(METHODS))
def method(request):
    return METHODS[request.param]


@pytest.fixture
def make_batch():
    return _batch
