"""The built-in `http_fetch` tool's engine: one GET, capped in size and time, never at internal addresses.

Owns: `FetchPolicy`, `FetchResult`, `http_fetch`, `FetchError` and its subclasses, and the guard itself
(`check_target`, `check_resolves`, `guarded_connector`) for the platform's other outbound HTTP (the app
factory gives it to the webhook channel).
May import: core. Never: db, models, api — a fetch is a pure function of (url, policy).

Server-side request forgery is the threat: a model told to "fetch" `http://169.254.169.254/` or an
internal admin page. Every hop (the first URL and each redirect) is checked for scheme, and the host
is checked *at the address actually connected to*: literal IPs before any socket exists, names inside
aiohttp's resolver hook, which hands the connector only addresses that passed — so a name that
resolves to a public address for the check and to 127.0.0.1 for the connection (DNS rebinding) has no
second lookup to exploit. Environment proxies are ignored (`trust_env=False`) for the same reason.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp.abc import ResolveResult
from aiohttp.resolver import ThreadedResolver
from multidict import CIMultiDictProxy
from yarl import URL

from somaagent.core.errors import SomaError

MB = 1024 * 1024
ALLOWED_SCHEMES = frozenset({"http", "https"})
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_READ_CHUNK = 64 * 1024
_USER_AGENT = "SomaAgent-http_fetch/1"
# Headers worth showing the model; the rest (cookies, server internals) is noise or sensitive.
_KEPT_HEADERS = ("content-type", "content-length", "last-modified", "etag", "location", "content-language")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Prefixes that embed an IPv4 address a host may route to: NAT64 (RFC 6052) and 6to4 (RFC 3056).
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")


class FetchError(SomaError):
    """`http_fetch` could not, or would not, fetch the URL; the message is written for the model."""

    code = "fetch_failed"


class FetchBlocked(FetchError):
    """The URL's host is (or resolves to) an address the policy does not allow."""

    code = "fetch_blocked"


class FetchBadUrl(FetchError):
    """The URL is malformed or not http/https."""

    code = "fetch_bad_url"


class FetchTooLarge(FetchError):
    """The body exceeds the size cap and the policy says to fail rather than truncate."""

    code = "fetch_too_large"


class FetchTimeout(FetchError):
    """The whole fetch (DNS, connect, redirects, body) took longer than the policy allows."""

    code = "fetch_timeout"


class FetchTooManyRedirects(FetchError):
    """The server redirected more times than the policy allows."""

    code = "fetch_too_many_redirects"


