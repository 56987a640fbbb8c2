"""flow.get_dataset: items, gt of exactly the precondition tasks, batched fetching, errors."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import dnn_cool_catalyst as dcc


def test_items_and_gt_keys(security_flow, security_data):
    inputs, labels = security_data
    ds = security_flow.get_dataset(inputs, labels)
    assert len(ds) == 96
    x, y = ds[3]
    assert set(x["gt"]) == {"camera_blocked", "door_open", "person_present"}
    assert set(y) == set(security_flow.graph.paths)
    assert torch.equal(x["features"], torch.from_numpy(inputs["features"][3]))
    np.testing.assert_array_equal(y["door_open"].numpy(), labels["door_open"][3])


def test_batched_loader_equals_plain_loader(security_flow, security_data):
    inputs, labels = security_data
    ds = security_flow.get_dataset(inputs, labels, with_index=True)
    plain = list(DataLoader(ds, batch_size=32))
    batched = list(ds.loader(batch_size=32))
    assert len(plain) == len(batched) == 3
    for (xa, ya), (xb, yb) in zip(plain, batched):
        assert torch.equal(xa["features"], xb["features"]) and torch.equal(xa["index"], xb["index"])
        for p in ya:
            torch.testing.assert_close(ya[p], yb[p], equal_nan=True)
        for p in xa["gt"]:
            torch.testing.assert_close(xa["gt"][p], xb["gt"][p], equal_nan=True)
    shuffled = torch.cat([x["index"] for x, _ in ds.loader(batch_size=32, shuffle=True)])
    assert sorted(shuffled.tolist()) == list(range(96))


def test_samples_can_be_named_for_people(security_flow, security_data):
    ds = security_flow.get_dataset(*security_data)
    n = len(ds)
    assert ds.describe(0) == {}
    assert ds.name_samples(row=[f"r{i}" for i in range(n)]) is ds
    ds.name_samples(file=[f"{i}.png" for i in range(n)])  # added to the names already there
    assert ds.describe(n - 1) == {"row": f"r{n - 1}", "file": f"{n - 1}.png"}
    with pytest.raises(dcc.InputError, match=f"'row' has 2 values for {n} samples"):
        ds.name_samples(row=["a", "b"])
    with pytest.raises(dcc.InputError, match="'loss' cannot name a sample column"):
        ds.name_samples(loss=list(range(n)))


def test_errors_name_path_and_shapes(security_flow, security_data):
    inputs, labels = security_data
    bad = dict(labels)
    bad["door_open"] = labels["door_open"][:50]
    with pytest.raises(dcc.LabelError, match=r"'door_open'.*50.*96"):
        security_flow.get_dataset(inputs, bad)
    bad = dict(labels)
    bad["person_regression.face_regression.facial_characteristics"] = np.zeros((96, 4))
    with pytest.raises(dcc.LabelError, match=r"facial_characteristics.*\(N, 3\).*\(96, 4\)"):
        security_flow.get_dataset(inputs, bad)
    bad = dict(labels)
    del bad["door_locked"]
    with pytest.raises(dcc.LabelError, match="door_locked"):
        security_flow.get_dataset(inputs, bad)
    with pytest.raises(dcc.LabelError, match="face_x1"):
        security_flow.get_dataset(inputs, {**labels, "face_x1": labels["door_open"]})
    with pytest.raises(dcc.InputError, match="features"):
        security_flow.get_dataset({"img": inputs["features"]}, labels)
    bad = dict(labels)
    bad["camera_blocked"] = np.full(96, 2.0)
    with pytest.raises(dcc.LabelError, match="camera_blocked.*0, 1 or NaN"):
        security_flow.get_dataset(inputs, bad)
    with pytest.raises(dcc.InputError, match="reserved"):
        security_flow.get_dataset({**inputs, "gt": inputs["features"]}, labels)


def test_torch_tensors_and_numpy_accepted(security_flow, security_data):
    inputs, labels = security_data
    ds = security_flow.get_dataset({"features": torch.from_numpy(inputs["features"])},
                                   {k: torch.from_numpy(np.asarray(v)) for k, v in labels.items()})
    assert ds[0][1]["person_regression.body_regression.shirt_type"].dtype == torch.int64


def test_float_class_label_error_names_the_task_path_value_and_row(nested_kind_flow):
    outer = nested_kind_flow(width=3, features=2)
    labels = {"gate": np.ones(3, dtype=np.float32), "inner.kind": np.array([0.0, 1.0, np.inf])}
    with pytest.raises(dcc.LabelError, match=r"'inner\.kind'.*class label inf at sample 2"):
        outer.get_dataset({"f": np.zeros((3, 2), dtype=np.float32)}, labels)
