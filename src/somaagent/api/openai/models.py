"""`GET /v1/models` and `GET /v1/models/{id}`: what the caller's tenant may use, profiles included."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter
from starlette.responses import Response

from somaagent.api.deps import ChatUseDep, ServicesDep
from somaagent.api.openai.docs import ModelListOut, ModelOut, error_responses
from somaagent.api.services import Services
from somaagent.core.errors import NotFound
from somaagent.core.principal import Principal
from somaagent.models.catalog import PROFILE_PREFIX

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])


async def _visible_models(services: Services, principal: Principal) -> list[dict[str, Any]]:
    created = services.started_at
    models = [
        {"id": e.spec.id, "object": "model", "created": created, "owned_by": _owner(e.spec.provider)}
        for e in services.catalog.visible(principal)
    ]
    for role in sorted(await services.profiles.for_tenant(principal.tenant_id)):
        models.append(
            {
                "id": PROFILE_PREFIX + role,
                "object": "model",
                "created": created,
                "owned_by": "somaagent-profile",
            }
        )
    return models


def _owner(provider: str) -> str:
    return "somaagent" if provider in ("llamacpp", "minilm") else "upstream"


@router.get("/models", response_model=ModelListOut, responses=error_responses(401), summary="List models")
async def list_models(principal: ChatUseDep, services: ServicesDep) -> Response:
    payload = {"object": "list", "data": await _visible_models(services, principal)}
    return Response(orjson.dumps(payload), media_type="application/json")


@router.get(
    "/models/{model_id:path}",
    response_model=ModelOut,
    responses=error_responses(401, 404),
    summary="Get a model",
)
async def retrieve_model(model_id: str, principal: ChatUseDep, services: ServicesDep) -> Response:
    models = await _visible_models(services, principal)
    for model in models:
        if model["id"] == model_id:
            return Response(orjson.dumps(model), media_type="application/json")
    available = ", ".join(m["id"] for m in models)
    raise NotFound(
        f"The model {model_id!r} does not exist or you do not have access to it. "
        f"Available models: {available}",
        param="model",
        code="model_not_found",
    )
