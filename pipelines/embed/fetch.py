"""Fetch image bytes from any Beam FileSystems URI (local, file://, gs://, s3://) or http(s).

Every fetch has a total deadline (`fetch.deadline_s`, covering all attempts, backoff
and reading the body), not only a per-read socket timeout, so a server that trickles
a byte every second cannot hold a worker. http(s): per-read timeout, retries with
exponential backoff on timeouts, connection errors, 429 and 5xx; a byte cap checked
against Content-Length and while reading. Local files: only regular files are read
(opened non-blocking, then checked with fstat, so a FIFO or a device never blocks).

http(s) goes through an `HttpClient` (pipelines/embed/http_pool.py: one per worker process
and fetch config, see `client_for`): keep-alive connections reused per host (scheme, host,
port), at most `fetch.per_host_concurrency` fetches in flight per host (object stores: per bucket), and
`Retry-After` on 429/503 honoured for the whole host -- no request to that host before
the time it named (capped at the fetch deadline). A fetch's deadline starts when it gets
its host slot, so rows queued behind a busy host are not timed out by the queue.
Redirects follow urllib's rules (301/302/303/307/308, at most 10, the same URL at most 4
times, http(s) only), so every dead-letter reason is what urllib gave before.

Errors are FetchError with a short `reason` (what the dead letter records):
    not_found, too_large, timeout, http_<status>, connection, io_error, invalid_uri,
    unsupported_scheme, filesystem_unavailable (the pip extra is named), not_regular_file,
    permission_denied.
"""
from __future__ import annotations

import email.utils
import errno
import http.client
import os
import socket
import stat
import time
import urllib.parse

from pipelines.core import filesystem as fs
from pipelines.core.config import FetchConfig
from pipelines.embed.http_pool import HostKey, HttpClient, client_for

USER_AGENT = "catalog-visual-search/0.1 (+embed pipeline)"
_RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}
_REDIRECT_STATUS = {301, 302, 303, 307, 308}
_MAX_REDIRECTS, _MAX_REPEATS = 10, 4  # urllib.request.HTTPRedirectHandler's limits
_LOOP_MESSAGE = ("The HTTP server returned a redirect error that would lead to an infinite "
                 "loop.\nThe last 30x error message was:\n")
_CHUNK = 65536
_DRAIN_MAX = 65536  # an error / redirect body up to this size is read so the connection is reused


class FetchError(IOError):
    """A fetch failed; `reason` is the short dead-letter code, the message says why.
    `retry_after`: seconds a 429/503 asked us to wait (None when it did not say)."""

    def __init__(self, reason: str, message: str, retryable: bool = False,
                 retry_after: float | None = None):
        super().__init__(message)
        self.reason = reason
        self.retryable = retryable
        self.retry_after = retry_after


def _deadline_error(uri: str, cfg: FetchConfig) -> FetchError:
    return FetchError("timeout", f"{uri}: not complete within the fetch deadline of "
                                 f"{cfg.deadline_s:g}s")


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header (delta-seconds or an HTTP-date) as seconds from now (>= 0)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def host_key(uri: str) -> HostKey:
    """(scheme, host, port) an http(s) URI is fetched from; FetchError invalid_uri if none."""
    try:
        parts = urllib.parse.urlsplit(uri)
        port = parts.port
    except ValueError as e:
        raise FetchError("invalid_uri", f"{uri!r}: not a usable URL: {e}") from e
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchError("invalid_uri", f"{uri!r}: not an http(s) URL with a host")
    return parts.scheme, parts.hostname.lower(), port or (443 if parts.scheme == "https" else 80)


def _set_timeout(conn: http.client.HTTPConnection, seconds: float) -> None:
    if conn.sock is not None:
        conn.sock.settimeout(max(seconds, 0.001))


def _read_body(uri: str, response: http.client.HTTPResponse,
               conn: http.client.HTTPConnection, cfg: FetchConfig, deadline: float) -> bytes:
    length = response.getheader("Content-Length")
    if length and length.isdigit() and int(length) > cfg.max_bytes:
        raise FetchError("too_large", f"{uri}: Content-Length {length} is more than "
                                      f"the limit of {cfg.max_bytes} bytes")
    chunks, size = [], 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _deadline_error(uri, cfg)
        _set_timeout(conn, min(cfg.timeout_s, remaining))
        chunk = response.read1(_CHUNK)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > cfg.max_bytes:
            raise FetchError("too_large", f"{uri}: more than the limit of {cfg.max_bytes} bytes")
    return b"".join(chunks)


