"""`import dnn_cool_catalyst` does not import Catalyst; `dcc.runners` / `dcc.callbacks` do, on first access."""
import subprocess
import sys

CODE = """
import sys
import dnn_cool_catalyst as dcc
assert "catalyst" not in sys.modules and "dnn_cool_catalyst.runners" not in sys.modules
runners = dcc.runners
assert "catalyst" in sys.modules and runners.FlowRunner.__name__ == "FlowRunner"
assert dcc.callbacks.FlowMetricsCallback.__module__ == "dnn_cool_catalyst.callbacks.metrics"
try:
    dcc.not_a_name
except AttributeError as e:
    assert "not_a_name" in str(e)
else:
    raise AssertionError("unknown attribute did not raise")
"""


def test_subpackages_are_imported_on_first_access():
    done = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
