"""The HTTP server's own limits on what a client may make it hold.

uvicorn's default HTTP implementation (httptools, when installed) buffers request
headers without a size limit, and no server-side timer bounds how long a client may take
to send them. `serve` therefore runs uvicorn with the h11 implementation and:

- `serving.max_header_bytes`: the request line + headers of one request (h11's
  `max_incomplete_event_size`); a larger block is answered 400 and the connection closed;
- `serving.header_timeout_s`: a connection that has not sent a complete request head
  within this many seconds (of connecting, or of its previous answer on a keep-alive
  connection) is closed.

Request *bodies* are bounded by size in the routes (serving.max_upload_bytes /
max_json_bytes); slow bodies and connection counts are the reverse proxy's job
(docs/RELIABILITY.md, "Running behind a proxy").
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from pipelines.core.config import Config

log = logging.getLogger(__name__)


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for each request head."""

    header_timeout_s: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info("closing a connection from %s: no complete request head within %gs "
                     "(serving.header_timeout_s)", _peer(self.client), self.header_timeout_s)
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the request head is in
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()  # the next request on this keep-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)


def _peer(client: Any) -> str:
    return "%s:%d" % client if client else "?"


def protocol_class(header_timeout_s: float) -> type[HeaderTimeoutH11Protocol]:
    return type("HeaderTimeoutH11Protocol", (HeaderTimeoutH11Protocol,),
                {"header_timeout_s": float(header_timeout_s)})


def uvicorn_config(app: Any, config: Config, **kwargs: Any) -> Any:
    """A uvicorn.Config for `app` with the header limits of `config.serving` (h11)."""
    import uvicorn
    sc = config.serving
    return uvicorn.Config(app, http=protocol_class(sc.header_timeout_s),
                          h11_max_incomplete_event_size=sc.max_header_bytes, **kwargs)
