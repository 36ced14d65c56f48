"""The helpers every stage shares (pipelines.core): file:// URIs, the exclusive lock, the
LATEST pointer, Parquet bytes, the embedding column, URI arguments, the model check."""
from __future__ import annotations

import multiprocessing
import os
import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from pipelines.core import filesystem as fs
from pipelines.core import latest
from pipelines.core.command import UsageError, check_name_arg, check_uri_arg
from pipelines.core.locks import exclusive_lock, root_lock
from pipelines.core.names import InvalidNameError
from pipelines.embed import snapshot
from pipelines.index import artifact as art


# --------------------------------------------------------------------------- file:// URIs

@pytest.mark.parametrize("uri, path", [
    ("file:///data/a.parquet", "/data/a.parquet"),
    ("file:///a%20b/c%23d", "/a b/c#d"),            # percent-escapes decoded
    ("file://localhost/srv/x", "/srv/x"),             # the local host named
    ("file://", "/"),                                 # nothing after the scheme: the root
    ("file:///", "/"),
    ("/plain/a%20b", "/plain/a%20b"),                 # plain paths are never decoded
    ("relative/dir", "relative/dir"),
    ("gs://bucket/a%20b", "gs://bucket/a%20b"),       # other schemes as given
    ("s3://bucket/file://x", "s3://bucket/file://x"),
])
def test_normalize_strips_file_scheme(uri, path):
    assert fs.normalize(uri) == path


@pytest.mark.parametrize("uri, local", [
    ("/a", True), ("a/b", True), ("file:///a", True), ("file://localhost/a", True),
    ("gs://b/a", False), ("s3://b/a", False), ("http://h/a", False), ("FILE:///a", False),
])
def test_is_local(uri, local):
    assert fs.is_local(uri) is local


def test_file_uri_reads_the_same_file_as_its_path(tmp_path):
    folder = tmp_path / "a b"
    folder.mkdir()
    (folder / "x.txt").write_text("hello")
    uri = "file://" + str(folder / "x.txt").replace(" ", "%20")
    assert fs.exists(uri) and fs.read_text(uri) == "hello"
    fs.write_bytes_atomic(uri, b"again")
    assert (folder / "x.txt").read_bytes() == b"again"


# --------------------------------------------------------------------------- the lock

def _count_under_lock(lock_path: str, counter: str, times: int) -> None:
    for _ in range(times):
        with exclusive_lock(lock_path):
            n = int(open(counter).read())
            time.sleep(0.001)  # a lost update shows without the lock
            with open(counter, "w") as f:
                f.write(str(n + 1))


def test_exclusive_lock_serialises_processes_and_threads(tmp_path):
    lock, counter = str(tmp_path / ".lock"), str(tmp_path / "n")
    with open(counter, "w") as f:
        f.write("0")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_count_under_lock, args=(lock, counter, 25)) for _ in range(3)]
    threads = [threading.Thread(target=_count_under_lock, args=(lock, counter, 25))
               for _ in range(2)]
    for w in procs + threads:
        w.start()
    for w in procs + threads:
        w.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert int(open(counter).read()) == 5 * 25


def test_exclusive_lock_is_reentrant_in_its_thread_and_released(tmp_path):
    lock = str(tmp_path / ".lock")
    with exclusive_lock(lock):
        with exclusive_lock(lock):  # would deadlock if it locked again
            pass
        got = []
        t = threading.Thread(target=lambda: got.append(_try_lock(lock)))
        t.start()
        t.join()
        assert got == [False]  # still held after the inner block
    assert _try_lock(lock)


def _try_lock(path: str) -> bool:
    import fcntl
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return True


def test_root_lock_creates_the_root_and_accepts_file_uris(tmp_path):
    root = tmp_path / "new root"
    with root_lock("file://" + str(root).replace(" ", "%20"), ".x.lock"):
        assert (root / ".x.lock").exists()
    with root_lock("gs://bucket/never-touched", ".x.lock"):  # object stores: no lock file
        pass


# --------------------------------------------------------------------------- LATEST

def _advance_many(root: str, names: list[str]) -> None:
    for name in names:
        latest.advance(root, name, "run id")


def test_concurrent_writers_leave_the_newest_name(tmp_path):
    root = str(tmp_path / "root")
    names = [f"r{i:04d}" for i in range(60)]
    ctx = multiprocessing.get_context("fork")
    # every writer offers names out of order; the newest one must win
    procs = [ctx.Process(target=_advance_many, args=(root, names[w::4][::-1]))
             for w in range(4)]
    seen: set[str | None] = set()
    for p in procs:
        p.start()
    while any(p.is_alive() for p in procs):
        seen.add(latest.read(root, "run id"))  # never a partial or garbled pointer
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert latest.read(root, "run id") == names[-1]
    assert seen <= {None, *names}
    assert not [n for n in os.listdir(root) if ".tmp-" in n]  # no temp file left behind


def test_advance_refuses_to_go_back_and_write_does(tmp_path):
    root = str(tmp_path)
    assert latest.advance(root, "b")
    assert not latest.advance(root, "a")
    assert latest.read(root) == "b"
    latest.write(root, "a")
    assert latest.read(root) == "a" and open(latest.pointer_uri(root)).read() == "a\n"


