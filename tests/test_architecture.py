"""The design's import rules, checked on the source (docs/ARCHITECTURE.md).

cluster/ is the control plane and imports none of the workers; llm/ imports cluster/; federated/
imports llm/ and cluster/; serve/ imports cluster/ only. Every import counts, also those inside
functions and under TYPE_CHECKING, and no module may reach itself through imports (no circle).
Ray's private `ray.llm._internal` is reached through one module only.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cluster", "llm", "federated", "serve")
ALLOWED = {
    "cluster": {"cluster"},
    "llm": {"cluster", "llm"},
    "federated": {"cluster", "llm", "federated"},
    "serve": {"cluster", "serve"},
}
PRIVATE_RAY = "ray.llm._internal"
PRIVATE_RAY_DOOR = "serve.ray_internal"


def _modules(root: Path = REPO) -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(p for p in parts if p != "__init__")] = path
    return found


def _imported_names(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def _graph(root: Path = REPO) -> dict[str, set[str]]:
    modules = _modules(root)
    return {
        name: {n for n in _imported_names(path) if n in modules and n != name}
        for name, path in modules.items()
    }


def test_no_import_crosses_a_forbidden_arrow():
    broken = [
        f"{module} imports {target}"
        for module, targets in _graph().items()
        for target in targets
        if target.split(".")[0] not in ALLOWED[module.split(".")[0]]
    ]
    assert broken == [], "imports the design forbids:\n" + "\n".join(broken)


def test_no_import_circle():
    graph, circles = _graph(), []
    state: dict[str, str] = {}  # module -> "open" while on the path, "done" after

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                circles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == [], "import circles:\n" + "\n".join(circles)


def _reaches_private_ray(path: Path) -> bool:
    """An import of it, or a module path to it as a string (for importlib)."""
    tree = ast.parse(path.read_text(), str(path))
    strings = [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]
    return any(n.startswith(PRIVATE_RAY) for n in [*_imported_names(path), *strings])


def test_rays_private_api_has_one_door():
    users = sorted(name for name, path in _modules().items() if _reaches_private_ray(path))
    assert users == [PRIVATE_RAY_DOOR], f"{PRIVATE_RAY} reached from {users}"


def test_the_checker_sees_arrows_inside_functions(tmp_path):
    """The rule is not vacuous: a lazy import from serve/ into llm/ is an edge of the graph."""
    for package in PACKAGES:
        (tmp_path / package).mkdir()
    (tmp_path / "llm" / "model.py").write_text("")
    (tmp_path / "serve" / "bad.py").write_text("def f():\n    from llm.model import load\n")
    assert _graph(tmp_path)["serve.bad"] == {"llm.model"}
