"""What the callbacks share: resolving the flow and the logdir from the runner, loader selection."""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence


def resolve_flow(flow: Any, runner: Any, who: str) -> Any:
    """The callback's own flow, else `runner.flow`; an error naming the callback when neither exists."""
    if flow is None:
        flow = getattr(runner, "flow", None)
    if flow is None:
        raise ValueError(f"{who}: no flow; pass flow=... or use a runner with a .flow (FlowRunner)")
    if hasattr(flow, "get_full_flow"):  # a Tasks registry
        flow = flow.get_full_flow()
    return flow


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
