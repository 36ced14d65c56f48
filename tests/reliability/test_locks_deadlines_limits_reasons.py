"""Run locks, incomplete versions, storage reads with a deadline, client aborts, HTTP
request-head limits, error reasons, unreachable ids, manifest and metadata caps, and the
OpenAPI schema stating what is enforced (docs/RELIABILITY.md, "Defects closed" lists the
defect each test pins). Real components: the
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
from index_fixtures import clustered_vectors, make_config, write_snapshot


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


# ----------------------------------------------------------------------- run locks

@pytest.mark.heavy
def test_second_embed_of_a_run_id_is_refused_naming_the_holder(
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


def test_run_lock_is_released_when_its_holder_dies(tmp_path, embed_config):
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
def test_second_build_of_a_version_is_refused_and_the_first_publishes(
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


# ------------------------------------------------------------- incomplete versions

def _interrupted(root: str, version: str) -> None:
    """What a build killed mid-way leaves: staging and a shard, no manifest.json."""
    vdir = art.version_dir(root, version)
    os.makedirs(os.path.join(vdir, "_build"))
    with open(os.path.join(vdir, "_build", "part-00000.parquet"), "wb") as fh:
        fh.write(b"PAR1 partial")
    os.makedirs(os.path.join(vdir, "shards", art.shard_name(0, 2)))


def test_unpublished_incomplete_version_is_replaced_by_its_rerun(tmp_path):
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


def test_incomplete_version_latest_names_is_never_replaced(tmp_path):
    snap = _snap(tmp_path)
    root = str(tmp_path / "index")
    _interrupted(root, "v1")
    art.write_latest(root, "v1")  # e.g. a hand-edited LATEST: never delete what it names
    with pytest.raises(IndexBuildError, match="LATEST names it"):
        run_build_index(snap, root, make_config(), version="v1")
    assert os.path.exists(os.path.join(art.version_dir(root, "v1"), "_build"))


def test_index_info_verify_does_not_count_incomplete_versions_as_ok(
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


# --------------------------------------------------- storage reads with a deadline

def test_fifo_catalog_image_is_404_at_once_and_searches_keep_answering(fifo_world):
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


def test_image_reads_have_a_deadline_and_their_own_threads(fifo_world, monkeypatch):
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


def test_readiness_reflects_a_saturated_service(fifo_world, monkeypatch):
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


def test_fifo_as_query_photo_is_refused_not_waited_on(fifo_world, capsys):
    world, root, fifo_id, fifo, vector = fifo_world
    done, rc = _in_thread(cli_main, ["query", "--index-root", root, "--allow-model",
                                     world.config.model.handle, fifo])
    _unblock(fifo)
    assert done, "query blocked on a FIFO photo"
    assert rc == 2
    err = capsys.readouterr().err
    assert "is not a regular file" in err and len(err.strip().splitlines()) == 1, err


def test_fifo_as_admin_token_file_is_refused_not_waited_on(tmp_path):
    from pipelines.core.admin_token import AdminTokenError, read_token_file
    fifo = str(tmp_path / "token")
    os.mkfifo(fifo)
    done, result = _in_thread(read_token_file, fifo)
    _unblock(fifo)
    assert done, "reading the admin token blocked on a FIFO"
    assert isinstance(result, AdminTokenError) and "not a regular file" in str(result)


# ------------------------------------------------------------------- client aborts

def test_client_abort_is_counted_499_with_one_log_line(fifo_world, caplog):
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


# -------------------------------------------------------------- HTTP request heads

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
def test_serve_limits_request_heads_and_their_read_time(fifo_world, tmp_path):
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


# ------------------------------------------------------------------- error reasons

def test_row_reasons_name_what_happened(tmp_path, embed_config):
    """Before: an s3:// image without boto3 was fetch/io_error "AssertionError('Missing
    boto3 requirement')", a data: URI not_found, and an integer image_uri was turned into
    a path (not_found). Now: filesystem_unavailable naming apache-beam[aws],
    unsupported_scheme naming 'data', manifest/wrong_type."""
    from image_factory import jpeg_bytes

    from pipelines.core import filesystem as fs
    try:
        import boto3  # noqa: F401
        pytest.skip("boto3 is installed here")
    except ImportError:
        pass
    good = []
    for i in range(4):
        path = tmp_path / f"g{i}.jpg"
        path.write_bytes(jpeg_bytes(color=(40 * i, 200 - 30 * i, 90)))
        good.append({"product_id": f"g{i}", "image_uri": str(path)})
    bad = [{"product_id": "s3", "image_uri": "s3://bucket/key.jpg"},
           {"product_id": "data", "image_uri": "data:image/jpeg;base64," + "A" * 5000},
           {"product_id": "int", "image_uri": 12345}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in good + bad))
    summary = run_embed([str(manifest)], str(tmp_path / "emb"), embed_config, run_id="r1")
    assert summary.embedded == 4 and summary.input_rows == 7
    letters = {d["product_id"]: d for d in snapshot.read_dead_letters(summary.snapshot)}
    assert set(letters) == {"s3", "data", "int"}, letters
    s3 = letters["s3"]
    assert (s3["stage"], s3["error"]) == ("fetch", "filesystem_unavailable"), s3
    assert "apache-beam[aws]" in s3["message"] and "AssertionError" not in s3["message"]
    data = letters["data"]
    assert (data["stage"], data["error"]) == ("fetch", "unsupported_scheme"), data
    assert "'data'" in data["message"] and len(data["message"]) < 400
    integer = letters["int"]
    assert (integer["stage"], integer["error"]) == ("manifest", "wrong_type"), integer
    assert "image_uri" in integer["message"]
    with pytest.raises(fs.UnsupportedUriError, match=r"apache-beam\[aws\]"):
        fs.check_supported("s3://bucket/key.jpg")


def test_duplicate_csv_header_is_refused(tmp_path, capsys):
    """Before: `product_id,image_uri,title,title` was read silently (the last title won)."""
    from pipelines.embed.manifest import ManifestError, check_manifest
    image = tmp_path / "a.jpg"
    image.write_bytes(b"x")
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"product_id,image_uri,title,title\np1,{image},one,two\n")
    with pytest.raises(ManifestError, match=r"more than once: \['title'\]"):
        check_manifest(str(manifest))
    out = tmp_path / "emb"
    assert cli_main(["embed", "--manifest", str(manifest), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "more than once" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "title" in line]) == 1, err
    assert not out.exists()


def test_empty_latest_is_reported_empty_not_missing(tmp_path):
    from serving.searcher import CatalogSearcher
    from index_fixtures import make_config as index_config
    root = tmp_path / "index"
    (root / "versions").mkdir(parents=True)
    with pytest.raises(art.IndexArtifactError, match="(no LATEST under)"):
        reader.open_index(str(root))
    (root / "LATEST").write_bytes(b"")
    with pytest.raises(art.IndexArtifactError, match=r"LATEST is empty"):
        reader.open_index(str(root))
    searcher = CatalogSearcher(str(root), config=index_config(), load_embedder=False)
    outcome = searcher.reload()
    assert outcome.status == "refused" and "LATEST is empty" in outcome.reason, outcome


def _mount_tmpfs(path, options: str) -> None:
    os.makedirs(path, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")


@pytest.fixture()
def small_disks(tmp_path):
    """A read-only root and a 16 KB one (room for the run, not for its LATEST)."""
    ro, full = tmp_path / "ro", tmp_path / "full"
    _mount_tmpfs(ro, "size=64k,ro")
    try:
        _mount_tmpfs(full, "size=16k")
        yield ro, full
    finally:
        for path in (full, ro):
            subprocess.run(["umount", str(path)], capture_output=True)


@pytest.mark.heavy
def test_disk_full_and_read_only_roots_are_one_line(tmp_path, cli_config,
                                                            small_disks):
    """Before: exit 1 with 300-490 log lines and 10-17 tracebacks. Now: exit 1, no
    traceback, one line naming the path and the errno."""
    ro, full = small_disks
    manifest = write_catalog(str(tmp_path / "cat"), num_products=4, images_per_product=2,
                             size=64)
    expected = {ro: ("[Errno 30 EROFS]", str(ro / "emb")), full: ("[Errno 28 ENOSPC]",
                                                                   str(full / "emb"))}
    for root, (code, path) in expected.items():
        proc = subprocess.run([sys.executable, "-m", "catalog_search.cli", "--config",
                               cli_config, "embed", "--manifest", manifest, "--out",
                               str(root / "emb"), "--run-id", "r1"], env=_env(),
                              capture_output=True, text=True, timeout=300)
        text = proc.stdout + proc.stderr
        assert proc.returncode == 1, text
        assert "Traceback" not in text, text
        lines = [line for line in text.splitlines() if "Errno" in line]
        assert len(lines) == 1 and code in lines[0] and path in lines[0], text
        assert lines[0].startswith("catalog-search embed: cannot write "), lines[0]
        assert len(text.splitlines()) < 20, text


def test_query_of_an_http_url_is_one_line(fifo_world, capsys):
    """Before: a traceback (which said http(s) was supported). Now the URL is fetched
    (pipelines.embed.fetch) and an unreachable one is one line with its reason."""
    import socket
    world, root, *_ = fifo_world
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/photo.jpg"
    import yaml
    cfg = os.path.join(root, "..", "query-config.yaml")
    with open(cfg, "w") as fh:
        yaml.safe_dump(world.config.replace(fetch={"deadline_s": 5.0, "retries": 0})
                       .to_dict(), fh)
    rc = cli_main(["--config", cfg, "query", "--index-root", root, "--allow-model",
                   world.config.model.handle, url])
    captured = capsys.readouterr()
    assert rc == 1, captured
    assert "Traceback" not in captured.out + captured.err
    lines = [line for line in captured.out.splitlines() if url in line]
    assert len(lines) == 1 and "connection" in lines[0], captured.out


# ----------------------------------------------------------------- unreachable ids

#: ids no URL path segment can carry: refused at embed
UNREACHABLE_IDS = ["shelf/a", ".", ".."]
#: awkward ids that pass: every route must reach them through real HTTP clients
AWKWARD_IDS = ["space id", "q?x#y", "pct%2Fid", "üñí-ß", "...", "a.b", "semi;colon",
               "plus+sign", "back\\slash"]


@pytest.fixture(scope="module")
def awkward_world(tmp_path_factory, tiny_model):
    """Real embed (DirectRunner) + build-index of a catalog with awkward and unreachable
    ids; (config, summary, index root)."""
    from image_factory import jpeg_bytes

    from pipelines.core.config import load_config
    base = tmp_path_factory.mktemp("awkward")
    config = load_config(overrides={
        "model": {"handle": tiny_model, "cache_dir": str(base / "cache"), "batch_size": 8},
        "runner": {"direct_running_mode": "in_memory", "direct_num_workers": 1},
        "index": {"shards": 1, "eval_queries": 10, "recall_threshold": 0.0}})
    rows = []
    for i, pid in enumerate(AWKWARD_IDS + UNREACHABLE_IDS):
        for j in range(2):
            path = base / f"img{i}-{j}.jpg"
            path.write_bytes(jpeg_bytes(color=(25 * i % 256, 60 + 40 * j, 200 - 15 * i)))
            rows.append({"product_id": pid, "image_id": f"{pid}#{j}" if j else pid,
                         "image_uri": str(path), "title": f"t{i}"})
    rows.append({"product_id": "fine", "image_id": "img/with/slash",
                 "image_uri": str(base / "img0-0.jpg")})
    manifest = base / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_embed([str(manifest)], str(base / "emb"), config, run_id="r1")
    root = str(base / "index")
    run_build_index(summary.snapshot, root, config, version="v1")
    return config, summary, root


def test_unreachable_ids_are_refused_at_embed_with_a_reason(awkward_world):
    """Before: `shelf/a` was embedded and indexed, and no route reached it (404 from the
    router); `.` and `..` were unreachable from path-normalising clients."""
    config, summary, root = awkward_world
    letters = snapshot.read_dead_letters(summary.snapshot)
    refused = {(d["product_id"], d["image_id"]) for d in letters}
    assert all(d["stage"] == "manifest" and d["error"] == "unreachable_id" for d in letters)
    assert {p for p, _ in refused} == set(UNREACHABLE_IDS) | {"fine"}
    assert ("fine", "img/with/slash") in refused
    assert summary.embedded == 2 * len(AWKWARD_IDS)
    assert summary.input_rows == summary.embedded + summary.dead_lettered
    ids = set(snapshot.load(summary.snapshot).table.column("product_id").to_pylist())
    assert ids == set(AWKWARD_IDS)


def test_every_route_reaches_every_accepted_id_with_real_clients(awkward_world):
    import http.client
    import urllib.request
    from urllib.parse import quote

    import httpx

    from serving.app import create_app
    from serving_fixtures import LiveServer
    config, summary, root = awkward_world
    app = create_app(root, config, watch=False)
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=30) as client:
        host, port = live.url.rsplit("/", 1)[1].split(":")
        for pid in AWKWARD_IDS:
            seg = quote(pid, safe="")
            for path in (f"/v1/products/{seg}/similar?k=3", f"/v1/images/{seg}/similar?k=3",
                         f"/v1/images/{seg}"):
                r = client.get(path)  # httpx
                assert r.status_code == 200, (pid, path, r.status_code, r.text[:200])
                with urllib.request.urlopen(live.url + path, timeout=30) as answer:  # urllib
                    assert answer.status == 200, (pid, path)
                conn = http.client.HTTPConnection(host, int(port), timeout=30)  # raw request
                conn.request("GET", path)
                assert conn.getresponse().status == 200, (pid, path)
                conn.close()
            hits = client.get(f"/v1/products/{seg}/similar?k=3").json()["results"]
            for hit in hits:  # the URLs the API hands out lead back to the image
                assert client.get(hit["image_url"]).status_code == 200, hit


# ------------------------------------------------------ manifest and metadata caps

_PARQUET_PROBE = r"""
import json, resource, sys
import pyarrow as pa, pyarrow.parquet as pq
from pipelines.embed.manifest import read_rows
path = sys.argv[1]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
reasons = {}
for row in read_rows(0, path):
    key = row["error"][0] if row["error"] else "ok"
    reasons[key] = reasons.get(key, 0) + 1
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"reasons": reasons, "growth_mb": (after - before) / 1024}))
"""


def test_dictionary_encoded_parquet_title_is_bounded(tmp_path):
    """Before: a 51 KB Parquet manifest (one row group, a dictionary-encoded 1 MB title on
    every row) decoded to gigabytes (6.8 GB for 600 rows). Now it is read in batches with
    text columns as dictionaries: oversize rows are manifest/too_large without being
    decoded, and peak memory stays small."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    n = 400
    title = "x" * (1 << 20)
    table = pa.table({
        "product_id": [f"p{i}" for i in range(n + 3)],
        "image_uri": [f"img{i}.jpg" for i in range(n + 3)],
        "title": pa.array([title] * n + ["ok"] * 3).dictionary_encode()})
    path = tmp_path / "bomb.parquet"
    pq.write_table(table, path, row_group_size=n + 3, use_dictionary=True)
    assert path.stat().st_size < 200_000
    proc = subprocess.run([sys.executable, "-c", _PARQUET_PROBE, str(path)], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["reasons"] == {"too_large": n, "ok": 3}, report
    assert report["growth_mb"] < 150, report  # before: > 400 MB of titles, x2 in Arrow


def test_csv_cell_over_the_csv_limit_dead_letters_its_row(tmp_path, embed_config):
    """Before: one 140 KB CSV cell failed the whole run (Python's csv field limit)."""
    from image_factory import jpeg_bytes
    lines = ["product_id,image_uri,title"]
    for i in range(4):
        path = tmp_path / f"g{i}.jpg"
        path.write_bytes(jpeg_bytes(color=(50 * i, 100, 200 - 40 * i)))
        lines.append(f"g{i},{path},title {i}")
    lines.append(f"big,{tmp_path / 'g0.jpg'},{'y' * 140_000}")
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(lines) + "\n")
    summary = run_embed([str(manifest)], str(tmp_path / "emb"), embed_config, run_id="r1")
    assert (summary.input_rows, summary.embedded, summary.dead_lettered) == (5, 4, 1)
    (letter,) = snapshot.read_dead_letters(summary.snapshot)
    assert (letter["stage"], letter["error"], letter["product_id"]) == (
        "manifest", "too_large", "big"), letter
    assert "embed.max_cell_bytes" in letter["message"]


