"""Bearer tokens of the write and read routes (``COLDWARM_WRITE_TOKEN``, ``COLDWARM_READ_TOKEN``).

Unset, the routes are open, as before. Set, ``/events`` and the profile write need the write token,
and ``GET /users/{id}`` needs the read token, or the write token when no read token is set (a user's
history is personal data). Tokens are compared in constant time and never logged (``SecretStr``).
``/recommend`` stays open: a feed backend calls it on every page view from inside the network.
"""

from __future__ import annotations

import secrets
from typing import Annotated, TypeGuard

from fastapi import Depends, Header, HTTPException
from pydantic import SecretStr

from service.state import State


def configured(secret: SecretStr | None) -> TypeGuard[SecretStr]:
    return secret is not None and bool(secret.get_secret_value())


def bearer_matches(authorization: str | None, secret: SecretStr) -> bool:
    scheme, _, given = (authorization or "").partition(" ")
    expected = secret.get_secret_value().encode()
    return scheme.lower() == "bearer" and secrets.compare_digest(given.encode(), expected)


def refuse() -> HTTPException:
    return HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


async def require_write(state: State, authorization: Annotated[str | None, Header()] = None) -> None:
    secret = state.settings.write_token
    if configured(secret) and not bearer_matches(authorization, secret):
        raise refuse()


async def require_read(state: State, authorization: Annotated[str | None, Header()] = None) -> None:
    # The read token, or the write token (whoever may write a user's events may read them back).
    settings = state.settings
    tokens = [t for t in (settings.read_token, settings.write_token) if configured(t)]
    if tokens and not any(bearer_matches(authorization, token) for token in tokens):
        raise refuse()


WriteAccess = Annotated[None, Depends(require_write)]
ReadAccess = Annotated[None, Depends(require_read)]
