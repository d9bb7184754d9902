"""The webhook channel's HTTP client, composed from the `http_fetch` tool's address guard: a tenant's
webhook URL is someone else's input, so a POST to it is refused at loopback, private, link-local (cloud
metadata) and other non-public addresses, checked at the address actually connected to, exactly as
the tool's fetches are. `SOMA_WEBHOOK_ALLOWLIST` (hosts, `*.suffix`, IPs, CIDRs) lifts the block for
receivers an operator trusts on an internal network. No redirects are followed, no environment proxy
is used."""

from __future__ import annotations

import asyncio

import aiohttp

from somaagent.core.errors import InvalidRequest
from somaagent.notifications.channels import DeliveryFailed
from somaagent.tools.http_fetch import (
    FetchBadUrl,
    FetchBlocked,
    FetchError,
    FetchPolicy,
    check_resolves,
    check_target,
    guarded_connector,
)

_ANSWER_CHARS = 200


class GuardedWebhookPoster:
    """The `WebhookPoster` of the app: one connection pool, opened on first use."""

    def __init__(self, allowlist: tuple[str, ...], timeout_s: float) -> None:
        self._policy = FetchPolicy(allowlist=allowlist, timeout_s=timeout_s)
        self._timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def check(self, url: str) -> None:
        """Refuse, with the reason, a URL the guard would never deliver to (at registration). A name
        that does not resolve now is let through: the receiver's DNS may come later, and every delivery
        is checked again."""
        try:
            await check_resolves(url, self._policy)
        except (FetchBlocked, FetchBadUrl) as exc:
            raise InvalidRequest(str(exc), param="url") from exc
        except FetchError:
            return

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
        """POST `body`; (status, the start of the answer), or `DeliveryFailed`."""
        try:
            target = check_target(url, self._policy)
            async with asyncio.timeout(self._timeout_s):
                async with self._client().post(
                    target, data=body, headers=headers, allow_redirects=False
                ) as response:
                    answer = (await response.content.read(_ANSWER_CHARS)).decode("utf-8", "replace")
                    return response.status, answer
        except FetchError as exc:
            raise DeliveryFailed(str(exc)[:1000]) from exc
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise DeliveryFailed(f"POST {url}: {type(exc).__name__}: {exc}"[:1000]) from exc

    async def close(self) -> None:
        """Close the connection pool."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=guarded_connector(self._policy),
                trust_env=False,  # an environment proxy would connect somewhere the guard never checked
                timeout=aiohttp.ClientTimeout(total=None),  # `asyncio.timeout` bounds each POST
            )
        return self._session
