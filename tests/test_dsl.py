"""Tracing flows into graphs: the three add_flow spellings, nesting, paths and every definition error."""
import pytest
import torch
from torch import nn

import dnn_cool_catalyst as dcc
from dnn_cool_catalyst import FlowDefinitionError


def _tasks(inputs=None):
    return dcc.Tasks([
        dcc.BinaryClassificationTask("camera_blocked", nn.Linear(4, 1)),
        dcc.BinaryClassificationTask("door_open", nn.Linear(4, 1)),
        dcc.BinaryClassificationTask("person_present", nn.Linear(4, 1)),
        dcc.BoundedRegressionTask("face_x1", nn.Linear(4, 1)),
        dcc.ClassificationTask("shirt", nn.Linear(4, 3)),
    ], inputs=inputs)


def test_three_spellings_and_nested_paths():
    tasks = _tasks()

    @tasks.add_flow
    def person_flow(flow, x, out):
        out += flow.person_present(x.features)
        out += flow.face_x1(x.face) | out.person_present
        return out

    @tasks.add_flow()
    def middle(flow, x, out):
        out += flow.door_open(x.features)
        out += flow.person_flow(x) | out.door_open
        return out

    def full(flow, x, out):
        out += flow.camera_blocked(x.features)
        out += flow.middle(x.sub) | (~out.camera_blocked)
        return out

    flow = tasks.add_flow(full, flow_name="full_flow")
    assert tasks.get_full_flow() is flow and flow.name == "full_flow"
    assert isinstance(person_flow, dcc.TaskFlow)
    g = flow.graph
    assert g.paths == ("camera_blocked", "middle.door_open", "middle.person_flow.person_present",
                       "middle.person_flow.face_x1")
    pre = {leaf.path: [str(lit) for lit in leaf.precondition] for leaf in g.leaves}
    assert pre == {
        "camera_blocked": [],
        "middle.door_open": ["~out.camera_blocked"],
        "middle.person_flow.person_present": ["~out.camera_blocked", "out.middle.door_open"],
        "middle.person_flow.face_x1": ["~out.camera_blocked", "out.middle.door_open",
                                       "out.middle.person_flow.person_present"],
    }
    keys = {leaf.path: leaf.input_key for leaf in g.leaves}
    assert keys["middle.person_flow.face_x1"] == ("sub", "face")
    assert keys["camera_blocked"] == ("features",)
    assert g.condition_paths == ("camera_blocked", "middle.door_open", "middle.person_flow.person_present")
    module = flow.torch()
    assert module.middle.person_flow.face_x1 is tasks["face_x1"].module
    assert flow.torch() is module


def test_and_of_conditions():
    tasks = _tasks()

    @tasks.add_flow
    def f(flow, x, out):
        out += flow.camera_blocked(x.features)
        out += flow.door_open(x.features)
        out += flow.face_x1(x.features) | (~out.camera_blocked & out.door_open)
        return out

    assert [str(l) for l in f.graph.leaf("face_x1").precondition] == ["~out.camera_blocked", "out.door_open"]


def _expect(tasks, func, *fragments):
    with pytest.raises(FlowDefinitionError) as info:
        tasks.add_flow(func)
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, msg
    return msg


def test_unknown_task_names_flow_and_close_match():
    def bad(flow, x, out):
        out += flow.door_opn(x.features)
        return out

    _expect(_tasks(), bad, "'bad'", "door_opn", "door_open")


def test_unknown_feature_with_declared_inputs():
    def bad(flow, x, out):
        out += flow.door_open(x.featurs)
        return out

    _expect(_tasks(inputs=["features"]), bad, "'bad'", "x.featurs", "'features'")


def test_condition_on_task_not_added_earlier():
    def bad(flow, x, out):
        out += flow.door_open(x.features) | out.camera_blocked
        out += flow.camera_blocked(x.features)
        return out

    _expect(_tasks(), bad, "'bad'", "out.camera_blocked", "added earlier")


def test_condition_on_itself():
    def bad(flow, x, out):
        out += flow.door_open(x.features) | out.door_open
        return out

    _expect(_tasks(), bad, "out.door_open")


