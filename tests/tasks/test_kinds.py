"""Every task kind: labels and missing markers, loss finiteness, activation and decoding."""
import math
import warnings
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


def _squared_error(z, y):
    return (z.squeeze(-1) - torch.nan_to_num(y)) ** 2


def test_seed_task_fields_by_keyword():
    """The seed's `Task(name, labels, loss, per_sample_loss, available_func, inputs, activation,
    decoder, module, metrics)` raised on `labels=`. Its fields are accepted by keyword: labels and
    inputs ignored with a DeprecationWarning saying where they go, None activation/decoder = identity."""
    with pytest.warns(DeprecationWarning) as record:
        task = dcc.Task(name="depth", labels=np.zeros(4), loss=_squared_error, per_sample_loss=None,
                        available_func=lambda y: ~torch.isnan(y), inputs="features", activation=None,
                        decoder=None, module=nn.Linear(4, 1), metrics=())
    messages = [str(w.message) for w in record]
    assert any("labels=" in m and "'depth'" in m and "flow.get_dataset" in m for m in messages)
    assert any("inputs=" in m and "flow.<task>(x.features)" in m for m in messages)
    assert all(w.filename == __file__ for w in record)  # attributed to the caller's line
    assert task.labels is None and task.inputs is None  # nothing kept
    z = torch.randn(3, 1)
    assert torch.equal(task.activate(z), z) and torch.equal(task.decode(z), z)
    tasks = dcc.Tasks([task])

    @tasks.add_flow
    def f(flow, x, out):
        out += flow.depth(x.features)
        return out

    x, y = f.get_dataset({"features": torch.randn(4, 4)}, {"depth": [1.0, float("nan"), 2.0, 3.0]})[[0, 1, 2, 3]]
    out = f.torch().eval()(x)
    assert torch.equal(out["decoded"]["depth"], out["logits"]["depth"])
    assert torch.isfinite(f.get_loss()(out, y))


def test_seed_task_positional_order_and_reduced_loss_are_named():
    """Positionally, the seed's Task took labels second (here: the module); a reduced loss
    (`nn.MSELoss()`, as a seed task could use) would average over samples outside S_t."""
    with pytest.raises(TypeError, match=r"'depth': module must be an nn.Module, got ndarray.*seed's Task took "
                                        r"labels there.*by keyword"):
        dcc.Task("depth", np.zeros(3), _squared_error)
    task = dcc.Task(name="depth", module=nn.Linear(4, 1), loss=nn.MSELoss())
    with pytest.raises(ValueError, match=r"'depth'.*one number for the whole batch.*reduction='none'"):
        task.elementwise_loss(torch.zeros(3, 1), torch.zeros(3, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the predefined kinds pass neither labels nor inputs
        _kinds()


KIND_NAMES = {"binary": "BinaryClassificationTask", "classification": "ClassificationTask",
              "multilabel": "MultilabelClassificationTask", "regression": "BoundedRegressionTask",
              "mlm": "MaskedLanguageModelingTask"}


@pytest.mark.parametrize("name", sorted(KIND_NAMES))
def test_each_kind_names_itself_stably(name):
    """`kind` is what export manifests record: the predefined kinds keep the names older manifests
    hold, set in their own class, not derived from a class name that a subclass changes."""
    task, _ = _kinds()[name]
    assert task.kind == KIND_NAMES[name] and "kind" in vars(type(task))


def test_replacing_the_loss_changes_the_loss_of_every_kind(kind):
    """Binary and bounded-regression tasks called the loss they were built with, whatever
    `task.loss` was replaced by (the replacement was silently ignored)."""
    task, raw = kind
    labels = task.prepare_labels(raw)
    logits = task.module(torch.randn(N, 4)).detach()
    before = task.elementwise_loss(logits, labels)
    before_per_sample = task.sample_loss(logits, labels)
    calls = []

    def doubled(z, y, original=task.loss):
        calls.append(1)
        return 2 * original(z, y)

    task.loss = doubled
    torch.testing.assert_close(task.elementwise_loss(logits, labels), 2 * before)
    torch.testing.assert_close(task.sample_loss(logits, labels), 2 * before_per_sample, equal_nan=True)
    assert calls


def test_replacing_the_loss_changes_the_flow_loss():
    task = dcc.BinaryClassificationTask("b", nn.Linear(4, 1))
    tasks = dcc.Tasks([task])

    @tasks.add_flow
    def f(flow, x, out):
        out += flow.b(x.f)
        return out

    x, y = f.get_dataset({"f": torch.randn(4, 4)}, {"b": [1.0, 0.0, float("nan"), 1.0]})[[0, 1, 2, 3]]
    out = f.torch().train()(x)
    before = f.get_loss()(out, y).detach()
    task.loss = lambda z, labels: torch.zeros_like(labels)
    assert float(f.get_loss()(out, y)) == 0.0 and float(before) > 0


@pytest.mark.parametrize("name", sorted(KIND_NAMES))
def test_describe_gives_one_text_per_sample(name):
    task, _ = _kinds()[name]
    with torch.no_grad():
        logits = task.module(torch.randn(N, 4))
        activated = task.activate(logits)
        decoded = task.decode(activated)
    texts = task.describe(decoded.numpy(), activated.numpy(), logits.numpy(), digits=3)
    assert len(texts) == N and all(t.startswith("decoded: [") for t in texts)
    assert all(", logits: [" in t for t in texts)
    without_logits = task.describe(decoded.numpy(), activated.numpy())
    assert len(without_logits) == N and not any("logits" in t for t in without_logits)


def test_describe_per_kind():
    k = _kinds()
    binary = k["binary"][0]
    binary.decoder.load_tuned({"threshold": 0.25})
    assert binary.describe(np.array([True, False]), np.array([0.3, 0.2], np.float32), np.array([-0.85, -1.4])) == [
        "decoded: [True (0.3 > 0.25)], logits: [-0.85]", "decoded: [False (0.2 <= 0.25)], logits: [-1.4]"]
    cls = k["classification"][0]  # class names "abcde"
    assert cls.describe(np.array([[4, 0, 1, 2, 3]]), np.array([[0.2, 0.1, 0.05, 0.05, 0.6]]), None, top_k=2) == [
        "decoded: [e, a], activated: [0.6, 0.2]"]
    multi = k["multilabel"][0]  # no class names: classes by index
    assert multi.describe(np.array([[True, False]]), np.array([[0.75, 0.5]], np.float32)) == [
        "decoded: [0: True (0.75 > 0.5), 1: False (0.5 <= 0.5)]"]
    reg = k["regression"][0]  # scale 20
    assert reg.describe(np.array([5.0]), np.array([0.25]), np.array([-1.0986])) == [
        "decoded: [5], activated: [0.25], logits: [-1.099]"]
    mlm = k["mlm"][0]  # the top token of each position, the first `max_values` positions
    decoded = np.array([[[7, 1], [3, 2], [9, 0]]])
    activated = np.zeros((1, 3, 10))
    activated[0, [0, 1, 2], [7, 3, 9]] = [0.5, 0.25, 0.125]
    assert mlm.describe(decoded, activated, None, max_values=2) == [
        "decoded: [7, 3, ... (3 values)], activated: [0.5, 0.25, ... (3 values)]"]
