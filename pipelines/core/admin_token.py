"""The admin bearer token that guards the serving API's mutating endpoints (POST /v1/reload).

The token never lives in a config file of the repository: it comes from the environment
(`CATALOG_SEARCH_ADMIN_TOKEN`, or `CATALOG_SEARCH_ADMIN_TOKEN_FILE` naming a file that
holds it) or from `catalog-search serve --admin-token-file PATH`. Reading it is shared by
the server (serving/api/state.py checks requests against it) and its clients (the Airflow
hand-off in pipelines/orchestration sends it), so it lives here, below both.
Standard library only.
"""
from __future__ import annotations

import os
import stat
from typing import Mapping
from pipelines.core.errors import BadInputError

TOKEN_ENV = "CATALOG_SEARCH_ADMIN_TOKEN"
TOKEN_FILE_ENV = "CATALOG_SEARCH_ADMIN_TOKEN_FILE"
MIN_TOKEN_LENGTH = 16
_MAX_TOKEN_LENGTH = 4096


class AdminTokenError(BadInputError):
    """The configured admin token is unusable (empty, too short, unreadable file)."""


def _checked(token: str, source: str) -> str:
    token = token.strip()
    if len(token) < MIN_TOKEN_LENGTH:
        raise AdminTokenError(f"admin token from {source} is {len(token)} characters; use at "
                              f"least {MIN_TOKEN_LENGTH} (e.g. `openssl rand -hex 32`)")
    if len(token) > _MAX_TOKEN_LENGTH or any(c.isspace() or not c.isprintable() for c in token):
        raise AdminTokenError(f"admin token from {source} must be one line of at most "
                              f"{_MAX_TOKEN_LENGTH} printable characters without spaces")
    return token


def read_token_file(path: str) -> str:
    """The token held in `path` (surrounding whitespace stripped); AdminTokenError if bad."""
    try:  # non-blocking open + fstat: a FIFO or device is refused, never waited on
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise AdminTokenError(f"cannot read the admin token file {path}: {e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise AdminTokenError(f"the admin token file {path} is not a regular file")
        os.set_blocking(fd, True)
        text = os.read(fd, _MAX_TOKEN_LENGTH + 2).decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise AdminTokenError(f"cannot read the admin token file {path}: {e}") from None
    finally:
        os.close(fd)
    return _checked(text, f"file {path}")


def admin_token_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The admin token from CATALOG_SEARCH_ADMIN_TOKEN(_FILE), or None when neither is set.

    Raises AdminTokenError when a variable is set but unusable (both set, empty, short).
    """
    env = os.environ if environ is None else environ
    value, path = env.get(TOKEN_ENV), env.get(TOKEN_FILE_ENV)
    if value is not None and path is not None:
        raise AdminTokenError(f"set only one of {TOKEN_ENV} and {TOKEN_FILE_ENV}")
    if path is not None:
        return read_token_file(path)
    if value is not None:
        return _checked(value, f"${TOKEN_ENV}")
    return None


def bearer_header(token: str | None) -> dict[str, str]:
    """{"Authorization": "Bearer <token>"} or {} (for clients such as the Airflow hand-off)."""
    return {"Authorization": f"Bearer {token}"} if token else {}