def test_task_added_twice():
    def bad(flow, x, out):
        out += flow.door_open(x.features)
        out += flow.door_open(x.features)
        return out

    _expect(_tasks(), bad, "'bad'", "'door_open'", "twice")


def test_task_added_directly_and_inside_a_sub_flow():
    tasks = _tasks()

    @tasks.add_flow
    def person_flow(flow, x, out):
        out += flow.person_present(x.features)
        out += flow.door_open(x.features) | out.person_present
        return out

    def full_flow(flow, x, out):
        out += flow.door_open(x.features)
        out += flow.person_flow(x)
        return out

    _expect(tasks, full_flow, "'full_flow'", "'door_open'", "'person_flow.door_open'", "different names")
    assert "full_flow" not in tasks  # nothing registered


def test_same_task_in_two_sub_flows():
    tasks = _tasks()

    @tasks.add_flow
    def left(flow, x, out):
        out += flow.door_open(x.features)
        return out

    @tasks.add_flow
    def right(flow, x, out):
        out += flow.camera_blocked(x.features)
        out += flow.door_open(x.features) | ~out.camera_blocked
        return out

    def full_flow(flow, x, out):
        out += flow.left(x.a)
        out += flow.right(x.b)
        return out

    _expect(tasks, full_flow, "'door_open'", "'left.door_open'", "'right.door_open'", "different names")


def test_sub_flow_added_twice_under_one_parent():
    tasks = _tasks()

    @tasks.add_flow
    def person_flow(flow, x, out):
        out += flow.person_present(x.features)
        return out

    def full_flow(flow, x, out):
        out += flow.person_flow(x.left)
        out += flow.person_flow(x.right)
        return out

    _expect(tasks, full_flow, "'full_flow'", "'person_flow'", "twice", "different names")


def test_flow_nested_in_two_parents_of_the_full_flow():
    tasks = _tasks()

    @tasks.add_flow
    def person_flow(flow, x, out):
        out += flow.person_present(x.features)
        out += flow.face_x1(x.face) | out.person_present
        return out

    @tasks.add_flow
    def front(flow, x, out):
        out += flow.camera_blocked(x.features)
        out += flow.person_flow(x) | ~out.camera_blocked
        return out

    @tasks.add_flow
    def back(flow, x, out):
        out += flow.person_flow(x)
        return out

    def full_flow(flow, x, out):
        out += flow.front(x.front)
        out += flow.back(x.back)
        return out

    msg = _expect(tasks, full_flow, "'person_flow'", "'front.person_flow'", "'back.person_flow'",
                  "'person_present'", "different names")
    assert "front.person_flow.person_present" in msg and "back.person_flow.person_present" in msg
    # each parent alone is fine, and so is the flow beside a task it does not contain
    assert front.graph.paths == ("camera_blocked", "person_flow.person_present", "person_flow.face_x1")

    @tasks.add_flow
    def fine(flow, x, out):
        out += flow.door_open(x.features)
        out += flow.front(x)
        return out

    assert len(set(map(id, (leaf.task for leaf in fine.graph.leaves)))) == len(fine.graph.leaves)


def test_non_binary_condition():
    def bad(flow, x, out):
        out += flow.shirt(x.features)
        out += flow.door_open(x.features) | out.shirt
        return out

    _expect(_tasks(), bad, "'bad'", "out.shirt", "binary")


def test_flow_used_as_condition():
    tasks = _tasks()

    @tasks.add_flow
    def inner(flow, x, out):
        out += flow.door_open(x.features)
        return out

    def bad(flow, x, out):
        out += flow.inner(x)
        out += flow.camera_blocked(x.features) | out.inner
        return out

    _expect(tasks, bad, "out.inner", "flow")


