"""Shared fixtures: small synthetic flows and data (no state shared between tests)."""
import numpy as np
import pytest
import torch

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
