"""FlowRunner end to end on a tiny token-tagging dataset (issue 17): two epochs of training with
metrics and threshold tuning over the tokens of S_t, then the evaluation table, whose rows and
element counts equal a hand-written reference (loops over the tokens)."""
import importlib.util
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from dnn_cool_catalyst.runners import FlowRunner


def load_token_tagging():
    """`tests/token_tagging.py`: the token-tagging flow and its hand-written reference."""
    path = Path(__file__).resolve().parents[1] / "token_tagging.py"
    spec = importlib.util.spec_from_file_location("token_tagging", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_two_epochs_and_evaluate_a_token_tagging_flow(tmp_path):
    tt = load_token_tagging()
    flow = tt.token_flow(seed=0)
    x, y, real = tt.token_data(48, 6, seed=1)
    ds = flow.get_dataset(x, {p: v.numpy() for p, v in y.items()})  # with x["elements"], the padding marker
    loaders = OrderedDict(train=ds.loader(batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0)),
                          valid=ds.loader(batch_size=16))
    runner = FlowRunner(flow, model=flow.torch())
    runner.train(loaders=loaders, num_epochs=2, logdir=str(tmp_path / "run"), lr=1e-2, verbose=False)
    pre = tt.reference_masks(y, real)
    valid = runner.epoch_metrics["valid"]
    for key in ("is_entity/accuracy", "entity_type/accuracy_1", "span_score/mean_absolute_error", "tags/f1_score"):
        assert np.isfinite(valid[key]), key
    tuned = json.loads((tmp_path / "run" / "tuned_params.json").read_text())
    lab = y["is_person"].numpy()
    assert tuned["is_person"]["num_samples"] == int((pre["is_person"] & ~np.isnan(lab)).sum())  # tokens of S_t

    table = runner.evaluate(loaders["valid"], verbose=False)
    predictions = runner.infer(loaders["valid"], preconditions="gt")
    activated = {p: torch.as_tensor(v) for p, v in predictions["activated"].items()}
    thresholds = {p: params["threshold"] for p, params in flow.get_decoder().params().items()}
    ref_values, ref_counts = tt.reference_rows(activated, y, pre, tuned=thresholds)
    rows = {(r.task_path, r.metric_name): (r.metric_res, r.num_samples) for r in table.itertuples()}
    for path, metrics in ref_values.items():
        for name, value in metrics.items():
            got, count = rows[(path, name)]
            assert count == ref_counts[path], (path, name)
            # the same float32 activations in batches of 16 and through infer: up to float rounding
            assert got == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), (path, name)
    assert rows[("is_entity", "accuracy")][1] > len(ds)  # elements (tokens), not samples
    assert (tmp_path / "run" / "evaluation.csv").exists()
