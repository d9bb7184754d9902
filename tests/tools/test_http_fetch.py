"""`http_fetch` against real aiohttp servers on 127.0.0.1 — and nothing else, ever.

The only server these tests talk to is one they start on loopback and allowlist explicitly. Every
"outside" address (10.0.0.1, 169.254.169.254, [::1], 0.0.0.0, ...) must be refused before a socket
connects; a Python audit hook (`sys.addaudithook`, fired by the real `socket.connect` and
`socket.getaddrinfo`) records every connect and lookup the process makes, so each test asserts
exactly where it went — including that it went nowhere.
"""

from __future__ import annotations

import asyncio
import datetime
import inspect
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from somaagent.tools.http_fetch import (
    MB,
    FetchBadUrl,
    FetchBlocked,
    FetchError,
    FetchPolicy,
    FetchTimeout,
    FetchTooLarge,
    FetchTooManyRedirects,
    blocked_reason,
    http_fetch,
)

LOOPBACK_ONLY = FetchPolicy(allowlist=("127.0.0.1/32",))


@dataclass
class NetLog:
    connects: list[Any] = field(default_factory=list)
    lookups: list[Any] = field(default_factory=list)

    def connected_hosts(self) -> set[str]:
        return {addr[0] for addr in self.connects if isinstance(addr, tuple)}


_active: NetLog | None = None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    log = _active
    if log is None:
        return
    if event == "socket.connect":
        log.connects.append(args[1])
    elif event == "socket.getaddrinfo":
        log.lookups.append(args[0])


sys.addaudithook(_audit)


@contextmanager
def net_log() -> Iterator[NetLog]:
    """Record every socket connect and DNS lookup the process makes inside the block."""
    global _active
    _active = log = NetLog()
    try:
        yield log
    finally:
        _active = None


@dataclass
class Server:
    port: int
    methods: list[str]

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


# Function loop, like the tests: a server on another loop would never answer them.
@pytest_asyncio.fixture(loop_scope="function")
async def server() -> AsyncIterator[Server]:
    methods: list[str] = []
    release = asyncio.Event()

    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        methods.append(request.method)
        response: web.StreamResponse = await handler(request)
        return response

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="hello from loopback", headers={"Set-Cookie": "secret=1"})

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"a" * (MB + 100_000), content_type="application/octet-stream")

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        while not release.is_set():
            await response.write(b"x" * 65536)
        return response

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="too late")

    async def redirect_to(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["u"])

    async def hops(request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        if n == 0:
            return web.Response(text="arrived")
        raise web.HTTPFound(f"/hops/{n - 1}")  # relative on purpose

    app = web.Application(middlewares=[web.middleware(record)])
    app.router.add_get("/ok", ok)
    app.router.add_get("/big", big)
    app.router.add_get("/endless", endless)
    app.router.add_get("/slow", slow)
    app.router.add_get("/redirect", redirect_to)
    app.router.add_get("/hops/{n}", hops)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Server(port=port, methods=methods)
    finally:
        release.set()
        await runner.cleanup()


# --- refused before any socket exists -------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://10.0.0.1/", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[::1]:8080/", "loopback"),
        ("http://0.0.0.0:80/", "unspecified"),
        ("http://127.0.0.1/", "loopback"),
        ("https://192.168.1.1/admin", "private"),
        ("http://172.16.0.1/", "private"),
        ("http://[fd12:3456::1]/", "private"),
        ("http://[fe80::1]/", "link-local"),
        ("http://224.0.0.1/", "multicast"),
        ("http://240.0.0.1/", "reserved"),
        ("http://100.64.0.1/", "carrier-grade NAT"),
        ("http://[::ffff:127.0.0.1]/", "loopback"),
        ("http://[::ffff:169.254.169.254]/", "link-local"),
        ("http://[64:ff9b::a00:1]/", "private (embedded in 64:ff9b::a00:1)"),
    ],
)
async def test_internal_addresses_are_refused_without_connecting(url: str, reason: str) -> None:
    with net_log() as log, pytest.raises(FetchBlocked, match="refused to connect to") as caught:
        await http_fetch(url, FetchPolicy())
    assert reason in caught.value.message
    assert "allowlist" in caught.value.message  # the fix is named
    assert log.connects == [] and log.lookups == []


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "gopher://127.0.0.1:70/_GET",
        "ftp://127.0.0.1/",
        "javascript:alert(1)",
        "dict://127.0.0.1:11211/stats",
        "http:///nohost",
        "http://2130706433/",  # 127.0.0.1 as one decimal number
        "http://127.1/",  # 127.0.0.1, inet_aton's short form
        "http://017700000001/",  # 127.0.0.1 in octal
    ],
)
async def test_bad_urls_are_refused_without_connecting(url: str) -> None:
    with net_log() as log, pytest.raises(FetchBadUrl, match="refused to fetch"):
        await http_fetch(url, LOOPBACK_ONLY)
    assert log.connects == [] and log.lookups == []


