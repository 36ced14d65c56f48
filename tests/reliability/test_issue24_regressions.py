"""One regression test (or more) per defect of issue 24 (numbers as in the issue).

Each failed before its fix (see the commit that names the defect). Real components: the
CLI in subprocesses, Beam on the DirectRunner, real index versions, HTTP on loopback.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from catalog_search.cli import main as cli_main
from pipelines.embed import snapshot
from pipelines.embed.job import EmbedError, run_embed, run_lock_name
from pipelines.embed.sample_catalog import write_catalog
from pipelines.index import artifact as art
from pipelines.index import reader
from pipelines.index.build import run_build_index
from pipelines.index.build_plan import IndexBuildError
from test_index_build import clustered_vectors, make_config, write_snapshot


def _env() -> dict[str, str]:
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")


def _cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "catalog_search.cli", *args], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for_holder(proc: subprocess.Popen, lock: str, limit_s: float = 120) -> str:
    """The holder line `proc` wrote into `lock`, once it is there (fails if proc exits first)."""
    deadline = time.time() + limit_s
    while time.time() < deadline:
        try:
            with open(lock) as fh:
                text = fh.read()
        except OSError:
            text = ""
        if f"pid {proc.pid} " in text:
            return text
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise AssertionError(f"the first run ended without taking its run lock {lock}:\n"
                                 f"{out[-2000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no run lock {lock} within {limit_s}s")


@pytest.fixture()
def cli_config(tmp_path, tiny_model) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(f"model: {{handle: {tiny_model}, cache_dir: {tmp_path / 'cache'}, "
                    "batch_size: 4}\nrunner: {direct_running_mode: in_memory, "
                    "direct_num_workers: 1}\nindex: {eval_queries: 50}\n")
    return str(path)


# --------------------------------------------------------------------------- defect 1

@pytest.mark.heavy
def test_defect_1_second_embed_of_a_run_id_is_refused_naming_the_holder(
        tmp_path, cli_config, capsys):
    """Before: both ran; the folder ended with one run's rows while the other reported
    success (or died on _counts.json). Now the second is refused at once, exit 1, with the
    holder's pid, and the first completes with all of its rows."""
    big = write_catalog(str(tmp_path / "big"), num_products=12, images_per_product=3, size=64)
    small = write_catalog(str(tmp_path / "small"), num_products=4, images_per_product=3, size=64)
    out = str(tmp_path / "emb")
    first = _cli(["--config", cli_config, "embed", "--manifest", big, "--out", out,
                  "--run-id", "r1"])
    holder = _wait_for_holder(first, os.path.join(out, run_lock_name("r1")))
    assert "embed" in holder
    started = time.time()
    rc = cli_main(["--config", cli_config, "embed", "--manifest", small, "--out", out,
                   "--run-id", "r1"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert time.time() - started < 30  # refused at once, not after a run
    assert "already running" in err and f"pid {first.pid} " in err, err
    text = first.communicate(timeout=300)[0].decode()
    assert first.returncode == 0, text
    summary = snapshot.read_summary(os.path.join(out, "r1"))
    assert summary.input_rows == 36 and summary.embedded == 36
    assert snapshot.load(os.path.join(out, "r1")).table.num_rows == 36
    assert snapshot.latest_run_id(out) == "r1"
    assert not os.path.exists(os.path.join(out, run_lock_name("r1")))  # released


def test_defect_1_run_lock_is_released_when_its_holder_dies(tmp_path, embed_config):
    """A SIGKILLed holder leaves no stale lock: the kernel drops the flock."""
    out = tmp_path / "emb"
    out.mkdir()
    lock = str(out / run_lock_name("r1"))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pipelines.core.locks import run_lock\n"
        f"with run_lock({str(out)!r}, {run_lock_name('r1')!r}, 'x'):\n"
        "    print('held', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, env=_env())
    assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
    manifest = write_catalog(str(tmp_path / "cat"), num_products=2, images_per_product=1,
                             size=64)
    with pytest.raises(EmbedError, match=f"already running: pid {holder.pid} "):
        run_embed([manifest], str(out), embed_config, run_id="r1")
    assert not (out / "r1").exists()
    holder.kill()
    holder.wait()
    assert os.path.exists(lock)  # the dead holder's file is still there, unlocked
    summary = run_embed([manifest], str(out), embed_config, run_id="r1")
    assert summary.embedded == 2


def _snap(tmp_path, n: int = 400) -> str:
    return write_snapshot(str(tmp_path / "snap"), clustered_vectors(n, 16, seed=5))


@pytest.mark.heavy
def test_defect_1_second_build_of_a_version_is_refused_and_the_first_publishes(
        tmp_path, cli_config, capsys):
    """Before: two concurrent `build-index --version v1` both failed, nothing published."""
    snap = _snap(tmp_path, 3000)
    root = str(tmp_path / "index")
    first = _cli(["--config", cli_config, "build-index", "--embeddings", snap,
                  "--index-root", root, "--shards", "2", "--version", "v1"])
    _wait_for_holder(first, os.path.join(root, art.build_lock_name("v1")))
    rc = cli_main(["--config", cli_config, "build-index", "--embeddings", snap,
                   "--index-root", root, "--shards", "2", "--version", "v1"])
    err = capsys.readouterr().err
    assert rc == 1 and "already running" in err and f"pid {first.pid} " in err, err
    text = first.communicate(timeout=300)[0].decode()
    assert first.returncode == 0, text
    assert art.read_latest(root) == "v1"
    reader.open_index(root).load_shards()


# --------------------------------------------------------------------------- defect 2

def _interrupted(root: str, version: str) -> None:
    """What a build killed mid-way leaves: staging and a shard, no manifest.json."""
    vdir = art.version_dir(root, version)
    os.makedirs(os.path.join(vdir, "_build"))
    with open(os.path.join(vdir, "_build", "part-00000.parquet"), "wb") as fh:
        fh.write(b"PAR1 partial")
    os.makedirs(os.path.join(vdir, "shards", art.shard_name(0, 2)))


def test_defect_2_unpublished_incomplete_version_is_replaced_by_its_rerun(tmp_path):
    snap = _snap(tmp_path)
    root = str(tmp_path / "index")
    run_build_index(snap, root, make_config(), version="v1")
    _interrupted(root, "v2")
    manifest = run_build_index(snap, root, make_config(), version="v2")
    assert manifest.version == "v2" and art.read_latest(root) == "v2"
    assert not os.path.exists(os.path.join(art.version_dir(root, "v2"), "_build"))
    reader.open_index(root).load_shards()
    # published versions stay immutable
    with pytest.raises(IndexBuildError, match="already exists.*state is passed"):
        run_build_index(snap, root, make_config(), version="v1")


def test_defect_2_incomplete_version_latest_names_is_never_replaced(tmp_path):
    snap = _snap(tmp_path)
    root = str(tmp_path / "index")
    _interrupted(root, "v1")
    art.write_latest(root, "v1")  # e.g. a hand-edited LATEST: never delete what it names
    with pytest.raises(IndexBuildError, match="LATEST names it"):
        run_build_index(snap, root, make_config(), version="v1")
    assert os.path.exists(os.path.join(art.version_dir(root, "v1"), "_build"))


def test_defect_2_index_info_verify_does_not_count_incomplete_versions_as_ok(
        tmp_path, capsys):
    snap = _snap(tmp_path)
    root = str(tmp_path / "index")
    run_build_index(snap, root, make_config(), version="v1")
    _interrupted(root, "v0")
    rc = cli_main(["index-info", "--index-root", root, "--verify"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "verified: 1 ok, 0 corrupted, 1 incomplete (v0)" in out, out
    assert "an interrupted build, never published" in out
    rc = cli_main(["index-info", "--index-root", root, "--verify", "--json"])
    report = json.loads(capsys.readouterr().out)
    v0 = next(v for v in report["versions"] if v["version"] == "v0")
    assert v0["state"] == "incomplete" and v0["verified"] is False
    assert v0["building"] is False


# --------------------------------------------------------------------------- serving set-up

@pytest.fixture(scope="module")
def fifo_world(tmp_path_factory):
    """An index (copy of the serving world's) whose first catalog image was replaced by a
    FIFO after indexing, as in the issue; yields (world, index_root, fifo image id, fifo)."""
    import dataclasses as dc
    import shutil

    import pyarrow as pa

    from serving_fixtures import build_index, serving_world
    world = serving_world()
    base = tmp_path_factory.mktemp("fifo-index")
    snap = snapshot.load(world.snapshot)
    table = snap.table
    ids = table.column("image_id").to_pylist()
    uris = table.column("image_uri").to_pylist()
    fifo = str(base / "replaced.jpg")
    shutil.copyfile(uris[0], fifo)
    uris[0] = fifo
    table = table.set_column(table.schema.get_field_index("image_uri"), "image_uri",
                             pa.array(uris, pa.string()))
    snap_dir = str(base / "snapshot")
    snapshot.write_table(snap_dir, table)
    snapshot.write_summary(snap_dir, dc.replace(snap.summary, run_id="fifo", snapshot=snap_dir))
    root = str(base / "index")
    build_index(snap_dir, root, world.config, version="f0001")
    os.unlink(fifo)
    os.mkfifo(fifo)  # replaced after indexing: opening it for reading blocks without O_NONBLOCK
    vector = snap.vectors()[1].tolist()
    yield world, root, ids[0], fifo, vector
    _unblock(fifo)


def _unblock(fifo: str) -> None:
    """Release readers a pre-fix build left blocked on the FIFO (so the test run can end)."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    except OSError:
        pass


def _app(world, root, **serving):
    from serving.app import create_app
    config = world.config.replace(serving=serving) if serving else world.config
    return create_app(root, config, watch=False)


# --------------------------------------------------------------------------- defect 3

def test_defect_3_fifo_catalog_image_is_404_at_once_and_searches_keep_answering(fifo_world):
    """Before: each GET of the FIFO image blocked a worker thread forever; after 45 every
    search timed out while /readyz said 200."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from serving_fixtures import LiveServer
    world, root, fifo_id, fifo, vector = fifo_world
    with LiveServer(_app(world, root)) as live:
        def get_image(_: int) -> tuple[int, str, float]:
            t0 = time.time()
            with httpx.Client(base_url=live.url, timeout=15) as c:
                r = c.get(f"/v1/images/{fifo_id}")
            return r.status_code, r.headers.get("x-error-reason", ""), time.time() - t0

        with ThreadPoolExecutor(50) as pool:
            answers = list(pool.map(get_image, range(50)))
        assert {(s, reason) for s, reason, _ in answers} == {(404, "image_unavailable")}
        assert max(t for *_, t in answers) < 10
        with httpx.Client(base_url=live.url, timeout=15) as c:
            r = c.post("/v1/search", json={"vector": vector, "k": 3})
            assert r.status_code == 200, r.text
            assert c.get("/readyz").status_code == 200


def test_defect_3_image_reads_have_a_deadline_and_their_own_threads(fifo_world, monkeypatch):
    """A read that blocks inside the storage (a hung network filesystem): 404
    image_unavailable after serving.image_read_timeout_s; past MAX_READERS stuck reads,
    503 busy at once; searches keep answering throughout."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from pipelines.embed import fetch
    from serving.api import deadline
    from serving_fixtures import LiveServer
    world, root, fifo_id, fifo, vector = fifo_world
    release = threading.Event()
    real = fetch.fetch_bytes

    def hanging(uri, cfg):
        if uri == fifo:
            release.wait(60)
        return real(uri, cfg)

    monkeypatch.setattr(fetch, "fetch_bytes", hanging)
    try:
        with LiveServer(_app(world, root, image_read_timeout_s=1.0)) as live:
            def get_image(_: int) -> tuple[int, str, float]:
                t0 = time.time()
                with httpx.Client(base_url=live.url, timeout=15) as c:
                    r = c.get(f"/v1/images/{fifo_id}")
                return r.status_code, r.headers.get("x-error-reason", ""), time.time() - t0

            with ThreadPoolExecutor(deadline.MAX_READERS + 8) as pool:
                answers = list(pool.map(get_image, range(deadline.MAX_READERS + 8)))
            kinds = {(s, reason) for s, reason, _ in answers}
            assert kinds <= {(404, "image_unavailable"), (503, "busy")}, answers
            assert sum(s == 404 for s, *_ in answers) >= deadline.MAX_READERS // 2
            assert max(t for *_, t in answers) < 8
            with httpx.Client(base_url=live.url, timeout=15) as c:
                assert c.post("/v1/search", json={"vector": vector, "k": 3}).status_code == 200
    finally:
        release.set()


def test_defect_3_readiness_reflects_a_saturated_service(fifo_world, monkeypatch):
    """Every worker thread busy and searches waiting: /readyz 503 saturated (healthz 200)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from serving_fixtures import LiveServer
    world, root, fifo_id, fifo, vector = fifo_world
    app = _app(world, root)
    searcher = app.state.serving.searcher
    release = threading.Event()
    real = searcher.search_vector

    def slow(*args, **kwargs):
        release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(searcher, "search_vector", slow)
    with LiveServer(app) as live, ThreadPoolExecutor(48) as pool:
        try:
            def search(_: int) -> int:
                with httpx.Client(base_url=live.url, timeout=90) as c:
                    return c.post("/v1/search", json={"vector": vector, "k": 3}).status_code

            futures = [pool.submit(search, i) for i in range(46)]
            with httpx.Client(base_url=live.url, timeout=15) as c:
                deadline = time.time() + 20
                while time.time() < deadline:
                    r = c.get("/readyz")
                    if r.status_code == 503:
                        break
                    time.sleep(0.1)
                assert r.status_code == 503, r.text
                assert r.json()["ready"] is False and "worker threads" in r.json()["saturated"]
                assert r.headers["x-error-reason"] == "saturated"
                assert c.get("/healthz").status_code == 200
                release.set()
                assert all(f.result(timeout=60) == 200 for f in futures)
                assert c.get("/readyz").status_code == 200
        finally:
            release.set()


def _in_thread(fn, *args, limit_s: float = 10):
    """fn(*args) in a daemon thread: (finished, result or exception)."""
    import threading
    out: list = []

    def run():
        try:
            out.append(fn(*args))
        except BaseException as e:  # handed back to the test
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit_s)
    return (not t.is_alive()), (out[0] if out else None)


def test_defect_3_fifo_as_query_photo_is_refused_not_waited_on(fifo_world, capsys):
    world, root, fifo_id, fifo, vector = fifo_world
    done, rc = _in_thread(cli_main, ["query", "--index-root", root, "--allow-model",
                                     world.config.model.handle, fifo])
    _unblock(fifo)
    assert done, "query blocked on a FIFO photo"
    assert rc == 2
    err = capsys.readouterr().err
    assert "is not a regular file" in err and len(err.strip().splitlines()) == 1, err


def test_defect_3_fifo_as_admin_token_file_is_refused_not_waited_on(tmp_path):
    from serving.auth import AdminTokenError, read_token_file
    fifo = str(tmp_path / "token")
    os.mkfifo(fifo)
    done, result = _in_thread(read_token_file, fifo)
    _unblock(fifo)
    assert done, "reading the admin token blocked on a FIFO"
    assert isinstance(result, AdminTokenError) and "not a regular file" in str(result)


# --------------------------------------------------------------------------- defect 5

def test_defect_5_client_abort_is_counted_499_with_one_log_line(fifo_world, caplog):
    """Before: each aborted upload counted a 500 and logged a 40-line ClientDisconnect
    traceback."""
    import logging
    import socket

    import httpx

    from serving_fixtures import LiveServer
    world, root, *_ = fifo_world
    caplog.set_level(logging.INFO)
    with LiveServer(_app(world, root)) as live:
        host, port = live.url.rsplit("/", 1)[1].split(":")
        for _ in range(3):
            with socket.create_connection((host, int(port))) as s:
                s.sendall(b"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/"
                          b"form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n"
                          b"Content-Disposition: form-data; name=\"image\"; filename=\"a.jpg\""
                          b"\r\n\r\n" + b"\xff" * 1000)
                time.sleep(0.3)
        time.sleep(1.0)
        with httpx.Client(base_url=live.url, timeout=15) as c:
            metrics = c.get("/metrics").text
    searches = [line for line in metrics.splitlines()
                if line.startswith("catalog_search_requests_total") and "/v1/search" in line]
    assert any('status="499"' in line and line.endswith(" 3.0") for line in searches), searches
    assert not any('status="500"' in line for line in searches), searches
    assert 'reason="client_disconnect"' in metrics
    aborted = [r for r in caplog.records if "client disconnected" in r.getMessage()]
    assert len(aborted) == 3 and all(r.exc_info is None for r in aborted)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors  # no traceback


# --------------------------------------------------------------------------- defect 9

def _raw(port: int, data: bytes, wait_s: float = 5.0) -> bytes:
    """Send `data` on a fresh connection; everything the server answers until it closes
    (or `wait_s` passes)."""
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as s:
        try:
            s.sendall(data)
        except OSError:  # the server closed while we were still sending
            pass
        got = b""
        deadline = time.time() + wait_s
        while time.time() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            except OSError:
                break
            if not chunk:
                break
            got += chunk
            if b"\r\n\r\n" in got and b"Content-Length" not in got.split(b"\r\n\r\n")[0]:
                break
    return got


@pytest.mark.heavy
def test_defect_9_serve_limits_request_heads_and_their_read_time(fifo_world, tmp_path):
    """Before: 4 x 64 MB header blocks were accepted (+183 MB) and half-sent requests held
    40 s. Now `serve` answers 400 to a head over serving.max_header_bytes and closes a
    connection that sends no complete head within serving.header_timeout_s; SIGTERM
    still stops it while catalog reads of a FIFO are in flight."""
    import signal
    import threading

    import yaml
    world, root, fifo_id, fifo, vector = fifo_world
    cfg = world.config.replace(serving={"header_timeout_s": 1.0, "max_header_bytes": 16384})
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    proc = subprocess.Popen([sys.executable, "-m", "catalog_search.cli", "--config",
                             str(config_file), "serve", "--index-root", root, "--port", "0",
                             "--no-watch", "--json", "--allow-model", world.config.model.handle],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_env())
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        port = json.loads(line)["port"]
        ok = _raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 8000
                  + b"\r\nConnection: close\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200"), ok[:200]
        big = _raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (1 << 20)
                   + b"\r\n\r\n")
        assert not big.startswith(b"HTTP/1.1 200"), big[:200]
        assert big == b"" or big.startswith(b"HTTP/1.1 4"), big[:200]
        t0 = time.time()
        half = _raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n", wait_s=8)
        assert half == b"" and time.time() - t0 < 4, (half, time.time() - t0)
        answers: list[bytes] = []
        readers = [threading.Thread(target=lambda: answers.append(_raw(
            port, f"GET /v1/images/{fifo_id} HTTP/1.1\r\nHost: x\r\nConnection: close"
                  "\r\n\r\n".encode(), wait_s=10)), daemon=True) for _ in range(4)]
        for t in readers:
            t.start()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
    finally:
        _unblock(fifo)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
