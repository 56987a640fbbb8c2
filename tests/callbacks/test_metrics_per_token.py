"""FlowMetricsCallback, LoaderOutputs and the tuning callback with per-token tasks (issue 17):
loader values over the tokens of S_t, equal to the metrics of the whole loader as one batch, also
when each batch is padded to its own longest sample; PR curves over tokens; per-source metrics."""
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import dnn_cool_catalyst as dcc
from dnn_cool_catalyst.callbacks import FlowMetricsCallback, ThresholdTuningCallback


def load_token_tagging():
    """`tests/token_tagging.py`: the token-tagging flow and its hand-written reference."""
    path = Path(__file__).resolve().parents[1] / "token_tagging.py"
    spec = importlib.util.spec_from_file_location("token_tagging", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tt = load_token_tagging()
TOKEN_INPUTS = ("tokens", "elements")


def _dataset(flow, n=40, t=6, seed=2, partial=False, only=None):
    x, y, real = tt.token_data(n, t, seed=seed)
    labels = {p: v.numpy() for p, v in y.items() if only is None or p in only}
    return flow.get_dataset(x, labels, partial=partial), real


def _reference(flow, ds, train_mode):
    """The flow's metrics over the whole dataset as one batch (`FlowMetrics` is checked against
    the token loops in tests/interpreters/test_per_token_metrics.py)."""
    model = flow.torch()
    model.train(train_mode)
    x, y = ds[list(range(len(ds)))]
    with torch.no_grad():
        out = model(x)
    metrics = flow.get_metrics()
    metrics.update(out, y)
    return metrics.compute(), metrics.num_samples(), out, y


def _trimmed(batches):
    """Each batch cut to its longest sample (what a collate padding per batch gives): the number of
    tokens differs from batch to batch."""
    out = []
    for x, y in batches:
        t = int(x["elements"].sum(1).max())
        x = dict(x)
        for k in TOKEN_INPUTS:
            x[k] = x[k][:, :t]
        x["gt"] = {p: v[:, :t] if v.dim() > 1 else v for p, v in x["gt"].items()}
        y = {p: v[:, :t] if v.dim() > 1 else v for p, v in y.items()}
        out.append((x, y))
    assert len({x["elements"].shape[1] for x, _ in out}) > 1
    return out


def _assert_close(got, expected):
    """Loader values against the one-batch reference: the same counts (decisions of the same logits
    computed in batches of other sizes; none lies within 1e-5 of a threshold here), float64 ratios
    and float32 sums of the same terms in another order (relative 1e-5)."""
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("loader_key,buffer_elements,trim", [("valid", 2 ** 24, False), ("train", 2 ** 24, False),
                                                              ("valid", 1, False), ("valid", 2 ** 24, True),
                                                              ("train", 2 ** 24, True)])
def test_loader_values_over_tokens_equal_one_batch(fake_runner_cls, loader_key, buffer_elements, trim):
    flow = tt.token_flow(seed=1)
    ds, _ = _dataset(flow)
    runner = fake_runner_cls(flow, with_terms="stacked")
    cb = FlowMetricsCallback(buffer_elements=buffer_elements)
    runner.start([cb])
    batches = list(ds.loader(batch_size=7))
    got = runner.run_loader([cb], loader_key, _trimmed(batches) if trim else batches)
    expected, counts, _, _ = _reference(flow, ds, train_mode=loader_key == "train")
    _assert_close(got, expected)
    assert counts["is_entity"] > len(ds)  # tokens were counted


def test_pr_curve_of_a_per_token_binary_task_runs_over_its_tokens(fake_runner_cls):
    flow = tt.token_flow(seed=2)
    ds, real = _dataset(flow)
    runner = fake_runner_cls(flow)
    cb = FlowMetricsCallback()
    runner.start([cb])
    runner.run_loader([cb], "valid", _trimmed(list(ds.loader(batch_size=9))))
    curves = {tag: (labels, scores) for _, tag, labels, scores in runner.logger.pr_curves}
    _, counts, out, y = _reference(flow, ds, train_mode=False)
    for path in ("is_entity", "is_person"):
        labels, scores = curves[f"{path}/pr_curve"]
        assert len(labels) == counts[path]  # the tokens of S_t, padding and tokens outside S_t left out
        lab = y[path].numpy()
        keep = out["mask"][path].numpy() & ~np.isnan(lab) if out["mask"][path].dim() == 2 else None
        if keep is not None:
            np.testing.assert_array_equal(labels, lab[keep] > 0.5)
            np.testing.assert_allclose(scores, out["activated"][path].reshape(lab.shape).numpy()[keep], rtol=1e-5)
    assert len(curves["tags/pr_curve/0"][0]) == counts["tags"]  # one per token of S_t, for each class


@pytest.mark.parametrize("trim", [False, True])
def test_tuning_on_a_loader_of_per_token_tasks_equals_tuning_on_all_its_tokens(fake_runner_cls, trim):
    flow = tt.token_flow(seed=3)
    ds, _ = _dataset(flow, n=30, seed=5)
    runner = fake_runner_cls(flow)
    tuning, metrics = ThresholdTuningCallback(), FlowMetricsCallback()
    runner.start([tuning, metrics])
    batches = list(ds.loader(batch_size=8))
    got = runner.run_loader([tuning, metrics], "valid", _trimmed(batches) if trim else batches)
    _, _, out, y = _reference(flow, ds, train_mode=False)
    expected, report = flow.get_decoder().fit(out["activated"], y)
    for path in ("is_entity", "is_person", "has_entities"):
        assert tuning.tuned[path]["num_samples"] == report[path]["num_samples"]
        assert tuning.tuned[path]["threshold"] == pytest.approx(expected[path]["threshold"], abs=1e-6)
    # the loader's decoded metrics use the thresholds tuned on it
    flow.get_decoder().load_tuned(expected)
    values, _, _, _ = _reference(flow, ds, train_mode=False)
    _assert_close(got, {k: v for k, v in values.items() if k.startswith(("is_entity/", "is_person/"))})


def test_per_source_metrics_of_per_token_tasks_equal_each_source_alone(fake_runner_cls):
    flow = tt.token_flow(seed=4)
    # "tokens" labels the per-token tasks only: its has_entities is unknown, so every real token applies
    # (a per-token task cannot be left out of a partial source: its labels' shape is not known)
    tokens_only = {"is_entity", "entity_type", "is_person", "span_score", "tags"}
    a, _ = _dataset(flow, n=25, seed=7, partial=True, only=tokens_only)
    b, _ = _dataset(flow, n=20, seed=8, partial=True)
    mixed = dcc.MixedDataset({"tokens": a, "full": b}, seed=1)
    runner = fake_runner_cls(flow)
    cb = FlowMetricsCallback()
    runner.start([cb])
    got = runner.run_loader([cb], "valid", mixed.loader(batch_size=9))
    for name, ds in (("tokens", a), ("full", b)):
        alone, _, out, y = _reference(flow, ds, train_mode=False)
        labelled = mixed.labelled_paths(name)
        expected = {f"{name}/{k}": v for k, v in alone.items() if k.split("/")[0] in labelled}
        with torch.no_grad():  # each task's loss over the source's tokens of S_t
            terms = flow.get_loss().terms(out, y)
        expected.update({f"{name}/{p}/loss": float(s / c) if c > 0 else math.nan for p, (s, c) in terms.items()
                         if p in labelled})
        assert expected
        _assert_close(got, expected)
    assert not any(k.startswith("tokens/has_entities/") for k in got)
    assert got["tokens/is_entity/accuracy"] != got["full/is_entity/accuracy"]
