"""Runner checkpoints and logdirs that survive interruptions, resumes and untrusted files.

- `save_checkpoint`: `torch.save` into a temporary file beside the final name, fsync, `os.replace`
  (`files.write_atomic`): a kill or a full disk mid-write leaves the previous file as it was.
- `load_checkpoint`: `torch.load(..., weights_only=True)` whatever torch's default (torch < 2.6
  unpickles anything); a file holding other objects is refused before any of them is built, an
  empty or truncated one is an error naming it.
- The best-so-far bookkeeping (which epochs are kept, with their metric) and the decoder
  parameters in effect travel inside each runner checkpoint as plain values (`STORAGE_KEY`,
  `DECODER_KEY`), so a resumed run continues them and loading the best epoch restores its
  thresholds with its weights.
- `claim_logdir`: a logdir holding a run's files is only reused by `resume` (continue it) or
  `overwrite` (remove that run's files first); two runs never mix in one logdir.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import torch

from ..callbacks.tuning import HISTORY_FILE, TUNED_PARAMS_FILE
from ..errors import CheckpointError, capped
from ..files import write_atomic

#: Inside a runner checkpoint: the kept checkpoints, best first, `[{"file": "runner.0003.pth", "metric": 0.41}]`.
STORAGE_KEY = "checkpoint_storage"
#: Inside a runner checkpoint: the flow's decoder parameters (thresholds) in effect, as a JSON string.
DECODER_KEY = "decoder_params_json"

#: What a run leaves in its logdir (the runner's defaults); anything else there is not touched.
RUN_ENTRIES = ("checkpoints", "csv_logger", "tensorboard", TUNED_PARAMS_FILE, HISTORY_FILE, "evaluation.csv")
RUN_PATTERNS = (re.compile(r"interpretation_.+\.csv"),)


# Files ------------------------------------------------------------------------------------------


def save_checkpoint(obj: Any, path: str | os.PathLike) -> str:
    """`torch.save(obj)` to `path` atomically (temporary file in the same directory, fsync, `os.replace`)."""
    return write_atomic(path, lambda fh: torch.save(obj, fh), fsync=True)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """The checkpoint at `path`, loaded with `weights_only=True` (tensors, numbers, strings and
    containers only); `CheckpointError` naming the file when it is empty, truncated or holds other
    objects (which are refused, never built)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint {path!r}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path!r} is empty (a write interrupted by a kill or a full disk?); "
                              f"{_what_to_do(path)}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"refused to load checkpoint {path!r}: it holds objects other than tensors, numbers, strings and "
            f"containers{what}, which unpickling would build by running code. Checkpoints are loaded with "
            f"weights_only=True; load only files written by this package (numpy values or custom objects in a "
            f"scheduler or optimizer state cannot be loaded back either)") from None
    except Exception as e:  # torch reports a cut zip archive as RuntimeError, a cut legacy file as EOFError etc.
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"checkpoint {path!r} is truncated or not a torch checkpoint ({type(e).__name__}"
                              f"{': ' + first[:200] if first else ''}); {_what_to_do(path)}") from e


def _what_to_do(path: str) -> str:
    return (f"resume from another checkpoint in {os.path.dirname(path) or '.'!r} (resume='<path of runner.NNNN.pth>') "
            f"or start again with overwrite=True")


# Best-so-far bookkeeping ------------------------------------------------------------------------


def storage_entries(storage: Iterable[Any]) -> List[Dict[str, Any]]:
    """Catalyst's checkpoint storage (`Checkpoint(obj, logpath, metric)`, best first) as plain
    values: file names (the logdir may move) and metrics."""
    return [{"file": os.path.basename(str(c.logpath)), "metric": float(c.metric)} for c in storage]


