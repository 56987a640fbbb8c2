"""Exceptions raised by dnn_cool_catalyst, each naming the flow, task path, key or shape involved,
and the two helpers that keep their messages readable (`capped`, `did_you_mean`)."""
import difflib
from typing import Any, Iterable


class FlowDefinitionError(ValueError):
    """A flow function is malformed: unknown task or feature, bad condition, task added twice."""


class LabelError(ValueError):
    """Labels of a task have the wrong length, shape, dtype or values, or are absent."""


class InputError(KeyError):
    """An input mapping lacks a feature (or ground truth) that the flow reads."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


class TunedParamsError(ValueError):
    """Tuned decoder parameters (a file or a mapping) do not fit the flow: an unknown task path, a
    threshold that is not a finite number, the wrong number of thresholds."""


class HeadError(RuntimeError):
    """A task's head failed on its input (most often a feature of another width than the head
    takes); names the task, the feature it read and both shapes. A `RuntimeError`, as torch's own."""


class NonFiniteLossError(FloatingPointError):
    """A batch's loss is NaN or infinite: names the loader, the batch, the tasks and the inputs."""


class CheckpointError(RuntimeError):
    """A checkpoint file is empty, truncated, malformed, or holds objects that loading would run."""


#: Items an error message lists before "and N more".
SHOWN = 8


def capped(items: Any, shown: int = SHOWN, quote: bool = True) -> str:
    """`"a, b, c and 240 more"`: the first `shown` items (strings quoted unless `quote=False`, for
    items that are already phrases such as `"row 3 (2.0)"`), then how many are left."""
    items = list(items)
    head = ", ".join(repr(i) if quote and isinstance(i, str) else str(i) for i in items[:shown])
    return head + (f" and {len(items) - shown} more" if len(items) > shown else "")


def did_you_mean(name: str, known: Iterable[str], listed: int = 30) -> str:
    """`"; did you mean 'a'? (known: a, b, ... and N more)"`: the close matches of `name` (when there
    are none, the names whose last dotted part is close to its last part), then the first `listed`
    known names (`listed=0`: the hint alone)."""
    known = sorted(set(map(str, known)))
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    if not close:  # `shirt_type` for `person_flow.body.shirt_type`
        tails = difflib.get_close_matches(name.rsplit(".", 1)[-1], {k.rsplit(".", 1)[-1] for k in known}, cutoff=0.6)
        close = [k for k in known if k.rsplit(".", 1)[-1] in tails][:3]
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    if not listed:
        return hint
    shown = ", ".join(known[:listed]) + (f" and {len(known) - listed} more" if len(known) > listed else "")
    return f"{hint} (known: {shown or 'none'})"
