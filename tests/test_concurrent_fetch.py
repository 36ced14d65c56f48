"""Concurrent fetching in the embed job (issue 20): a real HTTP/1.1 server on loopback
(tests/loopback_images.py) with a first-byte delay, and a Beam FileSystem with a latency.

What must hold: fetches overlap; the outcomes and dead-letter reasons of a mixed catalog
are exactly the sequential path's (fetch.concurrency 1); the per-host cap holds;
Retry-After is honoured for the whole host; connections are reused; a failed bundle's
fetches are never emitted by the retried bundle; object-store reads and change-signal
lookups overlap too.
"""
from __future__ import annotations

import csv
import threading
import time

import numpy as np
import pytest
from apache_beam.io.localfilesystem import LocalFileSystem

import image_factory as f
from loopback_images import ImageServer
from pipelines.core.config import AugmentConfig, ConfigError, DecodeConfig, FetchConfig, load_config
from pipelines.embed import snapshot
from pipelines.embed.fetch import FetchError, fetch_bytes, retry_after_seconds
from pipelines.embed.http_pool import HttpClient
from pipelines.embed.inflight import InFlight
from pipelines.embed.job import run_embed
from pipelines.embed.transforms import EmbedSettings, ResolveImage

CFG = FetchConfig(timeout_s=0.3, retries=2, backoff_s=0.01, max_bytes=20_000, deadline_s=0.8)


@pytest.fixture()
def server():
    with ImageServer() as srv:
        for i in range(32):
            srv.state.files[f"{i}.jpg"] = f.jpeg_bytes(color=(7 * i, 120, 255 - 7 * i))
        yield srv


def _fetch_all(uris, cfg, client, limit):
    """fetch_bytes for every URI through an InFlight window: {uri: bytes or reason}."""
    def one(uri):
        try:
            return fetch_bytes(uri, cfg, client)
        except FetchError as e:
            return e.reason
    window = InFlight(limit)
    out = {}
    for uri in uris:
        window.submit(one, uri, tag=uri)
        out.update(window.ready())
    out.update(window.drain())
    return out


def test_fetches_overlap(server):
    server.state.delay_s = 0.2
    uris = [server.url(f"/ok/{i}.jpg") for i in range(16)]
    start = time.monotonic()
    got = _fetch_all(uris, CFG, HttpClient(per_host=16), limit=8)
    wall = time.monotonic() - start
    assert all(got[u] == server.state.files[u.rsplit("/", 1)[1]] for u in uris)
    assert wall < 16 * 0.2 / 3, wall  # 8 at a time: about 2 x 0.2 s, not 16 x 0.2 s
    assert server.state.peak["127.0.0.1:%d" % server.port] == 8


def test_per_host_cap_holds_across_hosts(server):
    server.state.delay_s = 0.1
    uris = ([server.url(f"/ok/{i}.jpg") for i in range(8)]
            + [server.other_host_url(f"/ok/{i}.jpg") for i in range(8, 16)])
    # Fetches queue for their host's slot inside their deadline: a generous one, so a busy
    # machine cannot turn the queueing this test is about into timeouts.
    patient = FetchConfig(timeout_s=5, retries=2, backoff_s=0.01, max_bytes=20_000, deadline_s=20)
    got = _fetch_all(uris, patient, HttpClient(per_host=2), limit=8)
    assert all(isinstance(v, bytes) for v in got.values()), {
        u: v for u, v in got.items() if not isinstance(v, bytes)}
    hosts = {f"127.0.0.1:{server.port}", f"localhost:{server.port}"}
    assert set(server.state.peak) == hosts
    assert all(server.state.peak[h] == 2 for h in hosts), dict(server.state.peak)


def test_connections_are_reused_per_host(server):
    client = HttpClient(per_host=4)
    for i in range(20):
        fetch_bytes(server.url(f"/ok/{i}.jpg"), CFG, client)
    with pytest.raises(FetchError):
        fetch_bytes(server.url("/gone/x.jpg"), CFG, client)  # a small error body: drained
    fetch_bytes(server.url("/ok/1.jpg"), CFG, client)
    assert server.state.connections == 1 and client.connections_opened == 1


def test_retry_after_is_honoured_for_the_whole_host(server):
    server.state.retry_after_s = 1
    client = HttpClient(per_host=4)
    cfg = FetchConfig(timeout_s=2, retries=2, backoff_s=0.01, deadline_s=5)
    other: dict = {}

    def later():
        time.sleep(0.2)  # after the 429 arrived: this request must wait for the host too
        other["data"] = fetch_bytes(server.url("/ok/1.jpg"), cfg, client)

    t = threading.Thread(target=later)
    t.start()
    assert fetch_bytes(server.url("/busy/0.jpg"), cfg, client) == server.state.files["0.jpg"]
    t.join()
    first, second = server.arrivals("/busy/0.jpg")
    assert second - first >= 0.95  # not the 0.01 s backoff
    assert server.arrivals("/ok/1.jpg")[0] - first >= 0.95
    assert other["data"] == server.state.files["1.jpg"]


