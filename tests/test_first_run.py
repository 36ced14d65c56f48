"""A new user's first run: the documented commands in the documented order.

`serve` started before the first refresh (no index root yet) is up but not ready, and
picks up the first published version by itself; the sample catalog folder can be moved;
every command speaks `--json`; `--version`. Real CLI subprocesses, real HTTP on loopback.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "catalog_search.cli", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=300, env=env)


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_version_flag():
    r = _cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("catalog-search 0.")


@pytest.mark.heavy
def test_serve_before_the_first_refresh_becomes_ready_when_a_version_is_published(
        tmp_path, tiny_model):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {{handle: {tiny_model}, cache_dir: {tmp_path / 'cache'}}}\n"
                   "runner: {direct_running_mode: in_memory, direct_num_workers: 1}\n"
                   "index: {eval_queries: 20}\n"
                   "serving: {reload_interval_s: 0.5}\n")
    index_root = tmp_path / "data" / "index"  # does not exist yet
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "catalog_search.cli", "--config", str(cfg),
                               "serve", "--index-root", str(index_root), "--port", str(port),
                               "--host", "127.0.0.1"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while _status(base + "/healthz") != 200:
            assert server.poll() is None, server.stdout.read()
            assert time.time() < deadline
            time.sleep(0.3)
        assert _status(base + "/readyz") == 503

        # the sample catalog, moved after writing: its manifest holds relative URIs
        r = _cli("sample-catalog", "--out", str(tmp_path / "written"), "--products", "4",
                 "--images-per-product", "2", "--size", "64", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["images"] == 8
        shutil.move(str(tmp_path / "written"), str(tmp_path / "cat"))
        assert "images/P0000_0.jpg" in (tmp_path / "cat" / "manifest.csv").read_text()

        r = _cli("--config", str(cfg), "embed", "--manifest", str(tmp_path / "cat" / "manifest.csv"),
                 "--out", str(tmp_path / "data" / "emb"), "--run-id", "r1", "--json")
        assert r.returncode == 0, r.stderr
        summary = json.loads(r.stdout)
        assert summary["embedded"] == 8 and summary["dead_lettered"] == 0
        r = _cli("--config", str(cfg), "build-index", "--embeddings", summary["snapshot"],
                 "--index-root", str(index_root), "--shards", "2", "--version", "v1")
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("version      v1  (published as LATEST)")

        deadline = time.time() + 60
        while _status(base + "/readyz") != 200:
            assert time.time() < deadline, "serve did not pick up the first version"
            time.sleep(0.3)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_hand_off_url_from_an_airflow_http_connection(tmp_path, monkeypatch):
    """index_handoff finds the service through an Airflow connection (AIRFLOW_CONN_<ID>
    URI here; the UI or `airflow connections add` store the same), env var as fallback."""
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    from pipelines.orchestration import handoff
    monkeypatch.delenv(handoff.SERVING_URL_ENV, raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_CATALOG_SEARCH_API", "http://127.0.0.1:8081")
    assert handoff.resolve_serving_url("", handoff.SERVING_CONN_ID) == "http://127.0.0.1:8081"
    monkeypatch.setenv("AIRFLOW_CONN_SEARCH_TLS", "https://search.shop.internal:443")
    assert handoff.resolve_serving_url(None, "search_tls") == "https://search.shop.internal:443"
    assert handoff.resolve_serving_url("http://explicit:1", "search_tls") == "http://explicit:1"
    monkeypatch.setenv(handoff.SERVING_URL_ENV, "http://from-env:2")
    assert handoff.resolve_serving_url("", "no_such_connection") == "http://from-env:2"
    monkeypatch.delenv(handoff.SERVING_URL_ENV)
    assert handoff.resolve_serving_url("", "no_such_connection") == ""
