"""Who may import whom (docs/ARCHITECTURE.md, "Packages and imports").

 5   catalog_search (cli.py, demo.py)                  dags/
 4   serving     pipelines.orchestration
 3.5  pipelines.duplicates
 3    pipelines.index
 2.5  pipelines.adapter   (trained adapters: read by index, serving, deltas)
 2    pipelines.embed
 1    pipelines.model
 0    pipelines.core

A package imports only packages of a lower rank; serving and orchestration (both 4) do not
import each other. So the CLI and the demo (catalog_search) are the only code that imports
both the batch stages and serving, and nothing in pipelines imports serving. Checked
statically over every import statement, including those inside functions.

No import circles between modules of pipelines/ and serving/ either: the module graph (every
import statement, module-level, inside functions or under TYPE_CHECKING, since a
function-level import only hides a circle) has no cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

RANK = {"pipelines.core": 0, "pipelines.model": 1, "pipelines.embed": 2, "pipelines.adapter": 2.5,
        "pipelines.index": 3, "pipelines.duplicates": 3.5,
        "pipelines.orchestration": 4, "serving": 4, "catalog_search": 5, "dags": 5}


def _package(module: str) -> str | None:
    """The ranked package a module belongs to (None: not ours, or pipelines/__init__)."""
    for name in sorted(RANK, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return name
    return None


def _module_name(path: Path, root: Path = REPO) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def _sources() -> list[Path]:
    return sorted(p for top in ("pipelines", "serving", "catalog_search", "dags")
                  for p in (REPO / top).rglob("*.py"))


def test_the_layers_import_downwards_only():
    wrong = []
    for path in _sources():
        module = _module_name(path)
        own = _package(module)
        if own is None:
            continue
        for lineno, name in _imports(path):
            target = _package(name)
            if target is None or target == own:
                continue
            if RANK[target] >= RANK[own]:
                wrong.append(f"{path.relative_to(REPO)}:{lineno}: {own} (rank {RANK[own]}) "
                             f"imports {name} ({target}, rank {RANK[target]})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_every_package_is_ranked():
    """A new stage package must be placed in the order above before it can be used."""
    packages = {".".join(p.parent.relative_to(REPO).parts) for top in ("pipelines", "serving",
                "catalog_search") for p in (REPO / top).glob("*/__init__.py")}
    packages = {p for p in packages if p.startswith("pipelines.")}
    assert packages <= set(RANK), sorted(packages - set(RANK))


@pytest.mark.parametrize("text,expect", [
    ("from serving.app import create_app\n", True),
    ("def f():\n    import catalog_search.cli\n", True),
    ("from pipelines.core import filesystem\n", False),
])
def test_the_checker_sees_imports_inside_functions(tmp_path, text, expect):
    """The rule above is only as good as the import scan: it must see function-level imports."""
    path = tmp_path / "m.py"
    path.write_text(text)
    names = [n for _, n in _imports(path)]
    assert any(_package(n) in ("serving", "catalog_search") for n in names) is expect


def test_no_stage_module_names_another_by_string():
    """importlib by string would hide an import from the check above; only the CLI's
    command table (catalog_search/cli.py), the builtin weights packages and the Beam
    FileSystem plugins named in $CATALOG_SEARCH_FILESYSTEMS (pipelines/core/filesystem.py:
    names from the environment, not from the code) do that."""
    allowed = {"catalog_search/cli.py", "pipelines/model/efficientnet_lite.py",
               "pipelines/core/filesystem.py"}
    users = [str(p.relative_to(REPO)) for p in _sources()
             if "importlib.import_module(" in p.read_text(encoding="utf-8")]
    assert set(users) <= allowed, users


def _module_graph(root: Path, tops: tuple[str, ...]) -> dict[str, set[str]]:
    """module -> the modules (of `tops` under `root`) it imports; `from a.b import c` names
    a.b.c when that is a module, else a.b."""
    paths = {_module_name(p, root): p for top in tops for p in (root / top).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        targets = set()
        for _, name in _imports(path):
            while name and name not in paths:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles_in_pipelines_and_serving():
    circles = _circles(_module_graph(REPO, ("pipelines", "serving")))
    assert not circles, "modules that import each other (directly or around a loop):\n" + \
        "\n".join(" <-> ".join(c) for c in circles)


def test_the_circle_check_sees_a_circle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import B\n")
    (pkg / "b.py").write_text("B = 1\n\ndef f():\n    from pkg import c\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    (pkg / "d.py").write_text("from pkg import a, b\n")
    assert _circles(_module_graph(tmp_path, ("pkg",))) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_no_private_name_is_imported_from_another_module():
    """A module's interface is its public names: `from a.b import _c` across modules of
    pipelines/ and serving/ would make a private helper part of it."""
    wrong = []
    for top in ("pipelines", "serving"):
        for path in sorted((REPO / top).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if (isinstance(node, ast.ImportFrom) and node.module
                        and node.module.split(".")[0] in ("pipelines", "serving")):
                    wrong += [f"{path.relative_to(REPO)}:{node.lineno}: {node.module}.{a.name}"
                              for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert not wrong, "private names imported from another module:\n" + "\n".join(wrong)


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 80


def test_modules_and_functions_stay_readable_in_one_sitting():
    """No module of pipelines/ or serving/ over 400 lines, no function over 80: past that
    a module holds two things and a function does several (split them by what they do)."""
    long_modules, long_functions = [], []
    for top in ("pipelines", "serving"):
        for path in sorted((REPO / top).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            name = str(path.relative_to(REPO))
            if len(text.splitlines()) > MAX_MODULE_LINES:
                long_modules.append(f"{name}: {len(text.splitlines())} lines")
            for node in ast.walk(ast.parse(text, filename=name)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = (node.end_lineno or node.lineno) - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long_functions.append(f"{name}:{node.lineno} {node.name}: {lines} lines")
    assert not long_modules and not long_functions, \
        "\n".join(["modules over 400 lines:", *long_modules,
                   "functions over 80 lines:", *long_functions])
