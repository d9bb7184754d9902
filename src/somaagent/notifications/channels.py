"""The channels a delivery goes out on: the live fan-out (WebSocket), email over SMTP, signed webhooks.

Each sender takes one claimed delivery and either returns (sent) or raises `DeliveryFailed` with a
reason kept on the delivery (retried with backoff, then dead-lettered).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any, Protocol

import aiosmtplib
import orjson

from somaagent.notifications.fanout import Fanout, FanoutUnavailable
from somaagent.notifications.live import fanout_message
from somaagent.notifications.tables import Delivery, Webhook
from somaagent.notifications.webhooks import Sealer, sign


class DeliveryFailed(Exception):
    """This attempt failed; the message (never a secret) is kept as the delivery's last error."""


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A claimed delivery with what it needs: the notification's JSON and, for webhooks, the endpoint."""

    delivery: Delivery
    notification: dict[str, Any]
    event_id: str
    webhook: Webhook | None = None


class WebhookPoster(Protocol):
    """POSTs a body to a webhook URL: (status, the start of the answer's body), or `DeliveryFailed`
    (refused address, timeout, connection error). The app factory gives one that refuses internal
    addresses; notifications decides nothing about where a tenant's URL may point."""

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]: ...


class Sender(Protocol):
    """Sends one delivery on one channel."""

    async def send(self, outgoing: Outgoing) -> None:
        """Deliver, or raise `DeliveryFailed`."""
        ...


class SocketSender:
    """Publishes to every replica's hub (which pushes to the matching sockets)."""

    def __init__(self, fanout: Fanout) -> None:
        self._fanout = fanout

    async def send(self, outgoing: Outgoing) -> None:
        """Publish the push for this delivery's target."""
        delivery = outgoing.delivery
        target = f"user:{delivery.user_id}" if delivery.user_id else "tenant"
        message = fanout_message(
            delivery.tenant_id, target, str(outgoing.notification["audience"]), outgoing.notification
        )
        try:
            await self._fanout.publish(message)
        except FanoutUnavailable as exc:
            raise DeliveryFailed(str(exc)) from exc


@dataclass(frozen=True, slots=True)
class SmtpSettings:
    """Where email goes (from `SOMA_SMTP_*`)."""

    host: str
    port: int
    sender: str
    username: str | None = None
    password: str | None = None
    starttls: bool = False
    timeout_s: float = 10.0


def email_message(sender: str, to: str, notification: dict[str, Any]) -> EmailMessage:
    """The email for a notification: severity and kind in the subject, the message and metadata below."""
    message = EmailMessage()
    first_line = str(notification["message"]).splitlines()[0] if notification["message"] else ""
    message["Subject"] = f"[{notification['severity']}] {first_line[:120]}"
    message["From"] = sender
    message["To"] = to
    message["X-Soma-Notification-Id"] = str(notification["id"])
    details = orjson.dumps(notification["metadata"], option=orjson.OPT_INDENT_2).decode()
    message.set_content(
        f"{notification['message']}\n\n"
        f"kind: {notification['kind']}\nseverity: {notification['severity']}\n"
        f"at: {notification['created_at']}\nid: {notification['id']}\n\nmetadata:\n{details}\n"
    )
    return message


class EmailSender:
    """SMTP with aiosmtplib (async: never blocks the event loop)."""

    def __init__(self, settings: SmtpSettings) -> None:
        self._settings = settings

    async def send(self, outgoing: Outgoing) -> None:
        """Send the email to the delivery's address."""
        smtp = self._settings
        address = outgoing.delivery.address
        if not address:
            raise DeliveryFailed("the delivery has no email address")
        try:
            await aiosmtplib.send(
                email_message(smtp.sender, address, outgoing.notification),
                hostname=smtp.host,
                port=smtp.port,
                username=smtp.username,
                password=smtp.password,
                start_tls=smtp.starttls,
                timeout=smtp.timeout_s,
            )
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise DeliveryFailed(f"SMTP {smtp.host}:{smtp.port}: {exc!r}"[:1000]) from exc


class WebhookSender:
    """POSTs the notification as JSON, signed with the endpoint's secret; only a 2xx counts as sent."""

    def __init__(self, sealer: Sealer, poster: WebhookPoster) -> None:
        self._sealer = sealer
        self._poster = poster

    async def send(self, outgoing: Outgoing) -> None:
        """POST once; a non-2xx answer, a timeout or a refused connection fails the attempt."""
        webhook = outgoing.webhook
        if webhook is None:
            raise DeliveryFailed("the webhook was deleted")
        body = orjson.dumps(outgoing.notification)
        try:
            secret = self._sealer.open(webhook.sealed_secret)
        except ValueError as exc:
            raise DeliveryFailed("the webhook secret does not open with this server's secret") from exc
        headers = {
            "content-type": "application/json",
            "user-agent": "SomaAgent-Webhooks/1",
            "x-soma-signature": sign(secret, int(time.time()), body),
            "x-soma-event-id": outgoing.event_id,
            "x-soma-delivery-id": outgoing.delivery.id,
        }
        status, answer = await self._poster.post(webhook.url, body, headers)
        if not 200 <= status < 300:
            raise DeliveryFailed(f"POST {webhook.url} answered {status}: {answer}")
