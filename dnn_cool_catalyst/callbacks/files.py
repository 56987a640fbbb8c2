"""Atomic writes of the files that the callbacks and the runner leave in a logdir (the core's
`dnn_cool_catalyst.files`, re-exported for the Catalyst side)."""
from ..files import read_json, write_atomic, write_csv, write_json

__all__ = ["read_json", "write_atomic", "write_csv", "write_json"]
