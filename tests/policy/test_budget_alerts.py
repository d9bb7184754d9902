"""Budget alerts: a budget whose spend reaches 80 % and then 100 % of its limit tells the tenant's admins,
once per threshold and period (the server checks every 0.5 s here)."""

from __future__ import annotations

import time
from typing import Any

from tests.conftest import TenantCtx
from tests.identity.test_login import make_user
from tests.identity.test_security_notices import notices, sign_in
from tests.support.processes import SomaServer


def wait_for(server: SomaServer, token: str, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 15
    found = notices(server, token, "budget.threshold")
    while len(found) < count and time.monotonic() < deadline:
        time.sleep(0.3)
        found = notices(server, token, "budget.threshold")
    return found


def test_budgets_alert_admins_at_80_and_100_percent(server: SomaServer, tenant: TenantCtx) -> None:
    admin = make_user(tenant, role="admin")
    token = sign_in(server, tenant, admin["username"], "198.51.100.30")
    created = tenant.http.post(
        "/v1/budgets",
        json={"scope": "key", "scope_id": tenant.key_id, "unit": "tokens", "limit": 10**6, "period": "day"},
    )
    assert created.status_code == 201, created.text
    budget = created.json()
    tenant.oai.embeddings.create(model="all-minilm-l6-v2", input=["budgets are watched as they fill"] * 4)
    spent = tenant.http.get(f"/v1/budgets/{budget['id']}").json()["spent"]
    assert spent > 0
    time.sleep(1.5)
    assert wait_for(server, token, 0) == []  # far below 80 %: nothing to say

    limit = spent * 100 // 85  # now about 85 % used
    assert tenant.http.patch(f"/v1/budgets/{budget['id']}", json={"limit": limit}).status_code == 200
    [warning] = wait_for(server, token, 1)
    assert warning["severity"] == "warning"
    assert warning["metadata"]["budget_id"] == budget["id"] and warning["metadata"]["threshold"] == 80

    assert tenant.http.patch(f"/v1/budgets/{budget['id']}", json={"limit": spent}).status_code == 200
    found = wait_for(server, token, 2)
    assert sorted(n["metadata"]["threshold"] for n in found) == [80, 100]
    critical = next(n for n in found if n["metadata"]["threshold"] == 100)
    assert critical["severity"] == "critical" and str(spent) in critical["message"].replace(",", "")
    time.sleep(1.5)  # later passes see the same crossings and say nothing more
    assert len(notices(server, token, "budget.threshold")) == 2
