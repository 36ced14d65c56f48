"""`catalog-search query` / `serve` argument handling and `evaluate` (library + CLI) on a
real published index."""
from __future__ import annotations

import csv
import json
import os
import shutil

import pytest

from catalog_search.cli import main
from serving.evaluate import evaluate
from serving.evaluate_metrics import METRIC_NAMES
from serving_fixtures import NUM_PRODUCTS, jpeg_bytes, serving_world


@pytest.fixture(scope="module")
def world():
    return serving_world()


def _trust(world) -> list[str]:
    """The index was built with the tiny test model, not the default config's builtin one:
    the operator must say it trusts that model (issue 9 #4)."""
    return ["--allow-model", world.config.model.handle]


def test_query_refuses_a_model_it_was_not_told_to_trust(world, capsys):
    row = world.catalog_rows()[2]
    assert main(["query", "--index-root", world.index_root, row["image_uri"]]) == 1
    assert "not trusted" in capsys.readouterr().out


def test_query_prints_a_results_table(world, capsys):
    row = world.catalog_rows()[2]
    code = main(["query", "--index-root", world.index_root, *_trust(world), "-k", "3",
                 row["image_uri"]])
    out = capsys.readouterr().out
    assert code == 0, out
    lines = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [line[0] for line in lines] == ["1", "2", "3"]
    assert lines[0][1] == "1.000" and lines[0][2] == row["product_id"]
    assert "index v0001" in out


def test_query_json_filters_and_errors(world, tmp_path, capsys):
    row = world.catalog_rows()[0]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"definitely not a jpeg")
    code = main(["query", "--index-root", world.index_root, *_trust(world), "--json", "--filters",
                 json.dumps({"category": "dairy"}), row["image_uri"], str(broken)])
    out = capsys.readouterr().out
    assert code == 1  # one of the two images could not be searched
    first = json.loads(out.splitlines()[0])
    assert {h["metadata"]["category"] for h in first["results"]} == {"dairy"}
    assert "broken.jpg: not_an_image" in out
    assert main(["query", "--index-root", world.index_root, *_trust(world), "-k", "0",
                 row["image_uri"]]) == 2
    assert main(["query", "--index-root", world.index_root, *_trust(world), "--filters", "[1]",
                 row["image_uri"]]) == 2
    assert main(["query", "--index-root", world.index_root, str(tmp_path / "none.jpg")]) == 2
    assert main(["query", "--index-root", world.index_root, "--shard-subset", "a,b",
                 row["image_uri"]]) == 2
    assert "--shard-subset must be" in capsys.readouterr().err
    # arguments are checked before any index is loaded: no index is needed to refuse -k 0
    assert main(["query", "--index-root", str(tmp_path / "no-index"), "-k", "0",
                 row["image_uri"]]) == 2
    assert "-k must be between 1 and" in capsys.readouterr().err
    # a missing index root is an argument mistake too (tests/test_cli_mistakes.py)
    assert main(["query", "--index-root", str(tmp_path / "no-index"), row["image_uri"]]) == 2


def test_serve_rejects_bad_arguments(world, tmp_path, capsys):
    assert main(["serve", "--index-root", world.index_root, "--port", "70000"]) == 2
    assert main(["serve", "--index-root", str(tmp_path / "missing"), "--no-watch"]) == 2
    (tmp_path / "a-file").write_text("")
    assert main(["serve", "--index-root", str(tmp_path / "a-file")]) == 2
    err = capsys.readouterr().err
    assert "--port must be between" in err and "is not a directory" in err
    assert "--no-watch would never pick up" in err.replace("(and ", "")


