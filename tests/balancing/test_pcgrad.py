"""PCGrad on the Gram matrix against gradient surgery on the vectors themselves."""
import pytest
import torch

from dnn_cool_catalyst import balancing


def _surgery(g, orders):
    """Yu et al.'s Algorithm 1 on the vectors: each g_i projected against the original g_j it conflicts with."""
    out = []
    for i, order in enumerate(orders):
        pc = g[i].clone()
        for j in order:
            if j != i and g[j].norm() > 0 and pc @ g[j] < 0:
                pc = pc - (pc @ g[j]) / (g[j] @ g[j]) * g[j]
        out.append(pc)
    return torch.stack(out).sum(0)


def _draws(seed, p, steps):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randperm(p, generator=gen).tolist() for _ in range(p)] for _ in range(steps)]


def test_two_conflicting_gradients_by_hand():
    b = balancing.PCGrad().bind(["a", "b"])
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    c, h = b.weigh(g @ g.T, torch.ones(2), torch.tensor([0, 1]), update=True)
    # g1 -> g1 + g2 / 2 = (0.5, 0.5); g2 -> g2 + g1 = (0, 1); their sum (0.5, 1.5)
    torch.testing.assert_close((c.double() @ g), torch.tensor([0.5, 1.5], dtype=torch.float64))
    assert h.tolist() == [1.0, 1.0] and b.effective_weights() == {"a": 2.0, "b": 1.5}


def test_agreeing_gradients_are_summed():
    b = balancing.PCGrad().bind(["a", "b", "c"])
    g = torch.tensor([[1.0, 0.2], [0.5, 1.0], [0.1, 0.1]], dtype=torch.float64)
    c, _ = b.weigh(g @ g.T, torch.ones(3), torch.arange(3), update=True)
    assert c.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_surgery_on_the_vectors_with_the_same_random_orders(seed):
    torch.manual_seed(seed)
    g = torch.randn(5, 7, dtype=torch.float64)
    g[3] = 0.0  # a zero gradient is never projected against
    b = balancing.PCGrad(seed=seed).bind(list("abcde"))
    orders = _draws(seed, 5, 3)
    for step in range(3):
        c, _ = b.weigh(g @ g.T, torch.ones(5, dtype=torch.float64), torch.arange(5), update=True)
        torch.testing.assert_close(c @ g, _surgery(g, orders[step]))


def test_orders_matter_and_are_drawn_only_on_training_steps():
    g = torch.tensor([[1.0, 0.0, 0.0], [-0.6, 1.0, 0.0], [-0.5, -0.8, 0.3]], dtype=torch.float64)
    gram = g @ g.T
    results = {tuple(tuple(o) for o in orders): _surgery(g, orders)
               for orders in ([[0, 1, 2]] * 3, [[2, 1, 0]] * 3)}
    assert not torch.allclose(*results.values())  # the order changes the result: the draws are tested
    b = balancing.PCGrad(seed=4).bind(list("abc"))
    state = b.generator.get_state().clone()
    c, _ = b.weigh(gram, torch.ones(3, dtype=torch.float64), torch.arange(3), update=False)
    assert torch.equal(state, b.generator.get_state())
    torch.testing.assert_close(c.double() @ g, _surgery(g, [[0, 1, 2]] * 3))


def test_same_seed_same_draws_and_state_dict_continues_them():
    gram = torch.tensor([[1.0, -0.5, -0.2], [-0.5, 2.0, -0.9], [-0.2, -0.9, 1.5]], dtype=torch.float64)
    a, b = balancing.PCGrad(seed=7).bind(list("xyz")), balancing.PCGrad(seed=7).bind(list("xyz"))
    a.weigh(gram, torch.ones(3), torch.arange(3), update=True)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        ca, _ = a.weigh(gram, torch.ones(3), torch.arange(3), update=True)
        cb, _ = b.weigh(gram, torch.ones(3), torch.arange(3), update=True)
        assert torch.equal(ca, cb)


def test_only_present_rows_are_recorded():
    b = balancing.PCGrad().bind(["a", "b", "c", "d"])
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    b.weigh(g @ g.T, torch.ones(2), torch.tensor([1, 3]), update=True)
    w = b.effective_weights()
    assert w["a"] == 0.0 and w["c"] == 0.0 and w["b"] == 2.0 and w["d"] == 1.5
