"""Per-token tasks with per-token preconditions (issue 17, point 1): labels `(N, T)`, masks per
token (broadcast from per-sample conditions, the `x["elements"]` padding marker), the loss as the
mean over the available tokens in `S_t` and per-sample losses, each against a hand-written
reference that loops over samples and tokens."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import dnn_cool_catalyst as dcc
from dnn_cool_catalyst.errors import FlowDefinitionError, InputError, LabelError
from dnn_cool_catalyst.functional import and_masks, element_rows, expand_mask

D, C = 6, 4


def token_tasks(seed=0):
    torch.manual_seed(seed)
    return dcc.Tasks([
        dcc.BinaryClassificationTask("has_entities", nn.Linear(D, 1)),
        dcc.BinaryClassificationTask("is_entity", nn.Linear(D, 1), element_dims=1),
        dcc.BinaryClassificationTask("is_verb", nn.Linear(D, 1), element_dims=1),
        dcc.ClassificationTask("entity_type", nn.Linear(D, C), element_dims=1),
        dcc.BoundedRegressionTask("span", nn.Linear(D, 1), element_dims=1),
        dcc.BinaryClassificationTask("sentiment", nn.Linear(D, 1)),
    ])


def token_flow(seed=0):
    tasks = token_tasks(seed)

    @tasks.add_flow
    def tagging(flow, x, out):
        out += flow.has_entities(x.pooled)
        out += flow.is_entity(x.tokens) | out.has_entities
        out += flow.is_verb(x.tokens)
        out += flow.entity_type(x.tokens) | out.is_entity
        out += flow.span(x.tokens) | out.is_entity.or_else(out.is_verb)
        out += flow.sentiment(x.pooled) | ~out.has_entities
        return out

    return tasks.get_full_flow()


# the reference: API.md section 4, element by element -------------------------------------------

TRUE, FALSE, UNKNOWN = 1, 0, -1


def value_of(applies, label):
    """`out.b` three-valued from b's mask and label (NaN: unknown)."""
    if not applies:
        return FALSE
    if math.isnan(label):
        return UNKNOWN
    return TRUE if label > 0.5 else FALSE


def kleene_or(a, b):
    if TRUE in (a, b):
        return TRUE
    if UNKNOWN in (a, b):
        return UNKNOWN
    return FALSE


def reference_masks(gt_has, gt_is, gt_verb, elements):
    """Nested loops: `{path: list of per-sample bools or per-token lists}` from ground truth."""
    n, t = gt_is.shape
    has = [True] * n
    is_e = [[value_of(has[i], gt_has[i]) != FALSE and elements[i][j] for j in range(t)] for i in range(n)]
    verb = [[bool(elements[i][j]) for j in range(t)] for i in range(n)]
    etype = [[value_of(is_e[i][j], gt_is[i][j]) != FALSE and elements[i][j] for j in range(t)] for i in range(n)]
    span = [[kleene_or(value_of(is_e[i][j], gt_is[i][j]), value_of(verb[i][j], gt_verb[i][j])) != FALSE
             and elements[i][j] for j in range(t)] for i in range(n)]
    sentiment = [has[i] and (math.isnan(gt_has[i]) or gt_has[i] < 0.5) for i in range(n)]
    return {"has_entities": has, "is_entity": is_e, "is_verb": verb, "entity_type": etype, "span": span,
            "sentiment": sentiment}


def batch(rng, n, t, missing=0.3):
    """Random inputs and labels; padding (`elements` false) carries the missing markers."""
    lengths = rng.integers(0, t + 1, size=n)
    elements = np.arange(t)[None, :] < lengths[:, None]

    def binary(shape):
        v = (rng.random(shape) < 0.5).astype(np.float32)
        v[rng.random(shape) < missing] = np.nan
        return v

    is_e, verb = binary((n, t)), binary((n, t))
    etype = rng.integers(0, C, size=(n, t))
    etype[rng.random((n, t)) < missing] = -1
    span = rng.random((n, t)).astype(np.float32)
    span[rng.random((n, t)) < missing] = np.nan
    for a, fill in ((is_e, np.nan), (verb, np.nan), (etype, -1), (span, np.nan)):
        a[~elements] = fill
    labels = {"has_entities": binary((n,)), "is_entity": is_e, "is_verb": verb, "entity_type": etype,
              "span": span, "sentiment": binary((n,))}
    x = {"tokens": torch.tensor(rng.normal(size=(n, t, D)), dtype=torch.float32),
         "pooled": torch.tensor(rng.normal(size=(n, D)), dtype=torch.float32),
         "elements": torch.tensor(elements)}
    return x, labels, elements


