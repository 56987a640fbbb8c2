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


def _sub_flow_tasks():
    tasks = dcc.Tasks([dcc.BinaryClassificationTask("blocked", torch.nn.Linear(4, 1)),
                       dcc.BinaryClassificationTask("exists", torch.nn.Linear(4, 1)),
                       dcc.BoundedRegressionTask("obj_x", torch.nn.Linear(4, 1))])

    @tasks.add_flow
    def localize_flow(flow, x, out):
        out += flow.exists(x.features)
        out += flow.obj_x(x.features) | out.exists
        return out

    return tasks


def _full(tasks, argument):
    def full_flow(flow, x, out):
        out += flow.blocked(x.cam)
        out += flow.localize_flow(getattr(x, argument)) | ~out.blocked
        return out

    return tasks.add_flow(full_flow)


def test_a_sub_flow_called_with_one_feature_reads_that_feature():
    """Seed spelling `flow.sub(x.features)` whose tasks read x.features: x.features is a tensor, so
    it stands for {"features": x.features} inside the sub-flow."""
    tasks = _sub_flow_tasks()
    flow = _full(tasks, "features")
    cam, features = torch.randn(3, 4), torch.randn(3, 4)
    with torch.no_grad():
        logits = flow.torch().eval()({"cam": cam, "features": features})["logits"]
        torch.testing.assert_close(logits["localize_flow.obj_x"], tasks["obj_x"].module(features))
        torch.testing.assert_close(logits["blocked"], tasks["blocked"].module(cam))


def test_a_sub_flow_called_with_a_mapping_reads_inside_it():
    tasks = _sub_flow_tasks()
    flow = _full(tasks, "features")
    inner, outer = torch.randn(3, 4), torch.randn(3, 4)
    with torch.no_grad():
        logits = flow.torch().eval()({"cam": outer, "features": {"features": inner}})["logits"]
    torch.testing.assert_close(logits["localize_flow.exists"], tasks["exists"].module(inner))
    with pytest.raises(dcc.InputError, match=r"'localize_flow.exists' reads x.features.features, but "
                                             r"x\['features'\] has no key 'features' \(has \['other'\]\)"):
        flow.torch()({"cam": outer, "features": {"other": inner}})


def test_a_feature_given_to_a_sub_flow_is_never_ignored():
    """The seed's `flow.localize_flow(x.localization_features)` with tasks reading x.features: with a
    tensor there, reading the caller's x.features would silently drop the argument; it is an error
    at get_dataset (and at the first forward) that names the task and the spelling that works."""
    import numpy as np

    tasks = _sub_flow_tasks()
    flow = _full(tasks, "localization_features")
    inputs = {"cam": torch.randn(3, 4), "localization_features": torch.randn(3, 4), "features": torch.randn(3, 4)}
    expected = (r"task 'localize_flow.exists' reads x.localization_features.features, but "
                r"x\['localization_features'\] is a Tensor, not a mapping of features.*flow.localize_flow\(x\)")
    with pytest.raises(dcc.InputError, match=expected):
        flow.get_dataset(inputs, {p: np.zeros(3) for p in flow.graph.paths})
    with pytest.raises(dcc.InputError, match=expected):
        flow.torch()(inputs)
    # x itself must be a mapping; no sub-flow hint then
    with pytest.raises(dcc.InputError, match=r"task 'blocked' reads x.cam, but x is a Tensor, not a mapping of features$"):
        flow.torch()(torch.randn(3, 4))
