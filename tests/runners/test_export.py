"""export / FlowRunner.load: identical predictions after a round trip, a JSON manifest, weights
loaded with weights_only=True, and errors naming what does not fit."""
import json

import numpy as np
import pytest
import torch

from dnn_cool_catalyst import TunedParamsError
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


@pytest.mark.parametrize("text", ["NaN", "-Infinity", '"0.7"', "null", "[0.5, 0.5]"],
                         ids=["NaN", "-Infinity", "string", "null", "list for a binary task"])
def test_load_refuses_bad_tuned_params_naming_task_and_file(flow_and_model, tmp_path, text):
    flow, model = flow_and_model()
    FlowRunner(flow, model=model).export(tmp_path)
    tuned_file = tmp_path / "tuned_params.json"
    tuned = json.loads(tuned_file.read_text())
    tuned_file.write_text(json.dumps(tuned).replace('"door_open": {"threshold": 0.5}',
                                                    '"door_open": {"threshold": %s}' % text))
    fresh_flow, fresh_model = flow_and_model(seed=1)
    weights = {k: v.clone() for k, v in fresh_model.state_dict().items()}
    with pytest.raises(TunedParamsError, match=r"task 'door_open' in '.*tuned_params\.json'.*threshold"):
        FlowRunner.load(tmp_path, fresh_flow, model=fresh_model)
    assert fresh_flow.get_decoder().params() == flow.get_decoder().params()  # nothing applied
    assert all(torch.equal(v, weights[k]) for k, v in fresh_model.state_dict().items())  # the model untouched


def test_load_names_an_unknown_task_path_in_the_tuned_file(flow_and_model, tmp_path):
    flow, model = flow_and_model()
    FlowRunner(flow, model=model).export(tmp_path)
    tuned_file = tmp_path / "tuned_params.json"
    tuned = json.loads(tuned_file.read_text())
    tuned["door_opn"] = tuned.pop("door_open")
    tuned_file.write_text(json.dumps(tuned))
    fresh_flow, fresh_model = flow_and_model(seed=1)
    with pytest.raises(TunedParamsError, match=r"'door_opn' in '.*tuned_params\.json'.*did you mean 'door_open'"):
        FlowRunner.load(tmp_path, fresh_flow, model=fresh_model)


def test_tuned_params_are_restored_when_the_weights_do_not_fit(flow_and_model, tmp_path):
    flow, model = flow_and_model()
    flow.get_decoder().load_tuned({"door_open": {"threshold": 0.25}})
    FlowRunner(flow, model=model).export(tmp_path)
    other = security_tasks(features=8).get_full_flow()  # no backbone: the weights do not fit
    with pytest.raises(ValueError, match="missing keys"):
        FlowRunner.load(tmp_path, other)
    assert other.get_decoder().params()["door_open"] == {"threshold": 0.5}


def _one_task_flow(task_class):
    import dnn_cool_catalyst as dcc

    tasks = dcc.Tasks([task_class("door", torch.nn.Linear(8, 1))])

    @tasks.add_flow
    def flow(flow, x, out):
        out += flow.door(x.features)
        return out

    return tasks.get_full_flow()


def test_manifest_records_and_compares_the_tasks_kind_not_its_class(tmp_path):
    """`ITask.kind` goes into the manifest: a class renamed or moved keeps its exports loadable, a
    changed kind is named."""
    import dnn_cool_catalyst as dcc
    from dnn_cool_catalyst.runners.export import check_compatible, export_model, manifest_of

    class DoorV1(dcc.BinaryClassificationTask):
        kind = "door"

    class DoorV2(dcc.BinaryClassificationTask):  # another class, the same kind
        kind = "door"

    class Window(dcc.BinaryClassificationTask):  # no kind of its own: its class name
        pass

    flow = _one_task_flow(DoorV1)
    model = flow.torch()
    assert manifest_of(flow, model)["tasks"] == [{"path": "door", "kind": "door"}]
    export_model(tmp_path, flow, model)
    FlowRunner.load(tmp_path, _one_task_flow(DoorV2), model=_one_task_flow(DoorV2).torch())
    with pytest.raises(ValueError, match=r"task kinds differ: \['door \(door exported, Window now\)'\]"):
        check_compatible(read_manifest(tmp_path), _one_task_flow(Window))