def _queries_with_problems(world, tmp_path) -> str:
    with open(world.queries, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(jpeg_bytes()[:150])
    rows.append({"product_id": "P0001", "image_id": "bad", "image_uri": str(broken),
                 "category": "snacks"})
    rows.append({"product_id": "NOT-IN-CATALOG", "image_id": "x",
                 "image_uri": rows[0]["image_uri"], "category": "dairy"})
    path = tmp_path / "queries.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


def test_evaluate_report(world, tmp_path):
    out = str(tmp_path / "report")
    queries = _queries_with_problems(world, tmp_path)
    report = evaluate(world.index_root, queries, out, world.config, max_examples=6)
    assert report["version"] == "v0001" and report["queries"] == NUM_PRODUCTS
    reasons = sorted(s["reason"] for s in report["skipped"])
    assert len(reasons) == 2 and "product_not_indexed" in reasons
    assert set(reasons) & {"truncated", "corrupt", "not_an_image"}
    for mode in ("index", "exact"):
        m = report["overall"][mode]
        assert set(m) == set(METRIC_NAMES)
        assert 0 <= m["recall@1"] <= m["recall@5"] <= m["recall@10"] <= 1
        assert m["precision@1"] == m["recall@1"]
        assert 0 <= m["mAP@10"] <= 1
    # Small shards are searched by brute force: the index column equals exact search.
    assert report["overall"]["index"] == report["overall"]["exact"]
    assert set(report["by_category"]) == {"beverages", "snacks", "produce", "household",
                                          "dairy"}
    assert sum(g["queries"] for g in report["by_product"].values()) == NUM_PRODUCTS
    with open(os.path.join(out, "report.json")) as f:
        assert json.load(f)["overall"] == report["overall"]
    page = open(os.path.join(out, "report.html"), encoding="utf-8").read()
    assert page.count("data:image/jpeg;base64,") >= 6 * 2
    assert 'src="/' not in page and 'src="http' not in page and 'src=""' not in page
    assert 'class="hit"' in page and "By category" in page and "Skipped queries" in page


def test_evaluate_catalog_against_itself_is_perfect_at_1(world, tmp_path):
    """Catalog images as queries: each finds itself first (same preprocessing end to end)."""
    report = evaluate(world.index_root, world.manifest, str(tmp_path / "self"), world.config)
    assert report["overall"]["index"]["recall@1"] == 1.0
    assert report["overall"]["exact"]["precision@1"] == 1.0


def test_evaluate_cli(world, tmp_path, capsys):
    out = str(tmp_path / "cli")
    code = main(["evaluate", "--index-root", world.index_root, *_trust(world), "--queries",
                 world.queries, "--out", out, "--examples", "3"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "recall@1" in printed and printed.count("\nindex ") == 1
    assert os.path.exists(os.path.join(out, "report.html"))
    assert main(["evaluate", "--index-root", world.index_root, "--queries",
                 str(tmp_path / "missing.csv")]) == 2
    shutil.rmtree(out)


def test_evaluate_vector_cache_and_text_fusion(world, tmp_path):
    """Cached query vectors give the same report; the product title as query text lifts
    recall@1 to 1 (the title names the product), weight 0 keeps the visual metrics."""
    cache = str(tmp_path / "cache")
    first = evaluate(world.index_root, world.queries, str(tmp_path / "a"), world.config,
                     vector_cache=cache)
    again = evaluate(world.index_root, world.queries, str(tmp_path / "b"), world.config,
                     vector_cache=cache)
    assert first["queries_from_cache"] == 0 and again["queries_from_cache"] == NUM_PRODUCTS
    assert again["overall"] == first["overall"]
    # queries.csv has no title column: use the product_id (e.g. "P0003") as its words
    fused = evaluate(world.index_root, world.queries, str(tmp_path / "c"), world.config,
                     vector_cache=cache, text_from="product_id", text_weight=0.5)
    assert fused["fusion"] == {"text_from": "product_id", "text_weight": 0.5,
                               "candidates": world.config.fusion.candidates}
    assert first["overall"]["index"]["recall@1"] < 1.0  # the photos alone make mistakes
    assert fused["overall"]["index"]["recall@1"] == 1.0
    zero = evaluate(world.index_root, world.queries, str(tmp_path / "d"), world.config,
                    vector_cache=cache, text_from="product_id", text_weight=0.0)
    assert zero["overall"]["index"]["recall@1"] == first["overall"]["index"]["recall@1"]
    assert main(["evaluate", "--index-root", world.index_root, "--queries", world.queries,
                 "--text-weight", "0.5"]) == 2  # --text-weight needs --text-from
    assert main(["evaluate", "--index-root", world.index_root, "--queries", world.queries,
                 "--text-from", "category", "--text-weight", "3"]) == 2


def test_evaluate_prints_progress_like_embed(world, tmp_path, monkeypatch, caplog):
    """evaluate embeds its queries in batches and logs `evaluate progress:` lines against
    the number of query rows (skipped rows count as done), ending in done (issue 23)."""
    import logging
    import re

    from pipelines.core import progress
    monkeypatch.setenv(progress.PROGRESS_INTERVAL_ENV, "0.2")
    caplog.set_level(logging.INFO)
    queries = _queries_with_problems(world, tmp_path)  # 12 usable rows + 2 skipped
    config = world.config.replace(model={"batch_size": 2})
    report = evaluate(world.index_root, queries, str(tmp_path / "out"), config)
    assert report["queries"] == NUM_PRODUCTS
    lines = [r.getMessage() for r in caplog.records if "evaluate progress:" in r.getMessage()]
    total = NUM_PRODUCTS + 2
    pattern = re.compile(rf"evaluate progress: (\d+)/{total} queries \(\d+%\), ")
    done = [int(pattern.match(line).group(1)) for line in lines]
    assert done and done == sorted(done) and done[-1] == total, lines
    assert lines[-1].startswith(f"evaluate progress: {total}/{total} queries (100%), done")
    assert any(f"{NUM_PRODUCTS} embedded in" in r.getMessage() for r in caplog.records)
