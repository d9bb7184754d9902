"""Back-pressure and cancellation on the real model: a client that leaves frees its slot at once,
and a full wait queue answers 503 with Retry-After instead of piling up."""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.conftest import TenantCtx
from tests.support.processes import SomaServer

MODEL = "smollm2-135m-instruct"
# Greedy decoding of a counting prompt keeps SmolLM2 going far past a few hundred tokens.
ENDLESS = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Count from 1 to 5000, one number per line."}],
    "max_tokens": 3000,
    "temperature": 0,
    "stream": True,
}


def _usage_rows(tenant: TenantCtx) -> list[dict[str, object]]:
    return list(tenant.http.get("/v1/usage").json()["data"])


def test_disconnect_mid_stream_stops_generation_and_frees_the_slot(tenant: TenantCtx) -> None:
    with tenant.http.stream("POST", "/v1/chat/completions", json=ENDLESS) as response:
        assert response.status_code == 200
        seen = 0
        for line in response.iter_lines():
            if line.startswith("data: "):
                seen += 1
            if seen >= 5:
                break  # leaving the block closes the connection mid-stream
    started = time.monotonic()
    answer = tenant.http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]},
    )
    waited = time.monotonic() - started
    assert answer.status_code == 200, answer.text
    # 3000 tokens at ~100 tok/s would hold the only slot for ~30 s; the next request got it at once.
    assert waited < 5, f"the next request waited {waited:.1f}s for the slot"
    rows = _usage_rows(tenant)
    assert rows[0]["requests"] == 2
    assert rows[0]["errors"] == 1  # the cancelled stream is recorded, with its status
    assert int(rows[0]["completion_tokens"]) < 200  # generation stopped soon after the client left


async def test_full_queue_answers_503_with_retry_after(server: SomaServer, tenant: TenantCtx) -> None:
    # The test server runs 1 slot and a queue of 2 (SOMA_MODEL_QUEUE=2).
    headers = {"authorization": f"Bearer {tenant.key}"}
    short = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=120) as client:
        async with client.stream("POST", "/v1/chat/completions", json=ENDLESS) as holder:
            assert holder.status_code == 200
            waiting = [asyncio.create_task(client.post("/v1/chat/completions", json=short)) for _ in range(2)]
            await asyncio.sleep(0.5)  # let both reach the queue
            refused = await client.post("/v1/chat/completions", json=short)
            assert refused.status_code == 503, refused.text
            assert int(refused.headers["retry-after"]) >= 1
            error = refused.json()["error"]
            assert error["code"] == "server_overloaded"
            assert error["type"] == "server_error"
        # The holder is gone: the queued requests are served.
        for task in waiting:
            assert (await task).status_code == 200
    assert tenant.http.post("/v1/chat/completions", json=short).status_code == 200
