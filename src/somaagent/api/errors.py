"""The one place errors become HTTP: `SomaError` subclasses → status, OpenAI-style JSON, headers.

Every body is `{"error": {"message", "type", "param", "code"}}`. Unknown exceptions become a
generic 500 whose body carries only the request id; the traceback goes to the log, never out.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from somaagent.core.errors import (
    BudgetExceeded,
    Conflict,
    Forbidden,
    InvalidRequest,
    Locked,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    SomaError,
    Unauthenticated,
    UpstreamError,
)
from somaagent.observability.context import current_request_id

log = logging.getLogger("somaagent.api")

# Walked by MRO: the most specific class listed wins. (status, OpenAI error type)
ERROR_TABLE: dict[type[SomaError], tuple[int, str]] = {
    PayloadTooLarge: (413, "invalid_request_error"),
    InvalidRequest: (400, "invalid_request_error"),
    Unauthenticated: (401, "authentication_error"),
    Forbidden: (403, "permission_error"),
    NotFound: (404, "invalid_request_error"),
    Locked: (423, "invalid_request_error"),
    Conflict: (409, "invalid_request_error"),
    RateLimited: (429, "rate_limit_error"),
    # 402, not 429: clients (the OpenAI SDKs among them) retry a 429 by themselves, and a spent monthly
    # budget does not come back in a few seconds.
    BudgetExceeded: (402, "insufficient_quota"),
    Overloaded: (503, "server_error"),
    UpstreamError: (502, "server_error"),
    SomaError: (500, "server_error"),
}

_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    423: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def internal_error_body(request_id: str | None) -> dict[str, Any]:
    """The body of a 500: no detail beyond the request id to quote when reporting it."""
    return error_body(
        f"The server had an error while processing your request (request id {request_id}).",
        "server_error",
        "internal_error",
    )


def status_for(exc: SomaError) -> tuple[int, str]:
    """(HTTP status, OpenAI error type) for a domain error."""
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return 500, "server_error"


def error_headers(exc: SomaError) -> dict[str, str]:
    """Extra headers an error carries (Retry-After for 402/429/503, `x-ratelimit-*` for 429)."""
    headers: dict[str, str] = dict(getattr(exc, "headers", {}))
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers["retry-after"] = str(max(1, math.ceil(retry_after)))
    return headers


def soma_error_response(exc: SomaError) -> Response:
    """The HTTP response for a domain error."""
    status, type_ = status_for(exc)
    headers = error_headers(exc)
    if isinstance(exc, Unauthenticated):
        headers["www-authenticate"] = "Bearer"
    body = error_body(exc.message, type_, exc.code, exc.param)
    body["error"].update(exc.extra)
    return _json(status, body, headers)


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, headers=headers, media_type="application/json")


# Parameters whose values are never echoed back in an error (they may be a real secret, mistyped).
_SECRET_PARAMS = ("password", "secret", "token", "otp", "code", "key")
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})
# FastAPI's first location item says where the value came from; OpenAI's `param` is the name alone.
_SOURCES = frozenset({"body", "query", "path", "header", "cookie"})


def _param(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for position, item in enumerate(loc):
        if position == 0 and item in _SOURCES:
            continue
        # Pydantic names union members in the location ("content.str"): not part of the param.
        if isinstance(item, str) and (item in _TYPE_TAGS or "[" in item):
            continue
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def translate_validation(errors: list[dict[str, Any]]) -> SomaError:
    """Pydantic's error list → one clear `InvalidRequest` about the first problem."""
    if not errors:
        return InvalidRequest("invalid request body")
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    kind = first.get("type", "")
    param = _param(loc) or None
    if kind == "json_invalid":
        return InvalidRequest(
            "We could not parse the JSON body of your request. The body must be valid JSON "
            f"({first.get('ctx', {}).get('error', 'syntax error')}).",
            code="invalid_json",
        )
    if loc == ("body",) and kind in ("model_attributes_type", "dict_type", "model_type"):
        return InvalidRequest(
            "the request body must be a JSON object, sent with `Content-Type: application/json`",
            code="invalid_json",
        )
    if kind == "missing" and loc == ("body",):
        return InvalidRequest("the request body is missing; send a JSON object", code="invalid_json")
    if kind == "extra_forbidden":
        return InvalidRequest(
            f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter"
        )
    if kind == "missing":
        return InvalidRequest(
            f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    if kind in ("value_error", "assertion_error") and "ctx" in first:
        cause = first["ctx"].get("error")
        message = str(cause or first.get("msg", "invalid value"))
        code = getattr(cause, "code", None) or "invalid_value"
        return InvalidRequest(message, param=getattr(cause, "param", None) or param, code=code)
    got = first.get("input")
    secret = any(word in (param or "") for word in _SECRET_PARAMS)
    shown = "" if isinstance(got, dict | list) or got is None or secret else f" (got {str(got)[:60]!r})"
    return InvalidRequest(
        f"Invalid value for '{param}': {first.get('msg', 'invalid')}{shown}.",
        param=param,
        code="invalid_value" if not kind.endswith("_type") else "invalid_type",
    )


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers: domain errors, validation errors, HTTP errors, everything else."""

    async def on_soma_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, SomaError)
        return soma_error_response(exc)

    async def on_validation_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return soma_error_response(translate_validation(list(exc.errors())))

    async def on_http_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if isinstance(exc.__cause__, SomaError):
            # FastAPI turns any error raised while it reads the body (the size cap on a chunked
            # upload raises PayloadTooLarge) into a generic 400; answer with the real error.
            return soma_error_response(exc.__cause__)
        type_ = _STATUS_TYPES.get(
            exc.status_code, "server_error" if exc.status_code >= 500 else "invalid_request_error"
        )
        message = str(exc.detail)
        if exc.status_code == 404:
            message = "Unknown request URL. Please check the URL and method; the API is documented at /docs."
        elif exc.status_code == 405:
            message = "Method not allowed for this URL."
        return _json(exc.status_code, error_body(message, type_, None), dict(exc.headers or {}))

    async def on_unexpected(_request: Request, exc: Exception) -> Response:
        # Only reached if the edge middleware could not answer (it normally does, with the request id).
        log.error("unhandled error", exc_info=exc)
        return _json(500, internal_error_body(current_request_id()))

    app.add_exception_handler(SomaError, on_soma_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
