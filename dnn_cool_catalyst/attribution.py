"""Heat maps of one task's loss on one sample, with captum (saliency, integrated gradients, GradCAM).

Core (torch, numpy; captum imported on first use, from the `attribution` extra:
`pip install 'dnn_cool_catalyst[attribution]'`; never Catalyst). `InterpretationCallback(attribution=...)`
uses it on the best and worst samples of each task; from Python:

    heat = attribution.attribute(model, x, y, "door_locked", "img", method="gradcam")  # (N, H, W)
    picture = attribution.overlay(image_hwc_uint8, heat[0])                          # (H, W, 3) uint8

What is attributed: the task's *per-sample loss* (`task.sample_loss`, the value the samples are
ranked by), not a logit. A logit says nothing of the label and is not one number for every kind
(a classifier has one per class, a multilabel task one per label); the loss is one number for every
kind of task and includes the label, so for a worst sample the map shows the evidence behind the
mistake (for saliency and integrated gradients: what the loss is most sensitive to; for GradCAM,
ReLU of the gradient-weighted feature maps: where the features push the loss up, so a sample
predicted well may show little heat).

- `"saliency"`: `|d loss / d input|` (captum `Saliency`);
- `"integrated_gradients"`: captum `IntegratedGradients` from a black image (zeros), absolute values;
- `"gradcam"`: captum `LayerGradCam` on a layer (by name, `model.named_modules()`; default
  `default_layer`: the last `nn.Conv2d` outside the flow module), ReLU'd, upsampled (bilinear) to
  the image's size.

Attributions of an input `(C, H, W)` are summed over channels into the heat map `(H, W)`; several
samples are attributed in one batch (one backward for all).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .batches import to_device
from .errors import did_you_mean
from .keys import GT, LOGITS

METHODS = ("saliency", "integrated_gradients", "gradcam")
EXTRA = "attribution"


def check_method(method: str) -> str:
    """`method` if it is one of `METHODS`, else `ValueError` naming them."""
    if method not in METHODS:
        raise ValueError(f"attribution method {method!r} is not one of {METHODS}{did_you_mean(str(method), METHODS)}")
    return method


def captum_attr() -> Any:
    """`captum.attr`, or `ImportError` saying how to install it (the package's `attribution` extra)."""
    try:
        import captum.attr
    except ImportError as e:
        raise ImportError(f"attribution needs captum ({e}): pip install 'dnn_cool_catalyst[{EXTRA}]' "
                          "(or pip install 'captum>=0.8')") from e
    return captum.attr


def default_layer(model: nn.Module) -> str:
    """The name (`model.named_modules()`) of the last `nn.Conv2d` of `model` outside its flow module
    (the backbone's last conv layer, GradCAM's usual choice); `ValueError` when there is none."""
    from .interpreters.module import FlowModule

    flows = [name for name, m in model.named_modules() if isinstance(m, FlowModule)]

    def in_flow(name: str) -> bool:  # "" is the model itself being the flow module
        return any(f == "" or name == f or name.startswith(f + ".") for f in flows)

    found = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and not in_flow(name)]
    if not found:
        raise ValueError(f"GradCAM needs a convolution layer: {type(model).__name__} has no nn.Conv2d outside the flow "
                         "module; pass attribution_layer='<name in model.named_modules()>' or use "
                         "attribution='saliency' or 'integrated_gradients'")
    return found[-1]


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """`model`'s submodule called `name` (as `named_modules()` names it), with a clear error."""
    modules = dict(model.named_modules())
    if name not in modules or not name:
        raise KeyError(f"attribution_layer {name!r}: {type(model).__name__} has no such submodule"
                       f"{did_you_mean(str(name), [n for n in modules if n])}")
    return modules[name]


def _replace(x: Mapping[str, Any], key: Sequence[str], value: Tensor) -> Dict[str, Any]:
    out = dict(x)
    out[key[0]] = _replace(x[key[0]], key[1:], value) if len(key) > 1 else value
    return out


def _get(x: Mapping[str, Any], key: Sequence[str]) -> Any:
    for k in key:
        x = x[k]
    return x


def _tile(x: Any, n: int, reps: int) -> Any:
    """Every tensor of an input mapping of `n` rows repeated `reps` times along the batch dimension
    (captum's integrated gradients evaluates `reps` = n_steps scaled copies of the `n` inputs, one
    block of `n` rows per step)."""
    if isinstance(x, Mapping):
        return {k: _tile(v, n, reps) for k, v in x.items()}
    if isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == n and reps != 1:
        return x.repeat(reps, *([1] * (x.dim() - 1)))
    return x


def loss_function(model: nn.Module, x: Mapping[str, Any], labels: Tensor, path: str, task: Any,
                  input_key: str) -> Callable[[Tensor], Tensor]:
    """`f(inputs) -> (B,)`: task `path`'s per-sample loss of the `n` samples of `x` with `inputs`
    (B = a multiple of n rows, the samples' `x[input_key]` or copies of them; dotted for nested
    inputs) in place of that input; the samples' other inputs and their `labels` are repeated to
    match."""
    key = input_key.split(".")
    n = labels.shape[0]

    def forward(inputs: Tensor) -> Tensor:
        reps = inputs.shape[0] // n
        out = model(_replace(_tile(x, n, reps), key, inputs))
        return task.sample_loss(out[LOGITS][path], _tile(labels, n, reps))

    return forward


def _channel_dim(shape: Sequence[int]) -> Optional[int]:
    """The channel dimension of one image `(C, H, W)` / `(H, W, C)` (C in 1, 3, 4), None for `(H, W)`."""
    if len(shape) == 3:
        return 0 if shape[0] in (1, 3, 4) else (2 if shape[-1] in (1, 3, 4) else None)
    return None


