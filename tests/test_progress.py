"""Progress lines of the Beam jobs against the known total (real CLI, real DirectRunner)."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.core import progress

REPO = Path(__file__).resolve().parent.parent


def test_format_line_has_done_total_rate_and_eta():
    line = progress.format_line("embed", "rows", 120, 300, 10.0, rate=12.0)
    assert line == "embed progress: 120/300 rows (40%), 12.0/s, ETA 15s, 10s elapsed"
    assert progress.format_line("embed", "rows", 12, 300, 6.0, rate=None) == \
        "embed progress: 12/300 rows (4%), ETA estimating…, 6s elapsed"
    assert "done" in progress.format_line("embed", "rows", 300, 300, 10.0, rate=None)


def _simulate(startup_s: float, rate: float, bundle: int, total: int, poll_s: float = 1.0):
    """(time, done, eta_s) each poll of a job that does nothing for `startup_s` seconds,
    then finishes `bundle` items at a time at `rate` items/s (Beam workers hand items
    back in bundles)."""
    est = progress.EtaEstimator(total)
    out, now = [], 0.0
    while True:
        done = 0 if now < startup_s else \
            min(total, int((now - startup_s) * rate) // bundle * bundle + bundle)
        est.update(now, done)
        out.append((now, done, est.eta_s()))
        if done >= total:
            return out, startup_s + (total - bundle) / rate
        now += poll_s


@pytest.mark.parametrize("startup_s,bundle", [(20.0, 32), (40.0, 1), (5.0, 10)])
def test_eta_ignores_a_slow_start_up_and_says_estimating_first(startup_s, bundle):
    """The grocery embed said "ETA 55m06s" for a 37 s job: the rate counted Beam's start-up.
    Now the first lines say estimating, and every ETA given is close to the real finish."""
    polls, finish = _simulate(startup_s, rate=10.0, bundle=bundle, total=600)
    first_items = next(t for t, done, _ in polls if done)
    early = [eta for t, done, eta in polls if done and t < first_items + 3.0]
    assert early and all(eta is None for eta in early)  # "estimating…"
    given = [(t, eta) for t, done, eta in polls if eta is not None and done < 600]
    assert len(given) > 20
    for t, eta in given:
        assert abs(t + eta - finish) <= 0.1 * (finish - first_items) + 4.0, (t, eta, finish)
    # what the old since-the-start rate said 5 s after the first items
    t, done, _ = next(p for p in polls if p[0] >= first_items + 5)
    naive_eta = (600 - done) / (done / t)
    assert t + naive_eta - finish > 0.5 * (finish - first_items)


def test_eta_smooths_an_uneven_rate():
    """A bundle that takes twice as long moves the predicted finish by a few percent of the
    time left (the unsmoothed rate would double the ETA)."""
    est = progress.EtaEstimator(1000)
    now, done, finish = 0.0, 0, {}
    for step in range(30):
        now += 2.0 if step == 25 else 1.0
        done += 10
        est.update(now, done)
        eta = est.eta_s()
        if step in (24, 25):
            assert eta is not None
            finish[step] = (now, now + eta)
    (then, before), (_, after) = finish[24], finish[25]
    assert 0 < after - before < 0.1 * (before - then)


def test_report_progress_lines_on_a_job_with_slow_start_up(monkeypatch, caplog):
    """The real reporter thread and tick file: a job that starts its first items after
    2 s prints estimating… lines, then ETAs near the real end, then done."""
    import threading
    import time
    monkeypatch.setenv(progress.PROGRESS_INTERVAL_ENV, "0.2")
    caplog.set_level(logging.INFO, logger=progress.__name__)
    total = 80

    def job() -> None:
        time.sleep(2.0)  # start-up: workers, model
        for _ in range(total // 4):
            progress.tick(4)
            time.sleep(0.25)

    started = time.monotonic()
    with progress.report_progress("embed", total, "rows"):
        worker = threading.Thread(target=job)
        worker.start()
        worker.join()
    took = time.monotonic() - started
    lines = [(r.created, r.getMessage()) for r in caplog.records
             if "embed progress:" in r.getMessage()]
    assert lines and lines[-1][1].startswith(f"embed progress: {total}/{total} rows (100%), done")
    assert "ETA estimating…" in lines[0][1], lines[0][1]
    etas = [(created, m) for created, m in lines if "/s, ETA " in m]
    assert etas, lines
    end = lines[-1][0]
    for created, message in etas:
        eta = re.search(r"ETA (\d+)s", message)
        assert eta, message
        # the job's real remaining time, with slack for a loaded machine
        assert abs(created + int(eta.group(1)) - end) <= 0.5 * took + 1.0, (message, took)


def test_ticks_from_several_processes_add_up(tmp_path, monkeypatch):
    """Worker processes append to one file; the reporter reads the sum."""
    path = tmp_path / "progress"
    monkeypatch.setenv(progress.PROGRESS_FILE_ENV, str(path))
    code = "from pipelines.core import progress\nfor _ in range(50): progress.tick()"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO) for _ in range(4)]
    assert all(p.wait() == 0 for p in procs)
    assert path.stat().st_size == 200


@pytest.mark.heavy
def test_embed_of_300_images_prints_progress_lines(tmp_path, tiny_model):
    from pipelines.embed.sample_catalog import write_catalog
    manifest = write_catalog(str(tmp_path / "cat"), num_products=100, images_per_product=3,
                             size=64, seed=1)
    env = dict(os.environ, **{progress.PROGRESS_INTERVAL_ENV: "0.5",
                              "CATALOG_SEARCH_CACHE": str(tmp_path / "cache")})
    proc = subprocess.run(
        [sys.executable, "-m", "catalog_search.cli", "embed", "--manifest", manifest,
         "--out", str(tmp_path / "emb"), "--model", tiny_model, "--workers", "2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines()
             if "embed progress:" in line]
    assert lines, proc.stderr[-3000:]
    pattern = re.compile(r"embed progress: (\d+)/300 rows \(\d+%\), "
                         r"([\d.]+/s, ETA \S+|ETA estimating…|done)")
    done = [int(pattern.search(line).group(1)) for line in lines]
    assert done == sorted(done)
    assert done[-1] == 300 and lines[-1].rstrip().endswith("elapsed")
    # the known noise of Beam's optional GCP client is gone, from launcher and workers
    assert "apitools" not in proc.stdout + proc.stderr


def test_ticks_open_the_file_once_per_job(tmp_path, monkeypatch):
    """A worker opens the progress file on its first tick, not on every tick; the next
    job (another file) gets its own ticks."""
    opened = []
    real_open = os.open
    monkeypatch.setattr(progress.os, "open",
                        lambda path, *a, **kw: opened.append(path) or real_open(path, *a, **kw))
    first, second = tmp_path / "first", tmp_path / "second"
    monkeypatch.setenv(progress.PROGRESS_FILE_ENV, str(first))
    for _ in range(30):
        progress.tick()
    monkeypatch.setenv(progress.PROGRESS_FILE_ENV, str(second))
    progress.tick(5)
    progress.tick(2)
    assert first.stat().st_size == 30 and second.stat().st_size == 7
    assert opened == [str(first), str(second)]
