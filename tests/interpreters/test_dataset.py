"""flow.get_dataset: items, gt of exactly the precondition tasks, batched fetching, errors."""
import numpy as np
import pytest
import torch
from torch import nn
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


def test_inputs_need_not_hold_the_features_the_model_computes(security_flow, security_data):
    """A dataset holds what the loader yields: `x.features` computed by a backbone from `x["raw"]`
    needs no argument, and a feature nobody computes fails at the first forward, named."""
    inputs, labels = security_data
    raw = torch.from_numpy(inputs["features"][:, :5]).contiguous()
    ds = security_flow.get_dataset({"raw": raw}, labels)
    torch.manual_seed(0)
    model = dcc.BackboneModel(nn.Linear(5, 8), security_flow, input_key="raw")
    x, y = next(iter(ds.loader(batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))))
    out = model(x)  # X["index"] passes through the backbone model and the flow module, unread
    assert out["logits"]["door_open"].shape == (8, 1)
    assert torch.equal(x["raw"], raw[x["index"]])
    with pytest.raises(dcc.InputError, match=r"task 'camera_blocked' reads x.features.*has \['gt', 'index', 'raw'\]"):
        security_flow.torch()(x)
    # still accepted, no longer needed
    assert len(security_flow.get_dataset({"raw": raw}, labels, computed=["features"])) == 96


def test_every_batch_carries_the_sample_index_unless_opted_out(security_flow, security_data):
    inputs, labels = security_data
    ds = security_flow.get_dataset(inputs, labels)
    gen = torch.Generator().manual_seed(0)
    batches = list(ds.loader(batch_size=32, shuffle=True, generator=gen))
    index = torch.cat([x["index"] for x, _ in batches])
    assert index.dtype == torch.int64 and sorted(index.tolist()) == list(range(96))
    assert index.tolist() != list(range(96))  # shuffled: positions in the loader would be wrong
    for x, y in batches:
        assert torch.equal(x["features"], torch.from_numpy(inputs["features"])[x["index"]])
    plain = next(iter(DataLoader(ds, batch_size=4, shuffle=False)))[0]
    assert plain["index"].tolist() == [0, 1, 2, 3]
    assert ds[-1][0]["index"].item() == 95
    x, _ = ds[[0, 1]]
    out = security_flow.torch()(x)  # the flow module reads only the features it names
    assert out["logits"]["door_open"].shape == (2, 1)
    off = security_flow.get_dataset(inputs, labels, with_index=False)
    assert "index" not in off[0][0] and "index" not in off[[0, 1]][0]


# partial=True: a source labelled for some tasks only ---------------------------------------------------

A_PATHS = ("camera_blocked", "door_open", "door_locked")


def test_partial_source_leaves_the_other_tasks_missing_in_y_and_gt(security_flow, security_data):
    inputs, labels = security_data
    ds = security_flow.get_dataset(inputs, {p: labels[p] for p in A_PATHS}, partial=True)
    full = security_flow.get_dataset(inputs, labels)
    assert ds.labelled_paths == frozenset(A_PATHS)
    assert full.labelled_paths == frozenset(security_flow.graph.paths)
    x, y = ds[list(range(10))]
    assert list(y) == list(full[0][1])  # every task of the flow, in the flow's order
    for leaf in security_flow.graph.leaves:
        want = full.labels[leaf.path]
        got = y[leaf.path]
        assert got.dtype == want.dtype and got.shape[1:] == want.shape[1:], leaf.path
        if leaf.path in A_PATHS:
            torch.testing.assert_close(got, want[:10], equal_nan=True)
        else:
            assert not leaf.task.available(got).any(), leaf.path  # each task's own missing marker
    assert set(x["gt"]) == {"camera_blocked", "door_open", "person_present"}
    assert torch.isnan(x["gt"]["person_present"]).all()
    torch.testing.assert_close(x["gt"]["door_open"], full.labels["door_open"][:10], equal_nan=True)
    # the classification task's marker is -1 (int64), the multilabel one NaN per class
    assert torch.equal(y["person_regression.body_regression.shirt_type"], torch.full((10,), -1))
    assert y["person_regression.face_regression.facial_characteristics"].shape == (10, 3)


def test_partial_still_refuses_unknown_paths_and_needs_the_flag(security_flow, security_data):
    inputs, labels = security_data
    with pytest.raises(dcc.LabelError, match=r"unknown task path.*'door_opne'.*did you mean 'door_open'"):
        security_flow.get_dataset(inputs, {"door_opne": labels["door_open"]}, partial=True)
    with pytest.raises(dcc.LabelError, match=r"no entry for task.*'person_present'.*partial=True"):
        security_flow.get_dataset(inputs, {p: labels[p] for p in A_PATHS})


def test_partial_task_that_cannot_know_its_label_shape_is_named():
    tasks = dcc.Tasks([dcc.BinaryClassificationTask("gate", nn.Linear(3, 1)),
                       dcc.MultilabelClassificationTask("tags", nn.Linear(3, 4))])  # no class_names: C unknown

    @tasks.add_flow
    def full(flow, x, out):
        out += flow.gate(x.f)
        out += flow.tags(x.f) | out.gate
        return out

    f = np.zeros((5, 3), np.float32)
    with pytest.raises(dcc.LabelError, match=r"task path 'tags' has no labels \(partial=True\).*shape"):
        full.get_dataset({"f": f}, {"gate": np.ones(5)}, partial=True)
    # given all-missing labels of the right shape, it works
    ds = full.get_dataset({"f": f}, {"gate": np.ones(5), "tags": np.full((5, 4), np.nan)}, partial=True)
    assert ds.labelled_paths == {"gate", "tags"}  # what was given, even if all missing
    with pytest.raises(dcc.LabelError, match="number of samples"):
        full.get_dataset({}, {}, partial=True)


@pytest.mark.parametrize("task", [
    dcc.BinaryClassificationTask("t", nn.Linear(2, 1)),
    dcc.ClassificationTask("t", nn.Linear(2, 3)),
    dcc.BoundedRegressionTask("t", nn.Linear(2, 1)),
    dcc.MultilabelClassificationTask("t", nn.Linear(2, 3), class_names=["a", "b", "c"]),
])
def test_missing_labels_of_every_kind_are_unavailable_and_canonical(task):
    m = task.missing_labels(4)
    assert m.shape == (4, *task.label_shape()) and m.dtype == task.label_dtype
    assert not task.available(m).any()
    logits = torch.zeros(4, 3) if task.label_shape() == (3,) or isinstance(task, dcc.ClassificationTask) else \
        torch.zeros(4, 1)
    assert task.sample_loss(logits, m).isnan().all()  # no available element: no loss (NaN, left out of means)
