"""RandomLossWeighting: lambda = softmax(eps), eps ~ N(0, I) from a seeded generator."""
import pytest
import torch

from dnn_cool_catalyst import balancing


def test_weights_are_the_softmax_of_seeded_normals_over_present_tasks():
    b = balancing.RandomLossWeighting(seed=3).bind(["a", "b", "c"])
    g = torch.Generator().manual_seed(3)
    losses = torch.tensor([1.0, 0.0, 2.0])
    for present in ([True, True, True], [True, False, True]):
        eps = torch.randn(3, generator=g)
        where = [i for i, p in enumerate(present) if p]
        lam = torch.softmax(eps[where], 0)
        loss = b(losses, present, update=True)
        assert loss.item() == pytest.approx(float((lam * losses[where]).sum()), rel=1e-6)
        assert [b.last_weights[i].item() for i in where] == pytest.approx(lam.tolist(), rel=1e-6)
    assert b.last_weights[1] == 0.0


def test_same_seed_same_draws_and_no_draw_outside_training():
    one, two = (balancing.RandomLossWeighting(seed=7).bind(["a", "b"]) for _ in range(2))
    losses = torch.tensor([1.0, 3.0])
    evaluated = one(losses, [True, True], update=False)  # expected weights 1/2, no draw
    assert float(evaluated) == pytest.approx(2.0)
    assert [float(one(losses, [True, True], update=True)) for _ in range(3)] == \
        [float(two(losses, [True, True], update=True)) for _ in range(3)]
    assert float(balancing.RandomLossWeighting(seed=8).bind(["a", "b"])(losses, [True, True], update=True)) != \
        float(balancing.RandomLossWeighting(seed=7).bind(["a", "b"])(losses, [True, True], update=True))


def test_the_draws_continue_after_a_state_dict_round_trip(tmp_path):
    losses = torch.tensor([1.0, 3.0])
    first = balancing.RandomLossWeighting(seed=5).bind(["a", "b"])
    first(losses, [True, True], update=True)
    torch.save(first.state_dict(), tmp_path / "rlw.pt")
    resumed = balancing.RandomLossWeighting(seed=5).bind(["a", "b"])
    resumed.load_state_dict(torch.load(tmp_path / "rlw.pt", weights_only=True))
    assert resumed(losses, [True, True], update=True).item() == first(losses, [True, True], update=True).item()
    fresh = balancing.RandomLossWeighting(seed=5).bind(["a", "b"])
    assert fresh(losses, [True, True], update=True).item() != resumed(losses, [True, True], update=True).item()
