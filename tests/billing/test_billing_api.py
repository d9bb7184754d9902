"""Billing over HTTP on the real server (SQLite and PostgreSQL): real chat and embedding calls at a set
price reach the ledger; summary, exports, invoices and corrections agree with it; bad input is a 400
naming the parameter; another tenant's ledger does not exist."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.conftest import TenantCtx

CHAT = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"
# Micro-USD per million tokens: prompt, completion (embeddings: prompt only), and per call.
CHAT_PRICE = {"prompt_micros_per_mtok": 150_000, "completion_micros_per_mtok": 600_000, "call_micros": 3}
EMBED_PRICE = {"prompt_micros_per_mtok": 20_000}


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()["error"]
    assert set(body) >= {"message", "type", "code", "param"}
    return body


def ledger(http: httpx.Client, **params: Any) -> list[dict[str, Any]]:
    """Every matching entry, following `next_after`."""
    rows: list[dict[str, Any]] = []
    after = None
    while True:
        response = http.get("/v1/billing/ledger", params={**params, **({"after": after} if after else {})})
        assert response.status_code == 200, response.text
        page = response.json()
        rows.extend(page["data"])
        if not page["has_more"]:
            return rows
        after = page["next_after"]


def wait_for_entries(
    http: httpx.Client, count: int, timeout: float = 10, **params: Any
) -> list[dict[str, Any]]:
    """Poll the ledger until it holds `count` entries: usage reaches it through the outbox and the bus."""
    deadline = time.monotonic() + timeout
    while True:
        rows = ledger(http, **params)
        if len(rows) >= count:
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"the ledger held {len(rows)} of {count} entries after {timeout}s: {rows}")
        time.sleep(0.2)


def expected_cost(price: dict[str, int], prompt: int, completion: int) -> int:
    numerator = prompt * price.get("prompt_micros_per_mtok", 0) + completion * price.get(
        "completion_micros_per_mtok", 0
    )
    return -(-numerator // 1_000_000) + price.get("call_micros", 0)


@pytest.fixture
def priced(admin: httpx.Client) -> None:
    for model, body in ((CHAT, CHAT_PRICE), (EMBED, EMBED_PRICE)):
        current = admin.get(f"/v1/prices/{model}")
        if current.status_code == 200 and current.json()["data"][0]["call_micros"] == body.get(
            "call_micros", 0
        ):
            continue
        made = admin.put(f"/v1/prices/{model}", json=body)
        assert made.status_code == 200, made.text


def test_real_calls_are_billed_and_every_view_agrees(
    priced: None, new_tenant: Callable[..., TenantCtx], admin: httpx.Client
) -> None:
    del priced
    tenant, stranger = new_tenant(), new_tenant()
    usages = []
    for n in range(2):
        answer = tenant.oai.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": f"Say hi {n}"}], max_tokens=4
        )
        assert answer.usage is not None
        usages.append((CHAT, answer.usage.prompt_tokens, answer.usage.completion_tokens))
    embedded = tenant.oai.embeddings.create(model=EMBED, input=["billing is exact", "never a float"])
    usages.append((EMBED, embedded.usage.prompt_tokens, 0))

    rows = wait_for_entries(tenant.http, 3)
    assert len(rows) == 3
    prices = {CHAT: CHAT_PRICE, EMBED: EMBED_PRICE}
    expected_total = sum(expected_cost(prices[m], p, c) for m, p, c in usages)
    assert sorted((r["item"], r["prompt_tokens"], r["completion_tokens"]) for r in rows) == sorted(usages)
    for row in rows:
        assert (row["tenant_id"], row["kind"], row["key_id"], row["priced"]) == (
            tenant.id,
            "model",
            tenant.key_id,
            True,
        )
        assert row["amount_micros"] == expected_cost(
            prices[row["item"]], row["prompt_tokens"], row["completion_tokens"]
        )
        assert (
            row["amount_usd"] == f"{row['amount_micros'] // 1_000_000}.{row['amount_micros'] % 1_000_000:06d}"
        )
        assert row["subject"] == f"key:{tenant.key_id}" and row["source_event_id"].startswith("evt_")
    assert sum(r["amount_micros"] for r in rows) == expected_total

    # Filters and paging.
    assert [r["item"] for r in ledger(tenant.http, model=EMBED)] == [EMBED]
    assert len(ledger(tenant.http, kind="model", key_id=tenant.key_id, limit=1)) == 3
    assert ledger(tenant.http, kind="tool") == []
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert ledger(tenant.http, since=later) == []

    # The summary, from the rollups, in every grouping.
    for group_by, groups in (
        ("model", {CHAT, EMBED}),
        ("key", {tenant.key_id}),
        ("user", {None}),
        ("day", {datetime.now(UTC).date().isoformat(), rows[0]["occurred_at"][:10]}),
    ):
        summary = tenant.http.get("/v1/billing/summary", params={"group_by": group_by})
        assert summary.status_code == 200, summary.text
        body = summary.json()
        assert {d["group"] for d in body["data"]} <= groups and body["data"], (group_by, body)
        assert body["total"]["amount_micros"] == expected_total, group_by
        assert body["total"]["requests"] == 3, group_by
        assert sum(d["amount_micros"] for d in body["data"]) == expected_total

    # Exports parse back to the same rows.
    as_json = tenant.http.get("/v1/exports/billing-ledger", params={"format": "json"})
    assert as_json.status_code == 200 and as_json.headers["content-type"].startswith("application/json")
    assert as_json.json() == [
        {k: v for k, v in r.items() if k != "object"}
        | {"occurred_at": e["occurred_at"], "recorded_at": e["recorded_at"]}
        for r, e in zip(rows, as_json.json(), strict=True)
    ]
    assert [e["id"] for e in as_json.json()] == [r["id"] for r in rows]
    as_csv = tenant.http.get("/v1/exports/billing-ledger", params={"format": "csv"})
    assert as_csv.status_code == 200 and as_csv.headers["content-type"].startswith("text/csv")
    parsed = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert [p["id"] for p in parsed] == [r["id"] for r in rows]
    assert [int(p["amount_micros"]) for p in parsed] == [r["amount_micros"] for r in rows]
    assert [p["amount_usd"] for p in parsed] == [r["amount_usd"] for r in rows]
    assert [int(p["prompt_tokens"]) for p in parsed] == [r["prompt_tokens"] for r in rows]

    # A correction (operators only), then the invoice.
    charge = rows[0]
    body = {
        "tenant": tenant.name,
        "entry_id": charge["id"],
        "amount_micros": -1,
        "reason": "=SUM(1) goodwill <credit>",  # HTML in the invoice page, a formula in a spreadsheet
    }
    error_of(tenant.http.post("/v1/billing/corrections", json=body), 403)
    made = admin.post("/v1/billing/corrections", json={**body, "idempotency_key": "once"})
    assert made.status_code == 201, made.text
    again = admin.post("/v1/billing/corrections", json={**body, "idempotency_key": "once"})
    assert (again.status_code, again.json()["id"]) == (200, made.json()["id"])
    correction = made.json()
    assert (correction["kind"], correction["corrects"], correction["amount_micros"]) == (
        "correction",
        charge["id"],
        -1,
    )
    assert tenant.http.get(f"/v1/billing/ledger/{correction['id']}").json()["reason"] == body["reason"]
    error_of(admin.post("/v1/billing/corrections", json={**body, "amount_micros": -(10**9)}), 400)

    month = datetime.now(UTC).strftime("%Y-%m")
    invoice = tenant.http.get(f"/v1/billing/invoices/{month}")
    assert invoice.status_code == 200, invoice.text
    inv = invoice.json()
    assert (inv["tenant_id"], inv["month"], inv["status"], inv["currency"]) == (
        tenant.id,
        month,
        "open",
        "USD",
    )
    assert inv["number"] == tenant.http.get(f"/v1/billing/invoices/{month}").json()["number"]
    assert {line["item"]: line["quantity"] for line in inv["lines"]} == {CHAT: 2, EMBED: 1}
    assert (inv["subtotal_micros"], inv["corrections_micros"], inv["total_micros"]) == (
        expected_total,
        -1,
        expected_total - 1,
    )
    assert [c["id"] for c in inv["corrections"]] == [correction["id"]]
    page = tenant.http.get(f"/v1/billing/invoices/{month}", params={"format": "html"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert (
        inv["number"] in page.text and "goodwill &lt;credit&gt;" in page.text and "<credit>" not in page.text
    )
    # In the CSV export the reason is text, not a formula a spreadsheet would run.
    exported = csv.DictReader(io.StringIO(tenant.http.get("/v1/exports/billing-ledger?format=csv").text))
    assert [row["reason"] for row in exported if row["id"] == correction["id"]] == ["'" + body["reason"]]
    empty = tenant.http.get("/v1/billing/invoices/2001-01").json()
    assert (empty["lines"], empty["total_micros"], empty["status"]) == ([], 0, "closed")
    assert admin.get("/v1/billing/summary", params={"tenant": tenant.name}).json()["total"][
        "amount_micros"
    ] == (expected_total - 1)

    # Another tenant's ledger does not exist for a non-operator.
    assert ledger(stranger.http) == []
    error_of(stranger.http.get(f"/v1/billing/ledger/{charge['id']}"), 404)
    for path in (
        "/v1/billing/ledger",
        "/v1/billing/summary",
        f"/v1/billing/invoices/{month}",
        "/v1/exports/billing-ledger",
    ):
        assert error_of(stranger.http.get(path, params={"tenant": tenant.name}), 404)["param"] == "tenant", (
            path
        )
    assert stranger.http.get("/v1/billing/summary").json()["total"]["amount_micros"] == 0
    assert stranger.http.get("/v1/exports/billing-ledger").json() == []


@pytest.mark.parametrize(
    ("path", "params", "param"),
    [
        ("/v1/billing/summary", {"group_by": "week"}, "group_by"),
        ("/v1/billing/summary", {"since": "2025-01-01T10:30:00Z"}, "since"),
        ("/v1/billing/summary", {"since": "yesterday"}, "since"),
        ("/v1/billing/ledger", {"after": "not-a-cursor"}, "after"),
        ("/v1/billing/ledger", {"after": "lc_!!!"}, "after"),
        ("/v1/billing/ledger", {"kind": "refund"}, "kind"),
        ("/v1/billing/ledger", {"limit": "0"}, "limit"),
        ("/v1/billing/ledger", {"since": "2025-01-02", "until": "2025-01-01"}, "until"),
        ("/v1/billing/ledger", {"until": "2025-01-01T00:00:00"}, "until"),
        ("/v1/exports/billing-ledger", {"format": "xml"}, "format"),
        ("/v1/billing/invoices/2025-13", {}, "month"),
        ("/v1/billing/invoices/9999-01", {}, "month"),
        ("/v1/billing/invoices/2025-01", {"format": "pdf"}, "format"),
    ],
)
def test_bad_input_is_a_400_naming_the_parameter(
    tenant: TenantCtx, path: str, params: dict[str, str], param: str
) -> None:
    assert error_of(tenant.http.get(path, params=params), 400)["param"] == param


def test_prices_take_new_fields_and_schedule_versions(admin: httpx.Client, tenant: TenantCtx) -> None:
    model = f"org/billing-{time.time_ns()}"
    first = admin.put(
        f"/v1/prices/{model}", json={"prompt_micros_per_mtok": 100, "completion_micros_per_mtok": 200}
    )
    assert first.status_code == 200, first.text
    assert (
        first.json()["cached_micros_per_mtok"],
        first.json()["call_micros"],
        first.json()["in_force"],
    ) == (100, 0, True)
    future = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0)
    scheduled = admin.put(
        f"/v1/prices/{model}",
        json={
            "prompt_micros_per_mtok": 300,
            "cached_micros_per_mtok": 30,
            "call_micros": 5,
            "effective_from": future.isoformat(),
        },
    )
    assert scheduled.status_code == 200, scheduled.text
    assert (scheduled.json()["version"], scheduled.json()["in_force"]) == (2, False)
    assert datetime.fromisoformat(scheduled.json()["effective_from"]) == future
    versions = tenant.http.get(f"/v1/prices/{model}/versions").json()["data"]
    assert [(v["version"], v["in_force"]) for v in versions] == [(2, False), (1, True)]
    listed = {p["model"]: p for p in tenant.http.get("/v1/prices").json()["data"]}
    assert listed[model]["version"] == 1  # the one in force now
    back = admin.put(
        f"/v1/prices/{model}", json={"prompt_micros_per_mtok": 1, "effective_from": "2020-01-01T00:00:00Z"}
    )
    assert error_of(back, 400)["param"] == "effective_from"
    tool = admin.put("/v1/prices/tool:calculator", json={"call_micros": 100})
    assert tool.status_code == 200, tool.text
    assert error_of(admin.put("/v1/prices/tool:calculator", json={"prompt_micros_per_mtok": 1}), 400)[
        "param"
    ] == ("prompt_micros_per_mtok")