@dataclass(frozen=True, slots=True)
class FetchPolicy:
    """Limits of one fetch; `allowlist` entries (hosts, `*.suffix`, IPs, CIDRs) lift the address block."""

    max_bytes: int = 1 * MB
    timeout_s: float = 10.0
    max_redirects: int = 3
    # True: keep the first `max_bytes` and set `truncated`; False: raise FetchTooLarge.
    truncate: bool = True
    allowlist: tuple[str, ...] = ()
    _hosts: frozenset[str] = field(init=False, repr=False, compare=False)
    _suffixes: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _networks: tuple[IPNetwork, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.timeout_s <= 0 or self.max_redirects < 0:
            raise ValueError("FetchPolicy needs max_bytes >= 1, timeout_s > 0 and max_redirects >= 0")
        hosts: set[str] = set()
        suffixes: list[str] = []
        networks: list[IPNetwork] = []
        for entry in self.allowlist:
            text = entry.strip().lower().rstrip(".")
            try:
                networks.append(ipaddress.ip_network(text.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            if text.startswith("*."):
                suffixes.append(text[1:])  # keep the dot: "*.corp" must not match "evilcorp"
            elif text:
                hosts.add(text)
        object.__setattr__(self, "_hosts", frozenset(hosts))
        object.__setattr__(self, "_suffixes", tuple(suffixes))
        object.__setattr__(self, "_networks", tuple(networks))

    def host_allowed(self, host: str) -> bool:
        """True if the tenant allowlisted this host name (exactly or by `*.suffix`)."""
        name = host.lower().rstrip(".")
        return name in self._hosts or any(name.endswith(s) for s in self._suffixes)

    def address_allowed(self, address: IPAddress) -> bool:
        """True if the tenant allowlisted a network containing this address."""
        return any(address in net for net in self._networks if net.version == address.version)


@dataclass(frozen=True, slots=True)
class FetchResult:
    """What came back: final URL, status, a few headers, the (possibly truncated) body."""

    url: str
    status: int
    headers: dict[str, str]
    body: bytes
    truncated: bool
    redirects: tuple[str, ...] = ()
    charset: str | None = None

    def text(self) -> str:
        """The body decoded with the response's charset (UTF-8 if none), bad bytes replaced."""
        try:
            return self.body.decode(self.charset or "utf-8", errors="replace")
        except LookupError:
            return self.body.decode("utf-8", errors="replace")


def blocked_reason(address: IPAddress) -> str | None:
    """Why this address is not fetchable by default (loopback, private, ...), or None if it is public."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or _embedded_ipv4(address)
        if embedded is not None:
            inner = blocked_reason(embedded)
            return f"{inner} (embedded in {address})" if inner else None
    checks = (
        (address.is_unspecified, "unspecified"),
        (address.is_loopback, "loopback"),
        (address.is_link_local, "link-local (cloud metadata endpoints live here)"),
        (address.is_multicast, "multicast"),
        (isinstance(address, ipaddress.IPv4Address) and address in _CGNAT, "shared (carrier-grade NAT)"),
        (isinstance(address, ipaddress.IPv6Address) and address.is_site_local, "site-local"),
        (address.is_reserved, "reserved"),
        (address.is_private, "private"),
        # Catches the special-purpose ranges the flags above do not name (documentation, benchmarking).
        (not address.is_global, "non-global"),
    )
    return next((reason for hit, reason in checks if hit), None)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _SIX_TO_FOUR:
        return address.sixtofour
    return None


def _check_address(address: IPAddress, host: str, policy: FetchPolicy) -> None:
    reason = blocked_reason(address)
    if reason is None or policy.host_allowed(host) or policy.address_allowed(address):
        return
    shown = host if host == str(address) else f"{host} ({address})"
    raise FetchBlocked(
        f"refused to connect to {shown}: it is a {reason} address, which SomaAgent does not reach on "
        "a tenant's behalf; allowlist the host or its network if this is intended"
    )


class _CheckingResolver(ThreadedResolver):
    """Resolves with getaddrinfo, then drops every address the policy forbids before aiohttp sees it."""

    def __init__(self, policy: FetchPolicy) -> None:
        super().__init__()
        self._policy = policy

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve `host` and keep only allowed addresses; raise FetchBlocked if none is left."""
        try:
            results = await super().resolve(host, port, family)
        except OSError as exc:
            raise FetchError(f"could not resolve host {host!r}: {exc}") from exc
        allowed: list[ResolveResult] = []
        first_refusal: FetchBlocked | None = None
        for result in results:
            try:
                _check_address(ipaddress.ip_address(result["host"]), host, self._policy)
            except FetchBlocked as exc:
                first_refusal = first_refusal or exc
                continue
            allowed.append(result)
        if not allowed:
            raise first_refusal or FetchError(f"host {host!r} has no usable address")
        return allowed


def _check_url(url: URL, policy: FetchPolicy) -> None:
    if url.scheme not in ALLOWED_SCHEMES:
        raise FetchBadUrl(f"refused to fetch {str(url)[:200]!r}: only http:// and https:// URLs are allowed")
    host = url.raw_host
    if not host:
        raise FetchBadUrl(f"refused to fetch {str(url)[:200]!r}: the URL has no host")
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        # Names go through the resolver hook, except digits-and-dots forms like "2130706433" or
        # "127.1" that getaddrinfo would quietly turn into 127.0.0.1: refuse those outright.
        if host.replace(".", "").isdigit() or ":" in host:
            raise FetchBadUrl(
                f"refused to fetch {str(url)[:200]!r}: {host!r} is not a canonical IP address"
            ) from None
        return
    _check_address(address, host, policy)


def guarded_connector(policy: FetchPolicy, *, limit: int = 100) -> aiohttp.TCPConnector:
    """A connector that connects only to addresses `policy` allows: every name is resolved afresh (no
    DNS cache) through the checking resolver. Literal-IP URLs bypass resolvers: `check_target` them."""
    return aiohttp.TCPConnector(resolver=_CheckingResolver(policy), use_dns_cache=False, limit=limit)


def check_target(url: str, policy: FetchPolicy) -> URL:
    """`url` parsed, or `FetchBadUrl` / `FetchBlocked` when its scheme or literal address is refused
    (names are checked when the connector resolves them)."""
    try:
        target = URL(url)
    except (ValueError, TypeError) as exc:
        raise FetchBadUrl(f"refused {url[:200]!r}: not a valid URL ({exc})") from exc
    _check_url(target, policy)
    return target


async def check_resolves(url: str, policy: FetchPolicy) -> None:
    """`check_target`, then resolve a host name now and refuse it if no address it has is allowed: an
    early, clear answer when a URL is registered (the connector checks again at every connection)."""
    target = check_target(url, policy)
    host = target.raw_host or ""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        resolver = _CheckingResolver(policy)
        try:
            await resolver.resolve(host, target.port or 0, socket.AF_UNSPEC)
        finally:
            await resolver.close()


async def http_fetch(url: str, policy: FetchPolicy) -> FetchResult:
    """GET `url` under `policy` (size, time, redirect and address limits); there is no other method."""
    try:
        target = URL(url)
    except (ValueError, TypeError) as exc:
        raise FetchBadUrl(f"refused to fetch {url[:200]!r}: not a valid URL ({exc})") from exc
    # Checked before any session exists, so a refused first URL opens no socket and resolves no name.
    _check_url(target, policy)
    try:
        async with asyncio.timeout(policy.timeout_s):
            return await _fetch(target, policy)
    except TimeoutError as exc:
        raise FetchTimeout(
            f"fetching {url[:200]!r} took longer than {policy.timeout_s:g} s and was stopped"
        ) from exc


async def _fetch(target: URL, policy: FetchPolicy) -> FetchResult:
    connector = guarded_connector(policy, limit=1)
    redirects: list[str] = []
    async with aiohttp.ClientSession(
        connector=connector,
        trust_env=False,  # HTTP(S)_PROXY would connect somewhere this module never checked
        timeout=aiohttp.ClientTimeout(total=None),  # the caller's asyncio.timeout bounds everything
        headers={"User-Agent": _USER_AGENT, "Accept": "*/*"},
    ) as session:
        while True:
            try:
                # Redirects are followed here, by hand, so every hop is checked like the first.
                async with session.get(target, allow_redirects=False) as response:
                    location = response.headers.get("Location")
                    if response.status in _REDIRECT_STATUSES and location:
                        next_url = _redirect_target(target, location)
                    else:
                        body, truncated = await _read_capped(response, policy, target)
                        return FetchResult(
                            url=str(target),
                            status=response.status,
                            headers=_kept_headers(response.headers),
                            body=body,
                            truncated=truncated,
                            redirects=tuple(redirects),
                            charset=response.charset,
                        )
            except aiohttp.ClientError as exc:
                raise FetchError(f"fetching {str(target)[:200]!r} failed: {_describe(exc)}") from exc
            if len(redirects) >= policy.max_redirects:
                raise FetchTooManyRedirects(
                    f"{str(redirects[0] if redirects else target)[:200]!r} redirected more than "
                    f"{policy.max_redirects} times; fetch the final URL directly if it is known"
                )
            _check_url(next_url, policy)
            redirects.append(str(target))
            target = next_url


def _redirect_target(current: URL, location: str) -> URL:
    try:
        return current.join(URL(location))
    except (ValueError, TypeError) as exc:
        raise FetchBadUrl(f"{str(current)[:200]!r} redirected to an invalid URL {location[:200]!r}") from exc


async def _read_capped(response: aiohttp.ClientResponse, policy: FetchPolicy, url: URL) -> tuple[bytes, bool]:
    # Streamed, so a huge (or endlessly compressed) body costs at most one chunk beyond the cap.
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(_READ_CHUNK):
        chunks.append(chunk)
        size += len(chunk)
        if size > policy.max_bytes:
            if not policy.truncate:
                raise FetchTooLarge(
                    f"{str(url)[:200]!r} returned more than {policy.max_bytes} bytes, the tool's size limit"
                )
            return b"".join(chunks)[: policy.max_bytes], True
    return b"".join(chunks), False


def _kept_headers(headers: CIMultiDictProxy[str]) -> dict[str, str]:
    return {name: headers[name] for name in _KEPT_HEADERS if name in headers}


def _describe(exc: BaseException) -> str:
    # aiohttp wraps OS errors; the innermost message ("Connection refused") is what helps the model.
    inner: Any = exc
    while getattr(inner, "os_error", None) is not None:
        inner = inner.os_error
    return str(inner) or type(inner).__name__
