"""export / FlowRunner.load: identical predictions after a round trip, a JSON manifest, weights
loaded with weights_only=True, and errors naming what does not fit."""
import json

import numpy as np
import pytest
import torch

from dnn_cool_catalyst.runners import FlowRunner, read_manifest
from dnn_cool_catalyst.runners.export import FORMAT
from dnn_cool_catalyst.story import security_tasks
from dnn_cool_catalyst.tuning import load_tuned


def test_round_trip_gives_identical_predictions(data, flow_and_model, loaders_for, tmp_path):
    flow, model = flow_and_model(seed=0)
    runner = FlowRunner(flow, model=model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # weights unlike a fresh model's
    tuned = runner.tune(loaders_for(flow, data)["valid"])
    runner.export(tmp_path / "export")
    assert sorted(f.name for f in (tmp_path / "export").iterdir()) == ["manifest.json", "tuned_params.json", "weights.pth"]
    assert load_tuned(tmp_path / "export" / "tuned_params.json") == flow.get_decoder().params()

    fresh_flow, fresh_model = flow_and_model(seed=1)
    loaded = FlowRunner.load(tmp_path / "export", fresh_flow, model=fresh_model)
    assert fresh_flow.get_decoder().params() == flow.get_decoder().params()
    assert tuned["door_open"]["threshold"] == fresh_flow.get_decoder().params()["door_open"]["threshold"]
    before = runner.infer(loaders_for(flow, data)["valid"])
    after = loaded.infer(loaders_for(fresh_flow, data)["valid"])
    for part in ("logits", "activated", "decoded", "mask"):
        for p in flow.graph.paths:
            np.testing.assert_array_equal(before[part][p], after[part][p])


def test_manifest_is_plain_json_with_versions_and_tasks(flow_and_model, tmp_path):
    flow, model = flow_and_model()
    FlowRunner(flow, model=model).export(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest == read_manifest(tmp_path)
    assert manifest["format"] == FORMAT and manifest["flow"] == "full_flow"
    assert {"dnn_cool_catalyst", "torch", "catalyst", "python"} <= set(manifest["versions"])
    assert [t["path"] for t in manifest["tasks"]] == list(flow.graph.paths)
    assert manifest["tasks"][0]["kind"] == "BinaryClassificationTask"
    assert manifest["model"].endswith("Backbone")
    state = torch.load(tmp_path / "weights.pth", weights_only=True)
    assert set(state) == set(model.state_dict())


def test_what_does_not_fit_is_named(flow_and_model, tmp_path):
    flow, model = flow_and_model()
    FlowRunner(flow, model=model).export(tmp_path)
    other = security_tasks(features=8).get_flow("person_regression")
    with pytest.raises(ValueError, match=r"tasks only in the export: \['camera_blocked'"):
        FlowRunner.load(tmp_path, other)
    with pytest.raises(ValueError, match="missing keys.*unexpected keys"):
        FlowRunner.load(tmp_path, security_tasks(features=8).get_full_flow())  # no backbone
    with pytest.raises(FileNotFoundError, match="not an exported flow model"):
        FlowRunner.load(tmp_path / "nowhere", flow)
