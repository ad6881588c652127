"""The package layers, from the bottom: a module imports only its own layer or lower ones.

Every import counts, inside functions and ``TYPE_CHECKING`` blocks too: a
deferred import is still a dependency. ``coordinator`` and ``client`` share a
layer and never import each other, and no import cycle exists between modules.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Source folder -> package, as pyproject's package-dir maps them.
PACKAGES = {
    "fedvault": "fedvault",
    "privacy": "fedvault.privacy",
    "proto": "fedvault.proto",
    "coordinator": "fedvault.coordinator",
    "client": "fedvault.client",
    "examples": "fedvault.examples",
}
#: Lowest first; a module belongs to the longest prefix listed. Plain ``fedvault.*``
#: modules are the shared base.
LAYERS = [
    ["fedvault.errors", "fedvault.durable"],
    ["fedvault.proto"],
    ["fedvault.privacy"],
    ["fedvault"],
    ["fedvault.coordinator", "fedvault.client"],
    ["fedvault.app", "fedvault.__main__"],
    ["fedvault.examples"],
]


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if "migrations" in parts or path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            if folder == "examples" and len(parts) > 1:
                continue  # the task-package example is its own distribution
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The fedvault modules ``name`` imports (a package's ``__init__`` counts as itself)."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1]])
                base = f"{base}.{node.module}" if node.module else base
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _layer(module: str) -> int:
    best, rank = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    return rank


GRAPH = {name: _imports(name, path, set(_modules())) for name, path in _modules().items()}


def test_every_module_has_a_layer() -> None:
    assert GRAPH and all(_layer(m) >= 0 for m in GRAPH)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module: str) -> None:
    upward = sorted(t for t in GRAPH[module] if _layer(t) > _layer(module))
    assert not upward, f"{module} (layer {_layer(module)}) imports higher layers: {upward}"
    sides = {"fedvault.coordinator", "fedvault.client"}
    mine = {s for s in sides if module.startswith(s)}
    crossed = sorted(t for t in GRAPH[module] for s in sides - mine if t.startswith(s) and mine)
    assert not crossed, f"{module} imports the other side: {crossed}"


@pytest.mark.parametrize(
    "package", sorted(m for m, p in _modules().items() if p.stem == "__init__")
)
def test_every_package_states_its_public_names(package: str) -> None:
    tree = ast.parse(_modules()[package].read_text())
    names = {
        t.id
        for n in tree.body
        if isinstance(n, ast.Assign | ast.AnnAssign)
        for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
        if isinstance(t, ast.Name)
    }
    assert "__all__" in names, f"{package}/__init__.py has no __all__"


def test_no_import_cycle() -> None:
    try:
        # static_order() is a generator: the cycle check runs only as it is consumed.
        list(graphlib.TopologicalSorter(GRAPH).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")
