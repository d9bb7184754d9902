"""`soma serve --workers 2`: several processes on one port share state, metrics and revocations."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.postgres import create_database, drop_database
from tests.support.processes import SomaServer, start_soma


@pytest.fixture(scope="module")
def workers(backend: str) -> Iterator[SomaServer]:
    database, url = create_database() if backend == "postgres" else (None, None)
    soma = start_soma(url, {"SOMA_LAST_USED_FLUSH_S": "0.3"}, args=("--workers", "2"))
    yield soma
    soma.stop()
    if database:
        drop_database(database)


def test_metrics_add_up_across_workers(workers: SomaServer) -> None:
    headers = {"authorization": f"Bearer {workers.admin_key}"}
    # Fresh connections spread over both workers (the kernel balances accepts).
    for _ in range(20):
        assert httpx.get(f"{workers.v1}/models", headers=headers).status_code == 200
    families = {
        f.name: f for f in text_string_to_metric_families(httpx.get(f"{workers.base_url}/metrics").text)
    }
    served = sum(
        s.value
        for s in families["soma_http_requests"].samples
        if s.labels["route"] == "/v1/models" and s.labels["status"] == "200"
    )
    assert served == 20


def test_a_revocation_reaches_every_worker_within_a_second(workers: SomaServer) -> None:
    admin = {"authorization": f"Bearer {workers.admin_key}"}
    created = httpx.post(f"{workers.v1}/keys", json={"name": "spread"}, headers=admin).json()
    headers = {"authorization": f"Bearer {created['key']}"}
    for _ in range(10):  # warm both workers' key caches
        assert httpx.get(f"{workers.v1}/models", headers=headers).status_code == 200
    assert httpx.delete(f"{workers.v1}/keys/{created['id']}", headers=admin).status_code == 200
    time.sleep(1.0)
    statuses = {httpx.get(f"{workers.v1}/models", headers=headers).status_code for _ in range(10)}
    assert statuses == {401}


def test_a_logout_reaches_every_worker_within_a_second(workers: SomaServer) -> None:
    admin = {"authorization": f"Bearer {workers.admin_key}"}
    body = {"username": "spread-user", "password": "correct horse battery staple"}
    assert httpx.post(f"{workers.v1}/users", json=body, headers=admin).status_code == 201
    form = {"grant_type": "password", "tenant": "default", **body}
    tokens = httpx.post(f"{workers.v1}/auth/token", data=form).json()
    headers = {"authorization": f"Bearer {tokens['access_token']}"}
    # Fresh connections land on both workers: each verifies the token signed by whichever issued it.
    assert {httpx.get(f"{workers.v1}/models", headers=headers).status_code for _ in range(10)} == {200}
    assert httpx.post(f"{workers.v1}/auth/logout", headers=headers).status_code == 200
    time.sleep(1.0)
    assert {httpx.get(f"{workers.v1}/models", headers=headers).status_code for _ in range(10)} == {401}


def test_last_used_time_is_recorded(workers: SomaServer) -> None:
    admin = {"authorization": f"Bearer {workers.admin_key}"}
    created = httpx.post(f"{workers.v1}/keys", json={"name": "touched"}, headers=admin).json()
    assert created["last_used_at"] is None
    httpx.get(f"{workers.v1}/models", headers={"authorization": f"Bearer {created['key']}"})
    time.sleep(1.0)
    keys = {k["id"]: k for k in httpx.get(f"{workers.v1}/keys", headers=admin).json()["data"]}
    assert keys[created["id"]]["last_used_at"] is not None
