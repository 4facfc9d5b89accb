"""The imports form a house: entry points on routers, routers on services, services on the
storage tier, and everything on the domain models and settings, with no arrow running back up
and no circle, between modules or between packages."""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

from config import BACKEND_DIR

# From the top down: a module imports from its own layer and the ones below it, never above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("entry points", ("main", "server", "gunicorn.conf", "gpu_worker", "tools", "examples")),
    ("routers", ("routers", "middleware")),
    ("services", ("services",)),
    ("storage", ("services.storage",)),
    ("domain and settings", ("mv", "config", "echo", "version", "observability", "ports")),
]
NOT_SOURCE = ("test", "mv/outputs", "mv/models")

Graph = Mapping[str, set[str]]


def module_name(path: Path) -> str:
    """`services/storage/__init__.py` -> `services.storage`."""
    parts = path.relative_to(BACKEND_DIR).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules() -> dict[str, Path]:
    """Every module of the backend, tests and runtime data excluded."""
    modules = {}
    for path in BACKEND_DIR.rglob("*.py"):
        relative = path.relative_to(BACKEND_DIR).as_posix()
        if not relative.startswith(NOT_SOURCE):
            modules[module_name(path)] = path
    return modules


def imported_modules(tree: ast.AST, known: Iterable[str]) -> set[str]:
    """The project modules a module imports (anywhere in it, function bodies included)."""
    known = set(known)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in known:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in known else node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    modules = source_modules()
    return {
        name: imported_modules(ast.parse(path.read_text("utf-8")), modules) - {name}
        for name, path in modules.items()
    }


def layer_of(module: str) -> int:
    """Index in LAYERS of the most specific prefix naming the module (0 is the top)."""
    best: tuple[int, int] | None = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            names_it = module == prefix or module.startswith(prefix + ".")
            if names_it and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[1]


def upward_imports(graph: Graph) -> list[str]:
    """Every import from a module to one in a layer above its own."""
    return sorted(
        f"{source} ({LAYERS[layer_of(source)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for source, targets in graph.items()
        for target in targets
        if layer_of(target) < layer_of(source)
    )


def circles(graph: Graph) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def package_of(module: str) -> str:
    """The idea a module belongs to: `services.generation.queue` -> `services.generation`."""
    parts = module.split(".")
    return ".".join(parts[:2] if parts[0] in ("services", "routers") else parts[:1])


def package_graph(graph: Graph) -> dict[str, set[str]]:
    """The import graph between packages (imports inside one package left out)."""
    packages: dict[str, set[str]] = {}
    for source, targets in graph.items():
        edges = packages.setdefault(package_of(source), set())
        edges.update(package_of(target) for target in targets)
    return {package: targets - {package} for package, targets in packages.items()}


def test_no_import_runs_up_a_layer() -> None:
    assert upward_imports(import_graph()) == []


def test_no_circle_between_modules() -> None:
    assert circles(import_graph()) == []


def test_no_circle_between_packages() -> None:
    assert circles(package_graph(import_graph())) == []


def test_the_domain_models_and_settings_import_nothing_from_services() -> None:
    graph = import_graph()
    lower = [name for name in graph if layer_of(name) == len(LAYERS) - 1]
    assert {"config", "mv.ids", "mv.character_reference", "mv.jobs"} <= set(lower)
    assert [
        (name, sorted(graph[name])) for name in lower if graph[name] & set(graph) - set(lower)
    ] == []


def test_the_checks_see_what_they_look_for() -> None:
    # The real graph has the edges the checks read, and a bad graph fails each check.
    graph = import_graph()
    assert "services.storage" in graph["services.asset_persistence.service"]
    assert "mv.ids" in graph["services.storage.keys"]
    assert "services.asset_persistence" in graph["routers.mv"]
    bad = {**graph, "mv.ids": {"services.storage.keys"}}
    assert upward_imports(bad) == [
        "mv.ids (domain and settings) imports services.storage.keys (storage)"
    ]
    assert ["mv.ids", "services.storage.keys"] in circles(bad)
    assert any({"mv", "services.storage"} <= set(circle) for circle in circles(package_graph(bad)))
