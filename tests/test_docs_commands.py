"""Every fenced shell command in README.md and docs/*.md is run here, by a named test, or
skipped for a stated reason; a command added to the docs without an entry fails.

`COVERAGE` maps each documented command (a regex over the command with `\\` continuations
joined, comments dropped and whitespace collapsed) to how it is covered:

- RUN: executed by this file as written, in a scratch copy of the repository (symlinks;
  its own `out/`), with the venv's bin/ first on PATH, and must exit 0. Only placeholders
  are substituted (`<run_id>`, `/path/to/...`, `/run/secrets/admin`, `../shared`), and the
  fixed ports 8080/8081 become free ones (other services run on this machine).
- TEST: covered by the named test file (it must exist).
- SKIP: not run, with the reason (cloud runners, docker, registry installs, benchmarks
  that take minutes). Their `catalog-search` subcommands and script flags are still
  checked against `--help`.

A documented command sequence lives in a script, `docs/examples/*.sh`, which the docs
include verbatim (a `<!-- include docs/examples/NAME.sh -->` line right before its fenced
block; checked here): the table covers the documented call of the script, and the
script's own lines are checked against `--help` and run by a test here on a small input.

Default run: the table, `--help` of every documented subcommand and script, and the
README's command-line chain on a 6-image catalog. `-m slow`: the same chain on the full
sample catalog as written (checking the README's example query), the grocery manifests
when the dataset is present, and the local Airflow stack sequence of docs/AIRFLOW.md
(`airflow standalone` on SQLite, catalog_refresh, index_handoff, a backfill, stop).
"""
from __future__ import annotations

import csv
import json
import os
import re
import shlex
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
# The grocery dataset where the docs say (../shared next to the repository), or $GROCERY_DATASET.
GROCERY = Path(os.environ.get("GROCERY_DATASET",
                              REPO.parent / "shared" / "datasets" / "grocery-store" / "dataset"))
EXAMPLES = REPO / "docs" / "examples"

RUN, TEST, SKIP = "run", "test", "skip"
CLOUD = "cloud runner / object store: not reachable from here"
LONG = "a measurement over the full dataset or 200k vectors (minutes of CPU)"


@dataclass(frozen=True)
class Coverage:
    pattern: str  # regex, fullmatch against DocCommand.key
    how: str      # RUN, TEST or SKIP
    where: str    # RUN: the test here; TEST: a test file; SKIP: the reason