def as_targets(flow, labels):
    return {p: flow.graph.leaf(p).task.prepare_labels(v) for p, v in labels.items()}


def ce(z, y):
    return float(F.cross_entropy(torch.as_tensor(z)[None], torch.tensor([int(y)])))


def reference_terms(logits, labels, masks):
    """`{path: (sum, count)}` by loops over samples and tokens."""
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    bce = lambda z, y: -(y * math.log(sig(z)) + (1 - y) * math.log(1 - sig(z)))  # noqa: E731
    out = {}
    for p, m in masks.items():
        z, y = logits[p].detach().double().numpy(), labels[p]
        s, c = 0.0, 0
        for i in range(len(m)):
            cells = [(i, j) for j in range(len(m[i]))] if isinstance(m[i], list) else [(i,)]
            for pos in cells:
                if not (m[i][pos[1]] if len(pos) == 2 else m[i]):
                    continue
                yv = y[pos]
                if (p == "entity_type" and yv < 0) or (p != "entity_type" and math.isnan(yv)):
                    continue
                zv = z[pos]
                if p == "entity_type":
                    s += ce(zv, yv)
                elif p == "span":
                    s += (sig(float(zv.reshape(-1)[0])) - yv) ** 2
                else:
                    s += bce(float(np.asarray(zv).reshape(-1)[0]), yv)
                c += 1
        out[p] = (s, c)
    return out


def as_lists(mask):
    return [list(map(bool, row)) if np.ndim(row) else bool(row) for row in mask.numpy()]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 6), t=st.integers(1, 5))
def test_masks_loss_and_per_sample_loss_equal_the_token_loop(seed, n, t):
    rng = np.random.default_rng(seed)
    flow = token_flow()
    module = flow.torch()
    x, labels, elements = batch(rng, n, t)
    targets = as_targets(flow, labels)
    x["gt"] = {p: targets[p] for p in flow.graph.condition_paths}
    out = module(x)
    want = reference_masks(labels["has_entities"], labels["is_entity"], labels["is_verb"], elements)
    got = {p: out["mask"][p] for p in flow.graph.paths}
    for p in flow.graph.paths:
        g = got[p]
        if isinstance(want[p][0], list):
            g = expand_mask(g, torch.ones(n, t)).expand(n, t)
        assert as_lists(g) == want[p], p

    terms = flow.get_loss().terms(out, targets)
    ref = reference_terms(out["logits"], {p: np.asarray(v, dtype=np.float64) for p, v in labels.items()}, want)
    for p in flow.graph.paths:
        s, c = terms[p]
        assert int(c) == ref[p][1], p
        # float32 element losses summed in float32 against a float64 loop: a few ulps per element
        assert float(s.detach()) == pytest.approx(ref[p][0], rel=1e-5, abs=1e-5), p
    loss = flow.get_loss()(out, targets)
    expected = sum(s / max(c, 1) for s, c in ref.values())
    assert float(loss) == pytest.approx(expected, rel=1e-5, abs=1e-5)

    per_sample = flow.get_per_sample_loss()(out, targets)
    for p in ("entity_type", "span", "is_entity"):
        m = want[p]
        for i in range(n):
            row = reference_terms({p: out["logits"][p][i:i + 1]},
                                  {p: np.asarray(labels[p], dtype=np.float64)[i:i + 1]}, {p: [m[i]]})[p]
            if row[1] == 0:
                assert math.isnan(float(per_sample[p][i])), (p, i)
            else:
                assert float(per_sample[p][i]) == pytest.approx(row[0] / row[1], rel=1e-5, abs=1e-6), (p, i)


def test_tokens_outside_s_t_and_padding_get_exactly_zero_gradient():
    rng = np.random.default_rng(3)
    flow = token_flow()
    module = flow.torch()
    x, labels, elements = batch(rng, 5, 4)
    targets = as_targets(flow, labels)
    x["gt"] = {p: targets[p] for p in flow.graph.condition_paths}
    out = module(x)
    z = out["logits"]["entity_type"]
    z.retain_grad()
    flow.get_loss()(out, targets).backward()
    selected = (targets["entity_type"] >= 0) & expand_mask(out["mask"]["entity_type"], targets["entity_type"])
    assert (z.grad[~selected] == 0).all()
    assert (z.grad[selected].abs().sum(-1) > 0).all()
    assert not selected[~torch.tensor(elements)].any()  # padding is never selected