def test_jsonl_row_caps_and_metadata_caps_in_answers(tmp_path, embed_config):
    """A 10 MB title: manifest/too_large by default (embed.max_cell_bytes); with the cap
    raised it is indexed, and answers cut it to serving.max_metadata_chars and use at
    most fusion.max_text_chars of it as similar-products query text (real HTTP)."""
    import httpx
    from image_factory import jpeg_bytes

    from serving.app import create_app
    from serving_fixtures import LiveServer
    rows = []
    for i in range(6):
        path = tmp_path / f"g{i}.jpg"
        path.write_bytes(jpeg_bytes(color=(40 * i, 90 + 20 * i, 200 - 30 * i)))
        rows.append({"product_id": f"g{i}", "image_uri": str(path), "title": f"shirt {i}"})
    rows[0]["title"] = "shirt " + "z" * (10 << 20)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_embed([str(manifest)], str(tmp_path / "emb"), embed_config, run_id="r1")
    assert (summary.embedded, summary.dead_lettered) == (5, 1)
    (letter,) = snapshot.read_dead_letters(summary.snapshot)
    assert letter["error"] == "too_large" and letter["stage"] == "manifest", letter
    roomy = embed_config.replace(embed={"max_cell_bytes": 11 << 20, "max_row_bytes": 12 << 20},
                                 index={"shards": 1, "eval_queries": 5,
                                        "recall_threshold": 0.0},
                                 serving={"max_metadata_chars": 200})
    summary = run_embed([str(manifest)], str(tmp_path / "emb2"), roomy, run_id="r1")
    assert summary.embedded == 6
    root = str(tmp_path / "index")
    run_build_index(summary.snapshot, root, roomy, version="v1")
    with LiveServer(create_app(root, roomy, watch=False)) as live, \
            httpx.Client(base_url=live.url, timeout=60) as c:
        for path in ("/v1/products/g1/similar?k=5",
                     "/v1/products/g0/similar?k=5&text_weight=0.5"):
            r = c.get(path)
            assert r.status_code == 200, r.text[:300]
            assert len(r.content) < 20_000, (path, len(r.content))
            titles = {h["product_id"]: h["metadata"]["title"] for h in r.json()["results"]}
            if "g0" in titles:
                assert len(titles["g0"]) == 201 and titles["g0"].endswith("…")