def test_blocked_reason_classifies_addresses() -> None:
    assert blocked_reason(ip_address("8.8.8.8")) is None
    assert blocked_reason(ip_address("2606:4700:4700::1111")) is None
    six_to_four = blocked_reason(ip_address("2002:a9fe:a9fe::1"))  # 169.254.169.254 via 6to4
    assert six_to_four is not None and six_to_four.startswith("link-local")
    for text in ("192.0.2.1", "198.18.0.1", "255.255.255.255", "ff02::1", "2001:db8::1", "::"):
        assert blocked_reason(ip_address(text)) is not None, text


# --- names: checked at the resolver, at the address actually connected to ------------------------


async def test_localhost_is_blocked_by_default_at_the_resolver(server: Server) -> None:
    refusal = r"localhost \((127\.0\.0\.1|::1)\).*loopback"
    with net_log() as log, pytest.raises(FetchBlocked, match=refusal):
        await http_fetch(f"http://localhost:{server.port}/ok", FetchPolicy())
    assert log.lookups == ["localhost"]
    assert log.connects == []
    assert server.methods == []


async def test_resolver_drops_addresses_outside_the_allowed_network(server: Server) -> None:
    # localhost resolves to 127.0.0.1 and usually ::1; only the allowlisted one may be connected to.
    with net_log() as log:
        result = await http_fetch(
            f"http://localhost:{server.port}/ok", FetchPolicy(allowlist=("127.0.0.0/8",))
        )
    assert result.status == 200
    assert log.connected_hosts() == {"127.0.0.1"}


async def test_allowlisted_host_name_may_reach_loopback(server: Server) -> None:
    with net_log() as log:
        result = await http_fetch(f"http://LOCALHOST:{server.port}/ok", FetchPolicy(allowlist=("localhost",)))
    assert result.text() == "hello from loopback"
    assert log.connected_hosts() <= {"127.0.0.1", "::1"}


async def test_hex_dotted_names_are_resolved_and_blocked() -> None:
    # Not digits-and-dots, so it reaches getaddrinfo, which parses it as 127.0.0.1 locally.
    with net_log() as log, pytest.raises(FetchBlocked, match="loopback"):
        await http_fetch("http://0x7f.1/", FetchPolicy())
    assert log.connects == []


# --- the allowlisted loopback server --------------------------------------------------------------


async def test_allowlisted_loopback_fetch_works(server: Server) -> None:
    with net_log() as log:
        result = await http_fetch(server.url("/ok"), LOOPBACK_ONLY)
    assert result.status == 200
    assert result.text() == "hello from loopback"
    assert result.truncated is False
    assert result.headers["content-type"].startswith("text/plain")
    assert "set-cookie" not in {h.lower() for h in result.headers}
    assert log.connected_hosts() == {"127.0.0.1"}


async def test_only_get_exists(server: Server) -> None:
    # By construction: no method, body or header parameter anywhere in the public surface.
    assert list(inspect.signature(http_fetch).parameters) == ["url", "policy"]
    assert {f.name for f in fields(FetchPolicy) if f.init} == {
        "max_bytes",
        "timeout_s",
        "max_redirects",
        "truncate",
        "allowlist",
    }
    await http_fetch(server.url("/ok"), LOOPBACK_ONLY)
    await http_fetch(server.url("/hops/2"), LOOPBACK_ONLY)
    assert server.methods == ["GET"] * 4


async def test_non_2xx_is_a_result_not_an_error(server: Server) -> None:
    result = await http_fetch(server.url("/missing"), LOOPBACK_ONLY)
    assert result.status == 404


async def test_connection_refused_is_a_readable_error() -> None:
    # A loopback port nothing listens on (bound then released by the OS for us).
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(FetchError, match=r"failed:.*(refused|Connect)"):
        await http_fetch(f"http://127.0.0.1:{port}/", LOOPBACK_ONLY)


