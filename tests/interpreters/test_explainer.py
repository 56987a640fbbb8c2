"""`flow.get_treelib_explainer()`: pruning, nesting, tag format (`ITask.describe`), plain treelib trees."""
import pytest
import torch
from torch import nn
from treelib import Tree

import dnn_cool_catalyst as dcc
from dnn_cool_catalyst.story import security_tasks

FACE = "person_regression.face_regression"
BODY = "person_regression.body_regression"


def _outputs(n=40, seed=0):
    torch.manual_seed(seed)
    flow = security_tasks(features=8).get_full_flow()
    with torch.no_grad():
        out = flow.torch().eval()({"features": torch.randn(n, 8) * 3})
    return flow, out


def test_one_tree_per_sample_pruned_where_masks_are_false():
    flow, out = _outputs(60)
    trees = flow.get_treelib_explainer()(out)
    assert len(trees) == 60 and all(isinstance(t, Tree) for t in trees)
    for i, tree in enumerate(trees):
        shown = {p for p in flow.graph.paths if tree.contains(p)}
        assert shown == {p for p in flow.graph.paths if bool(out["mask"][p][i])}
        assert tree[tree.root].tag == f"inp {i}"
    sizes = {len(t) for t in trees}
    assert min(sizes) == 2 and max(sizes) > 10  # the camera alone, and whole trees


def test_nesting_follows_conditions_and_flows():
    flow, out = _outputs(60)
    full = [i for i in range(60) if bool(out["mask"][f"{FACE}.face_x1"][i])]
    blocked = [i for i in range(60) if not bool(out["mask"]["door_open"][i])]
    assert full and blocked
    trees = flow.get_treelib_explainer()(out)
    tree = trees[full[0]]
    parent = {nid: (tree.parent(nid).identifier if tree.parent(nid) else None) for nid in tree.nodes}
    assert parent["camera_blocked"] == "/"
    assert parent["door_open"] == "camera_blocked"
    assert parent["person_present"] == "door_open"
    assert parent["person_regression"] == "person_present"
    assert parent[FACE] == "person_regression" and parent[BODY] == "person_regression"
    assert parent[f"{FACE}.face_x1"] == FACE and parent[f"{BODY}.shirt_type"] == BODY
    assert tree[FACE].tag == "face_regression"
    assert [n.identifier for n in trees[blocked[0]].all_nodes()] == ["/", "camera_blocked"]


def test_tags_show_decoded_activated_and_logits_per_kind():
    flow, out = _outputs(20)
    out["mask"] = {p: torch.ones(20, dtype=torch.bool) for p in flow.graph.paths}  # every tree shows every task
    tree = flow.get_treelib_explainer(top_k=2)(out)[3]
    a, z = out["activated"], out["logits"]
    d = bool(out["decoded"]["door_open"][3])
    q = float(a["door_open"][3])
    assert tree["door_open"].tag == (f"door_open | decoded: [{d} ({q:.4g} {'>' if q > 0.5 else '<='} 0.5)], "
                                     f"logits: [{float(z['door_open'][3]):.4g}]")
    x1 = f"{FACE}.face_x1"
    assert tree[x1].tag.startswith(f"face_x1 | decoded: [{float(out['decoded'][x1][3]):.4g}], ")
    probs = a[f"{BODY}.shirt_type"][3]
    top = torch.argsort(probs, descending=True)[:2].tolist()
    names = [flow.tasks[f"{BODY}.shirt_type"].class_names[k] for k in top]
    assert tree[f"{BODY}.shirt_type"].tag.startswith(
        f"shirt_type | decoded: [{names[0]}, {names[1]}], activated: [{float(probs[top[0]]):.4g}, "
        f"{float(probs[top[1]]):.4g}], logits: [")
    facial = tree[f"{FACE}.facial_characteristics"].tag
    flags = out["decoded"][f"{FACE}.facial_characteristics"][3].tolist()
    assert facial.startswith(f"facial_characteristics | decoded: [glasses: {flags[0]} (")
    assert f"), beard: {flags[1]} (" in facial and f"), hat: {flags[2]} (" in facial and "], logits: [" in facial


