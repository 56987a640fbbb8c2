"""Heat maps of a task's loss on one sample (`dnn_cool_catalyst.attribution`, captum)."""
import sys

import numpy as np
import pytest
import torch
from torch import nn

import dnn_cool_catalyst as dcc
from dnn_cool_catalyst import attribution


def conv_flow():
    torch.manual_seed(0)
    tasks = dcc.Tasks([dcc.BinaryClassificationTask("door", nn.Linear(4, 1)),
                       dcc.ClassificationTask("kind", nn.Linear(4, 3))])

    @tasks.add_flow
    def full(flow, x, out):
        out += flow.door(x.features)
        out += flow.kind(x.features) | out.door
        return out

    return full


def conv_model(flow):
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return dcc.BackboneModel(backbone, flow)


@pytest.fixture
def sample():
    g = torch.Generator().manual_seed(1)
    return {"img": torch.rand(1, 3, 8, 8, generator=g), "index": torch.tensor([3])}


def test_saliency_is_the_input_gradient_of_the_loss(sample):
    flow = conv_flow()
    model = conv_model(flow).train()
    label = torch.tensor([1.0])
    raw = attribution.attribute(model, sample, label, "door", "img", method="saliency", raw=True)
    heat = attribution.attribute(model, sample, label, "door", "img", method="saliency")
    img = sample["img"].clone().requires_grad_(True)
    model.eval()
    loss = flow.graph.leaf("door").task.sample_loss(model({"img": img})["logits"]["door"], label)
    (grad,) = torch.autograd.grad(loss.sum(), img)
    torch.testing.assert_close(raw, grad.abs())
    torch.testing.assert_close(heat, grad.abs().sum(1))
    assert heat.shape == (1, 8, 8) and torch.isfinite(heat).all()
    # options override the defaults: the signed gradient
    signed = attribution.attribute(model, sample, label, "door", "img", method="saliency", raw=True,
                                   options={"abs": False})
    torch.testing.assert_close(signed, grad)


@pytest.mark.parametrize("method", ["integrated_gradients", "gradcam"])
def test_each_method_gives_a_finite_map_of_the_image_size(sample, method):
    flow = conv_flow()
    model = conv_model(flow).train()
    heat = attribution.attribute(model, sample, torch.tensor([2]), "kind", "img", method=method,
                                 options={"n_steps": 8} if method == "integrated_gradients" else None)
    assert heat.shape == (1, 8, 8) and torch.isfinite(heat).all() and (heat >= 0).all()
    assert model.training  # its mode given back
    assert all(p.grad is None for p in model.parameters())  # gradients of the input (layer) only


def test_gradcam_takes_the_last_conv_layer_outside_the_flow_by_default(sample):
    flow = conv_flow()
    model = conv_model(flow)
    assert attribution.default_layer(model) == "backbone.2"
    first = attribution.attribute(model, sample, torch.tensor([1.0]), "door", "img", "gradcam", layer="backbone.0")
    assert first.shape == (1, 8, 8)
    with pytest.raises(KeyError, match="'backbone.O': BackboneModel has no such submodule.*backbone.0"):
        attribution.attribute(model, sample, torch.tensor([1.0]), "door", "img", "gradcam", layer="backbone.O")
    flat = dcc.BackboneModel(nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, 4)), flow)
    with pytest.raises(ValueError, match="no nn.Conv2d outside the flow module"):
        attribution.attribute(flat, sample, torch.tensor([1.0]), "door", "img", "gradcam")
    # saliency needs no layer
    assert attribution.attribute(flat, sample, torch.tensor([1.0]), "door", "img").shape == (1, 8, 8)


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients", "gradcam"])
def test_a_batch_gives_each_sample_its_own_map(method):
    flow = conv_flow()
    model = conv_model(flow)
    g = torch.Generator().manual_seed(2)
    x = {"img": torch.rand(3, 3, 8, 8, generator=g)}
    labels = torch.tensor([1.0, 0.0, 1.0])
    options = {"n_steps": 8} if method == "integrated_gradients" else None
    together = attribution.attribute(model, x, labels, "door", "img", method, options=options)
    alone = torch.cat([attribution.attribute(model, {"img": x["img"][i:i + 1]}, labels[i:i + 1], "door", "img", method,
                                             options=options) for i in range(3)])
    # the same arithmetic per sample, batched or not: float32 rounding of a different summation order only
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-5)


def test_an_unknown_method_and_a_missing_captum_are_clear_errors(sample, monkeypatch):
    with pytest.raises(ValueError, match="did you mean 'gradcam'"):
        attribution.check_method("gradcram")
    monkeypatch.setitem(sys.modules, "captum", None)
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    with pytest.raises(ImportError, match=r"dnn_cool_catalyst\[attribution\]"):
        attribution.captum_attr()


def test_overlay_blends_the_heat_into_the_image():
    image = np.full((8, 6, 3), 100, dtype=np.uint8)
    assert np.array_equal(attribution.overlay(image, np.zeros((8, 6))), image)  # no heat: the image unchanged
    heat = np.zeros((4, 3))
    heat[0, 0] = 2.0  # the hottest spot, resized to the image's top-left 2x2 pixels
    out = attribution.overlay(image, heat, alpha=0.5)
    assert out.shape == (8, 6, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [178, 50, 50] and np.array_equal(out[2:, 2:], image[2:, 2:])
