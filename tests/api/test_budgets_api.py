"""`/v1/budgets`, `/v1/rate-limits` and `/v1/prices` over HTTP on a real server (SQLite and PostgreSQL):
CRUD, 400s naming the parameter, capabilities, 404s across tenants, and prices only operators set."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from tests.conftest import TenantCtx
from tests.support.contract import error_of


def key_with_role(admin: httpx.Client, tenant: TenantCtx, role: str) -> httpx.Client:
    created = admin.post("/v1/keys", json={"tenant": tenant.name, "name": role, "role": role})
    assert created.status_code == 201, created.text
    return httpx.Client(
        base_url=str(admin.base_url), headers={"authorization": f"Bearer {created.json()['key']}"}, timeout=60
    )


def service_user(tenant: TenantCtx) -> str:
    created = tenant.http.post(
        "/v1/users", json={"username": f"svc-{secrets.token_hex(3)}", "kind": "service"}
    )
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def test_budget_crud_with_current_spend(tenant: TenantCtx) -> None:
    created = tenant.http.post(
        "/v1/budgets",
        json={"scope": "key", "scope_id": tenant.key_id, "unit": "tokens", "limit": 5000, "period": "day"},
    )
    assert created.status_code == 201, created.text
    budget: dict[str, Any] = created.json()
    assert budget["object"] == "budget"
    assert budget["id"].startswith("bud_")
    assert (budget["tenant_id"], budget["scope"], budget["scope_id"]) == (tenant.id, "key", tenant.key_id)
    assert (budget["spent"], budget["reserved"], budget["remaining"]) == (0, 0, 5000)
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    assert datetime.fromisoformat(budget["period_start"]) == today
    assert datetime.fromisoformat(budget["resets_at"]) == today + timedelta(days=1)

    whole = tenant.http.post(
        "/v1/budgets", json={"scope": "tenant", "unit": "usd", "limit": 2_000_000, "period": "total"}
    )
    assert whole.status_code == 201, whole.text
    assert whole.json()["scope_id"] == tenant.id  # the caller's tenant by default
    assert whole.json()["resets_at"] is None

    listed = tenant.http.get("/v1/budgets")
    assert listed.status_code == 200, listed.text
    assert [b["id"] for b in listed.json()["data"]] == [whole.json()["id"], budget["id"]]  # tenant first

    assert tenant.http.get(f"/v1/budgets/{budget['id']}").json()["limit"] == 5000
    patched = tenant.http.patch(f"/v1/budgets/{budget['id']}", json={"limit": 7000})
    assert patched.status_code == 200, patched.text
    assert (patched.json()["limit"], patched.json()["remaining"]) == (7000, 7000)

    deleted = tenant.http.delete(f"/v1/budgets/{budget['id']}")
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["id"] == budget["id"]
    error_of(tenant.http.get(f"/v1/budgets/{budget['id']}"), 404)
    assert [b["id"] for b in tenant.http.get("/v1/budgets").json()["data"]] == [whole.json()["id"]]


def test_budget_input_errors_name_the_parameter(tenant: TenantCtx) -> None:
    good = {"scope": "tenant", "unit": "tokens", "limit": 10, "period": "month"}
    for change, param in (
        ({"unit": "euros"}, "unit"),
        ({"period": "week"}, "period"),
        ({"scope": "team"}, "scope"),
        ({"limit": -1}, "limit"),
        ({"limit": 2**60}, "limit"),
        ({"colour": "red"}, "colour"),
    ):
        error = error_of(tenant.http.post("/v1/budgets", json={**good, **change}), 400)
        assert error["param"] == param, error
    missing = error_of(tenant.http.post("/v1/budgets", json={"scope": "tenant", "unit": "tokens"}), 400)
    assert missing["code"] == "missing_required_parameter"
    assert tenant.http.post("/v1/budgets", json=good).status_code == 201
    duplicate = error_of(tenant.http.post("/v1/budgets", json=good), 409)
    assert duplicate["code"] == "budget_exists"
    budget_id = tenant.http.get("/v1/budgets").json()["data"][0]["id"]
    error_of(tenant.http.patch(f"/v1/budgets/{budget_id}", json={"limit": "lots"}), 400)
    error_of(tenant.http.patch(f"/v1/budgets/{budget_id}", json={"period": "day"}), 400)


def test_reading_needs_billing_read_and_changing_needs_policy_admin(
    admin: httpx.Client, tenant: TenantCtx
) -> None:
    made = tenant.http.post(
        "/v1/budgets", json={"scope": "tenant", "unit": "tokens", "limit": 10, "period": "day"}
    )
    assert made.status_code == 201
    with key_with_role(admin, tenant, "viewer") as viewer:
        assert viewer.get("/v1/budgets").status_code == 200
        assert viewer.get(f"/v1/budgets/{made.json()['id']}").status_code == 200
        assert viewer.get("/v1/prices").status_code == 200
        body = {"scope": "tenant", "unit": "usd", "limit": 10, "period": "day"}
        assert error_of(viewer.post("/v1/budgets", json=body), 403)["code"] == "missing_capability"
        error_of(viewer.patch(f"/v1/budgets/{made.json()['id']}", json={"limit": 1}), 403)
        error_of(viewer.delete(f"/v1/budgets/{made.json()['id']}"), 403)
        error_of(viewer.get("/v1/rate-limits"), 403)
        error_of(viewer.put(f"/v1/rate-limits/tenant/{tenant.id}", json={"rpm": 1}), 403)


def test_other_tenants_budgets_users_and_keys_do_not_exist(new_tenant: Callable[..., TenantCtx]) -> None:
    owner, stranger = new_tenant(), new_tenant()
    user_id = service_user(owner)
    made = owner.http.post(
        "/v1/budgets",
        json={"scope": "user", "scope_id": user_id, "unit": "tokens", "limit": 10, "period": "day"},
    )
    assert made.status_code == 201, made.text
    budget_id = made.json()["id"]
    error_of(stranger.http.get(f"/v1/budgets/{budget_id}"), 404)
    error_of(stranger.http.patch(f"/v1/budgets/{budget_id}", json={"limit": 10**6}), 404)
    error_of(stranger.http.delete(f"/v1/budgets/{budget_id}"), 404)
    assert stranger.http.get("/v1/budgets").json()["data"] == []
    for scope, scope_id in (
        ("user", user_id),
        ("key", owner.key_id),
        ("tenant", owner.id),
        ("tenant", owner.name),
    ):
        body = {"scope": scope, "scope_id": scope_id, "unit": "tokens", "limit": 1, "period": "day"}
        assert error_of(stranger.http.post("/v1/budgets", json=body), 404)["param"] == "scope_id"
        error_of(stranger.http.put(f"/v1/rate-limits/{scope}/{scope_id}", json={"rpm": 1}), 404)
        error_of(stranger.http.delete(f"/v1/rate-limits/{scope}/{scope_id}"), 404)
    # An unknown id is the same 404 as another tenant's.
    error_of(stranger.http.put("/v1/rate-limits/key/key_doesnotexist", json={"rpm": 1}), 404)
    # The owner's settings are untouched.
    assert owner.http.get(f"/v1/budgets/{budget_id}").json()["limit"] == 10


def test_rate_limit_settings(tenant: TenantCtx) -> None:
    put = tenant.http.put(f"/v1/rate-limits/key/{tenant.key_id}", json={"rpm": 60, "tpm": 10_000})
    assert put.status_code == 200, put.text
    assert put.json() | {"updated_at": None} == {
        "object": "rate_limit",
        "tenant_id": tenant.id,
        "scope": "key",
        "scope_id": tenant.key_id,
        "rpm": 60,
        "tpm": 10_000,
        "concurrent": None,
        "updated_at": None,
    }
    by_name = tenant.http.put(f"/v1/rate-limits/tenant/{tenant.name}", json={"concurrent": 4})
    assert by_name.status_code == 200, by_name.text
    assert by_name.json()["scope_id"] == tenant.id  # a tenant named by name is stored by id
    replaced = tenant.http.put(f"/v1/rate-limits/key/{tenant.key_id}", json={"rpm": 30})
    assert (replaced.json()["rpm"], replaced.json()["tpm"]) == (30, None)  # PUT replaces the whole row

    listed = tenant.http.get("/v1/rate-limits")
    assert listed.status_code == 200, listed.text
    assert [(r["scope"], r["scope_id"]) for r in listed.json()["data"]] == [
        ("tenant", tenant.id),
        ("key", tenant.key_id),
    ]
    assert isinstance(listed.json()["defaults"], dict)
    assert tenant.http.get(f"/v1/rate-limits/key/{tenant.key_id}").json()["rpm"] == 30

    for body, param in (({"rpm": 0}, "rpm"), ({"tpm": -5}, "tpm"), ({"burst": 3}, "burst")):
        assert (
            error_of(tenant.http.put(f"/v1/rate-limits/key/{tenant.key_id}", json=body), 400)["param"]
            == param
        )
    error_of(tenant.http.put(f"/v1/rate-limits/team/{tenant.id}", json={"rpm": 1}), 400)

    assert tenant.http.delete(f"/v1/rate-limits/key/{tenant.key_id}").status_code == 200
    gone = error_of(tenant.http.delete(f"/v1/rate-limits/key/{tenant.key_id}"), 404)
    assert "defaults apply" in gone["message"]


def test_only_operators_set_prices(admin: httpx.Client, tenant: TenantCtx) -> None:
    model = f"org/model-{secrets.token_hex(3)}"  # ids with a slash work
    body = {"prompt_micros_per_mtok": 150_000, "completion_micros_per_mtok": 600_000}
    assert error_of(tenant.http.put(f"/v1/prices/{model}", json=body), 403)["code"] == "missing_capability"
    first = admin.put(f"/v1/prices/{model}", json=body)
    assert first.status_code == 200, first.text
    assert (first.json()["model"], first.json()["version"]) == (model, 1)
    second = admin.put(f"/v1/prices/{model}", json={**body, "completion_micros_per_mtok": 700_000})
    assert second.json()["version"] == 2
    listed = {p["model"]: p for p in tenant.http.get("/v1/prices").json()["data"]}
    assert (listed[model]["version"], listed[model]["completion_micros_per_mtok"]) == (2, 700_000)
    versions = tenant.http.get(f"/v1/prices/{model}").json()["data"]
    assert [v["version"] for v in versions] == [2, 1]
    error_of(tenant.http.get(f"/v1/prices/{model}-unpriced"), 404)
    assert error_of(admin.put(f"/v1/prices/{model}", json={**body, "prompt_micros_per_mtok": -1}), 400)[
        "param"
    ] == ("prompt_micros_per_mtok")


def test_a_budget_counts_exactly_what_the_calls_used(tenant: TenantCtx) -> None:
    made = tenant.http.post(
        "/v1/budgets",
        json={"scope": "key", "scope_id": tenant.key_id, "unit": "tokens", "limit": 10_000, "period": "day"},
    )
    assert made.status_code == 201, made.text
    used = 0
    for question in ("Say hello.", "Name a colour."):
        answer = tenant.oai.chat.completions.create(
            model="smollm2-135m-instruct", messages=[{"role": "user", "content": question}], max_tokens=4
        )
        assert answer.usage is not None
        used += answer.usage.total_tokens
    budget = tenant.http.get(f"/v1/budgets/{made.json()['id']}").json()
    assert (budget["spent"], budget["reserved"], budget["remaining"]) == (used, 0, 10_000 - used)
    # A limit below what one call may need refuses the next call with 402, naming the budget.
    assert tenant.http.patch(f"/v1/budgets/{made.json()['id']}", json={"limit": used + 3}).status_code == 200
    refused = tenant.http.post(
        "/v1/chat/completions",
        json={
            "model": "smollm2-135m-instruct",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4,
        },
    )
    assert refused.status_code == 402, refused.text
    error = refused.json()["error"]
    assert error["code"] == "budget_exceeded"
    assert error["budget"]["id"] == made.json()["id"]
    assert error["budget"]["spent"] == used
    assert f"budget {made.json()['id']} (key {tenant.key_id}, tokens per day)" in error["message"]
    assert int(refused.headers["retry-after"]) > 0