def test_inference_masks_follow_the_decoded_tokens_and_the_padding_marker():
    flow = token_flow()
    module = flow.torch().eval()
    rng = np.random.default_rng(1)
    x, _, elements = batch(rng, 4, 5)
    with torch.no_grad():
        out = module(x)
    is_e = out["decoded"]["is_entity"].squeeze(-1)
    has = out["decoded"]["has_entities"].reshape(-1)
    el = torch.tensor(elements)
    assert torch.equal(out["mask"]["is_entity"], el & has[:, None])
    assert torch.equal(out["mask"]["entity_type"], el & has[:, None] & is_e)
    verb = out["decoded"]["is_verb"].squeeze(-1)
    assert torch.equal(out["mask"]["span"], el & ((has[:, None] & is_e) | verb))
    assert torch.equal(out["mask"]["sentiment"], ~has)
    # without the padding marker every position exists
    x.pop("elements")
    with torch.no_grad():
        out = module(x)
    assert torch.equal(out["mask"]["entity_type"], has[:, None] & is_e)


def test_padding_reaches_a_token_task_whose_conditions_are_all_per_sample():
    tasks = token_tasks()

    @tasks.add_flow
    def f(flow, x, out):
        out += flow.has_entities(x.pooled)
        out += flow.sentiment(x.pooled)
        out += flow.span(x.tokens) | out.has_entities.or_else(out.sentiment)  # a compound: the sequential path
        out += flow.is_entity(x.tokens) | ~out.sentiment  # literals only: the one-pass path
        return out

    flow = tasks.get_full_flow()
    x, _, elements = batch(np.random.default_rng(2), 5, 3)
    with torch.no_grad():
        out = flow.torch().eval()(x)
    has, sent = out["decoded"]["has_entities"].reshape(-1), out["decoded"]["sentiment"].reshape(-1)
    el = torch.tensor(elements)
    assert torch.equal(out["mask"]["span"], el & (has | sent)[:, None])
    assert torch.equal(out["mask"]["is_entity"], el & ~sent[:, None])


def test_a_per_sample_task_cannot_take_a_per_token_condition():
    tasks = token_tasks()
    with pytest.raises(FlowDefinitionError, match=r"'sentiment'.*out\.is_entity.*element_dims=1"):
        @tasks.add_flow
        def bad(flow, x, out):
            out += flow.is_entity(x.tokens)
            out += flow.sentiment(x.pooled) | out.is_entity
            return out


def test_x_elements_is_reserved_and_checked():
    tasks = token_tasks()
    with pytest.raises(FlowDefinitionError, match="x.elements"):
        @tasks.add_flow
        def bad(flow, x, out):
            out += flow.is_entity(x.elements)
            return out
    flow = token_flow()
    x, _, _ = batch(np.random.default_rng(0), 3, 4)
    x["elements"] = x["elements"].float()
    with pytest.raises(InputError, match="x\\['elements'\\].*bool"):
        flow.torch().eval()(x)
    x["elements"] = torch.ones(3, 4, 2, dtype=torch.bool)
    with pytest.raises(InputError, match="shape \\(3, 4, 2\\)"):
        flow.torch().eval()(x)


def test_label_shapes_per_token():
    b = dcc.BinaryClassificationTask("tok", nn.Linear(D, 1), element_dims=1)
    assert b.prepare_labels(np.array([[1, 0, np.nan]])).shape == (1, 3)
    with pytest.raises(LabelError, match=r"'tok'.*\(N, T\)"):
        b.prepare_labels(np.zeros(3))
    with pytest.raises(LabelError, match=r"\[0, 2\] is 2.0"):
        b.prepare_labels(np.array([[1, 0, 2]]))
    plain = dcc.BinaryClassificationTask("plain", nn.Linear(D, 1))
    with pytest.raises(LabelError, match="element_dims=1"):
        plain.prepare_labels(np.zeros((2, 3)))
    c = dcc.ClassificationTask("cls", nn.Linear(D, C), element_dims=1)
    assert c.prepare_labels(np.array([[1.0, np.nan]])).tolist() == [[1, -1]]
    ml = dcc.MultilabelClassificationTask("ml", nn.Linear(D, 3), class_names=["a", "b", "c"], element_dims=1)
    assert ml.prepare_labels(np.zeros((2, 4, 3))).shape == (2, 4, 3)
    with pytest.raises(LabelError, match=r"\(N, T, 3\)"):
        ml.prepare_labels(np.zeros((2, 3)))
    r = dcc.BoundedRegressionTask("r", nn.Linear(D, 1), element_dims=1)
    with pytest.raises(LabelError, match=r"\[1, 0\] is 2.0"):
        r.prepare_labels(np.array([[0.5], [2.0]]))
    with pytest.raises(ValueError, match="element_dims"):
        dcc.BinaryClassificationTask("x", nn.Linear(D, 1), element_dims=-1)


