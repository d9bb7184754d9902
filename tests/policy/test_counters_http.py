"""Rate limits and budgets over HTTP, around real model calls (the MiniLM embedder): one limit however
many processes serve, `x-ratelimit-*` headers, 429 with Retry-After, and budgets that never overspend
under concurrency, on one process (local counters, SQLite and PostgreSQL) and on three processes
sharing Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.conftest import TenantCtx
from tests.support.postgres import create_database, drop_database
from tests.support.processes import SomaServer, start_soma

EMBEDDER = "all-minilm-l6-v2"
TEXT = "hello world"


@dataclass
class Burst:
    statuses: list[int]
    prompt_tokens: int  # what the admitted calls really used, by the model's own count
    seconds: float


async def _burst(base_url: str, key: str, count: int, concurrency: int) -> Burst:
    statuses: list[int] = []
    used = 0
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    async with httpx.AsyncClient(
        base_url=base_url, headers={"authorization": f"Bearer {key}"}, timeout=120, limits=limits
    ) as http:

        async def one() -> None:
            nonlocal used
            async with gate:
                response = await http.post("/v1/embeddings", json={"model": EMBEDDER, "input": TEXT})
            statuses.append(response.status_code)
            if response.status_code == 200:
                used += response.json()["usage"]["prompt_tokens"]

        started = time.monotonic()
        await asyncio.gather(*(one() for _ in range(count)))
    return Burst(statuses, used, time.monotonic() - started)


def burst(base_url: str, key: str, count: int, concurrency: int = 32) -> Burst:
    return asyncio.run(_burst(base_url, key, count, concurrency))


def limit_key(server: SomaServer, admin: httpx.Client, tenant: str) -> tuple[str, str]:
    created = admin.post("/v1/keys", json={"tenant": tenant, "name": "limited", "role": "member"})
    assert created.status_code == 201, created.text
    return created.json()["id"], created.json()["key"]


def test_rate_limit_headers_and_429(tenant: TenantCtx, server: SomaServer, admin: httpx.Client) -> None:
    key_id, key = limit_key(server, admin, tenant.name)
    put = tenant.http.put(f"/v1/rate-limits/key/{key_id}", json={"rpm": 3})
    assert put.status_code == 200, put.text
    time.sleep(1.2)  # past the settings cache
    with httpx.Client(
        base_url=server.base_url, headers={"authorization": f"Bearer {key}"}, timeout=60
    ) as http:
        answers = [http.post("/v1/embeddings", json={"model": EMBEDDER, "input": TEXT}) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    first = answers[0].headers
    assert first["x-ratelimit-limit-requests"] == "3" and first["x-ratelimit-remaining-requests"] == "2"
    refused = answers[3]
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and "rpm" in error["message"]
    # Another key of the same tenant is not limited by this key's setting.
    assert tenant.http.post("/v1/embeddings", json={"model": EMBEDDER, "input": TEXT}).status_code == 200


# A model wait queue long enough that a burst is admitted or refused by its budget, not by the queue.
DEEP_QUEUE = {"SOMA_MODEL_QUEUE": "512"}


@pytest.fixture(scope="module")
def one_process() -> Iterator[SomaServer]:
    """`soma serve` on SQLite with local counters: the embedded profile."""
    soma = start_soma(None, DEEP_QUEUE)
    try:
        yield soma
    finally:
        soma.stop()


def test_budget_never_overspends_under_concurrency(one_process: SomaServer) -> None:
    http, _owner, key_id, key = _tenant_key(one_process)
    # Each call reserves its worst case, 13 tokens for "hello world" (the UTF-8 bound), so 650 fits 50
    # calls at once; each really uses 4 and gives the rest back, so more than 50 fit in all.
    created = http.post(
        "/v1/budgets",
        json={"scope": "key", "scope_id": key_id, "unit": "tokens", "limit": 650, "period": "day"},
    )
    assert created.status_code == 201, created.text
    budget_id = created.json()["id"]
    time.sleep(1.2)
    result = burst(one_process.base_url, key, 200, concurrency=100)
    status = http.get(f"/v1/budgets/{budget_id}").json()
    assert set(result.statuses) <= {200, 402}, result.statuses
    assert result.statuses.count(402) > 0 and result.statuses.count(200) >= 50
    assert status["spent"] == result.prompt_tokens <= 650  # never over, and every token counted
    assert status["reserved"] == 0  # everything settled
    refused = httpx.post(
        f"{one_process.base_url}/v1/embeddings",
        headers={"authorization": f"Bearer {key}"},
        json={"model": EMBEDDER, "input": TEXT * 60},
    )
    error = refused.json()["error"]
    assert refused.status_code == 402 and error["code"] == "budget_exceeded" and budget_id in error["message"]
    assert error["budget"]["id"] == budget_id and error["budget"]["resets_at"]
    assert int(refused.headers["retry-after"]) >= 1
    http.close()


@pytest.fixture(scope="module")
def three_processes() -> Iterator[SomaServer]:
    """`soma serve --workers 3` on PostgreSQL, counting in Redis: three API processes, one port."""
    name, url = create_database()
    soma = start_soma(
        url,
        {"SOMA_COUNTERS": "redis", "SOMA_REDIS_URL": "redis://127.0.0.1:6379/0", **DEEP_QUEUE},
        args=("--workers", "3"),
    )
    try:
        yield soma
    finally:
        soma.stop()
        drop_database(name)


def _tenant_key(soma: SomaServer) -> tuple[httpx.Client, str, str, str]:
    admin = httpx.Client(
        base_url=soma.base_url, headers={"authorization": f"Bearer {soma.admin_key}"}, timeout=60
    )
    name = f"t-{secrets.token_hex(4)}"
    assert admin.post("/v1/tenants", json={"name": name}).status_code == 201
    owner = admin.post("/v1/keys", json={"tenant": name, "name": "o", "role": "owner"}).json()["key"]
    key = admin.post("/v1/keys", json={"tenant": name, "name": "k", "role": "member"}).json()
    admin.close()
    http = httpx.Client(base_url=soma.base_url, headers={"authorization": f"Bearer {owner}"}, timeout=60)
    return http, owner, key["id"], key["key"]


def _warm(soma: SomaServer, key: str) -> None:
    # Load the embedder in every worker first (the kernel spreads connections over them).
    burst(soma.base_url, key, 24, concurrency=12)


@pytest.mark.postgres
def test_three_processes_enforce_one_rate_limit(three_processes: SomaServer) -> None:
    http, owner, key_id, key = _tenant_key(three_processes)
    _warm(three_processes, owner)
    rpm = 120
    assert http.put(f"/v1/rate-limits/key/{key_id}", json={"rpm": rpm}).status_code == 200
    time.sleep(1.5)
    result = burst(three_processes.base_url, key, 600, concurrency=24)
    # Admitted is everything the limiter let through: answered (200), or then refused by a model's full
    # wait queue (503, which still used its request of the minute).
    assert set(result.statuses) <= {200, 429, 503}
    admitted = len(result.statuses) - result.statuses.count(429)
    # A sliding window: the whole minute's allowance at once, and never more within 60 s. Three
    # processes each counting alone would have admitted up to three times as many.
    assert result.seconds < 60
    assert abs(admitted - rpm) <= rpm * 0.01, (admitted, result.seconds)
    http.close()


@pytest.mark.postgres
def test_three_processes_never_overspend_a_budget(three_processes: SomaServer) -> None:
    http, owner, key_id, key = _tenant_key(three_processes)
    _warm(three_processes, owner)
    created = http.post(
        "/v1/budgets",
        json={"scope": "key", "scope_id": key_id, "unit": "tokens", "limit": 650, "period": "total"},
    )
    assert created.status_code == 201, created.text
    time.sleep(1.5)
    result = burst(three_processes.base_url, key, 200, concurrency=64)
    status = http.get(f"/v1/budgets/{created.json()['id']}").json()
    assert set(result.statuses) <= {200, 402, 503}
    assert result.statuses.count(402) > 0 and result.statuses.count(200) >= 50
    assert status["spent"] == result.prompt_tokens <= 650 and status["reserved"] == 0
    http.close()


def test_rate_limits_are_tenant_scoped(new_tenant: Callable[..., TenantCtx], admin: httpx.Client) -> None:
    a, b = new_tenant(), new_tenant()
    # A key id of tenant B is not a scope tenant A can limit.
    assert a.http.put(f"/v1/rate-limits/key/{b.key_id}", json={"rpm": 1}).status_code == 404
    assert (
        a.http.post(
            "/v1/budgets",
            json={"scope": "key", "scope_id": b.key_id, "unit": "tokens", "limit": 1, "period": "day"},
        ).status_code
        == 404
    )


def test_a_stream_the_client_leaves_settles_its_reservation(
    tenant: TenantCtx, admin: httpx.Client, server: SomaServer
) -> None:
    key_id, key = limit_key(server, admin, tenant.name)
    created = tenant.http.post(
        "/v1/budgets",
        json={"scope": "key", "scope_id": key_id, "unit": "tokens", "limit": 100_000, "period": "day"},
    )
    budget_id = created.json()["id"]
    time.sleep(1.2)
    body = {
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": "Write a very long story about the sea."}],
        "max_tokens": 400,
        "stream": True,
    }
    with (
        httpx.Client(
            base_url=server.base_url, headers={"authorization": f"Bearer {key}"}, timeout=60
        ) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        seen = [next(lines) for _ in range(6)]  # a few chunks, then the client goes away
    assert any(line.startswith("data: ") for line in seen)
    deadline = time.monotonic() + 10
    status = tenant.http.get(f"/v1/budgets/{budget_id}").json()
    while status["reserved"] and time.monotonic() < deadline:
        time.sleep(0.2)
        status = tenant.http.get(f"/v1/budgets/{budget_id}").json()
    assert status["reserved"] == 0  # settled, not left to the sweeper
    # Charged what the cut-short call could have used (its prompt bound and the bytes it streamed), which
    # is less than the 400-token completion it reserved for.
    assert 0 < status["spent"] < 512 + 16 + len(body["messages"][0]["content"]) + 400
