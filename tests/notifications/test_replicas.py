"""Two `soma serve` replicas on one PostgreSQL database with the Redis fan-out (127.0.0.1:6379): a
notification queued on one reaches a socket held by the other, and each delivery is sent once."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import httpx
import pytest
from redis import Redis
from redis.exceptions import RedisError

from tests.notifications.conftest import SmtpServer, notify_env
from tests.notifications.sockets import open_socket
from tests.support.postgres import create_database, drop_database
from tests.support.processes import SomaServer, start_soma

REDIS_HINT = (
    "Redis is not reachable at 127.0.0.1:6379; start it with `redis-server --bind 127.0.0.1 --daemonize yes`"
)


@pytest.fixture
def replicas(smtp: SmtpServer) -> Iterator[tuple[SomaServer, SomaServer]]:
    try:
        Redis(host="127.0.0.1", port=6379, socket_timeout=2).ping()
    except (RedisError, OSError) as exc:
        raise RuntimeError(REDIS_HINT) from exc
    database, url = create_database()
    # A channel of our own, so parallel runs sharing the Redis server do not hear each other.
    env = notify_env(smtp.port) | {
        "SOMA_NOTIFICATIONS_FANOUT": "redis",
        "SOMA_REDIS_URL": "redis://127.0.0.1:6379/0",
        "SOMA_EVENT_STREAM_PREFIX": f"t{secrets.token_hex(4)}",
        "SOMA_SECRET_KEY": secrets.token_hex(32),  # replicas share the server secret
    }
    first = start_soma(url, env)
    second = None
    try:
        second = start_soma(url, env, expect_key=False)
        yield first, second
    finally:
        first.stop()
        if second is not None:
            second.stop()
        drop_database(database)


@pytest.mark.postgres
def test_a_notification_queued_on_one_replica_is_pushed_by_the_other(
    replicas: tuple[SomaServer, SomaServer],
) -> None:
    first, second = replicas
    admin = {"authorization": f"Bearer {first.admin_key}"}
    name = f"r-{secrets.token_hex(4)}"
    assert httpx.post(f"{first.v1}/tenants", json={"name": name}, headers=admin).status_code in (200, 201)
    made = httpx.post(f"{first.v1}/keys", json={"tenant": name, "name": "k", "role": "owner"}, headers=admin)
    assert made.status_code == 201, made.text
    key = made.json()["key"]
    assert httpx.get(f"{second.base_url}/readyz").status_code == 200
    with open_socket(second.base_url, key) as far, open_socket(first.base_url, key) as near:
        ids = []
        for i in range(5):
            queued = httpx.post(
                f"{first.v1}/notifications",
                json={"severity": "error", "message": f"replica {i}"},
                headers={"authorization": f"Bearer {key}"},
            )
            assert queued.status_code == 202, queued.text
            ids.append(queued.json()["id"])
        for notification_id in ids:
            assert far.wait_for(notification_id)["id"] == notification_id
            assert near.wait_for(notification_id)["id"] == notification_id
        # Each delivery went out once: no socket heard anything twice.
        assert far.pushed_within(1.5) == [] and near.pushed_within(0.2) == []
    found = httpx.get(f"{second.v1}/notifications/{ids[0]}", headers={"authorization": f"Bearer {key}"})
    assert found.status_code == 200 and [d["status"] for d in found.json()["deliveries"]] == ["sent"]