COVERAGE: list[Coverage] = [
    # README: set-up
    Coverage(r"make demo", TEST, "tests/test_demo.py (python -m catalog_search.demo, what the "
             "target runs, on a 3-image catalog: completes, fails fast, stops on SIGTERM)"),
    Coverage(r"make test", TEST, "tests/ (the suite this file belongs to)"),
    Coverage(r"make test-(fast|slow)", TEST, "tests/ (marker subsets of the suite this file "
             "belongs to: pyproject.toml's slow and heavy markers)"),
    Coverage(r"make lint|make browser", SKIP, "run by .ci/run on every CI run, before the "
             "suite (lint: ruff + mypy; browser: apt-get install chromium as root)"),
    # README: command line (run in order by test_readme_command_line_chain*)
    Coverage(r"\. \.venv/bin/activate", RUN, "test_readme_command_line_chain"),
    Coverage(r"catalog-search (?!.*out/grocery)(sample-catalog|embed|build-index|index-info|"
             r"query|evaluate|model (info|export|bench))( .*)?|catalog-search --version", RUN,
             "test_readme_command_line_chain"),
    Coverage(r"(CATALOG_SEARCH_ADMIN_TOKEN_FILE=\S+ )?catalog-search serve --index-root out/index.*",
             RUN, "test_readme_command_line_chain"),
    Coverage(r"catalog-search duplicates --index-root out/index .*", TEST,
             "tests/test_duplicates.py (the job on a catalog with planted copies, the CLI, "
             "its bad arguments, the report in a browser)"),
    # README: other runners
    Coverage(r"docker (build|push) .*", SKIP, "needs docker and a registry; the image "
             "definition is checked by tests/test_worker_image.py"),
    Coverage(r"pip install 'apache-beam\[(gcp|aws)\]==[0-9.]+'", SKIP,
             "registry install of a cloud extra; its absence is tested in "
             "tests/test_worker_image.py"),
    Coverage(r"catalog-search --config configs/(dataflow|flink)\.yaml .*", SKIP,
             CLOUD + "; option sets: tests/test_config_and_cli.py"),
    # README + docs/EVALUATION.md: the grocery store dataset
    Coverage(r"(DATA|DATASET)=\S+|CS=\.venv/bin/catalog-search", RUN, "test_grocery_manifests"),
    Coverage(r"\.venv/bin/python benchmarks/grocery_manifests\.py .*", RUN,
             "test_grocery_manifests (when the dataset is present)"),
    Coverage(r"(catalog-search|\$CS)( --config docs/examples/grocery-scann\.yaml)? "
             r"(embed|build-index|evaluate) .*out/grocery.*", SKIP,
             "the full grocery dataset (2,721 + 2,485 images: minutes); the same "
             "subcommands run here on the sample catalog"),
    Coverage(r"CSZ=\"\$CS --config configs/grocery-zoom\.yaml\"|"
             r"\$CSZ (embed|build-index|evaluate) .*out/(grocery|zoom)/.*|"
             r"\$CS --config docs/examples/grocery-zoom-queries\.yaml embed .*out/zoom/.*", SKIP,
             "the full grocery dataset embedded with the zoom option (minutes); "
             "configs/grocery-zoom.yaml is loaded by tests/test_adapter_refit.py"),
    Coverage(r"\$CSZ train-adapter .*", TEST,
             "tests/test_adapter_refit.py (train-adapter with a --config file, --refit)"),
    Coverage(r"(catalog-search|\$CS) train-adapter .*", TEST,
             "tests/test_adapter.py (train-adapter on generated confusable products: written, "
             "gate refusal keeps the old adapter, bad input / arguments)"),
    Coverage(r"bash docs/examples/grocery_duplicates\.sh out/grocery/catalog\.csv .*", SKIP,
             "the grocery catalog + 300 planted copies (3,021 images: minutes); the script "
             "runs on a 3-product catalog in test_grocery_duplicates_script"),
    # docs/EVALUATION.md: the quality grid's per-row steps and its model-cost loop
    Coverage(r"bash docs/examples/grocery_row\.sh .*|"
             r"\.venv/bin/catalog-search --config \$ROW/config\.yaml evaluate .*", SKIP,
             "a grocery evaluation row on the full dataset (minutes each); the script runs "
             "on a 3-product catalog in test_grocery_row_script; --text-from and "
             "--text-weight: tests/test_serving_cli_evaluate.py"),
    Coverage(r"bash docs/examples/model_bench\.sh lite0 lite1 lite2 >> "
             r"benchmarks/results/model_bench_lite012\.jsonl", SKIP,
             "three builtin models converted and benchmarked (minutes); the script runs for "
             "lite0 in test_model_bench_script"),
    # docs/AIRFLOW.md
    Coverage(r"airflow dags trigger catalog_(refresh|backfill) --conf '\{ \"config_file\": "
             r"\"/opt/catalog-search/configs/(dataflow|flink)\.yaml\".*", SKIP,
             CLOUD + "; the options assembled through the params: tests/test_orchestration.py"),
    Coverage(r"\.venv/bin/python -m catalog_search\.demo run-dag .*", TEST,
             "tests/test_dags.py (demo.run_dag in a `catalog_search.demo` subprocess, backfills "
             "with drops)"),
    Coverage(r"make airflow-(up|down)|export AIRFLOW_HOME=.*|export AIRFLOW__CORE__DAGS_FOLDER=.*|"
             r"\.venv/bin/catalog-search serve --index-root out/data/index .*|"
             r"\.venv/bin/airflow (connections add|dags unpause|dags list-runs|dags trigger) .*",
             RUN, "test_airflow_local_stack_sequence (slow)"),
    # docs/BENCHMARKS.md, docs/EVALUATION.md, docs/RELIABILITY.md
    Coverage(r"\.venv/bin/pip install faiss-cpu", SKIP, "registry install, for one benchmark"),
    Coverage(r"bash docs/examples/grocery_fit\.sh .*", SKIP,
             "the grocery embeddings the benchmark vectors are fitted to (the full grocery "
             "catalog, original + hflip: minutes); its config file is loaded in "
             "test_example_configs_load"),
    Coverage(r"(nice -n 10 )?(TF_ENABLE_ONEDNN_OPTS=0 )?\.venv/bin/python benchmarks/(onednn_bench|"
             r"embed_throughput|index_bench|serving_bench|reliability_soak|index_build_memory|"
             r"nightly_bench|fitted_vectors|quality_grid|text_index_bench|sharding_recall|"
             r"fusion_latency|delta_bench|delta_scann_crossover|remote_fetch_bench|duplicates_bench|"
             r"duplicates_scale|crowding_bench|adapter_train_bench|query_path_bench|"
             r"adapter_grocery_grid|projection_ab)\.py .*",
             SKIP, LONG),
    Coverage(r"\.venv/bin/catalog-search duplicates --config /tmp/dup1m/ws/config\.yaml .*",
             SKIP, "the duplicates job alone on the 1M version duplicates_scale.py built "
             "(10-15 min)"),
    Coverage(r"(TF_ENABLE_ONEDNN_OPTS=0 )?\.venv/bin/python -m pytest -q (-m slow )?tests/\S+.*",
             TEST, "the named test files (make test / make test-slow)"),
]


