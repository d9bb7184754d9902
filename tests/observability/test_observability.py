"""Health, readiness, Prometheus metrics, request ids and JSON logs of a running server."""

from __future__ import annotations

import json

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TenantCtx
from tests.support.processes import SomaServer

MODEL = "smollm2-135m-instruct"


def test_healthz_and_readyz(server: SomaServer) -> None:
    assert httpx.get(f"{server.base_url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server.base_url}/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready"
    assert body["checks"]["database"] == "ok"
    assert body["checks"][f"model:{MODEL}"] == "ok"
    assert body["checks"]["model:all-minilm-l6-v2"] == "ok"


def test_metrics_exposition_parses_and_counts_what_happened(server: SomaServer, tenant: TenantCtx) -> None:
    tenant.oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
    )
    tenant.http.get("/v1/models")
    text = httpx.get(f"{server.base_url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = families["soma_http_requests"]
    routes = {(s.labels["route"], s.labels["status"]) for s in requests.samples}
    assert ("/v1/chat/completions", "200") in routes
    assert ("/v1/models", "200") in routes
    assert all(not r.startswith("/v1/models/") or r == "/v1/models/{model_id:path}" for r, _ in routes)
    tokens = {(s.labels["model"], s.labels["kind"]): s.value for s in families["soma_model_tokens"].samples}
    assert tokens[(MODEL, "completion")] >= 3
    assert tokens[(MODEL, "prompt")] > 0
    latency = [s for s in families["soma_model_latency_seconds"].samples if s.name.endswith("_count")]
    assert any(s.labels["model"] == MODEL and s.labels["outcome"] == "ok" and s.value >= 1 for s in latency)
    queue = {s.labels["model"]: s.value for s in families["soma_model_queue_depth"].samples}
    assert queue[MODEL] == 0
    assert "soma_http_request_duration_seconds" in families


def test_every_response_has_a_request_id_and_a_given_one_is_kept(
    server: SomaServer, tenant: TenantCtx
) -> None:
    for response in (
        tenant.http.get("/v1/models"),
        httpx.get(f"{server.v1}/models"),  # 401
        tenant.http.get("/nowhere"),  # 404
        tenant.http.post("/v1/chat/completions", content=b"{"),  # 400
        httpx.get(f"{server.base_url}/healthz"),
    ):
        assert response.headers["x-request-id"].startswith("req_"), response.url
    echoed = tenant.http.get("/v1/models", headers={"x-request-id": "trace-abc.123"})
    assert echoed.headers["x-request-id"] == "trace-abc.123"
    unsafe = tenant.http.get("/v1/models", headers={"x-request-id": "bad id\twith junk"})
    assert unsafe.headers["x-request-id"].startswith("req_")


def test_logs_are_json_lines_with_request_ids_and_no_secrets(server: SomaServer, tenant: TenantCtx) -> None:
    marker = "req-log-check-42"
    tenant.http.get("/v1/models", headers={"x-request-id": marker})
    lines = [json.loads(line) for line in server.logs().splitlines() if line.startswith("{")]
    assert lines, "the server wrote no JSON log lines"
    access = [entry for entry in lines if entry.get("request_id") == marker]
    assert access and access[0]["logger"] == "somaagent.access"
    assert access[0]["route"] == "/v1/models" and access[0]["status"] == 200
    text = server.logs()
    assert tenant.key not in text
    assert server.admin_key not in text
