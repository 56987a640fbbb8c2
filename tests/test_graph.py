"""`graph`: the frozen graph a flow is traced into (paths, preconditions, input keys) and `lookup`."""
import dataclasses

import pytest
import torch
from torch import nn

import dnn_cool_catalyst as dcc
from dnn_cool_catalyst.graph import Literal, build_graph, lookup


def _graph():
    """`full`: blocked, then the flow `person` where not blocked; `person`: present, then x1 (read
    from `x.face`) where present. Entries as the tracer records them: (name, task, input key,
    own conditions, subgraph)."""
    blocked, present = (dcc.BinaryClassificationTask(n, nn.Linear(4, 1)) for n in ("blocked", "present"))
    x1 = dcc.BoundedRegressionTask("x1", nn.Linear(4, 1))
    person = build_graph("person", [("present", present, ("features",), (), None),
                                    ("x1", x1, ("face",), (Literal("present"),), None)])
    return build_graph("full", [("blocked", blocked, ("features",), (), None),
                                ("person", object(), (), (Literal("blocked", negated=True),), person)])


def test_leaves_carry_paths_inherited_preconditions_and_input_keys():
    g = _graph()
    assert g.paths == ("blocked", "person.present", "person.x1")
    assert g.leaf("blocked").precondition == ()
    assert g.leaf("person.present").precondition == (Literal("blocked", negated=True),)
    # a nested flow's condition comes first, then the leaf's own, with paths prefixed by the flow
    assert g.leaf("person.x1").precondition == (Literal("blocked", True), Literal("person.present"))
    assert g.leaf("person.x1").input_key == ("face",)
    assert g.condition_paths == ("blocked", "person.present")
    assert g.input_keys == (("features",), ("face",))


def test_nodes_form_the_tree_and_the_graph_is_frozen():
    g = _graph()
    assert [n.name for n in g.nodes] == ["blocked", "person"]
    person = g.nodes[1]
    assert person.is_flow and [c.path for c in person.children] == ["person.present", "person.x1"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.name = "other"


def test_unknown_leaf_names_the_flow_and_the_known_paths():
    with pytest.raises(KeyError, match=r"flow 'full' has no task 'person\.x2'.*person\.x1"):
        _graph().leaf("person.x2")


def test_literal_prefix_and_text():
    lit = Literal("present", negated=True).prefixed("person")
    assert lit == Literal("person.present", True) and str(lit) == "~out.person.present"


def test_lookup_follows_nested_keys_and_reports_the_first_missing_part():
    t = torch.zeros(2)
    x = {"a": {"b": t}, "f": t}
    assert lookup(x, ("a", "b")) == (2, t)
    assert lookup(x, ()) == (0, x)
    depth, node = lookup(x, ("a", "c"))
    assert depth == 1 and node is x["a"]
    assert lookup(x, ("f", "f")) == (2, t)  # a single feature passed to a sub-flow stands for {f: x.f}
    assert lookup(x, ("f", "g"))[0] == 1  # any other name inside it stays an error