@dataclass(frozen=True)
class DocCommand:
    doc: str   # path relative to the repository
    line: int  # first line of the command
    text: str  # as written: `\` continuations joined, comments dropped
    include: str | None = None  # the docs/examples script its block includes verbatim

    @property
    def key(self) -> str:
        return " ".join(self.text.split())


def _split_commands(block: list[str], doc: str, first_line: int,
                    include: str | None = None) -> list[DocCommand]:
    """Shell commands of one fenced block: quotes may span lines, `#` starts a comment."""
    commands: list[DocCommand] = []
    buf, start, quote = "", None, None
    for offset, line in enumerate(block):
        out, i = [], 0
        while i < len(line):
            c = line[i]
            if quote:
                quote = None if c == quote else quote
            elif c in "'\"":
                quote = c
            elif c == "\\" and i + 1 < len(line):
                out.append(line[i:i + 2])
                i += 2
                continue
            elif c == "#" and (i == 0 or line[i - 1].isspace()):
                break
            out.append(c)
            i += 1
        text = "".join(out).rstrip()
        if start is None:
            if not text.strip():
                continue
            start = first_line + offset
        if quote:
            buf += text + "\n"
        elif text.endswith("\\"):
            buf += text[:-1] + " "
        else:
            buf += text
            commands.append(DocCommand(doc, start, buf.strip(), include))
            buf, start = "", None
    assert start is None, f"{doc}:{start}: unterminated command {buf!r}"
    return commands


INCLUDE = re.compile(r"^<!-- include (docs/examples/[\w.-]+\.sh) -->$")


def doc_blocks() -> list[tuple[str, int, str, list[str], str | None]]:
    """(doc, first line, language, lines, included script) of every fenced block of
    README.md and docs/*.md."""
    found = []
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            m = re.match(r"^```(\w*)\s*$", lines[i])
            if not m:
                i += 1
                continue
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            inc = INCLUDE.match(lines[i - 1]) if i else None
            found.append((str(path.relative_to(REPO)), i + 2, m.group(1), lines[i + 1:end],
                          inc.group(1) if inc else None))
            i = end + 1
    return found


def doc_commands() -> list[DocCommand]:
    """Every command of every ```bash / ```sh block of README.md and docs/*.md."""
    return [cmd for doc, line, lang, block, include in doc_blocks() if lang in SHELL_LANGS
            for cmd in _split_commands(block, doc, line, include)]


def coverage_of(cmd: DocCommand) -> Coverage:
    matches = [c for c in COVERAGE if re.fullmatch(c.pattern, cmd.key)]
    assert len(matches) == 1, (f"{cmd.doc}:{cmd.line}: {cmd.key!r} matches {len(matches)} "
                               "entries of COVERAGE: add it to the table (run it, name the "
                               "test that covers it, or give the reason to skip it)")
    return matches[0]


def _commands_in(doc: str) -> list[DocCommand]:
    """The doc's own commands (not the lines of the scripts it includes)."""
    return [c for c in doc_commands() if c.doc == doc and c.include is None]


# ----------------------------------------------------------------------------- the table

def test_the_extractor_joins_continuations_and_drops_comments():
    cmds = _split_commands([
        "# a comment", "FOO=1 a --x 'q # not a comment' \\", "   --y 2   # trailing",
        "b --conf '{", '  "k": 1}\'', "c &   # bg"], "doc", 1)
    assert [c.key for c in cmds] == ["FOO=1 a --x 'q # not a comment' --y 2",
                                     "b --conf '{ \"k\": 1}'", "c &"]
    assert [c.line for c in cmds] == [2, 4, 6]


def test_included_scripts_are_verbatim_and_each_is_called_by_a_documented_command():
    blocks = [(doc, line, inc, block) for doc, line, _, block, inc in doc_blocks() if inc]
    assert {inc for *_, inc, _ in blocks} == {str(p.relative_to(REPO))
                                              for p in EXAMPLES.glob("*.sh")}
    called = " ".join(c.key for c in doc_commands() if c.include is None)
    for doc, line, inc, block in blocks:
        assert "\n".join(block) + "\n" == (REPO / inc).read_text(), (
            f"{doc}:{line}: the block differs from {inc} (paste the script as it is)")
        assert f"bash {inc} " in called, f"{inc}: no documented command runs it"
        r = subprocess.run(["bash", "-n", str(REPO / inc)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in re.finditer(r"^#+\s+(.*)$", markdown, re.M)}


def test_links_between_docs_resolve():
    """Every relative link of README.md and docs/*.md names a file that exists, and a
    #fragment names a heading of its page."""
    broken = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"\]\(([^)\s]+)\)", text):
            target, _, fragment = m.group(1).partition("#")
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            page = (path.parent / target) if target else path
            if not page.exists():
                broken.append(f"{path.name}: {m.group(1)}")
            elif fragment and page.suffix == ".md" and fragment not in _anchors(
                    page.read_text(encoding="utf-8")):
                broken.append(f"{path.name}: {m.group(1)} (no such heading)")
    assert not broken, broken