def test_numpy_outputs_ids_and_outputs_without_masks():
    flow, out = _outputs(10)
    np_out = {k: {p: v.numpy() for p, v in d.items()} for k, d in out.items()}
    explain = flow.get_treelib_explainer(root_format="sample {}")
    trees = explain(np_out, ids=[f"img{i}.png" for i in range(10)])
    assert trees[4][trees[4].root].tag == "sample img4.png"
    reference = [t.show(stdout=False) for t in flow.get_treelib_explainer()(out)]
    only_logits = flow.get_treelib_explainer()({"logits": out["logits"]})
    assert [t.show(stdout=False) for t in only_logits] == reference
    with pytest.raises(ValueError, match="3 ids for 10 samples"):
        explain(out, ids=[1, 2, 3])
    with pytest.raises(TypeError, match="outputs of flow.torch"):
        explain(out["logits"])


def test_custom_and_sequence_tasks_are_formatted_generically():
    tasks = dcc.Tasks([
        dcc.BinaryClassificationTask("gate", nn.Linear(4, 1)),
        dcc.MaskedLanguageModelingTask("mlm", nn.Sequential(nn.Linear(4, 5 * 7), nn.Unflatten(1, (5, 7)))),
        dcc.Task(name="depth", module=nn.Linear(4, 2), loss=lambda z, y: (z - y.nan_to_num()) ** 2),
    ])

    @tasks.add_flow
    def flow(flow, x, out):
        out += flow.gate(x.f)
        out += flow.mlm(x.f) | out.gate
        out += flow.depth(x.f)
        return out

    f = tasks.get_full_flow()
    with torch.no_grad():
        out = f.torch().eval()({"f": torch.randn(3, 4)})
    out["mask"]["mlm"] = torch.ones(3, dtype=torch.bool)
    tree = f.get_treelib_explainer(max_values=3)(out)[0]
    assert tree.parent("mlm").identifier == "gate"
    mlm = tree["mlm"].tag
    top = out["decoded"]["mlm"][0, :3, 0].tolist()
    assert mlm.startswith(f"mlm | decoded: [{top[0]}, {top[1]}, {top[2]}, ... (5 values)], activated: [")
    d = out["decoded"]["depth"][0].tolist()
    assert tree["depth"].tag.startswith(f"depth | decoded: [{d[0]:.4g}, {d[1]:.4g}], activated: [")


def test_trees_are_ordinary_trees_built_through_the_public_api():
    """The same trees as `Tree.create_node` gives, node by node in flow order, and trees that can
    be edited like any other."""
    flow, out = _outputs(30)
    trees = flow.get_treelib_explainer()(out)
    for tree in trees:
        again = Tree()
        for nid in tree.expand_tree(mode=Tree.WIDTH, sorting=False):
            parent = tree.parent(nid)
            again.create_node(tree[nid].tag, nid, parent=parent.identifier if parent else None)
        assert tree.show(stdout=False) == again.show(stdout=False)
        assert tree.to_dict(with_data=False) == again.to_dict(with_data=False)
        assert {n: tree.level(n) for n in tree.nodes} == {n: again.level(n) for n in again.nodes}
    assert len({t.identifier for t in trees}) == len(trees)
    tree = trees[0]
    tree.create_node("extra", "extra", parent="camera_blocked")
    assert tree.parent("extra").identifier == "camera_blocked"
    assert "extra" in tree.show(stdout=False)
    assert tree.subtree("camera_blocked").root == "camera_blocked"


class _Depth(dcc.Task):
    """A task of the user's own that describes its outputs in its own words."""

    def describe(self, decoded, activated, logits=None, *, digits=4, max_values=16, top_k=3):
        import gc

        self.collector_was_on = gc.isenabled()
        return [f"{v:.1f} m" for v in decoded.reshape(-1)]