def test_multilabel_per_token_loss_broadcasts_the_token_mask_over_classes():
    tasks = dcc.Tasks([dcc.BinaryClassificationTask("is_entity", nn.Linear(D, 1), element_dims=1),
                       dcc.MultilabelClassificationTask("attrs", nn.Linear(D, 3), element_dims=1)])

    @tasks.add_flow
    def f(flow, x, out):
        out += flow.is_entity(x.tokens)
        out += flow.attrs(x.tokens) | out.is_entity
        return out

    flow = tasks.get_full_flow()
    torch.manual_seed(0)
    x = {"tokens": torch.randn(2, 3, D)}
    is_e = torch.tensor([[1.0, 0.0, float("nan")], [0.0, 1.0, 1.0]])
    attrs = torch.tensor([[[1, 0, float("nan")], [1, 1, 1], [0, 0, 0]], [[1, 1, 1], [0, 1, 0], [1, 0, 1]]])
    x["gt"] = {"is_entity": is_e}
    out = flow.torch()(x)
    s, c = flow.get_loss().terms(out, {"is_entity": is_e, "attrs": attrs})["attrs"]
    keep = torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool)[..., None] & ~torch.isnan(attrs)
    z = out["logits"]["attrs"]
    ref = F.binary_cross_entropy_with_logits(z, attrs.nan_to_num(), reduction="none")[keep].sum()
    assert int(c) == int(keep.sum()) == 11
    assert float(s) == pytest.approx(float(ref), rel=1e-6)


def test_functional_helpers_align_masks_from_the_left():
    a = torch.tensor([True, False])
    b = torch.tensor([[True, True], [True, False]])  # N == T: right alignment would pair a with tokens
    assert and_masks(a, b).tolist() == [[True, True], [False, False]]
    assert and_masks(b, a).tolist() == [[True, True], [False, False]]
    mask, z, y = element_rows(1, a, torch.arange(12.0).reshape(2, 2, 3), torch.zeros(2, 2))
    assert mask.tolist() == [True, True, False, False] and z.shape == (4, 3) and y.shape == (4,)
    with pytest.raises(ValueError, match="element shape"):
        element_rows(1, a, torch.zeros(2, 2, 3), torch.zeros(2, 3))
    assert element_rows(0, a, torch.zeros(2))[0] is a


def test_dataset_carries_token_labels_the_padding_marker_and_gt():
    flow = token_flow()
    rng = np.random.default_rng(0)
    x, labels, elements = batch(rng, 6, 4)
    ds = flow.get_dataset({"tokens": x["tokens"].numpy(), "pooled": x["pooled"].numpy(), "elements": elements}, labels)
    loader = torch.utils.data.DataLoader(ds, batch_size=3)
    X, y = next(iter(loader))
    assert X["elements"].dtype == torch.bool and X["elements"].shape == (3, 4)
    assert X["gt"]["is_entity"].shape == (3, 4) and y["entity_type"].shape == (3, 4)
    out = flow.torch()(X)
    assert out["mask"]["entity_type"].shape == (3, 4)
    assert torch.isfinite(flow.get_loss()(out, y))


def test_fused_heads_and_torch_compile_on_a_token_flow():
    rng = np.random.default_rng(0)
    x, labels, _ = batch(rng, 5, 4)
    plain, fused = token_flow(0), token_flow(0)
    m1, m2 = plain.torch(), fused.torch(fuse=True)
    assert len(m2.fused_heads) == 2  # the token heads with one output, and the pooled ones
    m2.load_state_dict(m1.state_dict())
    targets = as_targets(plain, labels)
    x["gt"] = {p: targets[p] for p in plain.graph.condition_paths}
    o1, o2 = m1(x), m2(x)
    for p in plain.graph.paths:
        # one GEMM against several: the same products summed in another order
        torch.testing.assert_close(o1["logits"][p], o2["logits"][p], atol=1e-6, rtol=1e-6)
        assert torch.equal(o1["mask"][p], o2["mask"][p])
    torch.testing.assert_close(plain.get_loss()(o1, targets), fused.get_loss()(o2, targets), atol=1e-6, rtol=1e-6)
    x.pop("gt")
    m1.eval()
    compiled = torch.compile(m1, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        eager, traced = m1(x), compiled(x)
    for p in plain.graph.paths:
        assert torch.equal(eager["mask"][p], traced["mask"][p]), p
        assert torch.equal(eager["decoded"][p], traced["decoded"][p]), p
