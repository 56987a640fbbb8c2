"""MC-dropout (`dnn_cool_catalyst.uncertainty`): statistics per task, seeds, modes, preconditions."""
import pytest
import torch
from torch import nn

import dnn_cool_catalyst as dcc
from dnn_cool_catalyst.interpreters.masks import compute_masks
from dnn_cool_catalyst.uncertainty import mc_dropout


class AlternatingDropout(nn.Dropout):
    """A dropout layer whose masks are known: in training mode row r is kept (times 2, as p=0.5
    scales) when r is even and zeroed when r is odd. With one sample per pass, the passes stacked in
    one forward alternate kept, dropped, kept, ..."""

    def __init__(self):
        super().__init__(p=0.5)

    def forward(self, x):
        if not self.training:
            return x
        keep = (torch.arange(x.shape[0]) % 2 == 0).to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return x * keep * 2.0


def value_flow():
    """One identity-activated regression task `value` reading `x.f` through an identity head."""
    head = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
    tasks = dcc.Tasks([dcc.Task(name="value", module=head, loss=lambda z, y: (z - y.nan_to_num()) ** 2)])

    @tasks.add_flow
    def full(flow, x, out):
        out += flow.value(x.f)
        return out

    return full


class Backbone(nn.Module):
    """`raw` -> dropout(features) -> the flow (reading `f`)."""

    def __init__(self, flow, features: nn.Module, dropout: nn.Module):
        super().__init__()
        self.features, self.dropout, self.flow = features, dropout, flow.torch()

    def forward(self, x):
        return self.flow({"f": self.dropout(self.features(x["raw"]))})


def gated_model(gated_flow, p=0.5):
    flow = gated_flow()
    torch.manual_seed(1)
    model = Backbone(flow, nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3)), nn.Dropout(p))
    model.train()
    model(({"raw": torch.randn(32, 5)}))  # running statistics away from their defaults
    return flow, model


def test_known_masks_give_the_analytic_mean_and_variance():
    flow = value_flow()
    model = Backbone(flow, nn.Identity(), AlternatingDropout())
    x = torch.tensor([[1.5, -2.0]])
    # passes alternate 2x and 0x: mean x, variance (divided by n) x^2, in any even chunking
    for per_forward in (2, 4, 10):
        u = mc_dropout(model, {"raw": x}, n=10, passes_per_forward=per_forward)["value"]
        torch.testing.assert_close(u["mean"], x)
        torch.testing.assert_close(u["variance"], x ** 2)
        assert set(u) == {"mean", "variance", "applied", "applies", "decoded"}  # a regression: no entropy
        torch.testing.assert_close(u["decoded"], x)
        assert u["applied"].tolist() == [1.0] and u["applies"].tolist() == [True]


def test_many_passes_approach_the_dropout_moments():
    flow = value_flow()
    model = Backbone(flow, nn.Identity(), nn.Dropout(0.5))
    x = torch.tensor([[1.0, 3.0]])
    u = mc_dropout(model, {"raw": x}, n=20000, seed=0)["value"]
    # output x * B / (1 - p), B ~ Bernoulli(1 - p): mean x, variance x^2 p / (1 - p) = x^2. The kept
    # fraction q of 20000 passes has sd 0.0035, so the mean is within 2 * 4.5 sd * x of x and the
    # variance 4q(1-q) x^2 within 1e-3 x^2 of x^2.
    torch.testing.assert_close(u["mean"], x, atol=0.035 * 3.0, rtol=0)
    torch.testing.assert_close(u["variance"], x ** 2, atol=1e-3 * 9.0, rtol=0)


def test_statistics_match_the_passes_computed_by_hand(gated_flow):
    flow, model = gated_model(gated_flow)
    x = {"raw": torch.randn(6, 5)}
    logits = {}
    hooks = [getattr(model.flow, name).register_forward_hook(
        lambda m, i, o, name=name: logits.setdefault(name, []).append(o.detach().clone()))
        for name in ("gate", "value", "tags", "kind")]
    u = mc_dropout(model, x, n=7, seed=3, passes_per_forward=3)  # forwards of 3, 3 and 1 passes
    for h in hooks:
        h.remove()
    n, N = 7, 6
    passes = {k: torch.cat([z.reshape(-1, N, *z.shape[1:]) for z in v]) for k, v in logits.items()}
    assert passes["gate"].shape[0] == n
    probs = {"gate": torch.sigmoid(passes["gate"]), "value": torch.sigmoid(passes["value"]),
             "tags": torch.sigmoid(passes["tags"]), "kind": torch.softmax(passes["kind"], -1)}

    def bernoulli_h(p):
        return -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p))

    def categorical_h(p):
        return -torch.special.xlogy(p, p).sum(-1)

    # float32 passes summed in float64: agreement to float32 rounding of a few operations
    close = dict(atol=1e-5, rtol=1e-5)
    for path, h in (("gate", bernoulli_h), ("tags", bernoulli_h), ("kind", categorical_h), ("value", None)):
        p = probs[path]
        torch.testing.assert_close(u[path]["mean"], p.mean(0), **close)
        torch.testing.assert_close(u[path]["variance"], p.var(0, unbiased=False), **close)
        if h is None:
            assert "entropy" not in u[path] and "mutual_information" not in u[path]
            continue
        torch.testing.assert_close(u[path]["entropy"], h(p.mean(0)), **close)
        torch.testing.assert_close(u[path]["mutual_information"], (h(p.mean(0)) - h(p).mean(0)).clamp_min(0), **close)
    assert u["kind"]["entropy"].shape == (N,) and u["kind"]["variance"].shape == (N, 4)
    assert u["tags"]["entropy"].shape == (N, 2)
    # preconditions per pass from that pass's decisions, as at inference
    gate_yes = (probs["gate"].reshape(n, N) > 0.5).float()
    torch.testing.assert_close(u["value"]["applied"], gate_yes.mean(0))
    torch.testing.assert_close(u["kind"]["applied"], (1 - gate_yes).mean(0))
    assert u["gate"]["applied"].tolist() == [1.0] * N


