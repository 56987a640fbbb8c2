"""MGDA: the Frank-Wolfe min-norm solver against a fine grid over the simplex, the normalisations,
and MGDA-UB (the representation variant)."""
import itertools

import pytest
import torch

from dnn_cool_catalyst import balancing
from dnn_cool_catalyst.balancing.mgda import min_norm_2, min_norm_weights


def _grid_min(gram, steps=400):
    """min of w^T gram w over a grid of the simplex (2 or 3 tasks)."""
    best = float("inf")
    p = gram.shape[0]
    for k in itertools.product(range(steps + 1), repeat=p - 1):
        if sum(k) > steps:
            continue
        w = torch.tensor([*k, steps - sum(k)], dtype=torch.float64) / steps
        best = min(best, float(w @ gram @ w))
    return best


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("p", [2, 3])
def test_min_norm_matches_a_fine_grid(p, seed):
    torch.manual_seed(seed)
    g = torch.randn(p, 4, dtype=torch.float64) * torch.tensor([[1.0], [3.0], [0.3]], dtype=torch.float64)[:p]
    gram = g @ g.T
    w = min_norm_weights(gram)
    assert w.min() >= 0 and float(w.sum()) == pytest.approx(1.0)
    found, grid = float(w @ gram @ w), _grid_min(gram, 400 if p == 2 else 120)
    # the grid's spacing bounds how far its minimum sits above the true one; FW stops within 1e-5
    assert found <= grid + 1e-6 and found == pytest.approx(grid, abs=2e-3 * float(gram.diagonal().max()))


def test_min_norm_by_hand():
    # two opposite unit vectors: the midpoint is 0
    gram = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(min_norm_weights(gram), torch.tensor([0.5, 0.5], dtype=torch.float64))
    # the shorter vector lies on the other's side of the origin's foot point: all weight on it
    assert min_norm_2(4.0, 1.0, 1.0) == (0.0, 1.0) and min_norm_2(1.0, 1.0, 4.0) == (1.0, 1.0)
    assert min_norm_weights(torch.tensor([[2.0]], dtype=torch.float64)).tolist() == [1.0]


def test_weights_are_applied_to_the_losses_and_recorded():
    b = balancing.MGDA().bind(["a", "b", "c"])
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    c, h = b.weigh(g @ g.T, torch.tensor([1.0, 1.0]), torch.tensor([0, 2]), update=True)
    # min ||w1 (1,0) + w2 (0,2)||: w = (0.8, 0.2)
    torch.testing.assert_close(c, torch.tensor([0.8, 0.2]))
    assert torch.equal(c, h)
    assert b.effective_weights() == {"a": pytest.approx(0.8), "b": 0.0, "c": pytest.approx(0.2)}


@pytest.mark.parametrize("normalization, scale", [("l2", [1.0, 2.0]), ("loss", [4.0, 0.5]),
                                                  ("loss+", [4.0, 1.0]), ("none", [1.0, 1.0])])
def test_normalizations_as_sener_and_koltun(normalization, scale):
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    losses = torch.tensor([4.0, 0.5], dtype=torch.float64)
    b = balancing.MGDA(normalization=normalization).bind(["a", "b"])
    assert b.normalizers(g @ g.T, losses).tolist() == pytest.approx(scale)
    c, _ = b.weigh(g @ g.T, losses, torch.arange(2), update=True)
    n = torch.tensor(scale, dtype=torch.float64)
    gn = g / n[:, None]
    torch.testing.assert_close(c, min_norm_weights(gn @ gn.T))
    with pytest.raises(ValueError, match="normalization='L2' is not one of"):
        balancing.MGDA(normalization="L2")


def test_a_zero_gradient_is_the_min_norm_point():
    gram = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    b = balancing.MGDA(normalization="l2").bind(["a", "b"])  # a zero norm counts as 1
    c, _ = b.weigh(gram, torch.ones(2, dtype=torch.float64), torch.arange(2), update=True)
    assert c.tolist() == [0.0, 1.0]


def test_mgda_ub_is_the_representation_variant(gated_flow, make_batch, shared_model):
    flow = gated_flow()
    model = shared_model(flow)
    loss_fn = flow.get_loss(balancer=balancing.MGDA(representation=True))
    x, y = make_batch([1, 0, 1, 1], seed=2)
    loss = loss_fn.backward(model(x), y)  # gradients w.r.t. the heads' input: no shared parameters needed
    assert torch.isfinite(loss) and model.backbone.weight.grad is not None
    w = loss_fn.balancer.last_weights
    assert float(w.sum()) == pytest.approx(1.0) and (w >= 0).all()
