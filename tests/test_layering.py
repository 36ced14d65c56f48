"""Who may import whom (docs/ARCHITECTURE.md, "Packages and imports").

    catalog_search  ->  serving  ->  pipelines.{embed,index,model,orchestration}  ->  pipelines.core
         |                                   ^
         +-----------------------------------+

The CLI and the demo (catalog_search) are the only code that imports both the batch stages
and serving; serving never imports the CLI, and nothing in pipelines imports serving or
catalog_search. pipelines.core imports no other stage. dags/ import only pipelines.
Checked statically over every import statement, including those inside functions.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# package prefix -> prefixes it must never import
FORBIDDEN = {
    "pipelines": ("serving", "catalog_search", "dags"),
    "pipelines.core": ("pipelines.model", "pipelines.embed", "pipelines.index",
                       "pipelines.orchestration"),
    "serving": ("catalog_search", "dags", "pipelines.orchestration"),
    "dags": ("serving", "catalog_search"),
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
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


def _is_under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_the_layers_import_downwards_only():
    wrong = []
    for path in _sources():
        module = _module_name(path)
        rules = [bad for owner, bad in FORBIDDEN.items() if _is_under(module, owner)]
        for lineno, name in _imports(path):
            for bad in (b for rule in rules for b in rule):
                if _is_under(name, bad):
                    wrong.append(f"{path.relative_to(REPO)}:{lineno}: {module} imports {name}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


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
    assert any(_is_under(n, "serving") or _is_under(n, "catalog_search") for n in names) is expect


def test_no_stage_module_names_another_by_string():
    """importlib by string would hide an import from the check above; only the CLI's
    command table (catalog_search/cli.py) and the builtin weights packages do that."""
    allowed = {"catalog_search/cli.py", "pipelines/model/efficientnet_lite.py"}
    users = [str(p.relative_to(REPO)) for p in _sources()
             if "importlib.import_module(" in p.read_text(encoding="utf-8")]
    assert set(users) <= allowed, users