def test_retry_after_past_the_deadline_gives_up_at_once(server):
    server.state.retry_after_s = 30
    start = time.monotonic()
    with pytest.raises(FetchError) as e:
        fetch_bytes(server.url("/busy/0.jpg"), FetchConfig(retries=3, deadline_s=2),
                    HttpClient(per_host=1))
    assert e.value.reason == "http_429" and "Retry-After 30s" in str(e.value)
    assert time.monotonic() - start < 1.0 and len(server.arrivals("/busy/0.jpg")) == 1


def test_retry_after_header_forms():
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    now = 1_700_000_000.0
    assert retry_after_seconds("Tue, 14 Nov 2023 22:13:40 GMT", now=now) == pytest.approx(20.0)
    assert retry_after_seconds("Tue, 14 Nov 2023 22:00:00 GMT", now=now) == 0.0


def test_concurrency_keys_are_validated():
    for key in ("concurrency", "per_host_concurrency"):
        with pytest.raises(ConfigError, match=f"fetch.{key}"):
            load_config(overrides={"fetch": {key: 0}})
    cfg = load_config()
    assert cfg.fetch.concurrency >= 1 and cfg.fetch.per_host_concurrency >= 1


# --- the embed job ----------------------------------------------------------------------

MIXED = {  # image_id -> (route, expected dead-letter reason or None); reasons as urllib gave
    "ok0": ("/ok/0.jpg", None), "ok1": ("/ok/1.jpg", None), "ok2": ("/ok/2.jpg", None),
    "gone": ("/gone/3.jpg", "not_found"), "flaky": ("/flaky/4.jpg", None),
    "big": ("/big/5.jpg", "too_large"), "slow": ("/slow/6.jpg", "timeout"),
    "loop": ("/loop/7.jpg", "http_302"),
}


def _mixed_manifest(server, path):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["product_id", "image_id", "image_uri"])
        w.writeheader()
        for image_id, (route, _) in MIXED.items():
            w.writerow({"product_id": f"P-{image_id}", "image_id": image_id,
                        "image_uri": server.url(route)})
    return str(path)


@pytest.mark.heavy
def test_mixed_catalog_outcomes_equal_the_sequential_path(server, embed_config, tmp_path):
    manifest = _mixed_manifest(server, tmp_path / "m.csv")
    server.state.delay_s = 0.1  # a first-byte time: concurrent requests overlap visibly
    results = {}
    for concurrency in (1, 8):
        server.reset()  # /flaky/ answers 500 again on its first request
        cfg = embed_config.replace(
            # timeout_s = deadline_s: the trickling /slow/ body ends on the deadline on both
            # paths (a per-read stall of a busy machine cannot end it as "no answer" instead)
            fetch={"timeout_s": 2.0, "retries": 2, "backoff_s": 0.01, "max_bytes": 20_000,
                   "deadline_s": 2.0, "concurrency": concurrency},
            embed={"max_dead_letter_fraction": 0.9})
        s = run_embed([manifest], str(tmp_path / f"emb{concurrency}"), cfg, run_id="r")
        dead = {d["image_id"]: (d["stage"], d["error"], d["message"].split(": ", 1)[1])
                for d in snapshot.read_dead_letters(s.snapshot)}
        vectors = {r["image_id"]: r["embedding"]
                   for r in snapshot.read_table(s.snapshot).to_pylist()}
        results[concurrency] = (s.input_rows, s.embedded, s.dead_lettered, s.fetched,
                                s.dead_letter_reasons, dead, vectors,
                                server.state.peak[f"127.0.0.1:{server.port}"])
    seq, par = results[1], results[8]
    assert seq[:6] == par[:6]  # counts, reasons, dead-letter messages: the same
    assert seq[6].keys() == par[6].keys()  # vectors: the same up to batch composition
    assert all(np.allclose(seq[6][k], par[6][k], atol=1e-5) for k in seq[6])
    assert seq[:4] == (8, 4, 4, 8)
    assert {k: v[1] for k, v in seq[5].items()} == {
        k: reason for k, (_, reason) in MIXED.items() if reason}
    assert all(stage == "fetch" for stage, _, _ in seq[5].values())
    assert sorted(seq[6]) == ["flaky", "ok0", "ok1", "ok2"]
    assert seq[7] == 1 and par[7] > 1  # one request at a time, then several


def _settings(fetch: FetchConfig) -> EmbedSettings:
    return EmbedSettings(model={}, fetch=fetch, decode=DecodeConfig(), augment=AugmentConfig(),
                         features={}, fingerprint="test", reuse=False, merge_previous=False)


def _element(image_id: str, uri: str):
    row = {"order": 0, "image_id": image_id, "product_id": "P", "image_uri": uri,
           "source": "m.csv:2", "metadata": {}}
    return image_id, {"current": [row], "previous": []}


def _values(outputs):
    """(tag, value) of DoFn outputs (TaggedOutput of WindowedValue, or WindowedValue)."""
    import apache_beam as beam
    out = []
    for o in outputs:
        tag = o.tag if isinstance(o, beam.pvalue.TaggedOutput) else None
        wv = o.value if tag else o
        out.append((tag, wv.value))
    return out


