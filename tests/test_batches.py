"""`dnn_cool_catalyst.batches`: what a loader yields, checked (errors naming loader, task, key) and moved."""
import pytest
import torch

from dnn_cool_catalyst.batches import (
    check_first_batch,
    concat_rows,
    inputs_batch_size,
    split_batch,
    take_rows,
    to_device,
)
from dnn_cool_catalyst.errors import InputError, LabelError


def _batch(flow, data, n=8):
    x, y = flow.get_dataset(*data, with_index=True)[list(range(n))]
    return x, y


def test_split_batch_takes_pairs_and_names_what_else_came():
    x, y = {"a": torch.zeros(2)}, {"t": torch.zeros(2)}
    assert split_batch((x, y), "train") == (x, y)
    assert split_batch([x, y], "train") == (x, y)
    assert split_batch(x, "infer", allow_inputs_only=True) == (x, None)
    with pytest.raises(TypeError, match=r"loader 'train' yielded a dict; FlowRunner needs \(X, y\) pairs"):
        split_batch(x, "train")
    with pytest.raises(TypeError, match=r"loader 'valid' yielded a tuple of 3 item\(s\): \(dict, dict, int\)"):
        split_batch((x, y, 1), "valid")


def test_check_first_batch_names_the_missing_task_or_key(security_flow, security_data):
    x, y = _batch(security_flow, security_data)
    check_first_batch(security_flow, x, y, "train", reads_inputs=True)  # a complete batch passes
    with pytest.raises(LabelError, match=r"loader 'train': the first batch has no labels \(y\) for task\(s\) \['door_open'\]"):
        check_first_batch(security_flow, x, {k: v for k, v in y.items() if k != "door_open"}, "train", reads_inputs=False)
    with pytest.raises(InputError, match=r"loader 'valid': the first batch has no X\['gt'\]"):
        check_first_batch(security_flow, {k: v for k, v in x.items() if k != "gt"}, y, "valid", reads_inputs=False)
    gt = {k: v for k, v in x["gt"].items() if k != "camera_blocked"}
    with pytest.raises(InputError, match=r"X\['gt'\] has no labels for precondition task\(s\) \['camera_blocked'\]"):
        check_first_batch(security_flow, {**x, "gt": gt}, y, "valid", reads_inputs=False)
    with pytest.raises(InputError, match=r"lacks inputs the flow reads: task 'camera_blocked' reads x.features"):
        check_first_batch(security_flow, {"gt": x["gt"]}, y, "valid", reads_inputs=True)
    check_first_batch(security_flow, {"features": x["features"]}, None, "infer", reads_inputs=True)  # no labels: no gt needed


def test_take_rows_cuts_only_what_has_the_batch_length():
    tree = {"a": torch.arange(5), "b": {"c": torch.ones(5, 2)}, "scalar": torch.tensor(3.0), "other": torch.ones(4),
            "names": list("abcde"), "tag": "x"}
    cut = take_rows(tree, 3, 5)
    assert cut["a"].tolist() == [0, 1, 2] and cut["b"]["c"].shape == (3, 2) and cut["names"] == ["a", "b", "c"]
    assert cut["scalar"] is tree["scalar"] and cut["other"] is tree["other"] and cut["tag"] == "x"


def test_inputs_batch_size_reads_the_first_tensor_depth_first():
    assert inputs_batch_size({"gt": {"t": torch.zeros(7)}, "x": torch.zeros(3)}) == 7
    assert inputs_batch_size({"name": "a", "x": torch.zeros(3, 2)}) == 3
    with pytest.raises(ValueError, match="without tensors"):
        inputs_batch_size({"name": "a"})


def test_to_device_and_concat_rows_keep_structure():
    tree = {"a": torch.zeros(2), "b": [torch.ones(1), "s"], "c": (torch.ones(1),)}
    moved = to_device(tree, torch.device("cpu"))
    assert isinstance(moved["b"], list) and isinstance(moved["c"], tuple) and moved["b"][1] == "s"
    joined = concat_rows([{"p": torch.tensor([1, 2])}, {"p": torch.tensor([3])}])
    assert joined["p"].tolist() == [1, 2, 3] and concat_rows([]) == {}
