"""Every task kind: labels and missing markers, loss finiteness, activation and decoding."""
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

import dnn_cool_catalyst as dcc

N = 6


def _kinds():
    mlm_head = nn.Sequential(nn.Linear(4, 3 * 10), nn.Unflatten(1, (3, 10)))
    return {
        "binary": (dcc.BinaryClassificationTask("b", nn.Linear(4, 1)),
                   np.array([0, 1, np.nan, 1, 0, np.nan], dtype=np.float32)),
        "classification": (dcc.ClassificationTask("c", nn.Linear(4, 5), class_names=list("abcde")),
                           np.array([0, 4, -1, 2, 3, -1])),
        "multilabel": (dcc.MultilabelClassificationTask("m", nn.Linear(4, 2)),
                       np.array([[0, 1], [np.nan, 1], [np.nan, np.nan], [1, 1], [0, 0], [np.nan, np.nan]], dtype=np.float32)),
        "regression": (dcc.BoundedRegressionTask("r", nn.Linear(4, 1), scale=20.0),
                       np.array([0.1, 0.9, np.nan, 0.5, 0.0, np.nan], dtype=np.float32)),
        "mlm": (dcc.MaskedLanguageModelingTask("t", mlm_head),
                np.array([[1, -100, 2], [-100, -100, 9], [-100] * 3, [0, 0, 0], [5, -100, -100], [-100] * 3])),
    }


@pytest.fixture(params=["binary", "classification", "multilabel", "regression", "mlm"])
def kind(request):
    return _kinds()[request.param]


def test_loss_finite_and_zero_grad_where_missing(kind):
    task, raw = kind
    labels = task.prepare_labels(raw)
    logits = task.module(torch.randn(N, 4)).detach().requires_grad_()
    elem = task.elementwise_loss(logits, labels)
    avail = task.available(labels)
    assert elem.shape == avail.shape and torch.isfinite(elem).all()
    (elem * avail).sum().backward()
    # samples 2 and 5 have no available element: their logits get exactly zero gradient
    assert not logits.grad[2].any() and not logits.grad[5].any()
    assert logits.grad[0].any()
    ps = task.sample_loss(logits.detach(), labels)
    assert ps.shape == (N,) and math.isnan(ps[2]) and math.isnan(ps[5]) and not math.isnan(ps[0])


def test_missing_marker_is_unavailable(kind):
    task, raw = kind
    avail = task.available(task.prepare_labels(raw)).reshape(N, -1).any(1)
    assert avail.tolist() == [True, True, False, True, True, False]


def test_decode_shapes(kind):
    task, raw = kind
    with torch.no_grad():
        activated = task.activate(task.module(torch.randn(N, 4)))
        decoded = task.decode(activated)
    assert decoded.shape[0] == N
    if isinstance(task, dcc.BoundedRegressionTask):
        torch.testing.assert_close(decoded, activated * 20.0)
    if isinstance(task, (dcc.BinaryClassificationTask, dcc.MultilabelClassificationTask)):
        assert torch.equal(decoded, activated > 0.5)
    if isinstance(task, dcc.ClassificationTask):
        assert decoded.shape == (N, 5) and torch.equal(decoded[:, 0], activated.argmax(-1))
    if isinstance(task, dcc.MaskedLanguageModelingTask):
        assert decoded.shape == (N, 3, 5) and torch.equal(decoded[..., 0], activated.argmax(-1))


def test_label_errors_name_the_task():
    k = _kinds()
    with pytest.raises(dcc.LabelError, match="'c'.*7"):
        k["classification"][0].prepare_labels([0, 7])
    with pytest.raises(dcc.LabelError, match="'r'.*scale"):
        k["regression"][0].prepare_labels([0.5, 3.0])
    with pytest.raises(dcc.LabelError, match=r"'b'.*\(N,\)"):
        k["binary"][0].prepare_labels(np.zeros((3, 2)))
    with pytest.raises(dcc.LabelError, match="'t'.*-100"):
        k["mlm"][0].prepare_labels([[1, -5]])
    with pytest.raises(dcc.LabelError, match="'m'.*numeric"):
        k["multilabel"][0].prepare_labels(np.array([["a", "b"]], dtype=object))
    nan_float = k["classification"][0].prepare_labels(np.array([1.0, np.nan]))
    assert nan_float.tolist() == [1, -1]


def test_custom_task_from_functions():
    task = dcc.Task(name="depth", module=nn.Linear(4, 1),
                    loss=lambda z, y: (z.squeeze(-1) - torch.nan_to_num(y)) ** 2)
    tasks = dcc.Tasks([task])

    @tasks.add_flow
    def f(flow, x, out):
        out += flow.depth(x.f)
        return out

    x, y = f.get_dataset({"f": torch.randn(4, 4)}, {"depth": [1.0, float("nan"), 2.0, 3.0]})[[0, 1, 2, 3]]
    out = f.torch().train()(x)
    z = out["logits"]["depth"].detach().squeeze(-1)
    expected = ((z[[0, 2, 3]] - torch.tensor([1.0, 2.0, 3.0])) ** 2).mean()
    torch.testing.assert_close(f.get_loss()(out, y).detach(), expected)


@pytest.mark.parametrize("value", [math.inf, -math.inf, 1e20, -1e20, 2.0 ** 60])
def test_float_class_labels_are_checked_before_the_int64_cast(value):
    """+inf or 1e20 was reported as "class index -9223372036854775808" (the int64 cast's garbage)."""
    k = _kinds()
    shown = repr(float(value))
    with pytest.raises(dcc.LabelError, match=rf"'c': class label {re.escape(shown)} at sample 2 .*2\*\*53"):
        k["classification"][0].prepare_labels(np.array([0.0, np.nan, value, 1.0]))
    with pytest.raises(dcc.LabelError, match=rf"'t': token label {re.escape(shown)} at \[1, 0\]"):
        k["mlm"][0].prepare_labels(np.array([[1.0, -100.0], [value, 2.0]]))
    assert k["mlm"][0].prepare_labels(np.array([[1.0, -100.0]])).tolist() == [[1, -100]]
