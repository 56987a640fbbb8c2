"""A small token-tagging flow with padding and per-token preconditions, and its metrics computed
by hand (loops over the tokens in numpy / scikit-learn): the reference of the per-token tests
(issue 17). Not a test module: test files load it with `load_token_tagging()` of their own (the
tests run with `--import-mode=importlib`, so test files do not import each other)."""
import math

import numpy as np
import torch
from sklearn import metrics as skm
from torch import nn

import dnn_cool_catalyst as dcc

D, C, L = 6, 4, 3  # features, entity types, token tags


def token_flow(seed=0):
    """has_entities per sample; is_entity per token | has_entities (per-sample condition broadcast);
    entity_type, is_person and tags per token | is_entity (per-token condition); span_score per
    token | has_entities."""
    torch.manual_seed(seed)
    tasks = dcc.Tasks([
        dcc.BinaryClassificationTask("has_entities", nn.Linear(D, 1)),
        dcc.BinaryClassificationTask("is_entity", nn.Linear(D, 1), element_dims=1),
        dcc.ClassificationTask("entity_type", nn.Linear(D, C), top_k=3, element_dims=1),
        dcc.BinaryClassificationTask("is_person", nn.Linear(D, 1), element_dims=1),
        dcc.BoundedRegressionTask("span_score", nn.Linear(D, 1), element_dims=1),
        dcc.MultilabelClassificationTask("tags", nn.Linear(D, L), element_dims=1),
    ])

    @tasks.add_flow
    def tagging(flow, x, out):
        out += flow.has_entities(x.pooled)
        out += flow.is_entity(x.tokens) | out.has_entities
        out += flow.entity_type(x.tokens) | out.is_entity
        out += flow.is_person(x.tokens) | out.is_entity
        out += flow.span_score(x.tokens) | out.has_entities
        out += flow.tags(x.tokens) | out.is_entity
        return out

    return tasks.get_full_flow()


