"""`dnn_cool_catalyst.inference`: predict, infer, tune and evaluate as plain functions of
(model, flow, loader), without a runner and without Catalyst."""
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from dnn_cool_catalyst import inference


def _loader(flow, data, shuffle=False, batch_size=16):
    return flow.get_dataset(*data, with_index=True).loader(batch_size=batch_size, shuffle=shuffle)


def test_predict_is_the_module_on_the_whole_dataset_in_dataset_order(security_flow, security_data):
    model = security_flow.torch()
    model.train()
    result = inference.predict(model, security_flow, _loader(security_flow, security_data, shuffle=True),
                               preconditions="gt")
    assert model.training  # its mode is given back
    x, y = security_flow.get_dataset(*security_data, with_index=True)[list(range(96))]
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert result["index"].tolist() == list(range(96))
    for p in security_flow.graph.paths:
        # the same samples in other batches: float32 matmuls of fan-in 8 sum in another order
        # (bound ~ 8 x 2^-24 x |x||w| ~ 1e-6 for these unit-scale values)
        torch.testing.assert_close(result["logits"][p], out["logits"][p], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result["targets"][p], y[p], equal_nan=True)
        assert torch.equal(result["mask"][p], out["mask"][p])


def test_infer_without_labels_uses_predicted_preconditions(security_flow, security_data):
    inputs_only = [x for x, _ in _loader(security_flow, security_data)]  # X alone, as at deployment
    got = inference.infer(security_flow.torch(), security_flow, inputs_only)
    assert got["targets"] is None and isinstance(got["decoded"]["door_open"], np.ndarray)
    expected = ~got["decoded"]["camera_blocked"].reshape(-1) & ~got["decoded"]["door_open"].reshape(-1)
    np.testing.assert_array_equal(got["mask"]["door_locked"], expected)


def test_tune_returns_params_and_applies_them_only_when_asked(security_flow, security_data):
    decoder = security_flow.get_decoder()
    before = decoder.params()
    tuned = inference.tune(security_flow.torch(), security_flow, _loader(security_flow, security_data), apply=False)
    assert decoder.params() == before and set(tuned) == set(before) and tuned != before
    assert inference.tune(security_flow.torch(), security_flow, _loader(security_flow, security_data)) == tuned
    applied = decoder.params()  # the parameters; `tuned` also carries the tuning report (score, metric)
    assert all(applied[p].items() <= tuned[p].items() for p in tuned) and applied != before


def test_evaluate_is_the_evaluator_on_predict(security_flow, security_data):
    model = security_flow.torch()
    table = inference.evaluate(model, security_flow, _loader(security_flow, security_data), preconditions="predicted")
    result = inference.predict(model, security_flow, _loader(security_flow, security_data), preconditions="gt")
    expected = security_flow.get_evaluator()(result["activated"], result["targets"], preconditions="predicted")
    pd.testing.assert_frame_equal(table, expected)


def test_errors_name_the_caller(security_flow, security_data):
    with pytest.raises(ValueError, match=r"^my_loop: the loader yielded no batches"):
        inference.infer(security_flow.torch(), security_flow, DataLoader([], batch_size=4), name="my_loop")
    inputs_only = [x for x, _ in _loader(security_flow, security_data)]
    with pytest.raises(TypeError, match=r"^evaluate needs labels: the loader must yield \(X, y\) pairs"):
        inference.evaluate(security_flow.torch(), security_flow, inputs_only)
    with pytest.raises(ValueError, match="preconditions must be 'predicted' or 'gt'"):
        inference.predict(security_flow.torch(), security_flow, inputs_only, preconditions="labels")


def test_inference_runs_without_catalyst():
    code = (
        "import sys; sys.modules['catalyst'] = None\n"
        "import torch\n"
        "from dnn_cool_catalyst import inference\n"
        "from dnn_cool_catalyst.story import security_tasks, security_labels\n"
        "f = security_tasks(4).get_full_flow()\n"
        "loader = f.get_dataset({'features': torch.randn(16, 4)}, security_labels(16)).loader(batch_size=8)\n"
        "inference.tune(f.torch(), f, loader)\n"
        "assert len(inference.evaluate(f.torch(), f, loader)) > 0\n"
        "assert not any(m == 'catalyst' or m.startswith('catalyst.') for m in sys.modules if sys.modules[m] is not None)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("preconditions", ["gt", "predicted"])
def test_evaluate_on_a_mixed_loader_adds_a_source_column(security_flow, two_security_sources, preconditions):
    mixed = two_security_sources(security_flow)
    model = security_flow.torch()
    table = inference.evaluate(model, security_flow, mixed.loader(batch_size=16), preconditions=preconditions)
    assert list(table.columns) == ["source", "task_path", "metric_name", "metric_res", "num_samples"]
    overall = table[table["source"] == ""].drop(columns="source").reset_index(drop=True)
    # the overall rows: the evaluator on every sample of the mixture
    parts = [inference.predict(model, security_flow, mixed.sources[n].loader(batch_size=16), "gt")
             for n in mixed.source_names]
    joined = {k: {p: torch.cat([r[k][p] for r in parts]) for p in security_flow.graph.paths}
              for k in ("activated", "targets")}
    expected = security_flow.get_evaluator()(joined["activated"], joined["targets"], preconditions=preconditions)
    # the same samples in other batches and order: float32 activations round differently (~1e-7),
    # counts of decisions are exact (pd.testing's default rtol 1e-5 covers the means)
    pd.testing.assert_frame_equal(overall, expected)
    for name, result in zip(mixed.source_names, parts):
        rows = table[table["source"] == name].drop(columns="source").reset_index(drop=True)
        alone = security_flow.get_evaluator()(result["activated"], result["targets"], preconditions=preconditions)
        labelled = alone[alone["task_path"].isin(mixed.labelled_paths(name))].reset_index(drop=True)
        assert set(rows["task_path"]) == set(mixed.labelled_paths(name))  # only the tasks the source labels
        pd.testing.assert_frame_equal(rows, labelled)
    assert table["source"].tolist() == sorted(table["source"].tolist(), key=["", *mixed.source_names].index)
    # a plain loader keeps the table as it was
    assert "source" not in inference.evaluate(model, security_flow, mixed.sources["people"].loader(batch_size=16))


def test_predict_orders_a_mixed_loader_by_source_then_index(security_flow, two_security_sources):
    mixed = two_security_sources(security_flow)
    result = inference.predict(security_flow.torch(), security_flow, mixed.loader(batch_size=16), "gt")
    sizes = [len(mixed.sources[n]) for n in mixed.source_names]
    assert result["source"].tolist() == [s for s, n in enumerate(sizes) for _ in range(n)]
    assert result["index"].tolist() == [i for n in sizes for i in range(n)]

