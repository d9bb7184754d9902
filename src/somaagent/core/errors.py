"""The `SomaError` hierarchy: typed, serializable domain errors.

Domain code raises these; `api/errors.py` maps them (in one table) to HTTP statuses and
OpenAI-style JSON bodies. Each message names the bad value and, where there is one, the fix.
"""

from __future__ import annotations

from typing import Any


class SomaError(Exception):
    """Base of every error SomaAgent raises on purpose."""

    code: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        # Fields beside message/type/param/code in the error body (an MFA login's challenge token, a
        # policy decision's reasons, the budget that is spent).
        self.extra: dict[str, Any] = {}
        if code is not None:
            self.code = code


class InvalidRequest(SomaError):
    """The caller sent something we cannot act on; the message says what and how to fix it."""

    code = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    """The prompt plus the requested completion do not fit the model's context window."""

    code = "context_length_exceeded"


class PayloadTooLarge(InvalidRequest):
    """The request body is larger than the configured cap."""

    code = "request_too_large"


class Unauthenticated(SomaError):
    """No credentials, or credentials that are not valid (unknown, revoked, malformed)."""

    code = "invalid_api_key"


class Forbidden(SomaError):
    """Authenticated, but not allowed to do this."""

    code = "forbidden"


class NotFound(SomaError):
    """The named thing does not exist for this caller (other tenants' things do not exist either)."""

    code = "not_found"


class Conflict(SomaError):
    """The request conflicts with existing state (a duplicate name, say)."""

    code = "conflict"


class Locked(Conflict):
    """The resource is locked by someone else (a tenant in training mode); the message names the holder."""

    code = "locked"


class PolicyDenied(Forbidden):
    """The tenant's constitution or policy denies this; `extra` carries the decision (score, reasons)."""

    code = "policy_denied"


class RateLimited(SomaError):
    """Too many requests; retry after `retry_after` seconds. `headers` are the `x-ratelimit-*` state."""

    code = "rate_limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float = 1.0,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.retry_after = retry_after
        self.headers = headers or {}


class BudgetExceeded(SomaError):
    """A spend limit would be passed; the message names the budget, `extra` carries it and when it resets
    (`retry_after` seconds from now, or None for a lifetime budget)."""

    code = "budget_exceeded"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Overloaded(SomaError):
    """The server is at capacity (the model's wait queue is full); retry after `retry_after` seconds."""

    code = "server_overloaded"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UpstreamError(SomaError):
    """A model provider failed or timed out (after every fallback was tried)."""

    code = "upstream_error"
