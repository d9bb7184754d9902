"""Notifications over HTTP against a real `soma serve` (SQLite and PostgreSQL): queueing, the backlog,
live push over WebSocket, preferences with quiet hours, email through a real SMTP server, signed webhooks
with retries and dead letters, validation, and tenant isolation."""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from websockets.exceptions import InvalidStatus

from tests.notifications.conftest import (
    MAX_ATTEMPTS,
    Receivers,
    SmtpServer,
    Tenant,
    error_of,
    make_person,
)
from tests.notifications.sockets import open_socket
from tests.support.processes import SomaServer


def send(tenant: Tenant, **body: Any) -> dict[str, Any]:
    queued = tenant.http.post("/v1/notifications", json={"severity": "info", "message": "hi", **body})
    assert queued.status_code == 202, queued.text
    out: dict[str, Any] = queued.json()
    assert out["status"] == "queued" and out["id"].startswith("ntf_")
    return out


def deliveries(tenant: Tenant, notification_id: str) -> list[dict[str, Any]]:
    found = tenant.http.get(f"/v1/notifications/{notification_id}")
    assert found.status_code == 200, found.text
    rows: list[dict[str, Any]] = found.json()["deliveries"]
    return rows


def wait_deliveries(
    tenant: Tenant, notification_id: str, done: Callable[[list[dict[str, Any]]], bool], timeout: float = 15
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        rows = deliveries(tenant, notification_id)
        if rows and done(rows):
            return rows
        time.sleep(0.1)
    raise AssertionError(f"deliveries of {notification_id} did not settle: {rows}")


def test_a_notification_is_pushed_to_the_tenant_and_to_each_person_and_kept_in_the_backlog(
    notify_server: SomaServer, make_tenant: Callable[[], Tenant]
) -> None:
    tenant = make_tenant()
    alice, bob = make_person(notify_server, tenant), make_person(notify_server, tenant)
    with (
        open_socket(notify_server.base_url, tenant.key) as key_socket,
        open_socket(notify_server.base_url, alice.token) as alice_socket,
        open_socket(notify_server.base_url, bob.token) as bob_socket,
    ):
        assert key_socket.ready["user_id"] is None and alice_socket.ready["user_id"] == alice.id
        everyone = send(tenant, severity="warning", message="disk almost full", metadata={"disk": "/var"})
        for socket in (key_socket, alice_socket, bob_socket):
            pushed = socket.wait_for(everyone["id"])
            assert pushed["message"] == "disk almost full" and pushed["metadata"] == {"disk": "/var"}
            assert pushed["severity"] == "warning" and pushed["tenant_id"] == tenant.id
        just_alice = send(tenant, message="for you", user_id=alice.id)
        assert just_alice["audience"] == "user" and just_alice["user_id"] == alice.id
        assert alice_socket.wait_for(just_alice["id"])["message"] == "for you"
        assert [n["id"] for n in bob_socket.pushed_within(1.0)] == []
        assert [n["id"] for n in key_socket.pushed_within(0.2)] == []

    # The backlog: unread ones, newest first; reading one removes it for that reader only.
    alice_backlog = alice.http.get("/v1/notifications/backlog").json()
    assert [n["id"] for n in alice_backlog["data"]] == [just_alice["id"], everyone["id"]]
    assert all(n["status"] == "delivered" and n["read"] is False for n in alice_backlog["data"])
    assert [n["id"] for n in bob.http.get("/v1/notifications/backlog").json()["data"]] == [everyone["id"]]
    read = alice.http.post(f"/v1/notifications/{everyone['id']}/read")
    assert read.status_code == 200 and read.json()["read"] is True, read.text
    assert alice.http.post(f"/v1/notifications/{everyone['id']}/read").status_code == 200  # again: no-op
    assert [n["id"] for n in alice.http.get("/v1/notifications/backlog").json()["data"]] == [just_alice["id"]]
    assert [n["id"] for n in bob.http.get("/v1/notifications/backlog").json()["data"]] == [everyone["id"]]
    # Paging, newest first, with a cursor.
    first = alice.http.get("/v1/notifications/backlog", params={"limit": 1}).json()
    assert first["has_more"] is False and len(first["data"]) == 1
    more = [send(tenant, message=f"n{i}") for i in range(3)]
    page = bob.http.get("/v1/notifications/backlog", params={"limit": 2}).json()
    assert [n["id"] for n in page["data"]] == [more[2]["id"], more[1]["id"]] and page["has_more"]
    rest = bob.http.get("/v1/notifications/backlog", params={"limit": 2, "after": page["next_after"]}).json()
    assert [n["id"] for n in rest["data"]] == [more[0]["id"], everyone["id"]]
    # Not a cursor, and one that names a moment UTC cannot hold (0001-01-01T00:00:00+01:00).
    for after in ("nope", base64.urlsafe_b64encode(b"0001-01-01T00:00:00+01:00|x").decode()):
        error = error_of(bob.http.get("/v1/notifications/backlog", params={"after": after}), 400)
        assert error["param"] == "after"
    # A member may read but not send.
    refused = error_of(bob.http.post("/v1/notifications", json={"severity": "info", "message": "x"}), 403)
    assert "notifications:send" in refused["message"]
    # Admins see the deliveries: one per person plus the tenant's key sockets.
    rows = deliveries(tenant, everyone["id"])
    assert {(r["channel"], r["user_id"]) for r in rows} == {
        ("websocket", alice.id),
        ("websocket", bob.id),
        ("websocket", None),
    }
    assert len(rows) == 3
    assert all(r["status"] == "sent" and r["attempts"] == 1 for r in rows)


def test_a_browser_may_authenticate_with_the_query_string_which_is_never_logged(
    notify_server: SomaServer, make_tenant: Callable[[], Tenant]
) -> None:
    tenant = make_tenant()
    alice = make_person(notify_server, tenant)
    with open_socket(notify_server.base_url, query=f"?access_token={alice.token}") as socket:
        assert socket.ready["user_id"] == alice.id
        queued = send(tenant, message="via query", user_id=alice.id)
        assert socket.wait_for(queued["id"])["message"] == "via query"
    with pytest.raises(InvalidStatus), open_socket(notify_server.base_url, query="?access_token=sk-soma-bad"):
        pass
    with pytest.raises(InvalidStatus), open_socket(notify_server.base_url):  # no credential at all
        pass
    time.sleep(0.2)
    logs = notify_server.logs()
    assert "/v1/notifications/ws" in logs  # the connections were logged, without their query strings
    assert alice.token not in logs and "sk-soma-bad" not in logs


def test_quiet_hours_hold_deliveries_until_they_end_and_critical_goes_through(
    notify_server: SomaServer, make_tenant: Callable[[], Tenant]
) -> None:
    tenant = make_tenant()
    alice = make_person(notify_server, tenant)
    # A zone whose local time is far from UTC's, and a window that started an hour ago (it may cross
    # midnight there) and ends in a few seconds.
    zone = "Pacific/Kiritimati"
    now = datetime.now(ZoneInfo(zone))
    start, end = now - timedelta(hours=1), now + timedelta(seconds=5)
    quiet = {"start": start.strftime("%H:%M"), "end": end.strftime("%H:%M:%S"), "time_zone": zone}
    saved = alice.http.put(
        "/v1/notifications/preferences", json={"channels": ["websocket"], "quiet_hours": quiet}
    )
    assert saved.status_code == 200, saved.text
    assert saved.json()["quiet_hours"] == quiet
    with open_socket(notify_server.base_url, alice.token) as socket:
        held = send(tenant, severity="warning", message="can wait", user_id=alice.id)
        urgent = send(tenant, severity="critical", message="cannot wait", user_id=alice.id)
        assert socket.next_notification()["id"] == urgent["id"]  # critical bypasses quiet hours
        backlog = {n["id"]: n for n in alice.http.get("/v1/notifications/backlog").json()["data"]}
        assert backlog[held["id"]]["status"] == "held" and backlog[urgent["id"]]["status"] == "delivered"
        held_until = datetime.fromisoformat(backlog[held["id"]]["held_until"])
        assert abs((held_until - end.replace(microsecond=0)).total_seconds()) < 1
        (row,) = deliveries(tenant, held["id"])
        assert row["status"] == "held"
        # Released by the worker once the window ends, not before.
        released = socket.next_notification(timeout=15)
        assert released["id"] == held["id"]
        # The window ends at `end` to the second (HH:MM:SS), give or take clock skew.
        assert datetime.now(ZoneInfo(zone)) >= end.replace(microsecond=0) - timedelta(seconds=0.1)


def test_email_goes_through_smtp_to_the_address_in_the_preferences(
    notify_server: SomaServer, make_tenant: Callable[[], Tenant], smtp: SmtpServer
) -> None:
    tenant = make_tenant()
    alice, bob = make_person(notify_server, tenant, "admin"), make_person(notify_server, tenant)
    address = f"alice-{secrets.token_hex(3)}@mail.example"
    chosen = {"channels": ["websocket", "email"], "min_severity": "warning", "email": address}
    assert alice.http.put("/v1/notifications/preferences", json=chosen).status_code == 200
    assert alice.http.get("/v1/notifications/preferences").json()["email"] == address
    low = send(tenant, severity="info", message="below alice's minimum")
    high = send(tenant, severity="error", message="Build failed\nsee the log", metadata={"build": 42})
    email = smtp.mailbox.wait_for(lambda env, m: m["X-Soma-Notification-Id"] == high["id"])
    assert email["To"] == address and email["From"] == "soma@example.test"
    assert email["Subject"] == "[error] Build failed"
    text = email.get_payload(decode=True).decode()  # type: ignore[union-attr]
    assert "see the log" in text and '"build": 42' in text
    rows = wait_deliveries(tenant, high["id"], lambda rs: all(r["status"] == "sent" for r in rs))
    assert ("email", alice.id) in {(r["channel"], r["user_id"]) for r in rows}
    assert ("email", bob.id) not in {(r["channel"], r["user_id"]) for r in rows}  # bob did not choose email
    low_rows = deliveries(tenant, low["id"])
    assert alice.id not in {r["user_id"] for r in low_rows} and bob.id in {r["user_id"] for r in low_rows}
    # Naming the channel sends only on it: bob's username is an address, so he gets this one by email.
    by_mail = send(tenant, channel="email", message="mail only", user_id=bob.id)
    smtp.mailbox.wait_for(
        lambda env, m: m["X-Soma-Notification-Id"] == by_mail["id"] and m["To"] == bob.username
    )
    assert [r["channel"] for r in deliveries(tenant, by_mail["id"])] == ["email"]


def test_webhooks_are_signed_retried_and_dead_lettered(
    notify_server: SomaServer, make_tenant: Callable[[], Tenant], receivers: Receivers
) -> None:
    tenant = make_tenant()
    ok_url, flaky_url, down_url = receivers.url("ok"), receivers.url("flaky", fails=2), receivers.url("down")
    created = {}
    for url, severity in ((ok_url, "info"), (flaky_url, "info"), (down_url, "warning")):
        made = tenant.http.post("/v1/notifications/webhooks", json={"url": url, "min_severity": severity})
        assert made.status_code == 201, made.text
        secret = made.json()["secret"]
        assert secret.startswith("whsec_") and len(secret) > 30
        receivers.secrets[url.removeprefix(receivers.base_url)] = secret
        created[url] = made.json()
    chosen = "a-secret-of-my-own-choosing"
    mine = receivers.url("ok")
    made = tenant.http.post("/v1/notifications/webhooks", json={"url": mine, "secret": chosen})
    assert made.status_code == 201 and made.json()["secret"] == chosen
    receivers.secrets[mine.removeprefix(receivers.base_url)] = chosen
    listed = tenant.http.get("/v1/notifications/webhooks").json()["data"]
    assert {w["url"] for w in listed} == {ok_url, flaky_url, down_url, mine}
    assert all("secret" not in w for w in listed)

    queued = send(tenant, severity="warning", message="to the hooks", metadata={"k": "v"})
    (first,) = receivers.wait(ok_url, 1)
    assert (
        first.signature_ok and first.json()["id"] == queued["id"] and first.json()["metadata"] == {"k": "v"}
    )
    assert first.headers["x-soma-event-id"].startswith("evt_")
    assert receivers.wait(mine, 1)[0].signature_ok
    # Two 503s, then success: three attempts, the same event id each time, each freshly signed.
    flaky = receivers.wait(flaky_url, 3)
    assert all(r.signature_ok for r in flaky) and len({r.headers["x-soma-event-id"] for r in flaky}) == 1
    # Always 500: dead after the last attempt, with the error kept.
    assert len(receivers.wait(down_url, MAX_ATTEMPTS)) == MAX_ATTEMPTS
    rows = wait_deliveries(
        tenant,
        queued["id"],
        lambda rs: all(r["status"] in ("sent", "dead") for r in rs if r["channel"] == "webhook"),
    )
    by_hook = {r["webhook_id"]: r for r in rows if r["channel"] == "webhook"}
    assert (
        by_hook[created[flaky_url]["id"]]["status"] == "sent"
        and by_hook[created[flaky_url]["id"]]["attempts"] == 3
    )
    dead = by_hook[created[down_url]["id"]]
    assert dead["status"] == "dead" and dead["attempts"] == MAX_ATTEMPTS and "500" in dead["last_error"]
    letters = tenant.http.get("/v1/notifications/deliveries", params={"status": "dead"}).json()["data"]
    assert [d["id"] for d in letters] == [dead["id"]]
    time.sleep(4 * 0.2 * 2**MAX_ATTEMPTS / 8)  # longer than any further backoff: nothing more is tried
    assert len(receivers.at(down_url)) == MAX_ATTEMPTS

    # Below a hook's minimum severity nothing is sent to it; a deleted hook gets nothing more.
    info = send(tenant, severity="info", message="quiet")
    receivers.wait(ok_url, 2)
    assert {r["webhook_id"] for r in deliveries(tenant, info["id"]) if r["channel"] == "webhook"} == {
        created[ok_url]["id"],
        created[flaky_url]["id"],
        made.json()["id"],
    }
    removed = tenant.http.delete(f"/v1/notifications/webhooks/{created[ok_url]['id']}")
    assert removed.status_code == 200, removed.text
    assert error_of(tenant.http.delete(f"/v1/notifications/webhooks/{created[ok_url]['id']}"), 404)
    later = send(tenant, severity="error", message="after delete")
    receivers.wait(mine, 3)
    assert all(r.json()["id"] != later["id"] for r in receivers.at(ok_url))
    # Secrets are stored sealed and never logged.
    logs = notify_server.logs()
    for secret in receivers.secrets.values():
        assert secret not in logs


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"severity": "loud", "message": "x"}, "severity"),
        ({"severity": "info", "message": "x", "channel": "pigeon"}, "channel"),
        ({"severity": "info", "message": "x" * 4001}, "message"),
        ({"severity": "info", "message": "   "}, "message"),
        ({"severity": "info"}, "message"),
        ({"severity": "info", "message": "x", "metadata": [1, 2]}, "metadata"),
        ({"severity": "info", "message": "x", "metadata": {"blob": "y" * 17000}}, "metadata"),
        ({"severity": "info", "message": "x", "colour": "red"}, "colour"),
        ({"severity": "info", "message": "x", "user_id": "usr_nobody"}, "user_id"),
    ],
)
def test_bad_notifications_are_refused_naming_the_param(
    make_tenant: Callable[[], Tenant], body: dict[str, Any], param: str
) -> None:
    tenant = make_tenant()
    response = tenant.http.post("/v1/notifications", json=body)
    error = error_of(response, 404 if param == "user_id" else 400)
    assert error["param"] == param, error
    assert tenant.http.get("/v1/notifications/backlog").json()["data"] == []