def _drain(response: http.client.HTTPResponse) -> bool:
    """Read a small error / redirect body so the connection can be reused; False: close it."""
    length = response.getheader("Content-Length")
    if response.will_close or not (length and length.isdigit()) or int(length) > _DRAIN_MAX:
        return False
    response.read()
    return True


def _exchange(uri: str, url: str, cfg: FetchConfig, deadline: float, client: HttpClient):
    """One GET of `url` on a pooled connection: (status, reason, headers, body or None).
    The body is read (capped) for a 2xx answer only."""
    key = host_key(url)
    parts = urllib.parse.urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    for fresh in (False, True):  # a reused keep-alive connection the server closed: once more
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _deadline_error(uri, cfg)
        conn, reused = client.connection(key, min(cfg.timeout_s, remaining), fresh)
        try:
            conn.request("GET", target, headers=headers)
            response = conn.getresponse()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            conn.close()
            if reused:
                continue
            raise
        except BaseException:
            conn.close()
            raise
        break
    keep = False
    try:
        if 200 <= response.status < 300:
            body = _read_body(uri, response, conn, cfg, deadline)
            keep = not response.will_close
            return response.status, response.reason, response.headers, body
        keep = _drain(response)
        return response.status, response.reason, response.headers, None
    finally:
        response.close()  # the connection stays open: http.client reads the next answer on it
        if keep:
            client.give_back(key, conn)
        else:
            conn.close()


def _fetch_http_once(uri: str, cfg: FetchConfig, deadline: float, client: HttpClient) -> bytes:
    url, visited = uri, {}  # type: ignore[var-annotated]
    try:
        while True:
            status, reason, headers, body = _exchange(uri, url, cfg, deadline, client)
            if body is not None:
                return body
            location = headers.get("Location") or headers.get("URI")
            if status in _REDIRECT_STATUS and location:
                new = urllib.parse.urljoin(url, location)
                if urllib.parse.urlsplit(new).scheme not in ("http", "https"):
                    raise FetchError(f"http_{status}", f"{uri}: HTTP {status} Redirection to "
                                                       f"url '{new}' is not allowed")
                if len(visited) >= _MAX_REDIRECTS or visited.get(new, 0) >= _MAX_REPEATS:
                    raise FetchError(f"http_{status}", f"{uri}: HTTP {status} "
                                                       f"{_LOOP_MESSAGE}{reason}")
                visited[new] = visited.get(new, 0) + 1
                url = new
                continue
            error = "not_found" if status in (404, 410) else f"http_{status}"
            wait = (retry_after_seconds(headers.get("Retry-After"))
                    if status in (429, 503) else None)
            raise FetchError(error, f"{uri}: HTTP {status} {reason}",
                             retryable=status in _RETRYABLE_STATUS, retry_after=wait)
    except FetchError:
        raise
    except (socket.timeout, TimeoutError) as e:
        if time.monotonic() >= deadline:
            raise _deadline_error(uri, cfg) from e
        raise FetchError("timeout", f"{uri}: no answer within {cfg.timeout_s}s",
                         retryable=True) from e
    except (ConnectionError, OSError, http.client.HTTPException) as e:
        raise FetchError("connection", f"{uri}: {e}", retryable=True) from e
    except ValueError as e:  # http.client.InvalidURL: a control character in the URL
        raise FetchError("invalid_uri", f"{uri!r}: not a usable URL: {e}") from e


def _fetch_http(uri: str, cfg: FetchConfig, client: HttpClient) -> bytes:
    key = host_key(uri)
    with client.slot(key):
        deadline = time.monotonic() + cfg.deadline_s
        delay = cfg.backoff_s
        for attempt in range(cfg.retries + 1):
            try:
                return _fetch_http_once(uri, cfg, deadline, client)
            except FetchError as e:
                wait = delay
                if e.retry_after is not None:
                    client.defer(key, min(e.retry_after, cfg.deadline_s))
                    wait = max(wait, e.retry_after)
                out_of_time = time.monotonic() + wait >= deadline
                if not e.retryable or attempt == cfg.retries or out_of_time:
                    note = []
                    if attempt:
                        note.append(f"after {attempt + 1} attempts")
                    if e.retry_after is not None and out_of_time:
                        note.append(f"Retry-After {e.retry_after:g}s is past the deadline")
                    if note:
                        e.args = (f"{e.args[0]} ({'; '.join(note)})",)
                    raise
            time.sleep(wait)
            if not client.wait_turn(key, deadline):  # another row's Retry-After
                raise _deadline_error(uri, cfg)
            delay *= 2
    raise AssertionError("unreachable")