def test_example_configs_load():
    """The config files the docs pass with --config say what the docs say they do."""
    from pipelines.core.config import load_config
    fit = load_config(str(EXAMPLES / "fit-views.yaml")).augment
    assert fit.views == ("original", "hflip") and fit.mode == "separate"
    assert load_config(str(EXAMPLES / "grocery-scann.yaml")).index.brute_force_below == 0
    for precision in ("fp32", "bf16"):
        config = load_config(str(EXAMPLES / f"precision-{precision}.yaml"))
        assert config.model.precision == precision
    zoom_q = load_config(str(EXAMPLES / "grocery-zoom-queries.yaml")).features
    assert zoom_q.scales == (1.6,) and zoom_q.query_scales is None


def test_every_documented_command_has_exactly_one_coverage_entry():
    cmds = [c for c in doc_commands() if c.include is None]  # scripts: the test above
    assert len(cmds) > 40 and {c.doc for c in cmds} >= {"README.md", "docs/AIRFLOW.md"}
    used = {id(coverage_of(c)) for c in cmds}
    stale = [c.pattern for c in COVERAGE if id(c) not in used]
    assert not stale, f"COVERAGE entries that match no documented command: {stale}"
    for c in COVERAGE:
        if c.how == TEST:
            named = re.findall(r"tests/[\w/]*(?:\.py)?", c.where + " " + " ".join(
                x.key for x in cmds if re.fullmatch(c.pattern, x.key)))
            assert named and all((REPO / n).exists() for n in named), (c.pattern, named)


# ------------------------------------------------------------------ --help and flags

def _subcommand_and_flags(key: str) -> tuple[tuple[str, ...], set[str]] | None:
    """('model', 'export'), {'--out'} for a catalog-search command line; None otherwise."""
    words = shlex.split(key.replace("$CS", "catalog-search"))
    words = [w for w in words if "=" not in w or w.startswith("-")]
    while words and not words[0].endswith("catalog-search"):
        words.pop(0)
    if not words:
        return None
    words = words[1:]
    if words[:1] == ["--config"]:
        words = words[2:]
    if not words or words[0].startswith("-"):
        return None
    sub = tuple(words[:2]) if words[0] == "model" else (words[0],)
    flags = {w.split("=")[0] for w in words[len(sub):] if w.startswith("--")}
    return sub, flags


@pytest.mark.heavy
def test_help_of_every_documented_subcommand_and_script_names_the_documented_flags():
    """Also for the skipped commands: the subcommands and flags they use exist."""
    wanted: dict[tuple[str, ...], set[str]] = {}
    scripts: dict[tuple[str, str | None], set[str]] = {}
    for cmd in doc_commands():
        if (parsed := _subcommand_and_flags(cmd.key)) is not None:
            wanted.setdefault(parsed[0], set()).update(parsed[1])
        if m := re.search(r"(benchmarks/\w+\.py) (.*)", cmd.key):
            words = shlex.split(m.group(2))
            action = words[0] if words and re.fullmatch(r"[a-z][a-z-]*", words[0]) else None
            scripts.setdefault((m.group(1), action), set()).update(
                w for w in words if w.startswith("--"))
    assert {("embed",), ("build-index",), ("query",), ("serve",), ("model", "export")} <= set(wanted)
    for sub, flags in sorted(wanted.items()):
        r = subprocess.run([str(VENV_BIN / "catalog-search"), *sub, "--help"],
                           capture_output=True, text=True, timeout=120, cwd=REPO)
        assert r.returncode == 0, (sub, r.stderr)
        missing = [f for f in flags if not re.search(re.escape(f) + r"\b", r.stdout)]
        assert not missing, f"catalog-search {' '.join(sub)} --help lacks {missing}"
    for (script, action), flags in sorted(scripts.items(), key=lambda kv: (kv[0][0],
                                                                           kv[0][1] or "")):
        argv = [script, *([action] if action else []), "--help"]  # a script's subcommand
        r = subprocess.run([str(VENV_BIN / "python"), *argv], capture_output=True,
                           text=True, timeout=120, cwd=REPO)
        assert r.returncode == 0, (argv, r.stderr)
        missing = [f for f in flags if not re.search(re.escape(f) + r"\b", r.stdout)]
        assert not missing, f"{' '.join(argv)} lacks {missing}"


