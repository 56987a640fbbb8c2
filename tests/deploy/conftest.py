"""Artifacts exported once per session (exporting takes tens of seconds): the tests only read
them, and each test that changes a flow or an artifact builds its own."""
import numpy as np
import pytest
import torch
from torch import nn

import dnn_cool_catalyst as dcc
from dnn_cool_catalyst import inference
from dnn_cool_catalyst.story import security_labels, security_tasks

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

FORMATS = ("onnx", "pt2")
SECURITY_WIDTH = 8


def eager(model, flow, inputs):
    """What `runner.predict` gives: the model in eval mode, the decoder, masks from the decoded
    predictions (`inference.predict`, which `FlowRunner.predict` calls)."""
    batch = {k: torch.as_tensor(v) for k, v in inputs.items()}
    return inference.predict(model, flow, [batch])


def assert_same(result, reference, flow):
    """Artifact == eager: exact for booleans and indices, 1e-5 (absolute) for regressions: the
    artifact's sigmoid and matmul run in onnxruntime's float32 kernels, which differ from torch's
    by a few ulps (~1e-7 relative); times the scale (64) that stays below 1e-5."""
    assert list(result) == list(flow.graph.paths)
    for path in flow.graph.paths:
        got, want = result[path]["decoded"], reference["decoded"][path].numpy()
        assert got.shape == want.shape, path
        if want.dtype.kind == "f":
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=path)
        else:
            np.testing.assert_array_equal(got, want, err_msg=path)
        np.testing.assert_array_equal(result[path]["applies"], reference["mask"][path].numpy(), err_msg=path)


def tuned_security():
    """The security flow (features of width 8) with thresholds tuned on labelled data."""
    torch.manual_seed(0)
    flow = security_tasks(features=SECURITY_WIDTH).get_full_flow()
    model = flow.torch().eval()
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(256, SECURITY_WIDTH)).astype(np.float32))
    with torch.no_grad():
        activated = model({"features": x})["activated"]
    flow.get_decoder().tune(activated, security_labels(256, seed=2, missing_rate=0.1))
    return flow, model


@pytest.fixture(scope="session")
def security_artifacts(tmp_path_factory):
    """`(flow, model, {format: path})` of the tuned security flow, exported in both formats."""
    flow, model = tuned_security()
    directory = tmp_path_factory.mktemp("security")
    paths = {fmt: str(dcc.deploy.export(flow, model, directory / f"security.{fmt}", format=fmt)) for fmt in FORMATS}
    return flow, model, paths


def security_inputs(n, seed=3):
    """Features spread wide enough that preconditions fail at every depth in 64 samples."""
    return {"features": (np.random.default_rng(seed).normal(size=(n, SECURITY_WIDTH)) * 2).astype(np.float32)}


def mlm_flow(hidden=6, vocab=11):
    """A masked-language-model flow: `has_text` on a pooled vector, token predictions `(N, T, V)`
    when there is text."""
    torch.manual_seed(0)
    tasks = dcc.Tasks([dcc.BinaryClassificationTask("has_text", nn.Linear(hidden, 1)),
                       dcc.MaskedLanguageModelingTask("tokens", nn.Linear(hidden, vocab), top_k=3)])

    @tasks.add_flow
    def text_flow(flow, x, out):
        out += flow.has_text(x.pooled)
        out += flow.tokens(x.tokens) | out.has_text
        return out

    return tasks.get_full_flow()


def algebra_flow(width=4):
    """A flow with `or_else`, `^` and a nested flow gated by a compound condition."""
    torch.manual_seed(0)
    tasks = dcc.Tasks([dcc.BinaryClassificationTask(n, nn.Linear(width, 1)) for n in ("a", "b", "c", "p")]
                      + [dcc.BoundedRegressionTask(n, nn.Linear(width, 1), scale=10.0) for n in ("t_or", "t_xor", "q")])

    @tasks.add_flow
    def inner(flow, x, out):
        out += flow.p(x.features)
        out += flow.q(x.features) | out.p
        return out

    @tasks.add_flow
    def full(flow, x, out):
        out += flow.a(x.features)
        out += flow.b(x.features) | ~out.a
        out += flow.c(x.features)
        out += flow.t_or(x.features) | out.b.or_else(out.c)
        out += flow.t_xor(x.features) | (out.a ^ out.c)
        out += flow.inner(x) | (out.b ^ out.c)
        return out

    return tasks.get_full_flow()