def _kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def read_local_file(path: str, max_bytes: int, deadline: float | None = None,
                    what: str | None = None) -> bytes:
    """A local regular file's bytes, at most `max_bytes`; FetchError otherwise.

    Opened with O_NONBLOCK (opening a FIFO for reading does not wait for a writer) and
    checked with fstat on the open descriptor (no race with a swapped path).
    """
    shown = what or path
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as e:
        raise FetchError("not_found", f"{shown}: no such file") from e
    except NotADirectoryError as e:
        raise FetchError("not_found", f"{shown}: no such file (a parent is not a folder)") from e
    except PermissionError as e:
        raise FetchError("permission_denied", f"{shown}: permission denied") from e
    except IsADirectoryError as e:
        raise FetchError("not_regular_file", f"{shown}: is a directory, not an image file") from e
    except OSError as e:
        reason = "not_found" if e.errno in (errno.ENOENT, errno.ENAMETOOLONG) else "io_error"
        raise FetchError(reason, f"{shown}: {e.strerror or e}") from e
    except ValueError as e:  # an embedded NUL byte
        raise FetchError("invalid_uri", f"{shown!r}: not a usable path: {e}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FetchError("not_regular_file",
                             f"{shown}: is {_kind_of(st.st_mode)}, not a regular file")
        if st.st_size > max_bytes:
            raise FetchError("too_large", f"{shown}: {st.st_size} bytes is more than the limit "
                                          f"of {max_bytes} bytes")
        os.set_blocking(fd, True)
        chunks, size = [], 0
        while True:
            if deadline is not None and time.monotonic() > deadline:
                raise FetchError("timeout", f"{shown}: not read within the fetch deadline")
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise FetchError("too_large", f"{shown}: more than the limit of {max_bytes} bytes")
        return b"".join(chunks)
    except FetchError:
        raise
    except OSError as e:
        raise FetchError("io_error", f"{shown}: {e.strerror or e}") from e
    finally:
        os.close(fd)


def fetch_bytes(uri: str, cfg: FetchConfig, client: HttpClient | None = None) -> bytes:
    """The bytes at `uri` (at most cfg.max_bytes, within cfg.deadline_s); raises FetchError.
    http(s) and object stores go through `client` (default: this process's `client_for`)."""
    client = client or client_for(cfg)
    if uri.startswith(("http://", "https://")):
        return _fetch_http(uri, cfg, client)
    try:
        path = fs.check_supported(uri)
    except fs.UnsupportedUriError as e:
        reason = "filesystem_unavailable" if e.extra else "unsupported_scheme"
        raise FetchError(reason, str(e)) from e
    if fs.is_local(path):
        return read_local_file(path, cfg.max_bytes, time.monotonic() + cfg.deadline_s, what=uri)
    bucket = path.split("://", 1)[0] + "://" + path.split("://", 1)[1].split("/", 1)[0]
    with client.slot(bucket):  # per-bucket cap, as per host for http(s)
        # One GET per image: `exists` (one more request) is asked only when the read
        # failed, to tell a missing object (not_found) from a failing store (io_error).
        try:
            return fs.read_bytes(path, max_bytes=cfg.max_bytes)
        except fs.TooLargeError as e:
            raise FetchError("too_large",
                             f"{uri}: more than the limit of {cfg.max_bytes} bytes") from e
        except Exception as e:
            if not _exists(path):
                raise FetchError("not_found", f"{uri}: no such object") from e
            raise FetchError("io_error", f"{uri}: {type(e).__name__}: {e}") from e


def _exists(path: str) -> bool:
    """Whether the object is there; True when the store cannot say (then io_error)."""
    try:
        return bool(fs.exists(path))
    except Exception:
        return True