def test_bad_webhooks_and_delivery_filters_are_refused(make_tenant: Callable[[], Tenant]) -> None:
    tenant = make_tenant()
    for url in (
        "ftp://127.0.0.1/x",
        "file:///etc/passwd",
        "127.0.0.1:8080/x",
        "http://",
        "http://u:p@host/x",
    ):
        error = error_of(tenant.http.post("/v1/notifications/webhooks", json={"url": url}), 400)
        assert error["param"] == "url", (url, error)
    error = error_of(
        tenant.http.post("/v1/notifications/webhooks", json={"url": "https://x.test", "secret": "short"}), 400
    )
    assert error["param"] == "secret" and "short" not in error["message"]
    bad_level = {"url": "https://x.test", "min_severity": "meh"}
    assert (
        error_of(tenant.http.post("/v1/notifications/webhooks", json=bad_level), 400)["param"]
        == "min_severity"
    )
    assert tenant.http.get("/v1/notifications/webhooks").json()["data"] == []
    assert (
        error_of(tenant.http.get("/v1/notifications/deliveries", params={"status": "lost"}), 400)["param"]
        == "status"
    )
    assert (
        error_of(tenant.http.get("/v1/notifications/deliveries", params={"channel": "fax"}), 400)["param"]
        == "channel"
    )


