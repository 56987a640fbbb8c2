"""What the callbacks and the runner share: resolving the flow (objects or dotted paths, for YAML)
and the logdir, loader selection."""
from __future__ import annotations

import importlib
import os
from typing import Any, Optional, Sequence


def import_object(dotted: str) -> Any:
    """The object named by `"package.module.attr"` (or `"package.module:attr"`)."""
    module_name, sep, attr = dotted.partition(":") if ":" in dotted else dotted.rpartition(".")
    if not sep or not module_name or not attr:
        raise ValueError(f"{dotted!r} is not a dotted path 'package.module.name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"cannot import module {module_name!r} of {dotted!r}: {e}") from e
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ImportError(f"module {module_name!r} has no {attr!r} (from {dotted!r})") from None
    return obj


def resolve_flow(flow: Any) -> Any:
    """A `TaskFlow` from a flow, a `Tasks` registry (its full flow), a factory returning either,
    or the dotted path of any of these."""
    from ..dsl import Tasks, TaskFlow

    given = flow
    if isinstance(flow, str):
        flow = import_object(flow)
    if callable(flow) and not isinstance(flow, (TaskFlow, Tasks)):
        flow = flow()
    if isinstance(flow, Tasks):
        flow = flow.get_full_flow()
    if not isinstance(flow, TaskFlow):
        raise TypeError(f"a flow must be a TaskFlow, a Tasks registry, a factory of one, or its dotted path; "
                        f"{given!r} gave {type(flow).__name__}")
    return flow


def resolve_callback_flow(flow: Any, runner: Any, who: str) -> Any:
    """The callback's own flow (anything `resolve_flow` takes), else `runner.flow`; an error naming
    the callback when neither exists."""
    if flow is None:
        flow = getattr(runner, "flow", None)
    if flow is None:
        raise ValueError(f"{who}: no flow; pass flow=... or use a runner with a .flow (FlowRunner)")
    return resolve_flow(flow)


def resolve_logdir(logdir: Optional[str], runner: Any) -> Optional[str]:
    """The callback's own logdir, else the runner's (`runner.logdir`), else None (write no files)."""
    if logdir is None:
        logdir = getattr(runner, "logdir", None)
    return os.fspath(logdir) if logdir is not None else None


def loader_selected(runner: Any, loaders: Optional[Sequence[str]], default: str) -> bool:
    """Whether the current loader is one of `loaders`; with None, `default` decides:
    "all", "train" (train loaders) or "eval" (every loader that is not a train loader)."""
    if loaders is not None:
        return runner.loader_key in loaders
    if default == "all":
        return True
    if default == "train":
        return bool(runner.is_train_loader)
    return not runner.is_train_loader
