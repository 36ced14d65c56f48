"""Fetch image bytes from any Beam FileSystems URI (local, file://, gs://, s3://) or http(s).

Every fetch has a total deadline (`fetch.deadline_s`, covering all attempts, backoff
and reading the body), not only a per-read socket timeout, so a server that trickles
a byte every second cannot hold a worker. http(s): per-read timeout, retries with
exponential backoff on timeouts, connection errors, 429 and 5xx; a byte cap checked
against Content-Length and while reading. Local files: only regular files are read
(opened non-blocking, then checked with fstat, so a FIFO or a device never blocks).

Errors are FetchError with a short `reason` (what the dead letter records):
    not_found, too_large, timeout, http_<status>, connection, io_error, invalid_uri,
    unsupported_scheme, filesystem_unavailable (the pip extra is named), not_regular_file,
    permission_denied.
"""
from __future__ import annotations

import errno
import os
import socket
import stat
import time
import urllib.error
import urllib.request

from pipelines.core import filesystem as fs
from pipelines.core.config import FetchConfig

USER_AGENT = "catalog-visual-search/0.1 (+embed pipeline)"
_RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}
_CHUNK = 65536


class FetchError(IOError):
    """A fetch failed; `reason` is the short dead-letter code, the message says why."""

    def __init__(self, reason: str, message: str, retryable: bool = False):
        super().__init__(message)
        self.reason = reason
        self.retryable = retryable


def _deadline_error(uri: str, cfg: FetchConfig) -> FetchError:
    return FetchError("timeout", f"{uri}: not complete within the fetch deadline of "
                                 f"{cfg.deadline_s:g}s")


def _set_read_timeout(response, seconds: float) -> None:
    """Bound the next socket read of an http.client response (best effort)."""
    try:
        response.fp.raw._sock.settimeout(max(seconds, 0.001))
    except AttributeError:
        pass


def _fetch_http_once(uri: str, cfg: FetchConfig, deadline: float) -> bytes:
    request = urllib.request.Request(uri, headers={"User-Agent": USER_AGENT})
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _deadline_error(uri, cfg)
    try:
        with urllib.request.urlopen(request, timeout=min(cfg.timeout_s, remaining)) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > cfg.max_bytes:
                raise FetchError("too_large", f"{uri}: Content-Length {length} is more than "
                                              f"the limit of {cfg.max_bytes} bytes")
            chunks, size = [], 0
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _deadline_error(uri, cfg)
                _set_read_timeout(response, min(cfg.timeout_s, remaining))
                chunk = response.read1(_CHUNK)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > cfg.max_bytes:
                    raise FetchError("too_large",
                                     f"{uri}: more than the limit of {cfg.max_bytes} bytes")
            data = b"".join(chunks)
    except FetchError:
        raise
    except urllib.error.HTTPError as e:
        reason = "not_found" if e.code in (404, 410) else f"http_{e.code}"
        raise FetchError(reason, f"{uri}: HTTP {e.code} {e.reason}",
                         retryable=e.code in _RETRYABLE_STATUS) from e
    except (socket.timeout, TimeoutError) as e:
        if time.monotonic() >= deadline:
            raise _deadline_error(uri, cfg) from e
        raise FetchError("timeout", f"{uri}: no answer within {cfg.timeout_s}s",
                         retryable=True) from e
    except urllib.error.URLError as e:
        if isinstance(e.reason, (socket.timeout, TimeoutError)):
            raise FetchError("timeout", f"{uri}: no answer within {cfg.timeout_s}s",
                             retryable=True) from e
        raise FetchError("connection", f"{uri}: {e.reason}", retryable=True) from e
    except (ConnectionError, OSError) as e:
        raise FetchError("connection", f"{uri}: {e}", retryable=True) from e
    return data


def _fetch_http(uri: str, cfg: FetchConfig, deadline: float) -> bytes:
    delay = cfg.backoff_s
    for attempt in range(cfg.retries + 1):
        try:
            return _fetch_http_once(uri, cfg, deadline)
        except FetchError as e:
            out_of_time = time.monotonic() + delay >= deadline
            if not e.retryable or attempt == cfg.retries or out_of_time:
                if attempt:
                    e.args = (f"{e.args[0]} (after {attempt + 1} attempts)",)
                raise
        time.sleep(delay)
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


def fetch_bytes(uri: str, cfg: FetchConfig) -> bytes:
    """The bytes at `uri` (at most cfg.max_bytes, within cfg.deadline_s); raises FetchError."""
    deadline = time.monotonic() + cfg.deadline_s
    if uri.startswith(("http://", "https://")):
        return _fetch_http(uri, cfg, deadline)
    try:
        path = fs.check_supported(uri)
    except fs.UnsupportedUriError as e:
        reason = "filesystem_unavailable" if e.extra else "unsupported_scheme"
        raise FetchError(reason, str(e)) from e
    if fs.is_local(path):
        return read_local_file(path, cfg.max_bytes, deadline, what=uri)
    try:
        if not fs.exists(path):
            raise FetchError("not_found", f"{uri}: no such object")
        return fs.read_bytes(path, max_bytes=cfg.max_bytes)
    except FetchError:
        raise
    except fs.TooLargeError as e:
        raise FetchError("too_large", f"{uri}: more than the limit of {cfg.max_bytes} bytes") from e
    except Exception as e:
        raise FetchError("io_error", f"{uri}: {type(e).__name__}: {e}") from e
