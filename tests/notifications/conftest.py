"""Real receivers for the notification channels, and a `soma serve` wired to them.

- `smtp`: an aiosmtpd SMTP server in this process (127.0.0.1, free port) that keeps what it receives.
- `receivers`: HTTP webhook endpoints on 127.0.0.1 that verify the HMAC signature, one that fails a set
  number of times first, one that always fails.
- `notify_server`: `soma serve` (per backend) whose email goes to `smtp` and whose webhook retries are
  quick (0.2 s backoff, 3 attempts).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.support.postgres import create_database, drop_database
from tests.support.processes import SomaServer, free_port, start_soma

PASSWORD = "correct horse battery staple"
MAX_ATTEMPTS = 3
BACKOFF_S = 0.2


@dataclass
class Mailbox:
    """What the in-process SMTP server received."""

    messages: list[tuple[Envelope, Message]] = field(default_factory=list)

    async def handle_DATA(self, _server: SMTP, _session: Session, envelope: Envelope) -> str:
        content = envelope.content if isinstance(envelope.content, bytes) else str(envelope.content).encode()
        self.messages.append((envelope, message_from_bytes(content)))
        return "250 Message accepted for delivery"

    def wait_for(self, predicate: Callable[[Envelope, Message], bool], timeout: float = 10) -> Message:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for envelope, message in list(self.messages):
                if predicate(envelope, message):
                    return message
            time.sleep(0.05)
        raise AssertionError(f"no matching email within {timeout}s; got {len(self.messages)} others")


@dataclass
class SmtpServer:
    port: int
    mailbox: Mailbox


@pytest.fixture(scope="session")
def smtp() -> Iterator[SmtpServer]:
    mailbox = Mailbox()
    port = free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield SmtpServer(port, mailbox)
    finally:
        controller.stop()


@dataclass
class Received:
    """One webhook request and whether its signature verified."""

    path: str
    body: bytes
    headers: dict[str, str]
    signature_ok: bool

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receivers:
    """Webhook endpoints: `/ok/<name>` answers 204, `/flaky/<name>?fails=N` answers 503 N times then 204,
    `/down/<name>` always answers 500. Secrets are registered per path to verify signatures."""

    base_url: str
    secrets: dict[str, str] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    failures_left: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, kind: str, fails: int = 0) -> str:
        path = f"/{kind}/{secrets.token_hex(4)}"
        if kind == "flaky":
            self.failures_left[path] = fails
        return self.base_url + path

    def at(self, url: str) -> list[Received]:
        path = url.removeprefix(self.base_url)
        return [r for r in list(self.received) if r.path == path]

    def wait(self, url: str, count: int, timeout: float = 15) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.at(url)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"{url} got {len(self.at(url))} requests within {timeout}s, expected {count}")


def verify(secret: str, header: str, body: bytes) -> bool:
    """What a receiver does with `x-soma-signature: t=<unix>,v1=<hex>`."""
    fields = dict(part.split("=", 1) for part in header.split(","))
    expected = hmac.new(secret.encode(), f"{fields['t']}.".encode() + body, hashlib.sha256).hexdigest()
    fresh = abs(time.time() - int(fields["t"])) < 300
    return fresh and hmac.compare_digest(expected, fields["v1"])


@pytest.fixture(scope="session")
def receivers() -> Iterator[Receivers]:
    port = free_port()
    state = Receivers(base_url=f"http://127.0.0.1:{port}")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            path = self.path
            secret = state.secrets.get(path, "")
            signature = self.headers.get("x-soma-signature", "")
            ok = bool(secret and signature) and verify(secret, signature, body)
            with state.lock:
                state.received.append(
                    Received(path, body, {k.lower(): v for k, v in self.headers.items()}, ok)
                )
                status = 204
                if path.startswith("/down/"):
                    status = 500
                elif path.startswith("/flaky/") and state.failures_left.get(path, 0) > 0:
                    state.failures_left[path] -= 1
                    status = 503
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def notify_env(smtp_port: int) -> dict[str, str]:
    return {
        "SOMA_SMTP_HOST": "127.0.0.1",
        "SOMA_SMTP_PORT": str(smtp_port),
        "SOMA_SMTP_SENDER": "soma@example.test",
        "SOMA_WEBHOOK_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        "SOMA_WEBHOOK_BACKOFF_S": str(BACKOFF_S),
        "SOMA_NOTIFICATIONS_FANOUT": "local",
        "SOMA_WEBHOOK_ALLOWLIST": "127.0.0.1",  # the test receivers; everything else internal stays refused
    }


@pytest.fixture(scope="module")
def notify_server(backend: str, smtp: SmtpServer) -> Iterator[SomaServer]:
    database, url = (None, None)
    if backend == "postgres":
        database, url = create_database()
    soma = start_soma(url, notify_env(smtp.port))
    try:
        yield soma
    finally:
        soma.stop()
        if database is not None:
            drop_database(database)


@dataclass
class Tenant:
    id: str
    name: str
    key: str
    http: httpx.Client


@pytest.fixture
def make_tenant(notify_server: SomaServer) -> Iterator[Callable[[], Tenant]]:
    clients: list[httpx.Client] = []
    admin = {"authorization": f"Bearer {notify_server.admin_key}"}

    def make() -> Tenant:
        name = f"n-{secrets.token_hex(4)}"
        tenant = httpx.post(f"{notify_server.v1}/tenants", json={"name": name}, headers=admin, timeout=30)
        assert tenant.status_code in (200, 201), tenant.text
        key = httpx.post(
            f"{notify_server.v1}/keys",
            json={"tenant": name, "name": "t", "role": "owner"},
            headers=admin,
            timeout=30,
        )
        assert key.status_code == 201, key.text
        client = httpx.Client(
            base_url=notify_server.base_url,
            headers={"authorization": f"Bearer {key.json()['key']}"},
            timeout=30,
        )
        clients.append(client)
        return Tenant(tenant.json()["id"], name, key.json()["key"], client)

    yield make
    for client in clients:
        client.close()


@dataclass
class Person:
    id: str
    username: str
    token: str
    http: httpx.Client


def make_person(server: SomaServer, tenant: Tenant, role: str = "member") -> Person:
    """A user of `tenant`, logged in."""
    username = f"u-{secrets.token_hex(4)}@example.com"
    created = tenant.http.post("/v1/users", json={"username": username, "role": role, "password": PASSWORD})
    assert created.status_code == 201, created.text
    form = {"grant_type": "password", "tenant": tenant.name, "username": username, "password": PASSWORD}
    granted = httpx.post(f"{server.v1}/auth/token", data=form, timeout=30)
    assert granted.status_code == 200, granted.text
    token = granted.json()["access_token"]
    client = httpx.Client(base_url=server.base_url, headers={"authorization": f"Bearer {token}"}, timeout=30)
    return Person(created.json()["id"], username, token, client)


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    return error
