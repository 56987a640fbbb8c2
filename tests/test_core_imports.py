"""The core never imports Catalyst (DESIGN principle 5)."""
import subprocess
import sys


def test_core_imports_without_catalyst():
    code = (
        "import sys; sys.modules['catalyst'] = None\n"
        "import dnn_cool_catalyst as dcc, torch\n"
        "from dnn_cool_catalyst.story import security_tasks, security_labels\n"
        "f = security_tasks(4).get_full_flow()\n"
        "x, y = f.get_dataset({'features': torch.randn(8, 4)}, security_labels(8))[list(range(8))]\n"
        "f.get_loss()(f.torch()(x), y).backward()\n"
        "f.get_loss(balancer=dcc.balancing.UncertaintyWeighting())(f.torch()(x), y).backward()\n"
        "assert not any(m == 'catalyst' or m.startswith('catalyst.') for m in sys.modules if sys.modules[m] is not None)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