# -------------------------------------------------------------- the OpenAPI schema

def _k_schemas(node, found):
    """Every integer schema of a `k` (parameter, property) in an OpenAPI document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "k" and isinstance(value, dict):
                found.append(value)
            _k_schemas(value, found)
        if node.get("name") == "k" and isinstance(node.get("schema"), dict):
            found.append(node["schema"])
    elif isinstance(node, list):
        for item in node:
            _k_schemas(item, found)
    return found


def test_openapi_states_what_is_enforced(fifo_world):
    """Before: k's 1-100 bounds were missing from the schema, `"vector": null` passed the
    schema and was refused, and unmatched routes / ids with %0A answered {"detail": ...}.
    (schemathesis is not a dependency: the schema's k bounds are probed at and beyond
    both edges on every operation that takes k, over real HTTP.)"""
    import httpx

    from serving_fixtures import LiveServer
    world, root, fifo_id, fifo, vector = fifo_world
    max_k = world.config.serving.max_k
    with LiveServer(_app(world, root)) as live, httpx.Client(base_url=live.url,
                                                             timeout=30) as c:
        doc = c.get("/openapi.json").json()
        ks = _k_schemas(doc, [])
        integers = [s for k in ks for s in (k.get("anyOf") or [k]) if s.get("type") == "integer"]
        assert integers and all((s.get("minimum"), s.get("maximum")) == (1, max_k)
                                for s in integers), ks
        body = doc["paths"]["/v1/search"]["post"]["requestBody"]["content"]
        vec = body["application/json"]["schema"]["properties"]["vector"]
        assert vec["type"] == "array" and "anyOf" not in vec, vec
        r = c.post("/v1/search", json={"vector": None, "k": 3})
        assert r.status_code == 422 and r.json()["error"]["reason"] == "bad_vector", r.text
        product = world.catalog_rows()[0]["product_id"]
        for k, ok in ((0, False), (1, True), (max_k, True), (max_k + 1, False)):
            answers = [c.post("/v1/search", json={"vector": vector, "k": k}),
                       c.get(f"/v1/products/{product}/similar", params={"k": k}),
                       c.get(f"/v1/images/{fifo_id}/similar", params={"k": k})]
            for a in answers:
                assert (a.status_code == 200) == ok, (k, a.request.url, a.status_code, a.text)
                if not ok:
                    assert a.status_code == 422 and "error" in a.json(), a.text
        for method, path, status in (("GET", "/no/such/route", 404),
                                     ("GET", "/v1/products/a%0Ab/similar", 404),
                                     ("GET", "/v1/images/%0A", 404),
                                     ("DELETE", "/v1/search", 405)):
            r = c.request(method, path)
            assert r.status_code == status, (path, r.status_code, r.text)
            body = r.json()
            assert set(body) == {"error"} and {"reason", "message"} <= set(body["error"]), body
            assert r.headers["x-error-reason"] == body["error"]["reason"]
