"""flow.torch(): outputs, modes, submodule names and input errors."""
import pytest
import torch

import dnn_cool_catalyst as dcc


def test_outputs_in_train_and_eval(security_flow, security_data):
    inputs, labels = security_data
    x, y = security_flow.get_dataset(inputs, labels)[list(range(10))]
    module = security_flow.torch()
    out = module.train()(x)
    assert set(out) == {"logits", "mask"}
    assert set(out["mask"]) == set(security_flow.graph.paths)
    with torch.no_grad():
        out = module.eval()(x)  # eval with gt: masks from gt, activated/decoded present
        assert set(out) == {"logits", "activated", "decoded", "mask"}
        shirt = "person_regression.body_regression.shirt_type"
        assert out["decoded"][shirt].shape == (10, 7)
        assert torch.equal(out["decoded"][shirt][:, 0], out["activated"][shirt].argmax(1))
        no_gt = module({"features": x["features"]})
    # without gt, door_open applies exactly where camera_blocked is decoded False
    blocked = no_gt["decoded"]["camera_blocked"].reshape(-1)
    assert torch.equal(no_gt["mask"]["door_open"], ~blocked)


def test_missing_feature_names_task_and_key(security_flow):
    with pytest.raises(dcc.InputError, match=r"'camera_blocked'.*x.features.*'img'"):
        security_flow.torch()({"img": torch.randn(2, 8)})


def test_missing_gt_for_precondition(security_flow):
    with pytest.raises(dcc.InputError, match="camera_blocked"):
        security_flow.torch().train()({"features": torch.randn(2, 8), "gt": {}})


def test_tuned_threshold_changes_module_decoding(security_flow):
    module = security_flow.torch().eval()
    x = {"features": torch.randn(16, 8)}
    with torch.no_grad():
        before = module(x)["decoded"]["camera_blocked"]
        security_flow.get_decoder().load_tuned({"camera_blocked": {"threshold": 1.0}})
        after = module(x)["decoded"]["camera_blocked"]
    assert before.shape == after.shape and not after.any()


def test_empty_batch_at_inference(security_flow):
    with torch.no_grad():
        out = security_flow.torch().eval()({"features": torch.randn(0, 8)})
    assert all(m.shape == (0,) for m in out["mask"].values())


def test_a_head_of_the_wrong_width_names_task_feature_and_widths(security_flow):
    with pytest.raises(dcc.HeadError, match=r"task 'camera_blocked'.*takes 8 input features, x.features has 16 "
                                            r"\(shape \(2, 16\)\).*nn.Linear\(16"):
        security_flow.torch()({"features": torch.randn(2, 16)})


def test_a_head_failing_otherwise_still_names_task_and_shape():
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    tasks = dcc.Tasks([dcc.BinaryClassificationTask("gate", Broken())])

    @tasks.add_flow
    def flow(flow, x, out):
        out += flow.gate(x.f)
        return out

    with pytest.raises(RuntimeError, match=r"task 'gate': its head Broken failed on x.f of shape \(3, 2\) \(boom\)"):
        tasks.get_full_flow().torch()({"f": torch.zeros(3, 2)})