def test_preferences_are_validated_and_belong_to_a_person(
    notify_server: SomaServer, make_tenant: Callable[[], Tenant]
) -> None:
    tenant, other = make_tenant(), make_tenant()
    alice, bob = make_person(notify_server, tenant), make_person(notify_server, tenant)
    defaults = alice.http.get("/v1/notifications/preferences").json()
    assert defaults == {
        "object": "notification.preferences",
        "user_id": alice.id,
        "channels": ["websocket"],
        "min_severity": "info",
        "email": alice.username,
        "quiet_hours": None,
    }
    night = {"start": "22:00", "end": "07:00", "time_zone": "Europe/Paris"}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"quiet_hours": {**night, "time_zone": "Mars/Olympus"}}, "quiet_hours.time_zone"),
        ({"quiet_hours": {**night, "time_zone": "../../etc/passwd"}}, "quiet_hours.time_zone"),
        ({"quiet_hours": {**night, "start": "25:00"}}, "quiet_hours.start"),
        ({"quiet_hours": {**night, "end": "7am"}}, "quiet_hours.end"),
        ({"quiet_hours": {**night, "end": "22:00"}}, "quiet_hours.end"),
        ({"channels": ["webhook"]}, "channels"),
        ({"min_severity": "panic"}, "min_severity"),
        ({"email": "not-an-address"}, "email"),
        ({"sms": True}, "sms"),
    ]
    for body, param in cases:
        error = error_of(alice.http.put("/v1/notifications/preferences", json=body), 400)
        assert error["param"] == param, (body, error)
    saved = alice.http.put(
        "/v1/notifications/preferences",
        json={"channels": ["email"], "min_severity": "error", "quiet_hours": night},
    )
    assert saved.status_code == 200, saved.text
    assert saved.json()["quiet_hours"] == night and saved.json()["channels"] == ["email"]
    assert alice.http.get("/v1/notifications/preferences").json() == saved.json()
    # An API key is no person: it must name one (and only admins may).
    error = error_of(tenant.http.get("/v1/notifications/preferences"), 400)
    assert error["param"] == "user_id" and "API key" in error["message"]
    assert (
        tenant.http.get("/v1/notifications/preferences", params={"user_id": alice.id}).json() == saved.json()
    )
    set_for_bob = tenant.http.put(
        "/v1/notifications/preferences", params={"user_id": bob.id}, json={"min_severity": "warning"}
    )
    assert set_for_bob.status_code == 200 and set_for_bob.json()["user_id"] == bob.id
    assert error_of(bob.http.get("/v1/notifications/preferences", params={"user_id": alice.id}), 403)
    # Another tenant's user does not exist here.
    stranger = make_person(notify_server, other)
    assert error_of(tenant.http.get("/v1/notifications/preferences", params={"user_id": stranger.id}), 404)
    # A service account's name is not an address: choosing email needs one.
    created = tenant.http.post("/v1/users", json={"username": "robot", "role": "member", "kind": "service"})
    assert created.status_code == 201, created.text
    robot = created.json()["id"]
    error = error_of(
        tenant.http.put(
            "/v1/notifications/preferences", params={"user_id": robot}, json={"channels": ["email"]}
        ),
        400,
    )
    assert error["param"] == "email"


