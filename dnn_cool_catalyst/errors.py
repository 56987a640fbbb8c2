"""Exceptions raised by dnn_cool_catalyst, each naming the flow, task path, key or shape involved."""


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