# --- redirects ------------------------------------------------------------------------------------


async def test_redirects_are_followed_up_to_the_limit(server: Server) -> None:
    result = await http_fetch(server.url("/hops/3"), LOOPBACK_ONLY)
    assert result.text() == "arrived"
    assert result.url == server.url("/hops/0")
    assert len(result.redirects) == 3
    with pytest.raises(FetchTooManyRedirects, match="more than 3 times"):
        await http_fetch(server.url("/hops/4"), LOOPBACK_ONLY)
    with pytest.raises(FetchTooManyRedirects, match="more than 0 times"):
        await http_fetch(server.url("/hops/1"), FetchPolicy(allowlist=("127.0.0.1",), max_redirects=0))


@pytest.mark.parametrize(
    ("target", "error"),
    [
        ("http://169.254.169.254/latest/meta-data/iam/", FetchBlocked),
        ("http://10.0.0.1/", FetchBlocked),
        ("http://[::1]:{port}/ok", FetchBlocked),
        ("http://0.0.0.0:{port}/ok", FetchBlocked),  # Linux routes 0.0.0.0 to loopback
        ("file:///etc/passwd", FetchBadUrl),
        ("gopher://127.0.0.1:{port}/", FetchBadUrl),
    ],
)
async def test_redirect_from_allowlisted_server_to_blocked_target_is_refused(
    server: Server, target: str, error: type[FetchError]
) -> None:
    # Allowlisted by exact address, so the redirect's own host is checked on its own merits.
    policy = FetchPolicy(allowlist=("127.0.0.1",))
    location = target.format(port=server.port)
    with net_log() as log, pytest.raises(error, match=r"refused to (fetch|connect to)"):
        await http_fetch(server.url("/redirect") + f"?u={location}", policy)
    assert log.connected_hosts() == {"127.0.0.1"}
    assert server.methods == ["GET"]


# --- size and time --------------------------------------------------------------------------------


async def test_default_size_cap_truncates_at_one_megabyte(server: Server) -> None:
    result = await http_fetch(server.url("/big"), LOOPBACK_ONLY)
    assert result.truncated is True
    assert len(result.body) == MB
    assert set(result.body) == {ord("a")}


async def test_endless_body_is_cut_off(server: Server) -> None:
    start = time.perf_counter()
    result = await http_fetch(server.url("/endless"), FetchPolicy(allowlist=("127.0.0.1",), max_bytes=1000))
    assert (len(result.body), result.truncated) == (1000, True)
    assert time.perf_counter() - start < 2


async def test_size_cap_can_fail_instead_of_truncating(server: Server) -> None:
    policy = FetchPolicy(allowlist=("127.0.0.1",), max_bytes=4096, truncate=False)
    with pytest.raises(FetchTooLarge, match="more than 4096 bytes"):
        await http_fetch(server.url("/big"), policy)
    small = await http_fetch(server.url("/ok"), policy)
    assert small.truncated is False


async def test_timeout_fires(server: Server) -> None:
    start = time.perf_counter()
    with pytest.raises(FetchTimeout, match=r"longer than 0.3 s"):
        await http_fetch(server.url("/slow"), FetchPolicy(allowlist=("127.0.0.1",), timeout_s=0.3))
    assert time.perf_counter() - start < 1.5


def test_policy_rejects_nonsense_limits() -> None:
    bad_limits: list[dict[str, Any]] = [{"max_bytes": 0}, {"timeout_s": 0}, {"max_redirects": -1}]
    for bad in bad_limits:
        with pytest.raises(ValueError, match="FetchPolicy needs"):
            FetchPolicy(**bad)


# --- TLS ------------------------------------------------------------------------------------------


async def test_https_verifies_certificates_even_on_allowlisted_hosts(tmp_path: Path) -> None:
    # A self-signed certificate for localhost: connecting works, trusting it must not.
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="secret")

    app = web.Application()
    app.router.add_get("/", ok)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        with net_log() as log, pytest.raises(FetchError, match="certificate verify failed"):
            await http_fetch(f"https://localhost:{port}/", FetchPolicy(allowlist=("127.0.0.1/32",)))
        assert log.connected_hosts() == {"127.0.0.1"}
    finally:
        await runner.cleanup()
