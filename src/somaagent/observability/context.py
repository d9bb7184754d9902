"""The current request id, visible to logs and error bodies anywhere below the middleware."""

from __future__ import annotations

from contextvars import ContextVar

_request_id: ContextVar[str | None] = ContextVar("request_id", default=None)


def current_request_id() -> str | None:
    """The id of the request being served, if any."""
    return _request_id.get()


def set_request_id(value: str | None) -> object:
    """Bind a request id; returns a token for `reset_request_id`."""
    return _request_id.set(value)


def reset_request_id(token: object) -> None:
    """Unbind what `set_request_id` bound."""
    _request_id.reset(token)  # type: ignore[arg-type]


# Headers a layer below the route adds to the response (the caller's rate-limit state): the edge
# middleware binds one dict per request and sends what is in it when the response starts.
_response_headers: ContextVar[dict[str, str] | None] = ContextVar("response_headers", default=None)


def bind_response_headers() -> tuple[dict[str, str], object]:
    """A fresh dict for this request's extra headers, and the token to unbind it."""
    headers: dict[str, str] = {}
    return headers, _response_headers.set(headers)


def unbind_response_headers(token: object) -> None:
    """Unbind what `bind_response_headers` bound."""
    _response_headers.reset(token)  # type: ignore[arg-type]


def add_response_headers(headers: dict[str, str]) -> None:
    """Add headers to the current request's response (nothing outside a request)."""
    current = _response_headers.get()
    if current is not None:
        current.update(headers)