@pytest.mark.parametrize("content", [
    b"../elsewhere\n", b"/abs/path\n", b"a/b\n", b"..\n", b"\xff\xfe\x00bin", b"x" * 5000,
    b"two words\n",
])
def test_a_bad_name_is_refused(tmp_path, content):
    (tmp_path / "LATEST").write_bytes(content)
    with pytest.raises(latest.LatestError, match="LATEST"):
        latest.read(str(tmp_path))
    with pytest.raises(snapshot.SnapshotError):
        snapshot.latest_run_id(str(tmp_path))
    with pytest.raises(art.IndexArtifactError, match="corrupted"):
        art.read_latest(str(tmp_path))
    with pytest.raises(latest.LatestError):  # not overwritten blindly
        latest.advance(str(tmp_path), "r1")


def test_empty_latest_is_none_for_the_index_and_refused_for_snapshots(tmp_path):
    (tmp_path / "LATEST").write_text("\n")
    assert art.read_latest(str(tmp_path)) is None
    with pytest.raises(snapshot.SnapshotError, match="empty"):
        snapshot.latest_run_id(str(tmp_path))


def test_writing_a_bad_name_is_refused_before_anything_is_written(tmp_path):
    for bad in ("", "..", "a/b", "/x", "-x"):
        with pytest.raises(InvalidNameError):
            latest.write(str(tmp_path), bad)
    with pytest.raises(snapshot.SnapshotError):
        snapshot.mark_latest(str(tmp_path), "../x")
    with pytest.raises(art.IndexArtifactError):
        art.write_latest(str(tmp_path), "a/b")
    assert not (tmp_path / "LATEST").exists()


def test_missing_latest_is_none(tmp_path):
    assert latest.read(str(tmp_path / "nothing")) is None
    assert snapshot.latest_run_id(str(tmp_path)) is None
    assert snapshot.latest(str(tmp_path)) is None
    assert art.read_latest(str(tmp_path)) is None


def test_snapshot_advance_latest_keeps_the_newest_run(tmp_path):
    root = str(tmp_path)
    assert snapshot.advance_latest(root, "20260102T000000Z")
    assert not snapshot.advance_latest(root, "20260101T000000Z")
    assert snapshot.latest_run_id(root) == "20260102T000000Z"


# --------------------------------------------------------------------------- Parquet, vectors

def test_parquet_bytes_round_trip(tmp_path):
    table = pa.table({"a": ["x", "y"], "b": [1, 2]})
    for compression in ("snappy", "zstd", "none"):
        assert fs.parquet_from_bytes(fs.parquet_to_bytes(table, compression)).equals(table)
    uri = "file://" + str(tmp_path / "sub dir" / "t.parquet").replace(" ", "%20")
    fs.write_parquet(uri, table, compression="zstd")
    assert fs.read_parquet(uri).equals(table)
    assert fs.read_parquet(str(tmp_path / "sub dir" / "t.parquet")).equals(table)


def test_embedding_matrix_handles_chunks_slices_and_empty():
    dim = 3
    vectors = np.arange(12, dtype=np.float32).reshape(4, dim)
    col = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim)
    assert np.array_equal(snapshot.embedding_matrix(col, dim), vectors)
    chunked = pa.chunked_array([col.slice(0, 1), col.slice(1, 3)])
    assert np.array_equal(snapshot.embedding_matrix(chunked, dim), vectors)
    # a slice starts at its own offset, not at the start of the parent's values
    assert np.array_equal(snapshot.embedding_matrix(col.slice(2, 2), dim), vectors[2:])
    variable = pa.array(vectors.tolist(), pa.list_(pa.float64()))
    got = snapshot.embedding_matrix(variable, dim)
    assert got.dtype == np.float32 and np.array_equal(got, vectors)
    empty = snapshot.embedding_matrix(col.slice(0, 0), dim)
    assert empty.shape == (0, dim) and empty.dtype == np.float32


# --------------------------------------------------------------------------- arguments, models

def test_check_uri_arg(tmp_path):
    assert check_uri_arg("--out", str(tmp_path)) == str(tmp_path)
    assert check_uri_arg("--out", "file://" + str(tmp_path)) == str(tmp_path)
    for empty in ("", "  ", None):
        with pytest.raises(UsageError, match="--out must not be empty"):
            check_uri_arg("--out", empty)
    with pytest.raises(UsageError, match="--out: .*unsupported URI scheme 'nope'"):
        check_uri_arg("--out", "nope://x")


def test_check_name_arg():
    assert check_name_arg("--run-id", None) is None
    assert check_name_arg("--run-id", "20260101T000000Z") == "20260101T000000Z"
    for bad in ("", "..", "a/b", "/abs", ".hidden", "x" * 129):
        with pytest.raises(UsageError, match="--run-id"):
            check_name_arg("--run-id", bad)


def test_check_same_model():
    from pipelines.model.resolve import ModelError, ModelSpec, check_same_model
    a = ModelSpec(handle="h", path="/m", input_size=8, mean=0.0, std=1.0, dim=4,
                  fingerprint="a" * 64)
    assert check_same_model(a, a, "here", "the index was built with") is a
    b = ModelSpec(handle="h", path="/m", input_size=8, mean=0.0, std=1.0, dim=4,
                  fingerprint="b" * 64)
    with pytest.raises(ModelError, match="resolves to fingerprint bbbbbbbbbbbb here, but "
                                         "the job expects aaaaaaaaaaaa"):
        check_same_model(b, a, "here", "the job expects")
