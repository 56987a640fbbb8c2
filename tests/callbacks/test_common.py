"""`callbacks.common`: dotted paths, flows from objects/registries/factories/paths, logdir and loader choice."""
from types import SimpleNamespace

import pytest

from dnn_cool_catalyst.callbacks.common import (
    import_object,
    loader_selected,
    resolve_callback_flow,
    resolve_flow,
    resolve_logdir,
)
from dnn_cool_catalyst.story import security_tasks


def make_tasks():
    return security_tasks(features=4)


def test_import_object_takes_dots_and_colons_and_names_what_is_missing():
    import os.path

    assert import_object("os.path.join") is os.path.join
    assert import_object("os:path.join") is os.path.join
    with pytest.raises(ValueError, match="not a dotted path"):
        import_object("join")
    with pytest.raises(ImportError, match=r"cannot import module 'no_such_module_x'"):
        import_object("no_such_module_x.f")
    with pytest.raises(ImportError, match=r"module 'os' has no 'nothing_here'"):
        import_object("os.nothing_here")


def test_resolve_flow_from_a_flow_a_registry_a_factory_and_a_dotted_path():
    tasks = make_tasks()
    flow = tasks.get_full_flow()
    assert resolve_flow(flow) is flow
    assert resolve_flow(tasks) is flow
    assert resolve_flow(lambda: tasks) is flow
    by_path = resolve_flow(f"{__name__}.make_tasks")
    assert by_path.graph.paths == flow.graph.paths
    with pytest.raises(TypeError, match=r"a flow must be a TaskFlow.*gave int"):
        resolve_flow(lambda: 3)


def test_resolve_callback_flow_prefers_its_own_then_the_runner_and_names_the_callback():
    flow = make_tasks().get_full_flow()
    assert resolve_callback_flow(None, SimpleNamespace(flow=flow), "X") is flow
    assert resolve_callback_flow(flow, SimpleNamespace(flow=None), "X") is flow
    with pytest.raises(ValueError, match=r"MyCallback: no flow"):
        resolve_callback_flow(None, SimpleNamespace(), "MyCallback")


def test_resolve_logdir(tmp_path):
    assert resolve_logdir(None, SimpleNamespace(logdir=tmp_path)) == str(tmp_path)
    assert resolve_logdir(str(tmp_path / "own"), SimpleNamespace(logdir="x")) == str(tmp_path / "own")
    assert resolve_logdir(None, SimpleNamespace()) is None


@pytest.mark.parametrize("loaders, default, key, train, expected", [
    (["valid"], "all", "valid", False, True),
    (["valid"], "all", "train", True, False),
    (None, "all", "train", True, True),
    (None, "train", "train", True, True),
    (None, "train", "valid", False, False),
    (None, "eval", "valid", False, True),
    (None, "eval", "train", True, False),
])
def test_loader_selected(loaders, default, key, train, expected):
    runner = SimpleNamespace(loader_key=key, is_train_loader=train)
    assert loader_selected(runner, loaders, default) is expected