# ------------------------------------------------------------- running commands as written

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def scratch_repo(tmp: Path) -> Path:
    """A working copy of the repository for running doc commands: symlinks, its own out/."""
    work = tmp / "repo"
    work.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in ("out", ".git", ".pytest_cache"):
            (work / entry.name).symlink_to(entry)
    return work


def shell_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "CATALOG_SEARCH_"))}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", TF_CPP_MIN_LOG_LEVEL="3",
               **extra)
    return env


class Shell:
    """Runs doc commands one by one in `cwd`; `export`/`.`/VAR= lines carry over."""

    def __init__(self, cwd: Path, env: dict[str, str], subs: dict[str, str] | None = None):
        self.cwd, self.env, self.subs = cwd, env, dict(subs or {})
        self.preamble: list[str] = []
        self.background: list[subprocess.Popen] = []
        self.ran: list[str] = []

    def expand(self, text: str) -> str:
        for placeholder, value in self.subs.items():
            text = text.replace(placeholder, value)
        return text

    def run(self, cmd: DocCommand | str, timeout: float = 600) -> str:
        key = cmd.key if isinstance(cmd, DocCommand) else cmd
        text = self.expand(cmd.text if isinstance(cmd, DocCommand) else cmd)
        if re.fullmatch(r"(\. \S+activate|export .*|[A-Z_]+=\S+)", key):
            self.preamble.append(text)
            script = "\n".join(self.preamble)
        else:
            script = "\n".join([*self.preamble, text])
        if text.rstrip().endswith("&"):
            return self.start(text.rstrip()[:-1])
        r = subprocess.run(["bash", "-ec", script], cwd=self.cwd, env=self.env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
        assert r.returncode == 0, f"`{text}` exited {r.returncode}:\n{r.stdout[-6000:]}"
        self.ran.append(key)
        return r.stdout

    def start(self, text: str) -> str:
        log = open(self.cwd / f"bg-{len(self.background)}.log", "w")
        proc = subprocess.Popen(["bash", "-ec", "\n".join([*self.preamble, text])],
                                cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.background.append(proc)
        self.ran.append(text)
        return log.name

    def stop_background(self) -> None:
        for proc in self.background:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def _wait_http(url: str, want: int, proc: subprocess.Popen, log: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while _status(url) != want:
        assert proc.poll() is None, Path(log).read_text()[-4000:]
        assert time.time() < deadline, f"{url} not {want}: " + Path(log).read_text()[-4000:]
        time.sleep(0.5)


def _shrink_catalog(cat: Path, products: tuple[str, ...], queries: int) -> None:
    """Keep the named products of the sample catalog (the README's example query's P0000 and
    the "organic" one its text queries find) and the first query rows."""
    for name in ("manifest.csv", "queries.csv"):
        with open(cat / name, newline="") as f:
            rows = list(csv.DictReader(f))
        keep = ([r for r in rows if r["product_id"] in products] if name == "manifest.csv"
                else rows[:queries])
        with open(cat / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(keep)


def _readme_chain(tmp_path: Path, tiny: bool) -> None:
    work = scratch_repo(tmp_path)
    token = tmp_path / "admin-token"
    token.write_text("s3cret-token-for-the-docs-test\n")
    ports = {"serve": _free_port(), "serve-token": _free_port()}
    sh = Shell(work, shell_env(), {"/run/secrets/admin": str(token)})
    cmds = [c for c in _commands_in("README.md")
            if coverage_of(c).where == "test_readme_command_line_chain"]
    assert len(cmds) == 16, cmds  # README lines 67-82
    for cmd in cmds:
        key = cmd.key
        if "<run_id>" in key:
            sh.subs["<run_id>"] = (work / "out/emb/LATEST").read_text().strip()
        if key.startswith(("catalog-search serve", "CATALOG_SEARCH_ADMIN_TOKEN_FILE")):
            port = ports["serve-token" if "TOKEN" in key else "serve"]
            text = re.sub(r"--port \d+", "", sh.expand(cmd.text)) + f" --port {port}"
            log = sh.start(text)
            base = f"http://127.0.0.1:{port}"
            _wait_http(base + "/readyz", 200, sh.background[-1], log, 180)
            assert _status(base + "/") == 200
            req = urllib.request.Request(base + "/v1/reload", method="POST", data=b"")
            if "TOKEN" in key:  # the README: reload needs the token
                assert _status_of(req) == 401
                req.add_header("Authorization", "Bearer s3cret-token-for-the-docs-test")
            assert _status_of(req) == 200
            sh.stop_background()
            continue
        out = sh.run(cmd)
        if key.startswith("catalog-search sample-catalog") and tiny:
            _shrink_catalog(work / "out/cat", ("P0000", "P0001", "P0004"), queries=2)
        if key.startswith("catalog-search query"):
            _check_example_query(out, key, full=not tiny)
        if key == "catalog-search --version":
            assert out.startswith("catalog-search ")
    assert (work / "out/eval/report.html").exists() and (work / "out/model/saved_model.pb").exists()
    _check_json_of_export_and_serve(sh)


def _check_json_of_export_and_serve(sh: Shell) -> None:
    """`model export --json` and `serve --json` (its one startup line, the bound port)."""
    export = json.loads(sh.run("catalog-search model export --out out/model-json --json"))
    assert export["files"] >= 2 and export["out"] == "out/model-json", export
    assert export["model_id"] and (sh.cwd / "out/model-json/saved_model.pb").exists()
    proc = subprocess.Popen(["bash", "-ec", "\n".join([*sh.preamble, "catalog-search serve "
                             "--index-root out/index --port 0 --json"])], cwd=sh.cwd, env=sh.env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    sh.background.append(proc)
    try:
        line = json.loads(proc.stdout.readline())
        assert line["event"] == "listening" and line["port"] > 0 and line["ready"], line
        version = (sh.cwd / "out/index/LATEST").read_text().strip()
        assert line["version"] == version, line
        assert _status(line["url"] + "readyz") == 200
    finally:
        sh.stop_background()


def _status_of(req: urllib.request.Request) -> int:
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _check_example_query(out: str, key: str, full: bool) -> None:
    """README: P0000_q0.jpg lists P0000 first, about 0.86, the next product about 0.69;
    "organic" alone finds only the Organic products (P0004 Organic Yogurt, P0011 Organic
    Crackers); the photo with "organic" puts the look-alike Organic Yogurt P0004 (0.71 on
    the photo alone) first and P0000 second."""
    hits = [(m.group(2), float(m.group(1))) for m in
            re.finditer(r"^\s+\d+\s+([0-9.]+)\s+(\S+)\s", out, re.M)]
    assert "DEBUG" not in out, out  # no library debug lines on a plain run
    if key.endswith('--text "organic"') and "P0000_q0.jpg" not in key:
        assert hits and {p for p, _ in hits} <= {"P0004", "P0011"}, out
        return
    if "--text" in key:
        assert [p for p, _ in hits[:2]] == ["P0004", "P0000"], out
        return
    assert hits and hits[0][0] == "P0000", out
    if full:
        other = next(score for product, score in hits if product != "P0000")
        assert abs(hits[0][1] - 0.86) < 0.03 and abs(other - 0.69) < 0.05, out


@pytest.mark.heavy
def test_readme_command_line_chain(tmp_path):
    """The README's command line, in order, on the sample catalog cut to 3 products."""
    _readme_chain(tmp_path, tiny=True)


@pytest.mark.slow
def test_readme_command_line_chain_as_written(tmp_path):
    """The same on the full sample catalog, and the example query's documented scores."""
    _readme_chain(tmp_path, tiny=False)


def test_grocery_manifests(tmp_path):
    """The cheap grocery commands (manifests, variables), when the data is here."""
    if not GROCERY.is_dir():
        pytest.skip(f"{GROCERY} not present (the README says where the dataset comes from)")
    work = scratch_repo(tmp_path)
    sh = Shell(work, shell_env(), {"/path/to/GroceryStoreDataset/dataset": str(GROCERY),
                                   "../shared/datasets/grocery-store/dataset": str(GROCERY)})
    ran = 0
    for doc in ("README.md", "docs/EVALUATION.md"):
        for cmd in _commands_in(doc):
            if coverage_of(cmd).where.startswith("test_grocery_manifests"):
                sh.run(cmd, timeout=300)
                ran += 1
    assert ran == 11, sh.ran  # the cheap grocery commands of README.md + docs/EVALUATION.md
    for out in ("out/grocery", "out/grocery-iconic"):
        with open(work / out / "catalog.csv") as f:
            assert sum(1 for _ in f) > 81


@pytest.mark.heavy
def test_grocery_row_script(tmp_path, tiny_model):
    """docs/examples/grocery_row.sh as documented, on a 3-product sample catalog in the
    grocery layout, with the tiny model: both snapshots (the packshots run reusing the
    full run's vectors), both indexes, both evaluations sharing one vector cache."""
    work = scratch_repo(tmp_path)
    sh = Shell(work, shell_env())
    sh.run("catalog-search sample-catalog --out out/cat")
    _shrink_catalog(work / "out/cat", ("P0000", "P0001", "P0004"), queries=4)
    grocery, iconic = work / "out/m/grocery", work / "out/m/grocery-iconic"
    grocery.mkdir(parents=True)
    iconic.mkdir()
    with open(work / "out/cat/manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for folder, keep in ((grocery, rows), (iconic, rows[::3])):
        with open(folder / "catalog.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows([{**r, "image_uri": str(work / "out/cat" / r["image_uri"])}
                         for r in keep])
    with open(work / "out/cat/queries.csv", newline="") as f:
        queries = list(csv.DictReader(f))
    with open(grocery / "queries.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(queries[0]))
        w.writeheader()
        w.writerows([{**q, "image_uri": str(work / "out/cat" / q["image_uri"])}
                     for q in queries])
    (work / "out/row.yaml").write_text(
        f"model:\n  handle: {tiny_model}\n  cache_dir: {tmp_path / 'cache'}\n"
        "runner:\n  direct_running_mode: in_memory\n  direct_num_workers: 1\n")
    sh.run(f"bash docs/examples/grocery_row.sh out/row.yaml out/row out/m --allow-model "
           f"{tiny_model} --json", timeout=900)
    full = json.loads((work / "out/row/emb-full/full/summary.json").read_text())
    packshots = json.loads((work / "out/row/emb-iconic/iconic/summary.json").read_text())
    assert full["embedded"] == len(rows) and packshots["reused"] == len(rows[::3]), packshots
    for name in ("eval-full", "eval-iconic"):
        assert (work / "out/row" / name / "report.json").exists(), name
    assert any((work / "out/row/vector-cache").iterdir())


@pytest.mark.heavy
def test_grocery_duplicates_script(tmp_path, tiny_model):
    """docs/examples/grocery_duplicates.sh as documented, on a 3-product sample catalog with
    the tiny model: the planted copies are in the catalog, the sweep is written, and the
    duplicates job's report is scored (one JSON line whose counts are the planted ones)."""
    work = scratch_repo(tmp_path)
    sh = Shell(work, shell_env())
    sh.run("catalog-search sample-catalog --out out/cat")
    _shrink_catalog(work / "out/cat", ("P0000", "P0001", "P0004"), queries=1)
    with open(work / "out/cat/manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(work / "out/catalog.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([{**r, "image_uri": str(work / "out/cat" / r["image_uri"])} for r in rows])
    (work / "out/dup.yaml").write_text(
        f"model:\n  handle: {tiny_model}\n  cache_dir: {tmp_path / 'cache'}\n"
        "runner:\n  direct_running_mode: in_memory\n  direct_num_workers: 1\n")
    out = sh.run("bash docs/examples/grocery_duplicates.sh out/catalog.csv out/dupbench 3 "
                 "out/sweep.json out/dup.yaml", timeout=900)
    with open(work / "out/dupbench/truth.csv", newline="") as f:
        assert sum(1 for _ in csv.DictReader(f)) == 3
    with open(work / "out/dupbench/catalog.csv", newline="") as f:
        assert sum(1 for _ in csv.DictReader(f)) == len(rows) + 3
    assert json.loads((work / "out/sweep.json").read_text())
    assert (work / "out/dupbench/report/duplicates.parquet").exists()
    assert (work / "out/dupbench/report/report.html").exists(), out


@pytest.mark.heavy
def test_model_bench_script(tmp_path):
    """docs/examples/model_bench.sh for the builtin Lite0: one JSON line of its cost."""
    sh = Shell(scratch_repo(tmp_path), shell_env())
    out = sh.run("bash docs/examples/model_bench.sh lite0", timeout=900)
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and "efficientnet_lite0" in json.dumps(lines[0]), out


# ------------------------------------------------------------ the local Airflow stack

def _group_members(pgid: int) -> list[str]:
    """Processes of group `pgid` (from /proc), as 'pid cmdline'."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    found.append(d.name + " " + (d / "cmdline").read_bytes()
                                 .replace(b"\0", b" ").decode(errors="replace"))
            except (OSError, IndexError, ValueError):
                pass
    return found


def _runs(home: Path, dag_id: str) -> list[tuple[str, str]]:
    with closing(sqlite3.connect(f"file:{home / 'airflow.db'}?mode=ro", uri=True,
                                 timeout=10)) as conn:
        return conn.execute("SELECT run_id, state FROM dag_run WHERE dag_id = ? "
                            "ORDER BY id", (dag_id,)).fetchall()


def _wait_runs(home: Path, dag_id: str, count: int, timeout: float) -> list[tuple[str, str]]:
    """Wait until `count` runs of `dag_id` have finished; all must have succeeded."""
    deadline = time.time() + timeout
    while True:
        runs = _runs(home, dag_id)
        done = [r for r in runs if r[1] in ("success", "failed")]
        if len(done) >= count:
            assert all(state == "success" for _, state in done), (dag_id, runs, _logs(home))
            return runs
        assert time.time() < deadline, (f"{dag_id}: {runs} after {timeout:.0f} s\n" + _logs(home))
        time.sleep(3)


def _logs(home: Path) -> str:
    """The stack log's tail and the tail of every task log (for failure messages)."""
    parts = []
    stack = home / "stack.log"
    if stack.exists():
        parts.append("== stack.log\n" + "\n".join(stack.read_text(errors="replace")
                                                    .splitlines()[-40:]))
    for log in sorted((home / "logs").rglob("*.log"), key=lambda p: p.stat().st_mtime)[-6:]:
        parts.append(f"== {log.relative_to(home)}\n" + "\n".join(
            log.read_text(errors="replace").splitlines()[-25:]))
    return "\n".join(parts)


@pytest.mark.slow
def test_airflow_local_stack_sequence(tmp_path):
    """docs/AIRFLOW.md's local stack, command by command: up, serve, connection, unpause
    (one refresh run), index_handoff on the Asset event (the service serves the version),
    a backfill (a delta of that version, applied by the service), down (no process of the
    stack's group left)."""
    work = scratch_repo(tmp_path)
    api_port, serve_port = _free_port(), _free_port()
    env = shell_env(AIRFLOW__API__PORT=str(api_port),
                    AIRFLOW__API__BASE_URL=f"http://localhost:{api_port}",
                    CATALOG_SEARCH_TASK_RETRIES="0")
    # a drop for the documented backfill: two of the sample catalog's images as new products
    drop = tmp_path / "drop.csv"
    sh = Shell(work, env, {"8081": str(serve_port), "/path/to/drop.csv": str(drop)})
    cmds = [c for c in _commands_in("docs/AIRFLOW.md")
            if coverage_of(c).where.startswith("test_airflow_local_stack_sequence")]
    keys = [c.key.split(" #")[0] for c in cmds]
    assert keys[0] == "make airflow-up" and keys[-1] == "make airflow-down", keys
    home = work / "out/airflow"
    pgid = None
    try:
        for cmd in cmds:
            key = cmd.key
            if key == "make airflow-down":
                pgid = int((home / "stack.pid").read_text())
                assert _group_members(pgid)
            out = sh.run(cmd, timeout=600)
            if key == "make airflow-up":
                images = work / "out/data/catalog/images"
                drop.write_text("product_id,image_id,image_uri,title\n" + "".join(
                    f"D{i},D{i}_0,{images / f'P000{i}_1.jpg'},Drop {i}\n" for i in (1, 2)))
            elif "serve --index-root" in key:
                _wait_http(f"http://127.0.0.1:{serve_port}/healthz", 200, sh.background[-1],
                           out, 180)
                assert _status(f"http://127.0.0.1:{serve_port}/readyz") == 503
            elif key.startswith(".venv/bin/airflow dags unpause catalog_refresh"):
                runs = _wait_runs(home, "catalog_refresh", 1, 480)
                assert len(runs) == 1, runs  # the docs: unpausing gives one run
                _wait_runs(home, "index_handoff", 1, 300)
                version = (work / "out/data/index/LATEST").read_text().strip()
                assert version.endswith("-refresh"), version
                with urllib.request.urlopen(f"http://127.0.0.1:{serve_port}/readyz") as r:
                    assert version in r.read().decode()
            elif key.startswith(".venv/bin/airflow dags list-runs catalog_refresh"):
                assert "success" in out and "catalog_refresh" in out, out
            elif key.startswith(".venv/bin/airflow dags trigger catalog_backfill"):
                _wait_runs(home, "catalog_backfill", 1, 480)
                _wait_runs(home, "index_handoff", 2, 300)
                # the drop is published as delta 1 of the refresh's version (no rebuild),
                # and the hand-off's reload makes the service apply it
                version = (work / "out/data/index/LATEST").read_text().strip()
                assert version.endswith("-refresh"), version
                with urllib.request.urlopen(f"http://127.0.0.1:{serve_port}/readyz") as r:
                    ready = json.loads(r.read().decode())
                assert ready["version"] == version, ready
                assert ready["deltas"]["deltas"] == 1, ready
                assert ready["deltas"]["rows_added"] == 2, ready
        assert len(_runs(home, "catalog_refresh")) == 1
        assert pgid is not None and not _group_members(pgid), _group_members(pgid)
    except BaseException:
        print(_logs(home))
        raise
    finally:
        sh.stop_background()
        if (home / "stack.pid").exists():  # a failure before `make airflow-down`
            subprocess.run([str(VENV_BIN / "python"), "-m", "pipelines.orchestration.airflow_local", "down",
                            "--home", str(home)], cwd=work, env=env, timeout=120)
