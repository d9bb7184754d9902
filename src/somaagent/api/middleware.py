"""The HTTP edge, as one pure-ASGI middleware (cheaper than a stack of BaseHTTPMiddleware):
request id, body-size cap, metrics and the access log."""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from somaagent.api.errors import error_body, internal_error_body
from somaagent.core.errors import PayloadTooLarge
from somaagent.core.ids import new_request_id
from somaagent.observability.context import (
    bind_response_headers,
    reset_request_id,
    set_request_id,
    unbind_response_headers,
)
from somaagent.observability.metrics import Metrics

access_log = logging.getLogger("somaagent.access")
log = logging.getLogger("somaagent.api")
_SAFE_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,64}$")


class EdgeMiddleware:
    """Every HTTP request gets an `x-request-id`, a body no larger than `max_body_bytes`,
    a metrics sample labelled by route template, and (optionally) an access-log line."""

    def __init__(self, app: ASGIApp, metrics: Metrics, max_body_bytes: int, access_log_enabled: bool) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body_bytes
        self.access_log = access_log_enabled
        self._metric_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id, declared = _read_headers(scope)
        token = set_request_id(request_id)
        extra_headers, headers_token = bind_response_headers()
        header_id = request_id.encode()
        status = 500
        try:
            if declared is not None and declared > self.max_body:
                status = 413
                await _send_json(send, header_id, 413, _too_large_body(self.max_body), close=True)
                return

            async def send_with_id(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    message.setdefault("headers", [])
                    added = [(k.encode(), v.encode()) for k, v in extra_headers.items()]
                    message["headers"] = [*message["headers"], (b"x-request-id", header_id), *added]
                await send(message)

            started_response = False

            async def tracking_send(message: Message) -> None:
                nonlocal started_response
                started_response = started_response or message["type"] == "http.response.start"
                await send_with_id(message)

            try:
                await self.app(scope, self._capped(receive), tracking_send)
            except Exception:
                # Answered here rather than by Starlette's outermost handler, so the 500 carries the
                # request id (in its body and header) that the log line below is filed under.
                log.exception("unhandled error")
                if started_response:
                    raise
                status = 500
                await _send_json(send, header_id, 500, internal_error_body(request_id))
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            counter, histogram = self._children(template, method, status)
            counter.inc()
            histogram.observe(elapsed)
            if self.access_log:
                access_log.info(
                    "%s %s %d",
                    method,
                    scope["path"],
                    status,
                    extra={"route": template, "status": status, "ms": round(elapsed * 1000, 2)},
                )
            unbind_response_headers(headers_token)
            reset_request_id(token)

    def _children(self, route: str, method: str, status: int) -> tuple[Any, Any]:
        # `labels()` hashes and locks on every call; the label sets here are few and fixed.
        key = (route, method, status)
        found = self._metric_children.get(key)
        if found is None:
            found = (
                self.metrics.http_requests.labels(route, method, str(status)),
                self.metrics.http_latency.labels(route, method),
            )
            self._metric_children[key] = found
        return found

    def _capped(self, receive: Receive) -> Receive:
        limit = self.max_body
        seen = 0

        async def capped_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLarge(
                        f"request body is larger than the {limit} byte limit (SOMA_MAX_BODY_BYTES)"
                    )
            return message

        return capped_receive


def _read_headers(scope: Scope) -> tuple[str, int | None]:
    """(request id, declared content length) in one pass over the headers."""
    request_id: str | None = None
    length: int | None = None
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            if _SAFE_ID.match(value):
                request_id = value.decode()
        elif name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                length = None
    return request_id or new_request_id(), length


def _too_large_body(limit: int) -> dict[str, Any]:
    return error_body(
        f"request body is larger than the {limit} byte limit (SOMA_MAX_BODY_BYTES)",
        "invalid_request_error",
        "request_too_large",
    )


async def _send_json(
    send: Send, request_id: bytes, status: int, body: dict[str, Any], close: bool = False
) -> None:
    payload = orjson.dumps(body)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"x-request-id", request_id),
    ]
    if close:  # the rest of an oversized body is not read: the connection cannot be reused
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
