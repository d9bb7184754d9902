"""Webhooks never reach internal addresses: refused when registered (with the reason), and refused again
at the address actually connected to when delivered, unless `SOMA_WEBHOOK_ALLOWLIST` names them."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from somaagent.api.webhook_poster import GuardedWebhookPoster
from somaagent.notifications.channels import DeliveryFailed
from tests.notifications.conftest import Receivers, Tenant, error_of


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://10.1.2.3/hook", "private"),
        ("http://[::1]:9/hook", "loopback"),  # the allowlist names 127.0.0.1, not ::1
        ("http://2130706433/hook", "not a canonical IP address"),  # 127.0.0.1 in disguise
    ],
)
def test_an_internal_webhook_is_refused_when_registered_and_nothing_is_kept(
    make_tenant: Callable[[], Tenant], url: str, reason: str
) -> None:
    tenant = make_tenant()
    error = error_of(tenant.http.post("/v1/notifications/webhooks", json={"url": url}), 400)
    assert error["param"] == "url" and reason in error["message"], error
    assert tenant.http.get("/v1/notifications/webhooks").json()["data"] == []


async def test_a_delivery_is_refused_at_the_address_it_would_connect_to(receivers: Receivers) -> None:
    # `localhost` is a name: only the resolver hook sees that it is loopback, at connection time.
    url = receivers.url("ok").replace("127.0.0.1", "localhost")
    guarded = GuardedWebhookPoster((), timeout_s=5)
    try:
        with pytest.raises(DeliveryFailed, match="loopback"):
            await guarded.post(url, b"{}", {"content-type": "application/json"})
    finally:
        await guarded.close()
    assert receivers.at(url.replace("localhost", "127.0.0.1")) == []  # no request reached it

    trusted = GuardedWebhookPoster(("127.0.0.1",), timeout_s=5)
    try:
        status, _ = await trusted.post(receivers.url("ok"), b"{}", {"content-type": "application/json"})
    finally:
        await trusted.close()
    assert status == 204