def _depth_flow(task):
    tasks = dcc.Tasks([dcc.BinaryClassificationTask("gate", nn.Linear(4, 1)), task])

    @tasks.add_flow
    def flow(flow, x, out):
        out += flow.gate(x.f)
        out += flow.depth(x.f) | out.gate
        return out

    return tasks.get_full_flow()


def test_a_task_describes_its_own_nodes_with_the_collector_left_on():
    """Tags come from `task.describe`; the explainer no longer switches the garbage collector
    off (process-wide) while it formats them."""
    import gc

    task = _Depth(name="depth", module=nn.Linear(4, 1), loss=lambda z, y: (z - y) ** 2)
    flow = _depth_flow(task)
    with torch.no_grad():
        out = flow.torch().eval()({"f": torch.randn(4, 4)})
    out["mask"]["depth"] = torch.ones(4, dtype=torch.bool)
    trees = flow.get_treelib_explainer()(out)
    assert [t["depth"].tag for t in trees] == [f"depth | {float(v):.1f} m" for v in out["decoded"]["depth"]]
    assert task.collector_was_on and gc.isenabled()


def test_a_description_per_sample_is_required():
    class Short(_Depth):
        def describe(self, decoded, activated, logits=None, **options):
            return ["one"]

    flow = _depth_flow(Short(name="depth", module=nn.Linear(4, 1), loss=lambda z, y: (z - y) ** 2))
    with torch.no_grad():
        out = flow.torch().eval()({"f": torch.randn(3, 4)})
    with pytest.raises(ValueError, match=r"task 'depth': describe\(\) returned 1 texts for 3 samples"):
        flow.get_treelib_explainer()(out)


def test_thresholded_nodes_show_the_tuned_threshold():
    flow, out = _outputs(20)
    out["mask"] = {p: torch.ones(20, dtype=torch.bool) for p in flow.graph.paths}
    facial = f"{FACE}.facial_characteristics"
    explain = flow.get_treelib_explainer()  # built before tuning: the tags read the thresholds when called
    flow.get_decoder().load_tuned({"door_locked": {"threshold": 0.0297},
                                   facial: {"threshold": [0.42, 0.5, 0.9]}})
    a = out["activated"]
    i = 3
    p = float(a["door_locked"][i])
    decoded = bool(out["decoded"]["door_locked"][i])
    tag = explain(out)[i]["door_locked"].tag
    assert tag == (f"door_locked | decoded: [{decoded} ({p:.4g} {'>' if p > 0.0297 else '<='} 0.0297)], "
                   f"logits: [{float(out['logits']['door_locked'][i]):.4g}]")
    probs = a[facial][i].tolist()
    flags = out["decoded"][facial][i].tolist()
    parts = [f"{name}: {flag} ({q:.4g} {'>' if q > t else '<='} {t:.4g})"
             for name, flag, q, t in zip(["glasses", "beard", "hat"], flags, probs, [0.42, 0.5, 0.9])]
    assert explain(out)[i][facial].tag.startswith(f"facial_characteristics | decoded: [{', '.join(parts)}], logits: [")
    # the comparison is the threshold's, the decision the outputs' (decoded before tuning here)
    q = [float(v) for v in a[facial][:, 2]]
    j = next(k for k, v in enumerate(q) if 0.5 < v <= 0.9)
    assert f"hat: True ({q[j]:.4g} <= 0.9)" in explain(out)[j][facial].tag


def test_untuned_thresholds_are_shown_too():
    flow, out = _outputs(5)
    out["mask"] = {p: torch.ones(5, dtype=torch.bool) for p in flow.graph.paths}
    tree = flow.get_treelib_explainer()(out)[0]
    assert " 0.5)], logits: [" in tree["door_open"].tag
    assert "glasses: " in tree[f"{FACE}.facial_characteristics"].tag
    assert tree[f"{FACE}.facial_characteristics"].tag.count(" 0.5)") == 3
