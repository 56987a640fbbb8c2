"""The layers of ARCHITECTURE.md, checked on the source: each module imports only what its layer may.

The package is read with `ast` (every import statement, also those inside functions), so a new
import that crosses a layer fails here with the module and the import named, before a reader
meets it in a review.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "dnn_cool_catalyst"

# Layer of each top-level module or subpackage, lowest first (ARCHITECTURE.md draws the same).
LAYERS = {
    # 0 foundation: plain helpers that know nothing of tasks
    "errors": 0, "keys": 0, "files": 0, "distributed": 0, "functional": 0, "summary": 0, "tuning": 0,
    # 1 task kinds and their metrics
    "metrics": 1, "tasks": 1,
    # 2 the traced graph and its interpreters
    "graph": 2, "interpreters": 2, "balancing": 2,
    # 3 the user's front door over the graph
    "dsl": 3, "batches": 3, "inference": 3, "mixed": 3,
    # 4 data: tables, converters, projects, the synthetic story
    "converters": 4, "datasets": 4, "project": 4, "story": 4, "demo": 4, "synthetic": 4,
    # 4 deployment: export (reads the package version from __init__) and the self-contained runtime
    "deploy": 4,
    # 5 Catalyst adapters
    "callbacks": 5, "runners": 6,
}
# `from . import Project` (names the package's __init__ exports, all from the layers up to 4).
ROOT_NAMES = "__init__"
LAYERS[ROOT_NAMES] = 4
# Imports of a higher layer that are deliberate, each done inside a function (lazily) and said here.
LAZY_EXCEPTIONS = {
    ("project", "runners"): "Project.runner() builds a FlowRunner; Catalyst is imported only then",
}
ADAPTER_ONLY = {"catalyst", "accelerate", "tensorboardX", "tensorboard"}


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), package, path


def _imports(package, source):
    """`(target module within the package or None, external top-level name or None, lazy)`."""
    tree = ast.parse(source)
    top_level = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        lazy = id(node) not in top_level
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                if node.module is None and not base:  # `from . import Project`: the package's front names
                    names = [n if n in LAYERS else ROOT_NAMES for n in (a.name for a in node.names)]
                else:
                    names = [node.module] if node.module else [a.name for a in node.names]
                for name in names:
                    yield ".".join(base + name.split(".")), None, lazy
            elif node.module:
                yield None, node.module.split(".")[0], lazy
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield None, alias.name.split(".")[0], lazy


def _layer_of(module):
    head = module.split(".")[0]
    if head not in LAYERS:
        raise AssertionError(f"{module}: not in tests/test_architecture.LAYERS (and ARCHITECTURE.md): place it")
    return head, LAYERS[head]


def _violations(module, package, source):
    """What `module` imports against the layers, one readable line each."""
    head, layer = _layer_of(module)
    found = []
    for target, external, lazy in _imports(package, source):
        if external is not None:
            if layer < LAYERS["callbacks"] and external in ADAPTER_ONLY:
                found.append(f"{module} (core) imports {external}: only callbacks/ and runners/ may")
            continue
        if target == "__version__":  # the package's own version string
            continue
        other, other_layer = _layer_of(target)
        if other_layer > layer and not (lazy and (head, other) in LAZY_EXCEPTIONS):
            found.append(f"{module} (layer {layer}) imports {target} (layer {other_layer}): a lower layer may not "
                         "import a higher one (see ARCHITECTURE.md)")
    return found


MODULES = [(m, p, f) for m, p, f in _modules() if m]


@pytest.mark.parametrize("module,package,path", MODULES, ids=[m for m, _, _ in MODULES])
def test_each_module_imports_only_its_own_layer_and_below(module, package, path):
    assert _violations(module, package, path.read_text(encoding="utf-8")) == []


def test_the_callbacks_never_import_the_runners():
    for module, package, path in MODULES:
        if module.startswith("callbacks"):
            targets = [t for t, _, _ in _imports(package, path.read_text(encoding="utf-8")) if t]
            assert not any(t.startswith("runners") for t in targets), f"{module} imports the runners"


def test_the_checker_reports_crossings_and_allows_what_is_declared():
    assert _violations("errors", [], "from .graph import FlowGraph\n") == [
        "errors (layer 0) imports graph (layer 2): a lower layer may not import a higher one (see ARCHITECTURE.md)"]
    assert _violations("interpreters.loss", ["interpreters"], "import catalyst\n") == [
        "interpreters.loss (core) imports catalyst: only callbacks/ and runners/ may"]
    assert _violations("project", [], "from .runners import FlowRunner\n")  # at module level: refused
    assert _violations("project", [], "def f():\n    from .runners import FlowRunner\n") == []  # lazy, declared
    assert _violations("runners.runner", ["runners"], "from ..callbacks import X\nfrom . import compat\n") == []
