"""The design's import rules, checked on the source (docs/ARCHITECTURE.md).

Rooms: cluster/ is the control plane on three floors (core: schemas, state, errors, jobs;
records: the registry and everything it keeps; commands: the CLI and the demo) and imports none
of the workers. Core imports only core; records import core; commands import core and records.
The workers import core and records, never commands: llm/ besides itself, federated/ also llm/,
serve/ nothing else. Every import counts, also those inside functions and under TYPE_CHECKING,
and no module may reach itself through imports (no circle). Ray's private `ray.llm._internal`
is reached through one module only.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cluster", "llm", "federated", "serve")
CORE, RECORDS, COMMANDS = "cluster.core", "cluster.records", "cluster.commands"
ALLOWED = {
    "cluster": {"cluster"},  # the package's own __init__
    CORE: {CORE},
    RECORDS: {CORE, RECORDS},
    COMMANDS: {CORE, RECORDS, COMMANDS},
    "llm": {CORE, RECORDS, "llm"},
    "federated": {CORE, RECORDS, "llm", "federated"},
    "serve": {CORE, RECORDS, "serve"},
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


def room(module: str) -> str:
    """The room a module lives in: a floor of cluster/, or a worker package."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "cluster" and len(parts) > 1 else parts[0]


def forbidden(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{module} imports {target}"
        for module, targets in graph.items()
        for target in targets
        if room(target) not in ALLOWED[room(module)]
    ]


def test_no_import_crosses_a_forbidden_arrow():
    broken = forbidden(_graph())
    assert broken == [], "imports the design forbids:\n" + "\n".join(broken)


def test_a_worker_or_record_importing_a_command_is_caught(tmp_path):
    """Planted forbidden imports: a worker reaching the demo, a record reaching the CLI, the
    core reaching a record; each is named."""
    for package in (*PACKAGES, "cluster/core", "cluster/records", "cluster/commands"):
        (tmp_path / package).mkdir(parents=True, exist_ok=True)
    (tmp_path / "cluster/commands/demo.py").write_text("")
    (tmp_path / "cluster/commands/cli.py").write_text("")
    (tmp_path / "cluster/records/registry.py").write_text("from cluster.commands.cli import app\n")
    (tmp_path / "cluster/core/state.py").write_text("from cluster.records import registry\n")
    (tmp_path / "llm/train.py").write_text("def f():\n    from cluster.commands import demo\n")
    (tmp_path / "serve/ok.py").write_text("from cluster.records.registry import x\n")
    assert sorted(forbidden(_graph(tmp_path))) == [
        "cluster.core.state imports cluster.records.registry",
        "cluster.records.registry imports cluster.commands.cli",
        "llm.train imports cluster.commands.demo",
    ]


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


def test_a_worker_module_is_named_in_exactly_one_place():
    """`python -m <worker>` is written once, in the jobs table: every command, script and test
    runs a job through it (a string naming a worker module anywhere else fails here)."""
    from cluster.core.jobs import JOBS

    workers = {job.module for job in JOBS.values()}
    named: dict[str, list[str]] = {module: [] for module in workers}
    for path in [*REPO.glob("*/**/*.py")]:
        if ".venv" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and node.value in workers:
                named[node.value].append(str(path.relative_to(REPO)))
    assert named == {module: ["cluster/core/jobs.py"] for module in workers}


def test_no_test_imports_a_conftest():
    """conftest.py files hold fixtures, which pytest hands out; helpers tests import live in
    helper modules (tests/federated/tiny_config.py, tests/serve/harness.py)."""
    importers = sorted(
        str(path.relative_to(REPO))
        for path in (REPO / "tests").rglob("*.py")
        if any(name.split(".")[-1] == "conftest" for name in _imported_names(path))
    )
    assert importers == []
