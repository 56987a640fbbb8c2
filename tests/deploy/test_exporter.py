"""`deploy.export`: the artifact's decoded values and `applies` equal eager prediction (the model,
the decoder, masks from decoded predictions) in both formats, at batch sizes 1, 7 and 64; its
metadata; and the errors for what cannot be exported."""
import json

import numpy as np
import pytest
import torch
from torch import nn

import dnn_cool_catalyst as dcc
from dnn_cool_catalyst.deploy import DeployError
from dnn_cool_catalyst.deploy.exporter import infer_example_inputs

from .conftest import FORMATS, algebra_flow, assert_same, eager, mlm_flow, security_inputs

FACE = "person_regression.face_regression."
BODY = "person_regression.body_regression."


def test_the_security_flow_was_tuned_away_from_the_defaults(security_artifacts):
    flow, _, _ = security_artifacts
    params = flow.get_decoder().params()
    assert params["camera_blocked"]["threshold"] != 0.5
    assert len(params[FACE + "facial_characteristics"]["threshold"]) == 3
    assert params[FACE + "facial_characteristics"]["threshold"] != [0.5] * 3


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n", [1, 7, 64])
def test_artifact_equals_eager_prediction(security_artifacts, fmt, n, assert_clear_decisions):
    flow, model, paths = security_artifacts
    inputs = security_inputs(64)
    inputs = {k: v[:n] for k, v in inputs.items()}
    reference = eager(model, flow, inputs)
    assert_clear_decisions(flow, reference["activated"])
    result = dcc.deploy.load(paths[fmt])(inputs)
    assert_same(result, reference, flow)
    if n == 64:  # preconditions fail at several depths in this batch
        mask = reference["mask"]
        assert (~mask["door_open"]).any()                                   # camera blocked
        assert (mask["door_open"] & ~mask["person_present"]).any()          # door closed
        assert (mask["person_present"] & ~mask[FACE + "face_x1"]).any()     # nobody there
        assert mask[BODY + "shirt_type"].any()


