"""Metering wraps every model call: a `model.usage` event and token/latency metrics."""

from __future__ import annotations

from somaagent.api.services import Services
from somaagent.core.principal import Principal
from somaagent.events.schemas import MODEL_USAGE, Event
from somaagent.models.messages import Usage


def record_model_call(
    services: Services,
    principal: Principal,
    request_id: str,
    model: str,
    kind: str,
    usage: Usage | None,
    latency_s: float,
    status: str,
) -> None:
    """Emit `model.usage` {request_id, tenant_id, key_id, user_id, model, tokens, latency_ms, status}."""
    prompt = usage.prompt_tokens if usage else 0
    completion = usage.completion_tokens if usage else 0
    services.emitter.emit(
        Event(
            topic=MODEL_USAGE,
            type="model.usage",
            tenant_id=principal.tenant_id,
            actor=principal.subject,
            data={
                "request_id": request_id,
                "tenant_id": principal.tenant_id,
                "key_id": principal.key_id,
                "user_id": principal.user_id,  # the person behind a token; billing groups by it
                "model": model,
                "kind": kind,
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "cached_tokens": 0,  # no provider here reports prompt-cache hits yet
                "latency_ms": round(latency_s * 1000),
                "status": status,
            },
        )
    )
    services.metrics.events_emitted.labels(MODEL_USAGE).inc()
    services.metrics.count_tokens(model, prompt, completion)