def test_preconditions_follow_the_decoded_means(gated_flow):
    flow, model = gated_model(gated_flow)
    u = mc_dropout(model, {"raw": torch.randn(40, 5)}, n=9, seed=0)
    decided = (u["gate"]["mean"].reshape(-1) > 0.5)
    assert u["value"]["applies"].tolist() == decided.tolist()
    assert u["kind"]["applies"].tolist() == (~decided).tolist()
    assert u["gate"]["decoded"].reshape(-1).tolist() == decided.tolist()
    expected = compute_masks(flow.graph, 40, torch.device("cpu"), decoded={p: u[p]["decoded"] for p in u})
    for path in u:
        assert u[path]["applies"].tolist() == expected[path].tolist()


def test_a_seed_gives_the_same_result_and_leaves_the_global_random_state_alone(gated_flow):
    _, model = gated_model(gated_flow)
    x = {"raw": torch.randn(8, 5)}
    state = torch.get_rng_state()
    a = mc_dropout(model, x, n=5, seed=11)
    b = mc_dropout(model, x, n=5, seed=11)
    assert torch.equal(torch.get_rng_state(), state)
    c = mc_dropout(model, x, n=5, seed=12)
    for path in a:
        for key in a[path]:
            assert torch.equal(a[path][key], b[path][key]), (path, key)
    assert not torch.equal(a["kind"]["mean"], c["kind"]["mean"])
    # the labels of the precondition tasks are not read: preconditions come from the passes
    d = mc_dropout(model, {**x, "gt": {"gate": torch.ones(8)}}, n=5, seed=11)
    assert torch.equal(d["value"]["applied"], a["value"]["applied"])


def test_batchnorm_runs_in_eval_mode_untouched_and_modes_come_back(gated_flow):
    _, model = gated_model(gated_flow)
    bn = model.features[1]
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    seen = []
    bn.register_forward_hook(lambda m, i, o: seen.append((m.training, model.dropout.training)))
    model.train()
    model.features.eval()  # a mix of modes, each given back
    mc_dropout(model, {"raw": torch.randn(8, 5) * 10 + 3}, n=4)
    assert seen and all(flags == (False, True) for flags in seen)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training and model.dropout.training and not model.features.training and not bn.training


def test_a_model_without_dropout_is_an_error(gated_flow):
    flow = gated_flow()
    model = Backbone(flow, nn.Linear(5, 3), nn.Identity())
    with pytest.raises(ValueError, match="no dropout layer"):
        mc_dropout(model, {"raw": torch.randn(4, 5)}, n=3)
    model = Backbone(flow, nn.Linear(5, 3), nn.Dropout(0.0))
    with pytest.raises(ValueError, match="all have p=0"):
        mc_dropout(model, {"raw": torch.randn(4, 5)}, n=3)
    model = Backbone(flow, nn.Linear(5, 3), nn.Dropout(0.2))
    with pytest.raises(ValueError, match="n >= 2"):
        mc_dropout(model, {"raw": torch.randn(4, 5)}, n=1)
    assert model.training  # refused before any mode changed


def test_it_is_exported_at_the_top_level():
    assert dcc.uncertainty.mc_dropout is mc_dropout


# Through predict, evaluate and the explainer ------------------------------------------------------------------------