@pytest.mark.parametrize("fmt", FORMATS)
def test_class_names_are_mapped(security_artifacts, fmt):
    flow, _, paths = security_artifacts
    result = dcc.deploy.load(paths[fmt])(security_inputs(5))
    shirt = flow.graph.leaf(BODY + "shirt_type").task.class_names
    out = result[BODY + "shirt_type"]
    assert out["classes"][0][0] == shirt[out["decoded"][0][0]]
    facial = flow.graph.leaf(FACE + "facial_characteristics").task.class_names
    fc = result[FACE + "facial_characteristics"]
    assert fc["classes"][2] == [c for c, yes in zip(facial, fc["decoded"][2]) if yes]
    assert "classes" not in result["door_open"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_metadata_describes_inputs_tasks_and_preconditions(security_artifacts, fmt):
    flow, _, paths = security_artifacts
    meta = dcc.deploy.read_metadata(paths[fmt])
    assert meta["format_version"] == 1 and meta["artifact"] == fmt and meta["package_version"] == dcc.__version__
    assert meta["inputs"] == [{"name": "features", "key": ["features"], "dtype": "float32", "shape": ["batch", 8]}]
    tasks = {t["path"]: t for t in meta["tasks"]}
    assert list(tasks) == list(flow.graph.paths)
    assert tasks["door_locked"]["precondition"] == "~out.door_open"
    assert tasks["door_locked"]["precondition_tree"] == {"op": "and", "operands": [{"task": "door_open", "negated": True}]}
    # its own conditions: person_present applying (door open, camera not blocked) is part of out.person_present
    assert tasks[FACE + "face_x1"]["precondition"] == "out.person_present"
    assert tasks[FACE + "face_x1"]["scale"] == 64.0 and tasks[FACE + "face_x1"]["decoder"] == {"type": "ScaleDecoder",
                                                                                              "scale": 64.0}
    assert tasks["camera_blocked"]["decoder"]["threshold"] == flow.get_decoder().params()["camera_blocked"]["threshold"]
    assert tasks[BODY + "shirt_type"]["class_names"] == flow.graph.leaf(BODY + "shirt_type").task.class_names
    assert tasks[BODY + "shirt_type"]["kind"] == "ClassificationTask"
    assert tasks["door_open"]["outputs"] == {"decoded": "door_open.decoded", "applies": "door_open.applies"}
    json.dumps(meta, allow_nan=False)


def test_onnx_metadata_is_in_metadata_props(security_artifacts):
    onnx = pytest.importorskip("onnx")
    _, _, paths = security_artifacts
    props = {p.key: p.value for p in onnx.load(paths["onnx"]).metadata_props}
    assert json.loads(props["dnn_cool_catalyst"])["flow"] == "full_flow"


def test_thresholds_are_constants_of_the_graph(security_artifacts, tmp_path):
    """Changing the decoders after export changes nothing in the artifact."""
    flow, model, paths = security_artifacts
    inputs = security_inputs(16)
    before = dcc.deploy.load(paths["onnx"])(inputs)
    params = flow.get_decoder().params()
    try:
        flow.get_decoder().load_tuned({"camera_blocked": {"threshold": 0.999}})
        after = dcc.deploy.load(paths["onnx"])(inputs)
    finally:
        flow.get_decoder().load_tuned(params)
    np.testing.assert_array_equal(before["camera_blocked"]["decoded"], after["camera_blocked"]["decoded"])


@pytest.fixture(scope="module")
def mlm_artifacts(tmp_path_factory):
    flow = mlm_flow()
    model = flow.torch().eval()
    directory = tmp_path_factory.mktemp("mlm")
    example = {"pooled": torch.zeros(2, 6), "tokens": torch.zeros(2, 5, 6)}
    return flow, model, {fmt: dcc.deploy.export(flow, model, directory / f"mlm.{fmt}", fmt, example) for fmt in FORMATS}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n", [1, 7, 64])
def test_masked_language_model_artifact_equals_eager(mlm_artifacts, fmt, n, assert_clear_decisions):
    flow, model, paths = mlm_artifacts
    rng = np.random.default_rng(n)
    inputs = {"pooled": rng.normal(size=(n, 6)).astype(np.float32), "tokens": rng.normal(size=(n, 5, 6)).astype(np.float32)}
    reference = eager(model, flow, inputs)
    assert_clear_decisions(flow, reference["activated"])
    result = dcc.deploy.load(paths[fmt])(inputs)
    assert_same(result, reference, flow)
    assert result["tokens"]["decoded"].shape == (n, 5, 3)
    if n == 64:
        assert reference["mask"]["tokens"].any() and not reference["mask"]["tokens"].all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_or_else_and_xor_preconditions(tmp_path, fmt, assert_clear_decisions):
    flow = algebra_flow()
    model = flow.torch().eval()
    path = dcc.deploy.export(flow, model, tmp_path / f"algebra.{fmt}", format=fmt)
    inputs = {"features": np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32) * 3}
    reference = eager(model, flow, inputs)
    assert_clear_decisions(flow, reference["activated"])
    assert_same(dcc.deploy.load(path)(inputs), reference, flow)
    for p in ("t_or", "t_xor", "inner.p"):  # each condition is true for some samples and false for others
        assert reference["mask"][p].any() and not reference["mask"][p].all(), p
    tasks = {t["path"]: t for t in dcc.deploy.read_metadata(path)["tasks"]}
    assert tasks["t_or"]["precondition"] == "out.b.or_else(out.c)"
    assert tasks["t_xor"]["precondition_tree"] == {"op": "and", "operands": [
        {"op": "xor", "operands": [{"task": "a", "negated": False}, {"task": "c", "negated": False}]}]}


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_fused_module_exports_as_the_unfused_one(tmp_path, fmt, assert_clear_decisions):
    from dnn_cool_catalyst.synthetic import generated_tasks

    flow = generated_tasks(16, features=4, seed=0).get_full_flow()
    model = flow.torch(fuse=True).eval()  # one GEMM for the 16 heads
    assert len(model.fused_heads) == 1
    path = dcc.deploy.export(flow, model, tmp_path / f"fused.{fmt}", format=fmt)  # example inputs inferred
    inputs = {"features": np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32) * 3}
    reference = eager(model, flow, inputs)
    assert_clear_decisions(flow, reference["activated"])
    assert_same(dcc.deploy.load(path)(inputs), reference, flow)
    plain = generated_tasks(16, features=4, seed=0).get_full_flow()
    unfused = eager(plain.torch().eval(), plain, inputs)
    for p in flow.graph.paths:
        assert torch.equal(unfused["mask"][p], reference["mask"][p]), p


