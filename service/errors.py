"""The error contract of the HTTP API: every 4xx/5xx body is JSON ``{"message": str, "detail": ...}``.

``message`` is one line a person can act on (for a 422, each bad field named, e.g.
``body.k: Input should be less than or equal to 1000``); ``detail`` is machine-readable. Error bodies
are rendered ASCII-only and never echo the client's input back: a lone UTF-16 surrogate or a NaN in a
request must not turn its 422 into a 500 while the error itself is being serialised.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

# An absolute filesystem path inside a message (up to a space, a colon or a quote).
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s:'\"/]+/)*([^\s:'\"/]+)")


def without_paths(message: str) -> str:
    """``message`` with each absolute path cut to its last component (a version directory, a file):
    callers learn what is wrong, not how the server's disk is laid out; the logs keep the full paths."""
    return _ABSOLUTE_PATH.sub(r"\1", message)


class ErrorBody(BaseModel):
    message: str
    detail: Any = None


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` of a route: the error statuses it may answer, all with an ``ErrorBody``."""
    return {status: {"model": ErrorBody} for status in statuses}


def render_error(content: Any) -> bytes:
    return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


class ErrorResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return render_error(content)


def error_body(message: str) -> bytes:
    """The body of an error answered outside the app's handlers (by ASGI middleware)."""
    return render_error({"message": message, "detail": message})


def validation_message(errors: list[dict[str, Any]]) -> str:
    """One line naming each bad field."""
    parts = []
    for item in errors:
        field = ".".join(str(part) for part in item.get("loc", ()))
        parts.append(f"{field}: {item.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def validation_detail(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Without "input" and "ctx": they hold the client's values, which may not even be serialisable.
    return [
        {
            "loc": [str(part) for part in item.get("loc", ())],
            "msg": str(item.get("msg")),
            "type": item.get("type"),
        }
        for item in errors
    ]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> ErrorResponse:
        errors = list(error.errors())
        body = {"message": validation_message(errors), "detail": validation_detail(errors)}
        return ErrorResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> ErrorResponse:
        # Every error body carries "message", whatever raised it.
        return ErrorResponse(
            {"message": str(error.detail), "detail": error.detail},
            status_code=error.status_code,
            headers=getattr(error, "headers", None),
        )
