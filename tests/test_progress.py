"""Progress lines of the Beam jobs against the known total (real CLI, real DirectRunner)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.core import progress

REPO = Path(__file__).resolve().parent.parent


def test_format_line_has_done_total_rate_and_eta():
    line = progress.format_line("embed", "rows", 120, 300, 10.0)
    assert line.startswith("embed progress: 120/300 rows (40%), 12.0/s, ETA 15s")
    assert "done" in progress.format_line("embed", "rows", 300, 300, 10.0)


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
    pattern = re.compile(r"embed progress: (\d+)/300 rows \(\d+%\), [\d.]+/s, (ETA \S+|done)")
    done = [int(pattern.search(line).group(1)) for line in lines]
    assert done == sorted(done)
    assert done[-1] == 300 and lines[-1].rstrip().endswith("elapsed")
    # the known noise of Beam's optional GCP client is gone, from launcher and workers
    assert "apitools" not in proc.stdout + proc.stderr
