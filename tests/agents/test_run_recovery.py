"""Runs across process boundaries: a server killed mid-run loses no accepted message and marks the run
`interrupted` when it comes back; two replicas on one PostgreSQL database follow and cancel each
other's runs."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.postgres import create_database, drop_database
from tests.support.processes import SomaServer, start_soma
from tests.support.sse import events

STALE = {"SOMA_AGENT_RUN_STALE_S": "2", "SOMA_AGENT_HEARTBEAT_S": "0.3"}


@pytest.fixture
def database(backend: str) -> Iterator[str | None]:
    if backend == "sqlite":
        yield None
        return
    name, url = create_database()
    yield url
    drop_database(name)


def client(server: SomaServer, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, headers={"authorization": f"Bearer {key}"}, timeout=120)


def tenant_key(admin: httpx.Client) -> str:
    name = f"r-{secrets.token_hex(3)}"
    assert admin.post("/v1/tenants", json={"name": name}).status_code == 201
    created = admin.post("/v1/keys", json={"tenant": name, "name": "t", "role": "owner"})
    assert created.status_code == 201, created.text
    return str(created.json()["key"])


def start_talker(http: httpx.Client) -> str:
    body = {"name": "talker", "tools": [], "memory": {"recall": False, "remember": []}}
    assert http.post("/v1/personas", json=body).status_code == 201
    response = http.post("/v1/sessions", json={"persona": "talker"})
    return str(response.json()["id"])


def stream_in_background(http: httpx.Client, path: str, body: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Read an SSE stream in a thread; the list fills as events arrive (and survives a dropped server)."""
    seen: list[dict[str, Any]] = []

    def read() -> None:
        try:
            method = "POST" if body is not None else "GET"
            headers = {"accept": "text/event-stream"}
            with http.stream(method, path, json=body, headers=headers) as response:
                seen.extend(events(response))
        except httpx.HTTPError:
            pass  # the server was killed under us

    threading.Thread(target=read, daemon=True).start()
    return seen


def wait_for(condition: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_a_crash_mid_run_loses_no_accepted_message(database: str | None) -> None:
    server = start_soma(database, STALE)
    with client(server, server.admin_key) as admin:
        key = tenant_key(admin)
    http = client(server, key)
    session_id = start_talker(http)
    body = {"content": "Tell me a very long story about the sea.", "max_tokens": 400, "seed": 2}
    seen = stream_in_background(http, f"/v1/sessions/{session_id}/messages", body)
    wait_for(lambda: any(e["type"] == "assistant.delta" for e in seen))
    server.proc.kill()  # SIGKILL: no shutdown, no chance to record anything
    server.proc.wait()
    run_id = seen[0]["run_id"]
    last_seen = seen[-1]["id"]

    again = start_soma(database, STALE, data_dir=server.data_dir, expect_key=False)
    try:
        http = client(again, key)
        history = http.get(f"/v1/sessions/{session_id}/history").json()["data"]
        assert history[0]["role"] == "user" and history[0]["content"] == body["content"]

        def interrupted() -> bool:
            return bool(http.get(f"/v1/sessions/{session_id}/runs/{run_id}").json()["status"] == "failed")

        wait_for(interrupted, timeout=30)
        run = http.get(f"/v1/sessions/{session_id}/runs/{run_id}").json()
        assert run["reason"] == "interrupted"
        stored = http.get(f"/v1/sessions/{session_id}/events").json()["data"]
        assert stored[-1]["type"] == "run.failed" and stored[-1]["data"]["reason"] == "interrupted"
        # Live deltas the client saw were never stored: ids jump past them, so none is handed out twice.
        assert stored[-1]["id"] > last_seen
        assert http.get(f"/v1/sessions/{session_id}").json()["active_run_id"] is None
        done = stream_in_background(
            http, f"/v1/sessions/{session_id}/messages", {"content": "Hello", "max_tokens": 8}
        )
        wait_for(lambda: bool(done) and done[-1]["type"] in ("run.completed", "run.failed"))
        assert done[-1]["type"] == "run.completed" and done[0]["id"] > stored[-1]["id"]
    finally:
        again.stop()


@pytest.mark.postgres
def test_replicas_follow_and_cancel_each_others_runs() -> None:
    name, url = create_database()
    shared = {**STALE, "SOMA_SECRET_KEY": secrets.token_hex(32)}
    first = start_soma(url, shared)
    second = start_soma(url, shared, expect_key=False)
    try:
        with client(first, first.admin_key) as admin:
            key = tenant_key(admin)
        a, b = client(first, key), client(second, key)
        session_id = start_talker(a)
        # A run on replica A, followed from replica B (which polls the shared database).
        on_a = stream_in_background(
            a, f"/v1/sessions/{session_id}/messages", {"content": "Say hello.", "max_tokens": 16}
        )
        wait_for(lambda: bool(on_a))
        followed = stream_in_background(b, f"/v1/sessions/{session_id}/events", None)
        wait_for(lambda: bool(followed) and followed[-1]["type"] == "run.completed")
        durable = [e for e in on_a if e["type"] != "assistant.delta"]
        assert [e["id"] for e in followed if e["type"] != "assistant.delta"] == [e["id"] for e in durable]

        # A long run on A, cancelled through B.
        long_run = stream_in_background(
            a, f"/v1/sessions/{session_id}/messages", {"content": "Write a long poem.", "max_tokens": 400}
        )
        wait_for(lambda: bool(long_run))
        run_id = long_run[0]["run_id"]
        started = time.monotonic()
        cancelled = b.post(f"/v1/sessions/{session_id}/runs/{run_id}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["status"] == "cancelled"
        assert time.monotonic() - started < 5
        wait_for(lambda: long_run[-1]["type"] == "run.failed")
        assert long_run[-1]["data"]["reason"] == "cancelled"
    finally:
        second.stop()
        first.stop()
        drop_database(name)
