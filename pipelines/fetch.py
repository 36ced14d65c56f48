"""Fetch image bytes from any Beam FileSystems URI (local, gs://, s3://) or http(s).

http(s): per-request timeout, retries with exponential backoff on timeouts,
connection errors, 429 and 5xx; a byte cap checked against Content-Length and
while reading. Errors are FetchError with a short `reason`:
not_found, too_large, timeout, http_<status>, connection, io_error.
"""
from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

from pipelines import filesystem as fs
from pipelines.config import FetchConfig

USER_AGENT = "catalog-visual-search/0.1 (+embed pipeline)"
_RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}


class FetchError(IOError):
    def __init__(self, reason: str, message: str, retryable: bool = False):
        super().__init__(message)
        self.reason = reason
        self.retryable = retryable


def _fetch_http_once(uri: str, cfg: FetchConfig) -> bytes:
    request = urllib.request.Request(uri, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=cfg.timeout_s) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > cfg.max_bytes:
                raise FetchError("too_large", f"{uri}: Content-Length {length} is more than "
                                              f"the limit of {cfg.max_bytes} bytes")
            data = response.read(cfg.max_bytes + 1)
    except FetchError:
        raise
    except urllib.error.HTTPError as e:
        reason = "not_found" if e.code in (404, 410) else f"http_{e.code}"
        raise FetchError(reason, f"{uri}: HTTP {e.code} {e.reason}",
                         retryable=e.code in _RETRYABLE_STATUS) from e
    except (socket.timeout, TimeoutError) as e:
        raise FetchError("timeout", f"{uri}: no answer within {cfg.timeout_s}s",
                         retryable=True) from e
    except urllib.error.URLError as e:
        if isinstance(e.reason, (socket.timeout, TimeoutError)):
            raise FetchError("timeout", f"{uri}: no answer within {cfg.timeout_s}s",
                             retryable=True) from e
        raise FetchError("connection", f"{uri}: {e.reason}", retryable=True) from e
    except (ConnectionError, OSError) as e:
        raise FetchError("connection", f"{uri}: {e}", retryable=True) from e
    if len(data) > cfg.max_bytes:
        raise FetchError("too_large", f"{uri}: more than the limit of {cfg.max_bytes} bytes")
    return data


def fetch_bytes(uri: str, cfg: FetchConfig) -> bytes:
    """The bytes at `uri`; raises FetchError."""
    if uri.startswith(("http://", "https://")):
        delay = cfg.backoff_s
        for attempt in range(cfg.retries + 1):
            try:
                return _fetch_http_once(uri, cfg)
            except FetchError as e:
                if not e.retryable or attempt == cfg.retries:
                    if attempt:
                        e.args = (f"{e.args[0]} (after {attempt + 1} attempts)",)
                    raise
            time.sleep(delay)
            delay *= 2
    try:
        if not fs.exists(uri):
            raise FetchError("not_found", f"{uri}: no such file")
        return fs.read_bytes(uri, max_bytes=cfg.max_bytes)
    except FetchError:
        raise
    except ValueError as e:
        raise FetchError("too_large", f"{uri}: more than the limit of {cfg.max_bytes} bytes") from e
    except IsADirectoryError as e:
        raise FetchError("io_error", f"{uri}: is a directory") from e
    except Exception as e:
        raise FetchError("io_error", f"{uri}: {type(e).__name__}: {e}") from e