def gated_data(n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = (torch.rand(n, generator=g) > 0.5).float()
    labels = {"gate": gate, "value": torch.rand(n, generator=g), "tags": (torch.rand(n, 2, generator=g) > 0.5).float(),
              "kind": torch.randint(0, 4, (n,), generator=g)}
    return {"raw": torch.randn(n, 5, generator=g)}, labels


def test_predict_gives_the_statistics_in_dataset_order(gated_flow):
    from dnn_cool_catalyst import inference

    flow, model = gated_model(gated_flow, p=0.01)
    inputs, labels = gated_data()

    def loader():  # the same shuffled order each time: the same seed then gives the same statistics
        return flow.get_dataset(inputs, labels).loader(batch_size=16, shuffle=True,
                                                       generator=torch.Generator().manual_seed(0))

    state = torch.get_rng_state()
    result = inference.predict(model, flow, loader(), mc_samples=6, mc_seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    u = result["uncertainty"]
    assert result["index"].tolist() == list(range(50))
    for path, activated in result["activated"].items():
        assert u[path]["mean"].shape == activated.shape
        # dropout of 1% moves the mean a little; a sample paired with another's outputs moves it a lot
        torch.testing.assert_close(u[path]["mean"], activated, atol=0.05, rtol=0)
    assert model.training  # its mode given back
    again = inference.infer(model, flow, loader(), mc_samples=6, mc_seed=0)["uncertainty"]
    assert (again["kind"]["entropy"] == u["kind"]["entropy"].numpy()).all()


def test_evaluate_adds_mean_entropy_and_variance_over_the_scored_samples(gated_flow):
    from dnn_cool_catalyst import inference

    flow, model = gated_model(gated_flow)
    inputs, labels = gated_data()
    labels["kind"][:5] = -1  # missing labels: not scored, not in the mean
    loader = flow.get_dataset(inputs, labels).loader(batch_size=16)
    table = inference.evaluate(model, flow, loader, mc_samples=5, mc_seed=2)
    plain = inference.evaluate(model, flow, loader)
    assert list(table.columns) == list(plain.columns) + ["entropy", "variance"]
    result = inference.predict_labelled(model, flow, loader, name="test", mc_samples=5, mc_seed=2)
    u = result["uncertainty"]
    gate = labels["gate"].bool()
    scored = {"gate": torch.ones(50, dtype=torch.bool), "value": gate, "tags": gate,
              "kind": ~gate & (labels["kind"] >= 0)}
    for path, column, other in (("gate", "entropy", "variance"), ("tags", "entropy", "variance"),
                                ("kind", "entropy", "variance"), ("value", "variance", "entropy")):
        rows = table[table.task_path == path]
        values = u[path][column].reshape(50, -1).double().mean(1)[scored[path]]
        assert rows[column].tolist() == pytest.approx([float(values.mean())] * len(rows), rel=1e-6)
        assert rows[other].isna().all()


def test_the_explainer_shows_the_uncertainty_on_each_node_when_asked(gated_flow):
    from dnn_cool_catalyst import inference

    flow, model = gated_model(gated_flow)
    inputs, labels = gated_data(8)
    result = inference.predict(model, flow, flow.get_dataset(inputs, labels).loader(batch_size=8), mc_samples=4,
                               mc_seed=0)
    trees = flow.get_treelib_explainer(uncertainty=True)(result)
    u = result["uncertainty"]
    for i, tree in enumerate(trees):
        assert f"entropy {float(u['gate']['entropy'][i, 0]):.4g}, MI " in tree["gate"].tag
        assert f"applied {float(u['gate']['applied'][i]):.4g}" in tree["gate"].tag
        for path in ("value", "kind"):
            if path in tree:
                assert ("variance " if path == "value" else "entropy ") in tree[path].tag
    assert "entropy" not in flow.get_treelib_explainer()(result)[0]["gate"].tag  # off by default
    with pytest.raises(KeyError, match="mc_samples"):
        flow.get_treelib_explainer(uncertainty=True)({k: v for k, v in result.items() if k != "uncertainty"})


def test_predict_refuses_a_model_without_dropout_before_any_batch(gated_flow):
    from dnn_cool_catalyst import inference

    flow = gated_flow()
    model = Backbone(flow, nn.Linear(5, 3), nn.Identity())

    def batches():
        raise AssertionError("no batch should be read")
        yield

    with pytest.raises(ValueError, match="no dropout layer"):
        inference.predict(model, flow, batches(), mc_samples=3)


def test_evaluate_on_a_mixed_loader_takes_each_sources_own_samples(security_flow, two_security_sources):
    from dnn_cool_catalyst import inference

    class Noisy(nn.Module):
        def __init__(self, flow):
            super().__init__()
            self.dropout, self.flow = nn.Dropout(0.3), flow.torch()

        def forward(self, x):
            return self.flow({**x, "features": self.dropout(x["features"])})

    mixed = two_security_sources(security_flow)
    table = inference.evaluate(Noisy(security_flow), security_flow, mixed.loader(batch_size=16), mc_samples=3,
                               mc_seed=0)
    assert list(table.columns) == ["source", "task_path", "metric_name", "metric_res", "num_samples", "entropy",
                                   "variance"]
    door = table[(table.source == "door_cam") & (table.task_path == "door_open")]
    overall = table[(table.source == "") & (table.task_path == "door_open")]
    assert door.entropy.notna().all() and overall.entropy.notna().all()
    assert set(table[table.source == "door_cam"].task_path) == {"camera_blocked", "door_open", "door_locked"}
