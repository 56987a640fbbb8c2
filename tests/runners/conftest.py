"""Fixtures of the runner tests: a security flow behind a small backbone, data, fresh loaders
(the helpers are handed out as fixtures: tests are imported with --import-mode=importlib)."""
import numpy as np
import pytest
import torch
from torch import nn

from dnn_cool_catalyst.story import security_labels, security_tasks


class Backbone(nn.Module):
    """Computes `features` from the raw input and calls the flow module with `gt` passed through."""

    def __init__(self, flow_module, raw=6, features=8):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(raw, features), nn.Tanh())
        self.flow = flow_module

    def forward(self, x):
        return self.flow({"features": self.backbone(x["raw"]), "gt": x.get("gt")})


def make_flow_and_model(seed=0):
    torch.manual_seed(seed)
    flow = security_tasks(features=8).get_full_flow()
    return flow, Backbone(flow.torch())


def make_data(n=96, seed=7):
    rng = np.random.default_rng(seed)
    return {"raw": rng.normal(size=(n, 6)).astype(np.float32)}, security_labels(n, seed=seed + 1, missing_rate=0.1)


def make_loaders(flow, data, batch_size=16, shuffle=True):
    """Fresh loaders (Catalyst changes results when loader objects are reused across runs)."""
    ds = flow.get_dataset(*data, with_index=True, computed=["features"])
    return {"train": ds.loader(batch_size=batch_size, shuffle=shuffle), "valid": ds.loader(batch_size=32)}



@pytest.fixture
def data():
    return make_data()


@pytest.fixture
def flow_and_model():
    """`flow_and_model(seed=0)` -> a fresh (flow, Backbone model) pair."""
    return make_flow_and_model


@pytest.fixture
def loaders_for():
    """`loaders_for(flow, data, batch_size=16, shuffle=True)` -> fresh train/valid loaders."""
    return make_loaders
