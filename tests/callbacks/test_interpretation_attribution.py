"""InterpretationCallback(attribution=...): heat maps of the ranked samples, beside their images."""
import numpy as np
import pytest
import torch
from torch import nn

import dnn_cool_catalyst as dcc
from dnn_cool_catalyst.callbacks import InterpretationCallback


class ConvImageModel(nn.Module):
    """A tiny conv net from `x["img"]` (uint8 or float) to the flow's features."""

    def __init__(self, flow_module, features=8):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                      nn.Linear(16, features))
        self.flow = flow_module

    def forward(self, x):
        return self.flow({"features": self.backbone(x["img"].float() / 255.0), "gt": x.get("gt")})


def image_dataset(flow, labels, seed=0):
    n = len(next(iter(labels.values())))
    rng = np.random.default_rng(seed)
    inputs = {"img": rng.integers(0, 255, size=(n, 3, 8, 8)).astype(np.uint8)}
    return flow.get_dataset(inputs, labels, with_index=True, computed=["features"]), inputs


def test_each_ranked_sample_gets_a_heat_map_beside_its_image(small_flow, small_data, fake_runner_cls):
    _, labels = small_data
    ds, inputs = image_dataset(small_flow, labels)
    runner = fake_runner_cls(small_flow, model=ConvImageModel(small_flow.torch()))
    cb = InterpretationCallback(top_k=1, explain=0, attribution="saliency")
    runner.start([cb])
    runner.run_loader([cb], "valid", ds.loader(batch_size=32, shuffle=True))
    images = {tag: image for _, tag, image in runner.logger.images}
    for path in ("door_open", "camera_blocked"):
        for position in ("worst/1", "best/1"):
            plain, heat = images[f"{path}/{position}/img"], images[f"{path}/{position}/attribution"]
            assert heat.dtype == np.uint8 and heat.shape[1] >= 8 and heat.shape[0] > 8  # image and caption strip
            assert not np.array_equal(heat[:8, :8], plain[:8, :8])  # the heat blended over the image
    table = cb.results["valid"]
    row = table[(table["task_path"] == "door_open") & (table["rank"] == 1)].iloc[0]
    sample = {"img": torch.from_numpy(inputs["img"][int(row["dataset_index"])][None])}
    expected = dcc.attribution.attribute(runner.model, sample, torch.tensor([labels["door_open"][int(row["dataset_index"])]]),
                                         "door_open", "img", "saliency")
    shown = dcc.attribution.overlay(np.moveaxis(inputs["img"][int(row["dataset_index"])], 0, -1), expected[0])
    # the worst sample's own map (attributed in a batch with the best one: float32 rounding may move a pixel by 1)
    assert np.abs(images["door_open/worst/1/attribution"][:8, :8].astype(int) - shown).max() <= 1


def test_gradcam_without_a_conv_layer_fails_at_the_start(small_flow, fake_runner_cls):
    runner = fake_runner_cls(small_flow)  # the flow module alone: no conv layer outside it
    with pytest.raises(ValueError, match="no nn.Conv2d outside the flow module"):
        runner.start([InterpretationCallback(attribution="gradcam")])
    with pytest.raises(KeyError, match="no such submodule"):
        fake_runner_cls(small_flow, model=ConvImageModel(small_flow.torch())).start(
            [InterpretationCallback(attribution="gradcam", attribution_layer="backbone.9")])
    with pytest.raises(ValueError, match="did you mean 'saliency'"):
        InterpretationCallback(attribution="salency")


def test_gradcam_heat_maps_reach_the_tensorboard_event_file(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dnn_cool_catalyst.runners import FlowRunner

    torch.manual_seed(0)
    tasks = dcc.Tasks([dcc.BinaryClassificationTask("door_open", nn.Linear(8, 1)),
                       dcc.BinaryClassificationTask("door_locked", nn.Linear(8, 1))])

    @tasks.add_flow
    def full(flow, x, out):
        out += flow.door_open(x.features)
        out += flow.door_locked(x.features) | ~out.door_open
        return out

    rng = np.random.default_rng(0)
    n = 48
    labels = {"door_open": rng.integers(0, 2, n).astype(np.float32), "door_locked": rng.integers(0, 2, n).astype(np.float32)}
    ds, _ = image_dataset(full, labels)
    runner = FlowRunner(full, model=ConvImageModel(full.torch()), logdir=str(tmp_path))
    runner.train(loaders={"train": ds.loader(batch_size=16), "valid": ds.loader(batch_size=16)}, num_epochs=1,
                 verbose=False, callbacks={"interpretation": InterpretationCallback(top_k=1, explain=0,
                                                                                    attribution="gradcam")})
    ea = EventAccumulator(str(tmp_path / "tensorboard" / "valid"), size_guidance={"images": 0})
    ea.Reload()
    tags = set(ea.Tags()["images"])
    assert {"door_locked/worst/1/attribution", "door_locked/best/1/attribution", "door_open/worst/1/attribution",
            "door_locked/worst/1/img"} <= tags
