"""`GET /v1/usage`: per (day, model) totals that equal, exactly, the `usage` objects the calls returned."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.conftest import TenantCtx
from tests.support.contract import error_of

CHAT = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"
HELLO = [{"role": "user", "content": "Say hello."}]


def today() -> str:
    return datetime.now(UTC).date().isoformat()


def usage(tenant: TenantCtx, **params: str) -> dict[str, Any]:
    response = tenant.http.get("/v1/usage", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert body["object"] == "list"
    assert body["tenant_id"] == tenant.id
    for row in body["data"]:
        assert row["object"] == "usage.bucket"
        assert row["tenant_id"] == tenant.id
        assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]
    return body


def rows_by_model(tenant: TenantCtx, expected_requests: int, **params: str) -> dict[str, dict[str, Any]]:
    """The usage rows by model, once `expected_requests` calls are in: a stream's usage is recorded when
    its generator finishes, a moment after the client has read `[DONE]`."""
    deadline = time.monotonic() + 5
    while True:
        rows = usage(tenant, **params)["data"]
        if sum(r["requests"] for r in rows) >= expected_requests or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    by_model = {row["model"]: row for row in rows}
    assert len(by_model) == len(rows), rows  # one row per (day, model), and all of today's
    return by_model


def test_a_fresh_tenant_has_no_usage(tenant: TenantCtx) -> None:
    assert usage(tenant)["data"] == []


def test_totals_equal_the_usage_the_calls_returned(tenant: TenantCtx) -> None:
    prompt = completion = 0
    for question in ("Say hello.", "Name a fruit."):
        answer = tenant.oai.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": question}], max_tokens=5
        )
        assert answer.usage is not None
        prompt += answer.usage.prompt_tokens
        completion += answer.usage.completion_tokens
    stream = tenant.oai.chat.completions.create(
        model=CHAT, messages=HELLO, max_tokens=4, stream=True, stream_options={"include_usage": True}
    )
    last = list(stream)[-1]
    assert last.usage is not None
    prompt += last.usage.prompt_tokens
    completion += last.usage.completion_tokens

    embedded = 0
    for texts in (["one sentence"], ["two", "more sentences here"]):
        result = tenant.oai.embeddings.create(model=EMBED, input=texts)
        embedded += result.usage.prompt_tokens

    rows = rows_by_model(tenant, 5)
    assert set(rows) == {CHAT, EMBED}
    chat, embed = rows[CHAT], rows[EMBED]
    assert (chat["day"], embed["day"]) == (today(), today())
    assert (chat["requests"], chat["errors"]) == (3, 0)
    assert (chat["prompt_tokens"], chat["completion_tokens"]) == (prompt, completion)
    assert chat["total_tokens"] == prompt + completion
    assert chat["avg_latency_ms"] > 0
    assert (embed["requests"], embed["errors"]) == (2, 0)
    assert (embed["prompt_tokens"], embed["completion_tokens"]) == (embedded, 0)


def test_a_finished_stream_is_in_usage_at_once(tenant: TenantCtx) -> None:
    # /v1/usage promises read-your-writes: once the client has read `data: [DONE]`, the call is counted.
    for done in range(1, 16):
        stream = tenant.oai.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=1, stream=True)
        assert [c for c in stream if c.choices and c.choices[0].finish_reason]
        rows = usage(tenant)["data"]
        assert [(r["model"], r["requests"]) for r in rows] == [(CHAT, done)]


def test_failed_model_calls_count_as_errors_and_refused_requests_do_not(tenant: TenantCtx) -> None:
    good = tenant.oai.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=3)
    assert good.usage is not None
    too_long = {"model": CHAT, "messages": [{"role": "user", "content": "word " * 100_000}], "max_tokens": 2}
    assert error_of(tenant.http.post("/v1/chat/completions", json=too_long), 400)["code"] == (
        "context_length_exceeded"
    )
    no_room = {"model": CHAT, "messages": HELLO, "max_tokens": 100_000}
    assert error_of(tenant.http.post("/v1/chat/completions", json=no_room), 400)["param"] == "max_tokens"
    # Refused before any model ran: invalid bodies and unknown models are not usage.
    error_of(tenant.http.post("/v1/chat/completions", json={"model": CHAT, "messages": []}), 400)
    error_of(tenant.http.post("/v1/chat/completions", json={"model": "nope", "messages": HELLO}), 404)
    error_of(tenant.http.post("/v1/embeddings", json={"model": EMBED, "input": ""}), 400)

    rows = rows_by_model(tenant, 3)
    assert set(rows) == {CHAT}
    chat = rows[CHAT]
    assert (chat["requests"], chat["errors"]) == (3, 2)
    assert chat["prompt_tokens"] == good.usage.prompt_tokens  # failures consumed no tokens
    assert chat["completion_tokens"] == good.usage.completion_tokens


def test_start_and_end_filter_by_day(tenant: TenantCtx) -> None:
    answer = tenant.oai.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=2)
    assert answer.usage is not None
    day = datetime.now(UTC).date()
    yesterday, tomorrow = (day - timedelta(days=1)).isoformat(), (day + timedelta(days=1)).isoformat()
    everything = rows_by_model(tenant, 1)
    assert everything[CHAT]["requests"] == 1
    assert everything[CHAT]["total_tokens"] == answer.usage.total_tokens
    for window in (
        {"start": day.isoformat()},
        {"end": day.isoformat()},
        {"start": day.isoformat(), "end": day.isoformat()},
        {"start": yesterday, "end": tomorrow},
    ):
        assert usage(tenant, **window)["data"] == list(everything.values()), window
    for window in ({"end": yesterday}, {"start": tomorrow}, {"start": tomorrow, "end": yesterday}):
        assert usage(tenant, **window)["data"] == [], window


@pytest.mark.parametrize(
    ("params", "param"),
    [
        pytest.param({"start": "yesterday"}, "start", id="word"),
        pytest.param({"start": "2024-13-01"}, "start", id="month-13"),
        pytest.param({"end": "2024-02-30"}, "end", id="feb-30"),
        pytest.param({"end": "01/02/2024"}, "end", id="us-format"),
    ],
)
def test_bad_date_is_400(tenant: TenantCtx, params: dict[str, str], param: str) -> None:
    error = error_of(tenant.http.get("/v1/usage", params=params), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert params[param] in error["message"]


def test_usage_needs_a_key(tenant: TenantCtx) -> None:
    with httpx.Client(base_url=str(tenant.http.base_url), timeout=30) as anonymous:
        assert error_of(anonymous.get("/v1/usage"), 401)["code"] == "invalid_api_key"