def storage_from(checkpoint: Mapping[str, Any], directory: str, path: str) -> Optional[List[tuple]]:
    """`[(logpath, metric)]` kept in a runner checkpoint read from `path` (best first), None when
    it has none (a checkpoint from an older version)."""
    entries = checkpoint.get(STORAGE_KEY) if isinstance(checkpoint, Mapping) else None
    if entries is None:
        return None
    try:
        return [(f"{directory}/{os.path.basename(str(e['file']))}", float(e["metric"])) for e in entries]
    except (TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path!r}: malformed {STORAGE_KEY!r} ({e!r}); {_what_to_do(path)}") from None


def best_first(storage: Sequence[Any], minimize: bool) -> List[Any]:
    """`storage` sorted best first by `.metric`; NaN last, ties keep the earlier epoch first."""
    def key(c: Any) -> tuple:
        m = float(c.metric)
        return (math.isnan(m), m if minimize else -m)

    return sorted(storage, key=key)


def storage_json(storage: Iterable[Any], **stats: Any) -> Dict[str, Any]:
    """`runner.storage.json`'s content (Catalyst's layout); a non-finite metric is written as null."""
    stats["storage"] = [{"logpath": str(c.logpath), "metric": float(c.metric) if math.isfinite(float(c.metric)) else None}
                        for c in storage]
    return stats


# Decoder parameters -----------------------------------------------------------------------------


def decoder_params_json(runner: Any) -> Optional[str]:
    """The runner's flow decoder parameters as a JSON string (None without a flow)."""
    flow = getattr(runner, "flow", None)
    if flow is None or not hasattr(flow, "get_decoder"):
        return None
    return json.dumps(flow.get_decoder().params())


def restore_decoder_params(flow: Any, checkpoint: Mapping[str, Any], path: str) -> bool:
    """Apply the decoder parameters saved in a runner checkpoint to `flow`; False when it has none."""
    text = checkpoint.get(DECODER_KEY) if isinstance(checkpoint, Mapping) else None
    if text is None or flow is None:
        return False
    try:
        params = json.loads(text)
        flow.get_decoder().load_tuned(params)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path!r}: cannot restore the decoder parameters saved in it for flow "
                              f"{getattr(getattr(flow, 'graph', None), 'name', '?')!r}: {e}") from None
    return True


# Logdirs ----------------------------------------------------------------------------------------


def run_files(logdir: str | os.PathLike) -> List[str]:
    """The entries of `logdir` that a run left (`RUN_ENTRIES`, `interpretation_*.csv`); empty
    directories do not count."""
    logdir = os.fspath(logdir)
    if not os.path.isdir(logdir):
        return []
    found = []
    for name in sorted(os.listdir(logdir)):
        full = os.path.join(logdir, name)
        if name in RUN_ENTRIES or any(p.fullmatch(name) for p in RUN_PATTERNS):
            if os.path.isdir(full) and not os.path.islink(full):
                if any(files for _, _, files in os.walk(full)):
                    found.append(name)
            else:
                found.append(name)
    return found


def claim_logdir(logdir: str | os.PathLike, resume: Any, overwrite: bool) -> None:
    """Make `logdir` ready for a run: a logdir holding another run's files is an error unless the
    run resumes (`resume`) or `overwrite` is true (those files are removed; nothing else is)."""
    logdir = os.fspath(logdir)
    resuming = resume is not None and resume is not False
    if resuming and overwrite:
        raise ValueError(f"train(resume=..., overwrite=True) into {logdir!r}: resume continues the run in the logdir, "
                         f"overwrite removes it first; choose one")
    if resuming:
        return
    found = run_files(logdir)
    if not found:
        return
    if not overwrite:
        raise FileExistsError(f"logdir {logdir!r} already holds a run ({capped(found, quote=False)}); a new run there "
                              f"would mix with it. "
                              f"Pass resume=True to continue that run, overwrite=True to remove its files and start "
                              f"again, or give another logdir")
    for name in found:
        full = os.path.join(logdir, name)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        else:
            os.remove(full)


__all__ = ["DECODER_KEY", "RUN_ENTRIES", "STORAGE_KEY", "best_first", "claim_logdir", "decoder_params_json",
           "load_checkpoint", "restore_decoder_params", "run_files", "save_checkpoint", "storage_entries",
           "storage_from", "storage_json"]
