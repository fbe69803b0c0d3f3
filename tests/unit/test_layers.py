"""The supervisor's folders are layers: imports point down, never up, and no modules import each other in a loop.

Read from the source (ast), so a new import that breaks the layering fails
here with the file and the import named, before anyone has to find the cycle
at run time. The layers are the ones supervisor/__init__.py describes.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "daemon" / "mpsd"
SUPERVISOR = PACKAGE / "supervisor"
# The lower the number, the lower the layer; a module may import only layers below its own, or its own package.
LAYERS = {
    "mpsd.supervisor.memory": 1,
    "mpsd.supervisor.routing": 1,
    "mpsd.supervisor.fleet": 2,
    "mpsd.supervisor.edge": 3,
    "mpsd.supervisor.edge.http": 4,
    "mpsd.supervisor": 5,  # the wiring: daemon.py, listeners.py, demo_build.py
}
NEVER_FROM_THE_SUPERVISOR = ("mpsd.worker", "mpsd.cli")


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str, path: pathlib.Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def imports_of(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, module) for every mpsd import, TYPE_CHECKING-only ones left out (they never run)."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
               and getattr(block.test, "id", "") == "TYPE_CHECKING" for node in ast.walk(block)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mpsd"):
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("mpsd")]
    return found


def supervisor_modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in SUPERVISOR.rglob("*.py")}


def layer_of(package: str) -> int | None:
    while package and package not in LAYERS:
        package = package.rpartition(".")[0]
    return LAYERS.get(package)


def test_every_supervisor_folder_has_a_layer_and_says_what_it_owns():
    for folder in [SUPERVISOR, *(p for p in SUPERVISOR.rglob("*") if p.is_dir() and (p / "__init__.py").exists())]:
        name = module_name(folder / "__init__.py")
        assert name in LAYERS, f"{name} has no layer in this test: add it where it belongs"
        docstring = ast.get_docstring(ast.parse((folder / "__init__.py").read_text()))
        assert docstring and "import" in docstring.lower(), f"{name}/__init__.py must say what it owns and what it may import"


def test_imports_only_point_down_the_layers():
    modules = supervisor_modules()
    wrong = []
    for module, path in modules.items():
        own = package_of(module, path)
        for line, target in imports_of(path):
            if ".".join(target.split(".")[:2]) in NEVER_FROM_THE_SUPERVISOR:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} imports {target} (the daemon never imports it)")
            if target not in modules:
                continue  # a module of mpsd outside the supervisor (config, units, v1...), or a name inside one
            theirs = package_of(target, modules[target])
            if theirs != own and layer_of(theirs) >= layer_of(own):
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} imports {target}: layer {layer_of(theirs)} "
                             f"from layer {layer_of(own)}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    modules = supervisor_modules()
    graph = {m: sorted({t for _, t in imports_of(p) if t in modules and t != m}) for m, p in modules.items()}
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in graph[module]:
            if state.get(target) == "open":
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(target):] + [module, target])
                            if target in trail else f"import cycle through {module} -> {target}")
            if target not in state:
                visit(target, trail + [module])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [])


def test_no_file_over_400_lines_in_the_daemon_package():
    generated = PACKAGE / "v1"
    long = [f"{p.relative_to(PACKAGE)}: {n} lines" for p in PACKAGE.rglob("*.py")
            if generated not in p.parents and (n := len(p.read_text().splitlines())) > 400]
    assert not long, "\n".join(long)
