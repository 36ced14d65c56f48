"""The real embed job (Beam DirectRunner, tiny real SavedModel) on a hostile catalog.

Every row of tests/reliability/hostile_catalog.py must end embedded or dead-lettered
with its expected stage/reason, the counts must reconcile, and each wholly bad manifest
must fail before the job starts, with a clear message, leaving the output root as it was.
"""
from __future__ import annotations

import collections
import os
import time

import numpy as np
import pytest

from hostile_catalog import EMBEDDED, MAX_BYTES, write_bad_manifests, write_hostile_catalog
from pipelines.embed import snapshot
from catalog_search.cli import main as cli_main
from pipelines.embed.job import EmbedError, run_embed


def _hostile_config(embed_config):
    return embed_config.replace(
        fetch={"max_bytes": MAX_BYTES, "retries": 0, "timeout_s": 2.0, "deadline_s": 5.0},
        embed={"max_dead_letter_fraction": 1.0})


def test_every_hostile_row_is_embedded_or_dead_lettered_with_its_reason(embed_config, tmp_path):
    manifests, kinds = write_hostile_catalog(str(tmp_path / "cat"))
    assert len({k.kind for k in kinds}) >= 30
    out = str(tmp_path / "emb")
    started = time.time()
    s = run_embed(manifests, out, _hostile_config(embed_config), run_id="hostile")
    assert time.time() - started < 240  # nothing hangs (FIFO, device, closed port)

    expected = collections.Counter(k.expected for k in kinds)
    assert s.input_rows == len(kinds)
    assert s.input_rows == s.embedded + s.reused + s.dead_lettered
    assert s.embedded == expected[EMBEDDED]
    assert s.dead_letter_reasons == {k: v for k, v in expected.items() if k != EMBEDDED}

    dead = {d["source"]: d for d in snapshot.read_dead_letters(s.snapshot)}
    wrong = []
    for k in kinds:
        if k.expected == EMBEDDED:
            continue
        d = dead.get(k.source)
        got = f"{d['stage']}/{d['error']}" if d else "(no dead letter)"
        if got != k.expected:
            wrong.append((k.kind, k.expected, got, d and d["message"]))
        elif not d["message"]:
            wrong.append((k.kind, "a message", "empty message", None))
    assert not wrong, wrong

    table = snapshot.load(s.snapshot).table
    ids = table.column("image_id").to_pylist()
    assert sorted(ids) == sorted(k.image_id for k in kinds if k.expected == EMBEDDED)
    vectors = snapshot.load(s.snapshot).vectors()
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    for text in table.column("metadata").to_pylist():
        assert "b'" not in text  # nothing stringified from bytes
    assert snapshot.latest(out) == s.snapshot


def test_default_guard_fails_the_hostile_catalog_and_moves_nothing(embed_config, tmp_path):
    """The same catalog with the default failure-rate guard (0.5): exit 3, LATEST unchanged."""
    manifests, kinds = write_hostile_catalog(str(tmp_path / "cat"))
    out = tmp_path / "emb"
    (out / "r0").mkdir(parents=True)
    (out / "r0" / "summary.json").write_text("{}")
    (out / "LATEST").write_text("r0\n")
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{handle: {embed_config.model.handle}, batch_size: 8, "
                      f"cache_dir: {tmp_path / 'cache'}}}\n"
                      "runner: {direct_running_mode: in_memory, direct_num_workers: 1}\n"
                      f"fetch: {{max_bytes: {MAX_BYTES}, retries: 0, timeout_s: 2.0}}\n")
    argv = ["--config", str(config), "embed", "--out", str(out), "--run-id", "r1"]
    for m in manifests:
        argv += ["--manifest", m]
    assert cli_main(argv) == 3
    assert (out / "LATEST").read_text() == "r0\n"
    assert not (out / "r1" / "summary.json").exists()
    assert (out / "r1" / "failed_summary.json").exists()


@pytest.mark.heavy
def test_each_bad_manifest_fails_fast_with_a_clear_message(embed_config, tmp_path):
    bad = write_bad_manifests(str(tmp_path / "bad"))
    assert len([b for b in bad if b.expected != "ok"]) >= 15
    out = tmp_path / "emb"
    (out / "r0").mkdir(parents=True)
    (out / "r0" / "summary.json").write_text("{}")
    (out / "LATEST").write_text("r0\n")
    before = sorted(os.listdir(out))
    config = embed_config.replace(embed={"max_dead_letter_fraction": 1.0})
    problems = []
    for b in bad:
        started = time.time()
        try:
            s = run_embed([b.uri], str(out), config, run_id=f"run-{b.kind}")
            outcome = "ok" if s.embedded == 1 else f"ran: {s.dead_letter_reasons}"
        except EmbedError as e:
            outcome = str(e)
        elapsed = time.time() - started
        if b.expected == "ok":
            if outcome != "ok":
                problems.append((b.kind, outcome))
            continue
        if b.expected not in outcome:
            problems.append((b.kind, b.expected, outcome))
        if elapsed > 10:
            problems.append((b.kind, f"took {elapsed:.1f}s: not fast"))
        if sorted(os.listdir(out)) != before or (out / "LATEST").read_text() != "r0\n":
            problems.append((b.kind, "the output root changed"))
    assert not problems, problems


@pytest.mark.parametrize("argv, message", [
    (["embed", "--manifest", "MISSING", "--out", "OUT"], "does not exist"),
    (["embed", "--manifest", "EMPTY", "--out", "OUT"], "empty CSV"),
])
def test_bad_manifest_on_the_command_line_exits_1_and_names_it(tmp_path, capsys, argv, message):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    paths = {"MISSING": str(tmp_path / "nope.csv"), "EMPTY": str(empty),
             "OUT": str(tmp_path / "out")}
    assert cli_main([paths.get(a, a) for a in argv]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