def attribute(model: nn.Module, x: Mapping[str, Any], labels: Any, path: str, input_key: str,
              method: str = "saliency", layer: Optional[str] = None, *, flow: Any = None,
              options: Optional[Mapping[str, Any]] = None, raw: bool = False) -> Tensor:
    """The heat maps `(N, H, W)` (non-negative, on the CPU) of task `path`'s per-sample loss on N samples.

    `x`: the samples' model inputs, batch dimension first (e.g. `default_collate([X1, X2])`);
    `x["gt"]` is dropped (preconditions do not enter a task's loss). `labels`: the task's labels
    of the samples (present: a missing label has no loss). `input_key`: the image input (dotted
    for nested inputs), images `(N, C, H, W)`, `(N, H, W, C)` or `(N, H, W)`; non-float inputs
    are attributed as float32. Each sample's map is its own (the model runs in eval mode, where
    samples do not interact).
    `method`: one of `METHODS`; `layer`: GradCAM's layer by name (default `default_layer(model)`).
    `flow`: the `TaskFlow` (default: the flow module inside `model`). `options`: keyword arguments
    for captum's `attribute` (e.g. `{"n_steps": 16}` for integrated gradients). `raw=True`
    returns captum's attribution itself: the input's shape (saliency, integrated gradients), the
    layer's spatial shape (GradCAM).

    The model runs in eval mode (its mode is given back); gradients are taken with respect to the
    input (or layer) only, so no parameter's `.grad` changes.
    """
    check_method(method)
    attr = captum_attr()
    from .uncertainty import flow_module

    graph = flow.graph if flow is not None else flow_module(model).graph
    task = graph.leaf(path).task
    x = {k: v for k, v in x.items() if k != GT}
    key = input_key.split(".")
    image = _get(x, key)
    if not isinstance(image, Tensor) or image.dim() < 3:
        raise ValueError(f"attribution of task {path!r}: input {input_key!r} must be a batch of images (N, C, H, W), "
                         f"(N, H, W, C) or (N, H, W), got {type(image).__name__} {tuple(getattr(image, 'shape', ()))}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    # a copy that requires grad (captum's warning otherwise; the caller's tensor stays as it was)
    image = image.detach().to(device, torch.float32 if not image.is_floating_point() else image.dtype,
                              copy=True).requires_grad_(True)
    x = to_device(x, device)
    labels = task.prepare_labels(labels).to(device)
    if labels.shape[0] != image.shape[0]:
        raise ValueError(f"attribution of task {path!r}: {labels.shape[0]} labels for {image.shape[0]} images")
    forward = loss_function(model, x, labels, path, task, input_key)
    options = dict(options or {})
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            # `options` may override these defaults
            if method == "saliency":
                result = attr.Saliency(forward).attribute(image, **{"abs": True, **options})
            elif method == "integrated_gradients":
                result = attr.IntegratedGradients(forward).attribute(
                    image, **{"baselines": torch.zeros_like(image), **options}).abs()
            else:
                module = find_layer(model, layer if layer is not None else default_layer(model))
                result = attr.LayerGradCam(forward, module).attribute(image, **{"relu_attributions": True, **options})
    finally:
        model.train(was_training)
    result = result.detach()
    if raw:
        return result.cpu()
    spatial = _spatial(tuple(image.shape[1:]))
    if method == "gradcam":  # (N, 1, h, w) for a conv layer
        heat = result.reshape(result.shape[0], 1, *result.shape[-2:]) if result.dim() != 4 else result.sum(1, keepdim=True)
        heat = attr.LayerAttribution.interpolate(heat.float(), spatial, "bilinear")[:, 0]
    else:
        channel = _channel_dim(tuple(image.shape[1:]))
        heat = result.sum(channel + 1) if channel is not None else result
    return heat.clamp_min(0).float().cpu()


def _spatial(shape: Tuple[int, ...]) -> Tuple[int, int]:
    channel = _channel_dim(shape)
    if channel is None:
        return shape[-2], shape[-1]
    return (shape[1], shape[2]) if channel == 0 else (shape[0], shape[1])


def overlay(image: np.ndarray, heat: Any, alpha: float = 0.6) -> np.ndarray:
    """`image` `(H, W, 3)` uint8 blended with `heat` `(H, W)` (scaled to [0, 1] by its maximum) in a
    blue-green-red colour ramp: where the heat is 0 the image shows unchanged, where it is highest
    its colour takes `alpha` of the pixel. The heat map is resized (nearest) when its size differs."""
    h = np.asarray(heat.detach().cpu() if isinstance(heat, Tensor) else heat, dtype=np.float64)
    h = np.nan_to_num(h, nan=0.0, posinf=0.0, neginf=0.0).clip(min=0)
    if h.shape != image.shape[:2]:
        rows = np.arange(image.shape[0]) * h.shape[0] // image.shape[0]
        cols = np.arange(image.shape[1]) * h.shape[1] // image.shape[1]
        h = h[rows][:, cols]
    top = h.max()
    h = h / top if top > 0 else h
    ramp = np.stack([np.clip(2 * h - 1, 0, 1), 1 - np.abs(2 * h - 1), np.clip(1 - 2 * h, 0, 1)], axis=-1) * 255.0
    weight = (alpha * h)[..., None]
    out = image[..., :3].astype(np.float64) * (1 - weight) + ramp * weight
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


__all__ = ["METHODS", "attribute", "captum_attr", "check_method", "default_layer", "find_layer", "loss_function",
           "overlay"]