def token_data(n, t, seed, missing=0.1):
    """Inputs with `x["elements"]` and labels: padding after each sample's length (NaN / -1 there),
    some labels missing inside too; is_entity and the other per-token tasks are labelled at every
    real token, also where their precondition is FALSE (the metrics must leave those out)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, t + 1, n)
    real = np.arange(t)[None, :] < lengths[:, None]
    x = {"tokens": torch.randn(n, t, D, generator=torch.Generator().manual_seed(seed)) * 2,
         "pooled": torch.randn(n, D, generator=torch.Generator().manual_seed(seed + 1)) * 2,
         "elements": torch.as_tensor(real)}

    def binary(shape, p_missing):
        v = rng.integers(0, 2, shape).astype(np.float32)
        v[rng.random(shape) < p_missing] = np.nan
        return v

    has = binary(n, missing)
    is_entity = binary((n, t), missing)
    etype = rng.integers(0, C, (n, t))
    etype[rng.random((n, t)) < missing] = -1
    person = binary((n, t), missing)
    span = rng.random((n, t)).astype(np.float32)
    span[rng.random((n, t)) < missing] = np.nan
    tags = rng.integers(0, 2, (n, t, L)).astype(np.float32)
    for v in (is_entity, person, span):
        v[~real] = np.nan
    etype[~real] = -1
    tags[~real] = np.nan
    y = {"has_entities": has, "is_entity": is_entity, "entity_type": etype, "is_person": person,
         "span_score": span, "tags": tags}
    return x, {k: torch.as_tensor(v) for k, v in y.items()}, real


def reference_masks(y, real):
    """Ground-truth preconditions by hand, per token (three-valued: a missing label is not FALSE)."""
    has = y["has_entities"].numpy()
    is_e = y["is_entity"].numpy()
    n, t = is_e.shape
    sample = ~(has == 0)  # NaN compares false: unknown is not FALSE
    pre = {"has_entities": np.ones(n, bool)}
    pre["is_entity"] = np.zeros((n, t), bool)
    pre["entity_type"] = np.zeros((n, t), bool)
    for i in range(n):
        for j in range(t):
            pre["is_entity"][i, j] = sample[i] and real[i, j]
            pre["entity_type"][i, j] = pre["is_entity"][i, j] and not is_e[i, j] == 0
    pre["is_person"] = pre["tags"] = pre["entity_type"]
    pre["span_score"] = pre["is_entity"]
    return pre


NAMES = {"entity_type": ("accuracy_1", "accuracy_3", "f1_score", "precision", "recall"),
         "span_score": ("mean_absolute_error",), "tags": ("accuracy", "f1_score")}
BINARY_NAMES = ("accuracy", "f1_score", "precision", "recall")


def reference_rows(activated, y, pre, tuned=None):
    """`{path: {metric: value}}` and `{path: count}`: every metric of the flow from token loops
    (NaN values where a task has no scored item)."""
    values, counts = {}, {}
    tuned = tuned or {}

    def nothing(path):
        counts[path] = 0
        values[path] = {k: math.nan for k in NAMES.get(path, BINARY_NAMES)}

    def binary(path, a, lab, sel):
        if not sel.any():
            return nothing(path)
        thr = tuned.get(path, 0.5)
        yt, yp = lab[sel].astype(int), (a[sel] > thr).astype(int)
        counts[path] = int(sel.sum())
        values[path] = {"accuracy": skm.accuracy_score(yt, yp),
                        "f1_score": skm.f1_score(yt, yp, zero_division=0),
                        "precision": skm.precision_score(yt, yp, zero_division=0),
                        "recall": skm.recall_score(yt, yp, zero_division=0)}

    has_a = activated["has_entities"].reshape(-1).numpy()
    has_y = y["has_entities"].numpy()
    binary("has_entities", has_a, has_y, pre["has_entities"] & ~np.isnan(has_y))
    for path in ("is_entity", "is_person"):
        a, lab = activated[path].numpy().reshape(y[path].shape), y[path].numpy()
        sel = np.zeros(lab.shape, bool)
        for i in range(lab.shape[0]):
            for j in range(lab.shape[1]):
                sel[i, j] = pre[path][i, j] and not np.isnan(lab[i, j])
        binary(path, a, lab, sel)
    # classification: top-k accuracy and macro scores over the labelled tokens in S_t
    probs, lab = activated["entity_type"].numpy(), y["entity_type"].numpy()
    items = [(probs[i, j], lab[i, j]) for i in range(lab.shape[0]) for j in range(lab.shape[1])
             if pre["entity_type"][i, j] and lab[i, j] >= 0]
    if not items:
        nothing("entity_type")
    else:
        counts["entity_type"] = len(items)
        ranked = [np.argsort(-p, kind="stable") for p, _ in items]
        truth = np.array([c for _, c in items])
        top1 = np.array([r[0] for r in ranked])
        values["entity_type"] = {f"accuracy_{k}": float(np.mean([c in r[:k] for r, (_, c) in zip(ranked, items)]))
                                 for k in (1, 3)}
        for kind, fn in (("f1_score", skm.f1_score), ("precision", skm.precision_score),
                         ("recall", skm.recall_score)):
            values["entity_type"][kind] = fn(truth, top1, average="macro", zero_division=0)
    # regression: MAE over the labelled tokens of S_t
    a, lab = activated["span_score"].numpy().reshape(y["span_score"].shape), y["span_score"].numpy()
    errs = [abs(float(a[i, j]) - float(lab[i, j])) for i in range(lab.shape[0]) for j in range(lab.shape[1])
            if pre["span_score"][i, j] and not np.isnan(lab[i, j])]
    counts["span_score"] = len(errs)
    values["span_score"] = {"mean_absolute_error": float(np.mean(errs)) if errs else math.nan}
    # multilabel per token: micro scores and element accuracy over the labelled (token, class) elements
    a, lab = activated["tags"].numpy(), y["tags"].numpy()
    thr = np.asarray(tuned.get("tags", 0.5))  # one per class once tuned
    toks = [(a[i, j] > thr, lab[i, j]) for i in range(lab.shape[0]) for j in range(lab.shape[1])
            if pre["tags"][i, j] and not np.isnan(lab[i, j]).all()]
    if not toks:
        nothing("tags")
        return values, counts
    counts["tags"] = len(toks)
    yp = np.array([p for p, _ in toks]).astype(int)
    yt = np.array([t for _, t in toks]).astype(int)
    values["tags"] = {"accuracy": float((yp == yt).mean()),
                      "f1_score": skm.f1_score(yt, yp, average="micro", zero_division=0)}
    return values, counts
