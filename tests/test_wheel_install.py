"""The built wheel, installed on its own, runs `catalog-search` with the packaged defaults.

How the "fresh venv" is made without downloading the dependencies again:
1. `pip wheel --no-deps --no-build-isolation --no-index` builds the wheel from a copy of
   the sources (setup.py, pyproject.toml, pipelines/, serving/, catalog_search/, configs/;
   symlinks kept, as in a clone), so nothing is written into the repository.
2. `python -m venv --without-pip` makes an empty venv. A .pth file in its site-packages
   lists the test environment's site-packages as plain path lines: that makes Beam,
   TensorFlow, ScaNN... importable, and nothing else. Python runs the `.pth` files only
   of site-packages folders, not of folders a .pth line adds, so the test environment's
   editable install of this project (an import hook started by its own .pth) stays off.
3. The venv's own python runs pip (importable through that .pth) with `--no-deps
   --ignore-installed`, so the wheel lands in the new venv's site-packages (ahead of the
   .pth paths) with a `catalog-search` script bound to the new venv's python.
Every command runs in a folder outside the repository, so no `configs/` can be found by
a relative path, and the test checks that `pipelines` is imported from the wheel.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("setup.py", "pyproject.toml", "pipelines", "serving", "catalog_search", "configs")

pytestmark = pytest.mark.heavy  # builds and installs a wheel (~60 s)


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """A venv holding only the project's wheel (dependencies from the test environment)."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    dist = base / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "--no-index", "-w", str(dist), str(src)], cwd=base)
    (wheel,) = dist.glob("catalog_visual_search-*.whl")

    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=base)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     cwd=base).stdout.strip())
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "test-environment.pth").write_text("".join(f"{p}\n" for p in deps))
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
          "--ignore-installed", str(wheel)], cwd=base)
    return venv


def test_wheel_ships_the_defaults_and_runs_the_cli(wheel_venv, tiny_model, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    python, cli = str(wheel_venv / "bin" / "python"), str(wheel_venv / "bin" / "catalog-search")

    where = json.loads(_run([python, "-c", (
        "import json, pipelines, serving.app, pipelines.core.config as c; "
        "print(json.dumps({'pipelines': pipelines.__file__, 'config': str(c.DEFAULT_CONFIG_PATH),"
        " 'serving': serving.app.__file__}))")], cwd=work).stdout)
    for path in where.values():
        assert Path(path).resolve().is_relative_to(wheel_venv.resolve()), where
    packaged = Path(where["config"])
    assert not packaged.is_symlink()
    assert packaged.read_bytes() == (REPO / "configs" / "default.yaml").read_bytes()
    static = Path(where["serving"]).parent / "static"
    assert sorted(p.name for p in static.iterdir()) == sorted(
        p.name for p in (REPO / "serving" / "static").iterdir())

    r = _run([cli, "--help"], cwd=work)
    for command in ("sample-catalog", "embed", "build-index", "serve"):
        assert command in r.stdout

    _run([cli, "sample-catalog", "--out", "cat", "--products", "2", "--images-per-product", "2",
          "--queries-per-product", "0", "--size", "96"], cwd=work)
    # Only the model is overridden (the tiny test model instead of converting the builtin
    # one); everything else, runner included, comes from the packaged default.yaml.
    (work / "model.yaml").write_text(f"model: {{handle: {tiny_model}}}\n")
    r = _run([cli, "--config", "model.yaml", "embed", "--manifest", "cat/manifest.csv",
              "--out", "emb", "--run-id", "r1"], cwd=work)
    assert "check        4 = 4 + 0 + 0  ok" in r.stdout, r.stdout
    summary = json.loads((work / "emb" / "r1" / "summary.json").read_text())
    assert summary["input_rows"] == 4 and summary["embedded"] == 4