# ---- errors ----------------------------------------------------------------------------------------
def _one_task_flow(task):
    tasks = dcc.Tasks([task])

    @tasks.add_flow
    def only(flow, x, out):
        out += getattr(flow, task.name)(x.features)
        return out

    return tasks.get_full_flow()


def test_a_decoder_that_fails_names_the_task(tmp_path):
    task = dcc.Task(name="depth", module=nn.Linear(4, 1), loss=lambda y, t: (y - t) ** 2,
                    decoder=_ListDecoder())
    flow = _one_task_flow(task)
    with pytest.raises(DeployError, match=r"task 'depth' \(Task\) cannot be exported: its decoder returned a list"):
        dcc.deploy.export(flow, flow.torch(), tmp_path / "m.onnx")
    task.decoder = _RaisingDecoder()
    with pytest.raises(DeployError, match=r"task 'depth' \(Task\) cannot be exported: its activation or decoder "
                                          r"failed \(ValueError: needs a calibration table\)"):
        dcc.deploy.export(flow, flow.torch(), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_a_decoder_that_does_not_trace_names_the_task(tmp_path):
    task = dcc.Task(name="depth", module=nn.Linear(4, 1), loss=lambda y, t: (y - t) ** 2,
                    decoder=_BranchingDecoder())
    flow = _one_task_flow(task)
    with pytest.raises(DeployError, match=r"task 'depth' \(Task\) cannot be exported: .*does not trace"):
        dcc.deploy.export(flow, flow.torch(), tmp_path / "m.pt2", format="pt2")
    assert list(tmp_path.iterdir()) == []


class _ListDecoder(dcc.Decoder):
    def decode(self, activated):
        return activated.tolist()


class _RaisingDecoder(dcc.Decoder):
    def decode(self, activated):
        raise ValueError("needs a calibration table")


class _BranchingDecoder(dcc.Decoder):
    def decode(self, activated):
        if activated.sum() > 0:  # a Python branch on values: torch.export cannot trace it
            return activated * 2
        return activated


def test_example_inputs_are_needed_when_they_cannot_be_inferred(tmp_path):
    flow = _one_task_flow(dcc.BinaryClassificationTask("seen", nn.Sequential(nn.Conv1d(2, 1, 3), nn.Flatten())))
    with pytest.raises(DeployError, match=r"cannot infer the input x.features of task 'seen'.*example_inputs="):
        dcc.deploy.export(flow, flow.torch(), tmp_path / "m.onnx")

    class Backbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.flow = flow.torch()

        def forward(self, x):
            return self.flow(x)

    with pytest.raises(DeployError, match="cannot infer the inputs of a Backbone.*example_inputs="):
        dcc.deploy.export(flow, Backbone(), tmp_path / "m.onnx")


def test_inferred_example_inputs_follow_the_linear_heads():
    flow = algebra_flow(width=5)
    x = infer_example_inputs(flow, flow.torch())
    assert list(x) == ["features"] and tuple(x["features"].shape[1:]) == (5,)


def test_unknown_format_and_bad_example_inputs(tmp_path):
    flow = algebra_flow()
    with pytest.raises(DeployError, match="format must be one of"):
        dcc.deploy.export(flow, flow.torch(), tmp_path / "m", format="tflite")
    with pytest.raises(DeployError, match="the same batch size"):
        dcc.deploy.export(flow, flow.torch(), tmp_path / "m", example_inputs={"features": torch.zeros(2, 4),
                                                                                "other": torch.zeros(3, 4)})
    with pytest.raises(DeployError, match="model failed on the example inputs"):
        dcc.deploy.export(flow, flow.torch(), tmp_path / "m", example_inputs={"features": torch.zeros(2, 7)})


def token_flow(width=4, classes=3):
    """has_entities per sample; is_entity per token | out.has_entities; entity_type per token |
    out.is_entity (element_dims=1)."""
    torch.manual_seed(0)
    tasks = dcc.Tasks([dcc.BinaryClassificationTask("has_entities", nn.Linear(width, 1)),
                       dcc.BinaryClassificationTask("is_entity", nn.Linear(width, 1), element_dims=1),
                       dcc.ClassificationTask("entity_type", nn.Linear(width, classes), element_dims=1,
                                              class_names=["PER", "LOC", "ORG"])])

    @tasks.add_flow
    def tagging(flow, x, out):
        out += flow.has_entities(x.pooled)
        out += flow.is_entity(x.tokens) | out.has_entities
        out += flow.entity_type(x.tokens) | out.is_entity
        return out

    return tasks.get_full_flow()


def token_inputs(n, t, seed):
    rng = np.random.default_rng(seed)
    elements = np.ones((n, t), dtype=bool)
    elements[0, t // 2:] = False  # sample 0 is padded
    return {"tokens": (rng.normal(size=(n, t, 4)) * 3).astype(np.float32),
            "pooled": (rng.normal(size=(n, 4)) * 3).astype(np.float32), "elements": elements}


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_per_token_flow_exports_with_a_dynamic_sequence_length(tmp_path, fmt, assert_clear_decisions):
    flow = token_flow()
    model = flow.torch().eval()
    example = {k: torch.as_tensor(v) for k, v in token_inputs(2, 5, seed=0).items()}
    path = dcc.deploy.export(flow, model, tmp_path / f"tokens.{fmt}", format=fmt, example_inputs=example)
    meta = dcc.deploy.read_metadata(path)
    assert {i["name"]: i["shape"] for i in meta["inputs"]} == {
        "tokens": ["batch", "elements", 4], "pooled": ["batch", 4], "elements": ["batch", "elements"]}
    assert [t["element_dims"] for t in meta["tasks"]] == [0, 1, 1]
    deployed = dcc.deploy.load(path)
    for n, t, seed in ((9, 5, 1), (16, 11, 2)):  # other batch sizes and sequence lengths than the example's
        inputs = token_inputs(n, t, seed)
        reference = eager(model, flow, inputs)
        assert_clear_decisions(flow, reference["activated"])
        result = deployed(inputs)
        assert_same(result, reference, flow)  # `applies` per token: padding never applies
        assert result["is_entity"]["applies"].shape == (n, t) and not result["is_entity"]["applies"][0, t // 2:].any()
        assert result["entity_type"]["classes"].shape == (n, t, 3)
        assert reference["mask"]["entity_type"].any() and not reference["mask"]["entity_type"].all()
    bad = token_inputs(3, 5, seed=3)
    bad["elements"] = bad["elements"][:, :4]
    with pytest.raises(DeployError, match="'elements' has sequences of length 4, 'tokens' 5"):
        deployed(bad)


def test_element_inputs_are_checked(tmp_path):
    flow = token_flow()
    model = flow.torch().eval()
    example = {k: torch.as_tensor(v) for k, v in token_inputs(2, 5, seed=0).items()}
    with pytest.raises(DeployError, match="element_inputs 'words' are not inputs of the artifact"):
        dcc.deploy.export(flow, model, tmp_path / "a.onnx", example_inputs=example, element_inputs=["words"])
    with pytest.raises(DeployError, match="must share their sequence length .dimension 1., got tokens .2, 5, 4., pooled"):
        dcc.deploy.export(flow, model, tmp_path / "a.onnx", example_inputs=example, element_inputs=["tokens", "pooled"])
    short = {**example, "elements": example["elements"][:, :1], "tokens": example["tokens"][:, :1]}
    with pytest.raises(DeployError, match="give at least 2 positions"):
        dcc.deploy.export(flow, model, tmp_path / "a.onnx", example_inputs=short)
    uneven = {**example, "elements": example["elements"][:, :4]}
    with pytest.raises(DeployError, match="must share their sequence length"):
        dcc.deploy.export(flow, model, tmp_path / "a.onnx", example_inputs=uneven)
