"""The http(s) connection pool of the embed job's fetches (pipelines/embed/fetch.py).

One `HttpClient` per worker process and per-host cap (`client_for`), shared by all fetch
threads: keep-alive connections reused per host (scheme, host, port), at most `per_host`
requests in flight per host, and a host's `Retry-After` (429/503) honoured for every
request to it (`defer` / `wait_turn`).
"""
from __future__ import annotations

import contextlib
import http.client
import ssl
import threading
import time
from typing import Iterator

from pipelines.core.config import FetchConfig

HostKey = tuple[str, str, int]  # (scheme, host, port): see fetch.host_key


class _Host:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.active = 0
        self.idle: list[http.client.HTTPConnection] = []
        self.not_before = 0.0  # time.monotonic(): Retry-After


class HttpClient:
    """Keep-alive connections, an in-flight cap and Retry-After per host; thread-safe."""

    def __init__(self, per_host: int):
        self.per_host = per_host
        self._hosts: dict[object, _Host] = {}
        self._lock = threading.Lock()
        self._ssl: ssl.SSLContext | None = None
        self.connections_opened = 0

    def _host(self, key: object) -> _Host:
        with self._lock:
            host = self._hosts.get(key)
            if host is None:
                host = self._hosts[key] = _Host()
            return host

    @contextlib.contextmanager
    def slot(self, key: object) -> Iterator[None]:
        """Hold one of the host's `per_host` slots (waits for one), after its Retry-After."""
        host = self._host(key)
        with host.cond:
            while host.active >= self.per_host:
                host.cond.wait()
            host.active += 1
        try:
            self.wait_turn(key, None)
            yield
        finally:
            with host.cond:
                host.active -= 1
                host.cond.notify()

    def defer(self, key: object, seconds: float) -> None:
        """No new request to the host for `seconds` (a Retry-After it sent)."""
        host = self._host(key)
        with host.cond:
            host.not_before = max(host.not_before, time.monotonic() + seconds)

    def wait_turn(self, key: object, deadline: float | None) -> bool:
        """Sleep until the host's Retry-After has passed; False if that is past `deadline`."""
        host = self._host(key)
        wait = host.not_before - time.monotonic()
        if wait <= 0:
            return True
        if deadline is not None and time.monotonic() + wait >= deadline:
            return False
        time.sleep(wait)
        return True

    def connection(self, key: HostKey, timeout: float, fresh: bool
                   ) -> tuple[http.client.HTTPConnection, bool]:
        """An idle keep-alive connection to the host (True: reused) unless `fresh`, else a
        new one (False)."""
        host = self._host(key)
        if not fresh:
            with host.cond:
                conn = host.idle.pop() if host.idle else None
            if conn is not None and conn.sock is not None:
                conn.sock.settimeout(timeout)
                return conn, True
        scheme, name, port = key
        with self._lock:
            self.connections_opened += 1
        if scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            return http.client.HTTPSConnection(name, port, timeout=timeout,
                                               context=self._ssl), False
        return http.client.HTTPConnection(name, port, timeout=timeout), False

    def give_back(self, key: HostKey, conn: http.client.HTTPConnection) -> None:
        """Keep a connection whose response was read to the end for the next fetch."""
        host = self._host(key)
        with host.cond:
            if len(host.idle) < self.per_host:
                host.idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            hosts = list(self._hosts.values())
        for host in hosts:
            with host.cond:
                idle, host.idle = host.idle, []
            for conn in idle:
                conn.close()


_CLIENTS: dict[int, HttpClient] = {}
_CLIENTS_LOCK = threading.Lock()


def client_for(cfg: FetchConfig) -> HttpClient:
    """This process's HttpClient for the config's per-host cap (shared by all threads)."""
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(cfg.per_host_concurrency)
        if client is None:
            client = _CLIENTS[cfg.per_host_concurrency] = HttpClient(cfg.per_host_concurrency)
        return client