def test_a_failed_bundle_is_never_half_counted(server):
    """A bundle that dies with fetches in flight (a killed worker, a bundle retry): the
    retried bundle emits each element's outcome exactly once, nothing of the first try."""
    from apache_beam.transforms.window import GlobalWindow
    server.state.delay_s = 0.3
    dofn = ResolveImage(_settings(FetchConfig(concurrency=4, timeout_s=2, deadline_s=5)))
    elements = [_element(f"img{i}", server.url(f"/ok/{i}.jpg")) for i in range(6)]

    dofn.start_bundle()
    first_try = []
    for e in elements[:5]:  # 4 in flight, then the window is full: the 5th waits for one
        first_try += _values(dofn.process(e, GlobalWindow(), 0))
    # ... and the worker dies here: no finish_bundle. The runner retries the bundle:
    dofn.start_bundle()
    retried = []
    for e in elements:
        retried += _values(dofn.process(e, GlobalWindow(), 0))
    retried += _values(dofn.finish_bundle())
    time.sleep(0.4)  # the first try's fetches finish meanwhile: they must not surface
    retried += _values(dofn.finish_bundle())

    counts = [v for tag, v in retried if tag == "count"]
    decoded = sorted(v[0]["image_id"] for tag, v in retried if tag == "decode")
    assert counts == ["fetched"] * 6 and decoded == [f"img{i}" for i in range(6)]
    # the first try emitted whole elements only (count + decode), not the 5th (in flight)
    assert len(first_try) % 2 == 0 and 2 <= len(first_try) <= 8


class _SlowFS(LocalFileSystem):
    """`slowfetchfs://<abs path>`: a local folder with an object store's latency (every
    metadata / exists / open call waits 0.1 s), counting the calls in flight at once."""
    lock = threading.Lock()
    active = 0
    peak = 0

    @classmethod
    def scheme(cls):
        return "slowfetchfs"

    @classmethod
    def _slow(cls, path: str) -> str:
        with cls.lock:
            cls.active += 1
            cls.peak = max(cls.peak, cls.active)
        time.sleep(0.1)
        with cls.lock:
            cls.active -= 1
        prefix = "slowfetchfs://"
        return path[len(prefix):] if path.startswith(prefix) else path

    def metadata(self, path, *a, **kw):
        return super().metadata(self._slow(path), *a, **kw)

    def exists(self, path):
        return super().exists(self._slow(path))

    def open(self, path, *a, **kw):
        return super().open(self._slow(path), *a, **kw)


def test_object_store_reads_and_signal_lookups_overlap(tmp_path):
    from apache_beam.transforms.window import GlobalWindow
    for i in range(8):
        (tmp_path / f"{i}.jpg").write_bytes(f.jpeg_bytes(color=(30 * i, 40, 50)))
    elements = [_element(f"img{i}", f"slowfetchfs://{tmp_path}/{i}.jpg") for i in range(8)]

    def run(concurrency):
        _SlowFS.peak = 0
        dofn = ResolveImage(_settings(FetchConfig(concurrency=concurrency)))
        dofn.start_bundle()
        start = time.monotonic()
        out = []
        for e in elements:
            out += _values(dofn.process(e, GlobalWindow(), 0))
        out += _values(dofn.finish_bundle())
        return time.monotonic() - start, _SlowFS.peak, out

    seq_wall, seq_peak, seq_out = run(1)
    par_wall, par_peak, par_out = run(8)
    # per image: metadata (change signal) + exists + open, 0.1 s each
    assert seq_peak == 1 and seq_wall >= 8 * 3 * 0.1
    assert par_peak == 8 and par_wall < seq_wall / 3, (par_wall, seq_wall)
    key = sorted
    assert key(map(repr, seq_out)) == key(map(repr, par_out))
    signals = [v[0]["change_signal"] for tag, v in par_out if tag == "decode"]
    assert len(signals) == 8 and all(s and s.startswith("fs:") for s in signals)


def test_launcher_signal_count_looks_up_concurrently(tmp_path):
    """small_run's count of rows to fetch (the launcher, before a DirectRunner refresh)
    looks up change signals fetch.concurrency at a time too."""
    from pipelines.embed import small_run
    rows = []
    for i in range(8):
        (tmp_path / f"{i}.jpg").write_bytes(b"x" * (i + 1))
        rows.append({"image_uri": f"slowfetchfs://{tmp_path}/{i}.jpg", "metadata": {}})
    start = time.monotonic()
    seq = small_run._signals(rows, 1)
    seq_wall = time.monotonic() - start
    _SlowFS.peak = 0
    start = time.monotonic()
    par = small_run._signals(rows, 8)
    par_wall = time.monotonic() - start
    assert seq == par and len(set(seq)) == 8 and all(s.startswith("fs:") for s in seq)
    assert _SlowFS.peak == 8 and par_wall < seq_wall / 3, (par_wall, seq_wall)