def test_tenants_never_see_each_others_notifications(
    notify_server: SomaServer, make_tenant: Callable[[], Tenant], receivers: Receivers
) -> None:
    mine, theirs = make_tenant(), make_tenant()
    me, them = make_person(notify_server, mine), make_person(notify_server, theirs)
    hook = theirs.http.post("/v1/notifications/webhooks", json={"url": receivers.url("ok")})
    assert hook.status_code == 201
    with (
        open_socket(notify_server.base_url, mine.key) as my_key_socket,
        open_socket(notify_server.base_url, me.token) as my_socket,
        open_socket(notify_server.base_url, them.token) as their_socket,
    ):
        secret_news = send(theirs, severity="critical", message="their business")
        assert their_socket.wait_for(secret_news["id"])["tenant_id"] == theirs.id
        assert my_socket.pushed_within(1.0) == [] and my_key_socket.pushed_within(0.2) == []
    for client in (mine.http, me.http):
        assert error_of(client.get(f"/v1/notifications/{secret_news['id']}"), 404)["code"] == "not_found"
        assert error_of(client.post(f"/v1/notifications/{secret_news['id']}/read"), 404)
        assert all(
            n["id"] != secret_news["id"] for n in client.get("/v1/notifications/backlog").json()["data"]
        )
    assert mine.http.get("/v1/notifications/deliveries").json()["data"] == []
    assert mine.http.get("/v1/notifications/webhooks").json()["data"] == []
    assert error_of(mine.http.delete(f"/v1/notifications/webhooks/{hook.json()['id']}"), 404)
    # Naming another tenant is refused as if it did not exist; a user of another tenant likewise.
    assert error_of(mine.http.get("/v1/notifications/backlog", params={"tenant": theirs.name}), 404)
    assert error_of(
        mine.http.post(
            "/v1/notifications", json={"severity": "info", "message": "x", "tenant_id": theirs.id}
        ),
        404,
    )
    assert error_of(
        mine.http.post("/v1/notifications", json={"severity": "info", "message": "x", "user_id": them.id}),
        404,
    )
    # The operator acts for any tenant by naming it.
    operator = httpx.Client(
        base_url=notify_server.base_url,
        headers={"authorization": f"Bearer {notify_server.admin_key}"},
        timeout=30,
    )
    with operator:
        from_operator = operator.post(
            "/v1/notifications", json={"severity": "info", "message": "maintenance", "tenant_id": theirs.name}
        )
        assert from_operator.status_code == 202 and from_operator.json()["tenant_id"] == theirs.id
        seen = operator.get(f"/v1/notifications/{secret_news['id']}", params={"tenant": theirs.id})
        assert seen.status_code == 200 and seen.json()["message"] == "their business"
    assert any(
        n["id"] == from_operator.json()["id"]
        for n in them.http.get("/v1/notifications/backlog").json()["data"]
    )
    assert all(
        n["id"] != from_operator.json()["id"] for n in me.http.get("/v1/notifications/backlog").json()["data"]
    )


def test_a_member_socket_needs_a_valid_credential(
    notify_server: SomaServer, make_tenant: Callable[[], Tenant]
) -> None:
    tenant = make_tenant()
    bare = tenant.http.post("/v1/keys", json={"name": "nothing", "capabilities": []})
    assert bare.status_code == 201, bare.text
    with pytest.raises(InvalidStatus), open_socket(notify_server.base_url, bare.json()["key"]):
        pass
