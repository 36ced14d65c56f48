"""Checking a request's bearer token against the admin token (serving side).

With no token set the mutating endpoints are open (development on loopback); with one set,
a request without `Authorization: Bearer <token>` gets 401 and one with a wrong token 403.
The token itself is read by pipelines/core/admin_token.py (re-exported here).
"""
from __future__ import annotations

import hmac

from pipelines.core.admin_token import (  # noqa: F401  (re-exported for serving)
    MIN_TOKEN_LENGTH,
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    AdminTokenError,
    admin_token_from_env,
    bearer_header,
    read_token_file,
)


def check_bearer(authorization: str | None, token: str) -> int | None:
    """None when `authorization` carries `Bearer <token>`; else 401 (missing) or 403 (wrong).

    The comparison is constant-time (hmac.compare_digest over the UTF-8 bytes).
    """
    if not authorization:
        return 401
    scheme, _, given = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return 401
    if hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"),
                           token.encode("utf-8")):
        return None
    return 403
