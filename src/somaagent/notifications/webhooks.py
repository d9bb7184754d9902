"""A tenant's webhook endpoints: registering them (the secret sealed at rest, shown once), and the
signature every delivery carries.

Signature: `x-soma-signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, f"{t}.{body}")>`; a receiver
recomputes it over the raw body and refuses old `t` values (replays).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.core.clock import utcnow
from somaagent.core.errors import InvalidRequest, NotFound
from somaagent.core.ids import new_id
from somaagent.events.notices import SEVERITIES
from somaagent.notifications.tables import Webhook

MAX_WEBHOOKS = 20  # per tenant: each notification fans out to every one of them
MIN_SECRET, MAX_SECRET = 16, 256


class Sealer(Protocol):
    """Seals secrets at rest (the app factory passes identity's SecretBox)."""

    def seal(self, plaintext: bytes) -> str:
        """The sealed form, safe to store."""
        ...

    def open(self, sealed: str) -> bytes:
        """The plaintext back; ValueError if it was not sealed by this sealer."""
        ...


@dataclass(frozen=True, slots=True)
class RegisteredWebhook:
    """A new webhook and its secret, which is never shown again."""

    webhook: Webhook
    secret: str


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The `x-soma-signature` header value for `body` sent at `timestamp`."""
    digest = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def _checked_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a malformed port
    except ValueError as exc:
        raise InvalidRequest(f"`url` {url[:200]!r} is not a valid URL", param="url") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(
            f"`url` must be an http:// or https:// URL with a host, not {url[:200]!r}", param="url"
        )
    if parts.username or parts.password:
        raise InvalidRequest("`url` must not carry credentials; the signature authenticates us", param="url")
    del port
    return url


async def register_webhook(
    session: AsyncSession,
    sealer: Sealer,
    tenant_id: str,
    url: str,
    min_severity: str,
    secret: str | None,
    created_by: str | None,
) -> RegisteredWebhook:
    """Add an endpoint for the tenant; the secret is generated unless given (the caller commits)."""
    _checked_url(url)
    if min_severity not in SEVERITIES:
        raise InvalidRequest(
            f"`min_severity` must be one of {', '.join(SEVERITIES)}, not {min_severity!r}",
            param="min_severity",
        )
    if secret is not None and not MIN_SECRET <= len(secret) <= MAX_SECRET:
        raise InvalidRequest(
            f"`secret` must be {MIN_SECRET} to {MAX_SECRET} characters (or leave it out to get one)",
            param="secret",
        )
    count = await session.scalar(
        select(func.count()).select_from(Webhook).where(Webhook.tenant_id == tenant_id)
    )
    if (count or 0) >= MAX_WEBHOOKS:
        raise InvalidRequest(
            f"a tenant may register at most {MAX_WEBHOOKS} webhooks; delete one first", param="url"
        )
    plain = secret if secret is not None else "whsec_" + secrets.token_urlsafe(32)
    webhook = Webhook(
        id=new_id("whk"),
        tenant_id=tenant_id,
        url=url,
        min_severity=min_severity,
        sealed_secret=sealer.seal(plain.encode()),
        created_by=created_by,
        created_at=utcnow(),
    )
    session.add(webhook)
    await session.flush()
    return RegisteredWebhook(webhook, plain)


async def list_webhooks(session: AsyncSession, tenant_id: str) -> list[Webhook]:
    """The tenant's webhooks, oldest first."""
    rows = await session.scalars(
        select(Webhook).where(Webhook.tenant_id == tenant_id).order_by(Webhook.created_at, Webhook.id)
    )
    return list(rows.all())


async def get_webhook(session: AsyncSession, tenant_id: str, webhook_id: str) -> Webhook:
    """One of the tenant's webhooks; 404 otherwise (other tenants' webhooks do not exist here)."""
    found = await session.scalar(
        select(Webhook).where(Webhook.tenant_id == tenant_id, Webhook.id == webhook_id)
    )
    if found is None:
        raise NotFound(f"no webhook {webhook_id!r}; list them with GET /v1/notifications/webhooks")
    return found


async def delete_webhook(session: AsyncSession, tenant_id: str, webhook_id: str) -> Webhook:
    """Remove a webhook; its undelivered deliveries are cancelled by the worker (the caller commits)."""
    found = await get_webhook(session, tenant_id, webhook_id)
    await session.delete(found)
    return found
