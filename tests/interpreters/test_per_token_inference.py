"""Per-token tasks (element_dims=1) at inference: the tree explainer, the filter, MC-dropout and
predict / infer, against hand-written references (plain loops over samples and tokens)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import dnn_cool_catalyst as dcc
from dnn_cool_catalyst import inference

D, C = 4, 3


def token_flow(dropout=0.0, per_sample_only=False):
    """has_entities per sample; is_entity per token | out.has_entities; entity_type per token |
    out.is_entity (or, with `per_sample_only`, | out.has_entities: a per-sample precondition)."""
    def head(out):
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(D, out)) if dropout else nn.Linear(D, out)

    tasks = dcc.Tasks([dcc.BinaryClassificationTask("has_entities", head(1)),
                       dcc.BinaryClassificationTask("is_entity", head(1), element_dims=1),
                       dcc.ClassificationTask("entity_type", head(C), element_dims=1,
                                              class_names=["PER", "LOC", "ORG"])])

    @tasks.add_flow
    def tagging(flow, x, out):
        out += flow.has_entities(x.pooled)
        out += flow.is_entity(x.tokens) | out.has_entities
        if per_sample_only:
            out += flow.entity_type(x.tokens) | out.has_entities
        else:
            out += flow.entity_type(x.tokens) | out.is_entity
        return out

    torch.manual_seed(0)
    return tasks.get_full_flow()


def logits_of(has, is_entity, seed=0):
    """Outputs with decisions set by hand: logit +2 for True, -2 for False (threshold 0.5)."""
    has, is_entity = np.asarray(has, dtype=bool), np.asarray(is_entity, dtype=bool)
    n, t = is_entity.shape
    rng = np.random.default_rng(seed)
    return {"logits": {
        "has_entities": torch.tensor(np.where(has, 2.0, -2.0)[:, None], dtype=torch.float32),
        "is_entity": torch.tensor(np.where(is_entity, 2.0, -2.0)[:, :, None], dtype=torch.float32),
        "entity_type": torch.tensor(rng.normal(size=(n, t, C)), dtype=torch.float32),
    }}


def nodes(tree):
    """`{node id: parent id}` of a tree, the root left out."""
    return {nid: tree.parent(nid).identifier for nid in tree.nodes if nid != tree.root}


# The explainer ---------------------------------------------------------------------------------


HAS = [True, False, True]
IS_ENTITY = [[True, False, True, True],
             [True, True, True, True],
             [False, False, False, False]]
ELEMENTS = [[True, True, True, False],  # sample 0: token 3 is padding
            [True, True, True, True],
            [True, True, True, True]]


def test_token_nodes_where_the_task_applies_padding_left_out():
    flow = token_flow()
    trees = flow.get_treelib_explainer()(logits_of(HAS, IS_ENTITY), elements=torch.tensor(ELEMENTS))
    assert nodes(trees[0]) == {
        "has_entities": "/",
        "is_entity[0]": "has_entities", "is_entity[1]": "has_entities", "is_entity[2]": "has_entities",
        "entity_type[0]": "is_entity[0]", "entity_type[2]": "is_entity[2]",
        "entity_type[pruned]": "has_entities",
    }
    # sample 1: has_entities is False, no token task applies anywhere
    assert nodes(trees[1]) == {"has_entities": "/"}
    # sample 2: is_entity applies at every token (each False), entity_type at none
    assert nodes(trees[2]) == {"has_entities": "/", **{f"is_entity[{t}]": "has_entities" for t in range(4)}}
    assert trees[0]["entity_type[pruned]"].tag == "entity_type | does not apply at 1 of 3 tokens: 1"
    assert trees[0]["is_entity[2]"].tag.startswith("is_entity[2] | decoded: [True (0.8808 > 0.5)]")
    assert trees[0]["entity_type[0]"].tag.startswith("entity_type[0] | decoded: [")


def test_padding_from_the_models_masks_counts_as_not_applying():
    flow = token_flow()
    x = {"tokens": torch.randn(3, 4, D), "pooled": torch.randn(3, D), "elements": torch.tensor(ELEMENTS)}
    model = flow.torch().eval()
    with torch.no_grad():
        out = model(x)
    trees = flow.get_treelib_explainer()(out)  # no elements=: the masks alone tell where a task applies
    for i, tree in enumerate(trees):
        mask = out["mask"]["is_entity"][i]
        shown = {t for t in range(4) if tree.contains(f"is_entity[{t}]")}
        assert shown == {t for t in range(4) if bool(mask[t])}
        if 0 < len(shown) < 4:
            absent = [t for t in range(4) if not bool(mask[t])]
            assert tree["is_entity[pruned]"].tag == (f"is_entity | does not apply at {len(absent)} of 4 tokens: "
                                                     + ", ".join(map(str, absent)))


def test_a_per_sample_mask_is_broadcast_over_the_tokens():
    flow = token_flow(per_sample_only=True)
    trees = flow.get_treelib_explainer()(logits_of(HAS, IS_ENTITY))  # masks computed: entity_type's is (N,)
    assert {nid for nid in nodes(trees[0]) if nid.startswith("entity_type")} == {f"entity_type[{t}]" for t in range(4)}
    assert nodes(trees[0])["entity_type[1]"] == "has_entities"
    assert nodes(trees[1]) == {"has_entities": "/"}


def test_long_token_lists_are_capped_into_the_summary():
    flow = token_flow()
    trees = flow.get_treelib_explainer(max_elements=2)(logits_of(HAS, IS_ENTITY), elements=torch.tensor(ELEMENTS))
    got = nodes(trees[0])
    assert {nid for nid in got if nid.startswith("is_entity")} == {"is_entity[0]", "is_entity[1]", "is_entity[pruned]"}
    assert trees[0]["is_entity[pruned]"].tag == ("is_entity | not shown: 1 more token where it applies "
                                                 "(max_elements=2): 2")
    one = nodes(flow.get_treelib_explainer(max_elements=1)(logits_of(HAS, IS_ENTITY), elements=torch.tensor(ELEMENTS))[0])
    assert {nid for nid in one if nid.startswith("entity_type")} == {"entity_type[0]", "entity_type[pruned]"}
    assert got["entity_type[0]"] == "is_entity[0]"
    assert got["entity_type[2]"] == "has_entities"  # its token's is_entity node is not shown


def test_mismatched_masks_and_elements_name_the_task():
    flow = token_flow()
    out = logits_of(HAS, IS_ENTITY)
    with pytest.raises(ValueError, match="is_entity"):
        flow.get_treelib_explainer()(out, elements=torch.ones(3, 5, dtype=torch.bool))
    out["mask"] = {"has_entities": torch.ones(3, dtype=torch.bool), "is_entity": torch.ones(3, 2, dtype=torch.bool),
                   "entity_type": torch.ones(3, 4, dtype=torch.bool)}
    with pytest.raises(ValueError, match="mask of task 'is_entity' has shape"):
        flow.get_treelib_explainer()(out)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4).flatmap(lambda n: st.integers(1, 5).flatmap(lambda t: st.tuples(
    st.lists(st.booleans(), min_size=n, max_size=n),
    st.lists(st.lists(st.booleans(), min_size=t, max_size=t), min_size=n, max_size=n),
    st.lists(st.lists(st.booleans(), min_size=t, max_size=t), min_size=n, max_size=n)))))
def test_nodes_match_a_loop_over_tokens(case):
    has, is_entity, elements = case
    flow = token_flow()
    trees = flow.get_treelib_explainer()(logits_of(has, is_entity), elements=torch.tensor(elements))
    for i, tree in enumerate(trees):
        expected = {"has_entities": "/"}
        existing = [t for t, e in enumerate(elements[i]) if e]
        if has[i]:
            for t in existing:
                expected[f"is_entity[{t}]"] = "has_entities"
            entity = [t for t in existing if is_entity[i][t]]
            for t in entity:
                expected[f"entity_type[{t}]"] = f"is_entity[{t}]"
            if entity and len(entity) < len(existing):
                expected["entity_type[pruned]"] = "has_entities"
        assert nodes(tree) == expected


# MC-dropout ------------------------------------------------------------------------------------


def token_inputs(n=5, t=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    elements = torch.ones(n, t, dtype=torch.bool)
    elements[0, 2:] = False
    elements[3, 1:] = False
    return {"tokens": torch.randn(n, t, D, generator=g) * 3, "pooled": torch.randn(n, D, generator=g) * 3,
            "elements": elements}


def test_mc_dropout_gives_per_token_statistics_and_applied_fractions():
    flow = token_flow(dropout=0.5)
    model = flow.torch()
    x = token_inputs()
    u = dcc.uncertainty.mc_dropout(model, x, n=12, seed=0, passes_per_forward=3)
    assert u["has_entities"]["applied"].shape == (5,)
    assert u["is_entity"]["entropy"].shape == (5, 4, 1)
    assert u["entity_type"]["entropy"].shape == (5, 4)
    assert u["entity_type"]["mean"].shape == (5, 4, C)
    # reference: the passes one at a time, the same dropout stream (passes_per_forward=1, same seed)
    ref = {"is_entity": torch.zeros(5, 4), "entity_type": torch.zeros(5, 4)}
    with dcc.uncertainty.mc_dropout_mode(model, seed=0), torch.no_grad():
        for _ in range(12):
            out = model(x)
            for p in ref:
                ref[p] += out["mask"][p].float()
    u1 = dcc.uncertainty.mc_dropout(model, x, n=12, seed=0, passes_per_forward=1)
    for p in ref:
        assert u1[p]["applied"].shape == (5, 4)
        assert torch.equal(u1[p]["applied"], ref[p] / 12)
        assert torch.all(u[p]["applied"][~x["elements"]] == 0)  # padding never applies
        assert torch.all(~u[p]["applies"][~x["elements"]])
        assert u[p]["applies"].shape == (5, 4)
    out = model.eval()(x)
    out["uncertainty"] = u
    trees = flow.get_treelib_explainer(uncertainty=True)(out, elements=x["elements"])
    for i, tree in enumerate(trees):
        for t in range(4):
            if tree.contains(f"is_entity[{t}]"):
                assert f"applied {float(u['is_entity']['applied'][i, t]):.4g}" in tree[f"is_entity[{t}]"].tag


# The filter ------------------------------------------------------------------------------------

NAN = float("nan")


def gt_reference(has, is_entity, elements, path):
    """Where a task applies from ground truth (API.md section 4), by hand, per sample and token: a
    condition holds where its label is 1 or missing (unknown), a task applies where every
    condition on its path holds; padding positions never apply."""
    n, t = len(has), len(elements[0])
    out = []
    for i in range(n):
        has_ok = has[i] != 0  # 1 or NaN
        for j in range(t):
            if not elements[i][j]:
                continue
            if path == "is_entity" and has_ok:
                out.append((i, j))
            if path == "entity_type" and has_ok and is_entity[i][j] != 0:
                out.append((i, j))
    return out


def labelled_case(has, is_entity, entity_type, elements, seed=3):
    flow = token_flow()
    n, t = len(has), len(elements[0])
    g = torch.Generator().manual_seed(seed)
    x = {"tokens": torch.randn(n, t, D, generator=g), "pooled": torch.randn(n, D, generator=g),
         "elements": torch.tensor(elements), "gt": {"has_entities": torch.tensor(has, dtype=torch.float32),
                                                    "is_entity": torch.tensor(is_entity, dtype=torch.float32)}}
    with torch.no_grad():
        out = flow.torch().eval()(x)
    y = {"has_entities": torch.tensor(has, dtype=torch.float32), "is_entity": torch.tensor(is_entity, dtype=torch.float32),
         "entity_type": torch.tensor(entity_type)}
    return flow, out, y


CASE = dict(has=[1.0, 0.0, NAN, 1.0],
            is_entity=[[1.0, 0.0, NAN, NAN], [1.0, 1.0, 0.0, 1.0], [1.0, NAN, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]],
            entity_type=[[2, 1, 0, -1], [0, 1, 2, 0], [1, -1, 2, 2], [-1, 0, -1, 1]],
            elements=[[True, True, True, False], [True] * 4, [True] * 4, [True] * 4])


@pytest.mark.parametrize("output", ["decoded", "activated", "logits"])
def test_filter_gives_the_selected_tokens_flattened(output):
    flow, out, y = labelled_case(**CASE)
    got = flow.get_filter(output=output)(out, y)
    for path in ("is_entity", "entity_type"):
        selected = [(i, j) for i, j in gt_reference(CASE["has"], CASE["is_entity"], CASE["elements"], path)
                    if bool(flow.graph.leaf(path).task.available(y[path][i, j]))]
        pred, labels = got[path]
        assert torch.equal(pred, torch.stack([out[output][path][i, j] for i, j in selected]))
        assert torch.equal(labels, torch.stack([y[path][i, j] for i, j in selected]))
    # by hand: entity_type applies at (0, 0) (is_entity 1), (0, 2) (is_entity unknown; (0, 3) is
    # padding), (2, 0), (2, 1) (has_entities unknown), (3, 1), (3, 2); (2, 1) and (3, 2) have no label
    assert got["entity_type"][1].tolist() == [2, 0, 1, 0]
    assert got["entity_type"][0].shape == (4, C)  # ranked classes, probabilities or logits per token
    assert got["is_entity"][1].shape == (9,)  # sample 0: tokens 0, 1; sample 2: 0, 2, 3; sample 3: all 4
    assert got["has_entities"][1].tolist() == [1.0, 0.0, 1.0]


def test_filter_takes_given_per_token_masks_and_predicted_preconditions():
    flow, out, y = labelled_case(**CASE)
    masks = {p: m.clone() for p, m in out["mask"].items()}
    masks["entity_type"][:] = False
    masks["entity_type"][1, 2] = True
    pred, labels = flow.get_filter()({**out, "mask": masks}, y)["entity_type"]
    assert labels.tolist() == [2] and torch.equal(pred, out["decoded"]["entity_type"][1, 2:3])
    got = flow.get_filter(preconditions="predicted")(out, y)["entity_type"]
    dec = out["decoded"]
    expected = [(i, j) for i in range(4) for j in range(4)
                if bool(dec["has_entities"][i, 0]) and bool(dec["is_entity"][i, j, 0]) and int(y["entity_type"][i, j]) != -1]
    assert got[1].tolist() == [int(y["entity_type"][i, j]) for i, j in expected]
    with pytest.raises(ValueError, match="mask of task 'is_entity' has shape"):
        flow.get_filter()({**out, "mask": {**masks, "is_entity": torch.ones(3, 4, dtype=torch.bool)}}, y)


labels01 = st.sampled_from([0.0, 1.0, NAN])


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4).flatmap(lambda n: st.integers(1, 4).flatmap(lambda t: st.tuples(
    st.lists(labels01, min_size=n, max_size=n),
    st.lists(st.lists(labels01, min_size=t, max_size=t), min_size=n, max_size=n),
    st.lists(st.lists(st.integers(-1, C - 1), min_size=t, max_size=t), min_size=n, max_size=n),
    st.lists(st.lists(st.booleans(), min_size=t, max_size=t), min_size=n, max_size=n)))))
def test_filter_matches_a_loop_over_tokens(case):
    has, is_entity, entity_type, elements = case
    flow, out, y = labelled_case(has, is_entity, entity_type, elements)
    got = flow.get_filter()(out, y)
    for path, present in (("is_entity", lambda v: v == v), ("entity_type", lambda v: v != -1)):
        selected = [(i, j) for i, j in gt_reference(has, is_entity, elements, path) if present(y[path][i, j].item())]
        pred, labels = got[path]
        assert labels.tolist() == [y[path][i, j].item() for i, j in selected]
        assert pred.shape[0] == len(selected)
        if selected:
            assert torch.equal(pred, torch.stack([out["decoded"][path][i, j] for i, j in selected]))


# predict / infer ---------------------------------------------------------------------------------


def token_data(n, t, seed, pad_from=None):
    """Inputs and labels of `n` samples of `t` tokens; sample 1 is padding from token `pad_from`."""
    g = torch.Generator().manual_seed(seed)
    elements = torch.ones(n, t, dtype=torch.bool)
    if pad_from is not None:
        elements[1, pad_from:] = False
    x = {"tokens": torch.randn(n, t, D, generator=g) * 3, "pooled": torch.randn(n, D, generator=g) * 3,
         "elements": elements}
    y = {"has_entities": torch.randint(0, 2, (n,), generator=g).float(),
         "is_entity": torch.where(elements, torch.randint(0, 2, (n, t), generator=g).float(), NAN),
         "entity_type": torch.where(elements, torch.randint(0, C, (n, t), generator=g), -1)}
    return x, y


def test_predict_and_infer_over_a_dataset_with_padding():
    flow = token_flow()
    model = flow.torch()
    x, y = token_data(7, 4, seed=0, pad_from=2)
    loader = torch.utils.data.DataLoader(flow.get_dataset(x, y), batch_size=3)
    result = inference.predict(model, flow, loader)
    with torch.no_grad():
        ref = model.eval()(x)  # the whole set in one batch, x["elements"] included
    assert result["logits"]["entity_type"].shape == (7, 4, C)
    assert result["decoded"]["is_entity"].shape == (7, 4, 1)
    for p in flow.graph.paths:
        assert torch.equal(result["mask"][p], ref["mask"][p].expand(result["mask"][p].shape))
        # equal up to float rounding: batches of 3 and one of 7 may take different kernels
        torch.testing.assert_close(result["logits"][p], ref["logits"][p], rtol=1e-5, atol=1e-6)
    assert not result["mask"]["is_entity"][1, 2:].any()  # padding never applies
    assert torch.equal(result["targets"]["entity_type"], y["entity_type"])
    arrays = inference.infer(model, flow, loader)
    assert arrays["mask"]["entity_type"].shape == (7, 4) and arrays["mask"]["entity_type"].dtype == np.bool_


def test_batches_of_different_lengths_are_padded_to_the_longest():
    flow = token_flow(dropout=0.3)
    model = flow.torch()
    (x1, y1), (x2, y2) = token_data(3, 2, seed=1), token_data(4, 5, seed=2, pad_from=3)
    result = inference.predict(model, flow, [(x1, y1), (x2, y2)], mc_samples=3, mc_seed=0)
    with torch.no_grad():
        first = model.eval()(x1)
    assert result["logits"]["entity_type"].shape == (7, 5, C)
    assert torch.equal(result["logits"]["entity_type"][:3, :2], first["logits"]["entity_type"])
    assert torch.equal(result["mask"]["is_entity"][:3, :2], first["mask"]["is_entity"].expand(3, 2))
    assert not result["mask"]["is_entity"][:3, 2:].any() and not result["mask"]["entity_type"][:3, 2:].any()
    assert torch.isnan(result["targets"]["is_entity"][:3, 2:]).all()
    assert (result["targets"]["entity_type"][:3, 2:] == -1).all()
    u = result["uncertainty"]["entity_type"]
    assert u["entropy"].shape == (7, 5) and u["applies"].shape == (7, 5)
    assert not u["applies"][:3, 2:].any() and (u["applied"][:3, 2:] == 0).all()
    # the filter over the joined predictions: the same tokens as over each batch alone
    whole = flow.get_filter()(result, result["targets"])["entity_type"]
    parts = [flow.get_filter()(inference.predict(model, flow, [b]), b[1])["entity_type"] for b in [(x1, y1), (x2, y2)]]
    assert torch.equal(whole[1], torch.cat([p[1] for p in parts]))


def test_other_shape_mismatches_between_batches_name_the_task():
    flow = token_flow()
    chunks = [{"has_entities": torch.zeros(2, 1)}, {"has_entities": torch.zeros(2, 2)}]
    with pytest.raises(ValueError, match="the logits of task 'has_entities' have different shapes"):
        inference.join_batches(chunks, flow.graph, "logits", "predict")
    chunks = [{"entity_type": torch.zeros(2, 3, C)}, {"entity_type": torch.zeros(2, 4, C + 1)}]
    with pytest.raises(ValueError, match="only its element dimensions may differ"):
        inference.join_batches(chunks, flow.graph, "logits", "predict")


def test_per_token_multilabel_and_regression_are_filtered_per_token():
    torch.manual_seed(0)
    tasks = dcc.Tasks([dcc.BinaryClassificationTask("is_entity", nn.Linear(D, 1), element_dims=1),
                       dcc.MultilabelClassificationTask("tags", nn.Linear(D, C), element_dims=1),
                       dcc.BoundedRegressionTask("pos", nn.Linear(D, 1), element_dims=1, scale=10.0)])

    @tasks.add_flow
    def spans(flow, x, out):
        out += flow.is_entity(x.tokens)
        out += flow.tags(x.tokens) | out.is_entity
        out += flow.pos(x.tokens) | out.is_entity
        return out

    flow = tasks.get_full_flow()
    n, t = 4, 3
    g = torch.Generator().manual_seed(5)
    is_entity = torch.tensor([[1.0, 0.0, NAN], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [NAN, 1.0, 0.0]])
    x = {"tokens": torch.randn(n, t, D, generator=g), "gt": {"is_entity": is_entity}}
    tags = torch.randint(0, 2, (n, t, C), generator=g).float()
    tags[0, 0] = NAN  # a token without any tag label
    tags[2, 1, 0] = NAN  # a token with one missing tag
    y = {"is_entity": is_entity, "tags": tags, "pos": torch.rand(n, t, generator=g)}
    with torch.no_grad():
        out = flow.torch().eval()(x)
    applies = [(i, j) for i in range(n) for j in range(t) if not is_entity[i, j] == 0]  # 1 or unknown
    rows = [(i, j) for i, j in applies if not torch.isnan(tags[i, j]).all()]
    pred, labels = flow.get_filter()(out, y)["tags"]
    assert torch.equal(pred, torch.stack([out["decoded"]["tags"][i, j] for i, j in rows]))
    assert torch.allclose(labels, torch.stack([tags[i, j] for i, j in rows]), equal_nan=True)
    pred, labels = flow.get_filter(elements=True)(out, y)["tags"]  # the present tag elements, flattened
    present = [(i, j, c) for i, j in rows for c in range(C) if not torch.isnan(tags[i, j, c])]
    assert labels.tolist() == [tags[i, j, c].item() for i, j, c in present]
    assert pred.tolist() == [bool(out["decoded"]["tags"][i, j, c]) for i, j, c in present]
    pred, labels = flow.get_filter()(out, y)["pos"]
    assert labels.tolist() == [y["pos"][i, j].item() for i, j in applies]
    assert torch.equal(pred, torch.stack([out["decoded"]["pos"][i, j] for i, j in applies]))
