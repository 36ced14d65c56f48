"""A newcomer's CLI mistakes (issue 23): each is refused before any index loads, with one
line naming the problem and exit status 2, in well under a second, on a real published
index (loading it would take seconds). Plus the cosmetics of the query table, the
not_an_image message and the demo's lookup table."""
from __future__ import annotations

import shutil
import socket
import time
from types import SimpleNamespace

import pytest

from catalog_search.cli import main
from serving_fixtures import serving_world

# Refusals happen before the index loads: well below what loading it takes.
FAST_S = 1.0


@pytest.fixture(scope="module")
def world():
    return serving_world()


@pytest.fixture()
def embeddings_root(world, tmp_path):
    """An embeddings root (LATEST -> a complete snapshot), as `embed --out` leaves it."""
    from pipelines.core import latest
    root = tmp_path / "emb"
    shutil.copytree(world.snapshot, root / "run-1")
    latest.write(str(root), "run-1")
    return str(root)


def _refused(capsys, argv: list[str], *expected: str) -> float:
    """Run the CLI; assert exit 2 and one stderr line holding `expected`; the seconds taken."""
    t0 = time.perf_counter()
    code = main(argv)
    elapsed = time.perf_counter() - t0
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, (code, captured.out, captured.err)
    assert len(lines) == 1, captured.err
    for text in expected:
        assert text in lines[0], lines[0]
    assert "Traceback" not in captured.out + captured.err
    assert elapsed < FAST_S, f"{argv[0]} took {elapsed:.2f}s to refuse: {lines[0]}"
    return elapsed


def _trust(world) -> list[str]:
    return ["--allow-model", world.config.model.handle]


def test_evaluate_queries_csv_without_image_uri(world, tmp_path, capsys):
    queries = tmp_path / "queries.csv"
    queries.write_text("product_id,photo\nP0001,a.jpg\n", encoding="utf-8")
    _refused(capsys, ["evaluate", "--index-root", world.index_root, *_trust(world),
                      "--queries", str(queries), "--out", str(tmp_path / "out")],
             "catalog-search evaluate: error: --queries", "lacks required column",
             "image_uri")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["missing", "directory", "unknown_format", "empty"])
def test_evaluate_refuses_unusable_queries_files(world, tmp_path, capsys, case):
    path = {"missing": tmp_path / "none.csv", "directory": tmp_path,
            "unknown_format": tmp_path / "queries.txt", "empty": tmp_path / "empty.csv"}[case]
    if case == "unknown_format":
        path.write_text("product_id,image_uri\n", encoding="utf-8")
    if case == "empty":
        path.write_text("product_id,image_uri\n", encoding="utf-8")
    expected = {"missing": "does not exist", "directory": "is a directory",
                "unknown_format": "unknown manifest format", "empty": "has no rows"}[case]
    _refused(capsys, ["evaluate", "--index-root", world.index_root, "--queries", str(path),
                      "--out", str(tmp_path / "out")], expected)


def test_evaluate_refuses_an_out_that_is_a_file(world, tmp_path, capsys):
    (tmp_path / "report").write_text("", encoding="utf-8")
    _refused(capsys, ["evaluate", "--index-root", world.index_root, "--queries", world.queries,
                      "--out", str(tmp_path / "report")], "--out", "is a file")


def test_query_a_directory(world, tmp_path, capsys):
    _refused(capsys, ["query", "--index-root", world.index_root, *_trust(world),
                      str(tmp_path)], f"query image {tmp_path} is a directory")


def test_query_a_missing_index_root(tmp_path, capsys, world):
    image = world.catalog_rows()[0]["image_uri"]
    _refused(capsys, ["query", "--index-root", str(tmp_path / "no-index"), image],
             "--index-root", "does not exist")


@pytest.mark.parametrize("command", ["query", "evaluate", "serve"])
def test_an_embeddings_root_is_not_an_index_root(world, embeddings_root, capsys, command):
    extra = {"query": [world.catalog_rows()[0]["image_uri"]],
             "evaluate": ["--queries", world.queries], "serve": ["--port", "0"]}[command]
    _refused(capsys, [command, "--index-root", embeddings_root, *extra],
             f"--index-root {embeddings_root} is an embeddings root", "not an index root",
             f"build-index --embeddings {embeddings_root}")
    snapshot_folder = embeddings_root + "/run-1"
    _refused(capsys, [command, "--index-root", snapshot_folder, *extra],
             "is an embeddings snapshot", "not an index root")


def test_serve_on_a_busy_port_fails_at_once_naming_it(world, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        _refused(capsys, ["serve", "--index-root", world.index_root, *_trust(world),
                          "--host", "127.0.0.1", "--port", str(port)],
                 f"port {port} is already in use", f"127.0.0.1:{port}")


def test_serve_on_an_address_of_no_interface(world, capsys):
    _refused(capsys, ["serve", "--index-root", world.index_root, "--host", "192.0.2.1",
                      "--port", "0"], "cannot listen on 192.0.2.1:0")


def test_bind_socket_listens_before_the_app_exists():
    from serving.cli import bind_socket
    sock = bind_socket("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass  # the kernel accepts into the backlog: clients wait, they are not refused
    finally:
        sock.close()


# --------------------------------------------------------------------------- cosmetics

def test_not_an_image_message_names_no_python_object():
    from pipelines.model.image_decode import QUERY_FORMATS, DecodeError, decode_image
    for formats in (None, QUERY_FORMATS):
        with pytest.raises(DecodeError) as e:
            decode_image(b"this is plain text, not a photo", max_pixels=10**6, formats=formats)
        assert e.value.reason == "not_an_image"
        assert "BytesIO" not in str(e.value) and " at 0x" not in str(e.value)
        assert "31 bytes" in str(e.value)


def test_query_table_stays_aligned_for_long_product_ids():
    from serving.cli import results_table
    hits = [SimpleNamespace(product_id=pid, image_id=iid, score=score, metadata={"c": "x"})
            for pid, iid, score in [("P1", "P1-a", 0.9),
                                    ("a-very-long-product-identifier-0042", "img", 0.8),
                                    ("P3", "an-image-id-longer-than-twenty-four-chars", 0.7)]]
    lines = results_table(hits).splitlines()
    header, rows = lines[0], lines[1:]
    image_col, meta_col = header.index("image_id"), header.index("metadata")
    for row, hit in zip(rows, hits):
        assert row.index(hit.image_id, len("  rank  score  ")) == image_col, lines
        assert row.index("c=x") == meta_col, lines


def test_demo_lookup_table_says_misses_are_expected():
    from catalog_search.demo import lookup_table
    report = {"per_query": [
        {"image_uri": "/q/q1.jpg", "product_id": "P1",
         "results": [{"product_id": "P2", "score": 0.9, "hit": False}]},
        {"image_uri": "/q/q2.jpg", "product_id": "P2",
         "results": [{"product_id": "P2", "score": 0.95, "hit": True}]}]}
    text = lookup_table(report, {"P1": "Fresh Juice"})
    assert [line.split()[-1] for line in text.splitlines()[1:3]] == ["no", "yes"]
    assert "Misses are expected on this synthetic catalog" in text