def test_missing_return_and_dangling_call_and_bool():
    def no_return(flow, x, out):
        out += flow.door_open(x.features)

    _expect(_tasks(), no_return, "return out")

    def dangling(flow, x, out):
        out += flow.door_open(x.features)
        flow.camera_blocked(x.features)
        return out

    _expect(_tasks(), dangling, "camera_blocked", "never added")

    def python_if(flow, x, out):
        out += flow.door_open(x.features)
        if out.door_open:
            out += flow.camera_blocked(x.features)
        return out

    _expect(_tasks(), python_if, "truth value")

    def negate_and(flow, x, out):
        out += flow.camera_blocked(x.features)
        out += flow.door_open(x.features)
        out += flow.face_x1(x.features) | ~(out.camera_blocked & out.door_open)
        return out

    _expect(_tasks(), negate_and, "~")


def test_duplicate_registration_and_empty_registry():
    tasks = _tasks()
    with pytest.raises(FlowDefinitionError, match="door_open"):
        tasks.add_task(dcc.BinaryClassificationTask("door_open", nn.Linear(4, 1)))
    with pytest.raises(FlowDefinitionError, match="no flow"):
        dcc.Tasks().get_full_flow()
    with pytest.raises(ValueError, match="identifier"):
        dcc.BinaryClassificationTask("door open", nn.Linear(4, 1))
    with pytest.raises(ValueError, match="reserved"):
        dcc.BinaryClassificationTask("gt", nn.Linear(4, 1))


def test_flow_pickles_without_function():
    import pickle

    tasks = _tasks()

    @tasks.add_flow
    def f(flow, x, out):
        out += flow.door_open(x.features)
        return out

    g = pickle.loads(pickle.dumps(f))
    assert g.graph.paths == ("door_open",) and not hasattr(g, "func")


def _seed_imagenet_tasks():
    return dcc.Tasks([
        dcc.BinaryClassificationTask("camera_blocked", nn.Linear(4, 1)),
        dcc.BinaryClassificationTask("object_exists", nn.Linear(4, 1)),
        dcc.ClassificationTask("classifier", nn.Linear(4, 3)),
        dcc.BoundedRegressionTask("object_x", nn.Linear(4, 1)),
        dcc.BoundedRegressionTask("object_y", nn.Linear(4, 1)),
    ])


def test_seed_spelling_of_a_preconditioned_sub_flow_runs_end_to_end():
    """The seed README's imagenet example, spelled exactly as there: a sub-flow called with the
    single feature x.features, whose tasks read x.features. It traced, then failed at the first
    batch with "reads x.features.features"."""
    import numpy as np

    project = _seed_imagenet_tasks()

    @project.add_flow()
    def object_flow(flow, x, out):
        out += flow.classifier(x.features)
        out += flow.object_x(x.features)
        out += flow.object_y(x.features)
        return out

    @project.add_flow()
    def imagenet_flow(flow, x, out):
        out += flow.object_exists(x.features)
        out += flow.object_flow(x.features) | out.object_exists
        return out

    @project.add_flow
    def full_flow(flow, x, out):
        out += flow.camera_blocked(x.features)
        out += flow.imagenet_flow(x.features) | (~out.camera_blocked)
        return out

    flow = project.get_full_flow()
    pre = {leaf.path: [str(lit) for lit in leaf.precondition] for leaf in flow.graph.leaves}
    assert pre["imagenet_flow.object_flow.object_y"] == ["~out.camera_blocked", "out.imagenet_flow.object_exists"]
    n = 8
    features = torch.randn(n, 4)
    labels = {p: np.zeros(n) for p in flow.graph.paths}
    labels["camera_blocked"] = np.array([0, 1] * 4, dtype=float)
    labels["imagenet_flow.object_exists"] = np.ones(n)
    x, y = flow.get_dataset({"features": features}, labels)[list(range(n))]
    out = flow.torch().train()(x)
    # every head reads the one feature tensor
    torch.testing.assert_close(out["logits"]["imagenet_flow.object_flow.classifier"],
                               project["classifier"].module(features))
    torch.testing.assert_close(out["logits"]["camera_blocked"], project["camera_blocked"].module(features))
    assert out["mask"]["imagenet_flow.object_flow.object_x"].tolist() == [True, False] * 4
    assert torch.isfinite(flow.get_loss()(out, y))
