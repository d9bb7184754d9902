"""`POST /v1/embeddings`: a string or a list of strings → vectors, float or base64."""

from __future__ import annotations

import time

import orjson
from fastapi import APIRouter
from starlette.responses import Response

from somaagent.api.deps import InferenceDep, ServicesDep
from somaagent.api.metering import record_model_call
from somaagent.api.openai.docs import EmbeddingListOut, error_responses
from somaagent.api.openai.render import completion_id, embeddings_json
from somaagent.api.openai.schemas import EmbeddingRequest
from somaagent.core.errors import InvalidRequest, NotFound, SomaError
from somaagent.models.messages import Usage
from somaagent.observability.context import current_request_id

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])


@router.post(
    "/embeddings",
    response_model=EmbeddingListOut,
    responses=error_responses(400, 401, 404, 413, 423, 502, 503),
    summary="Create embeddings (OpenAI-compatible)",
)
async def create_embeddings(
    body: EmbeddingRequest, principal: InferenceDep, services: ServicesDep
) -> Response:
    request_id = current_request_id() or completion_id()
    started = time.perf_counter()
    try:
        result = await services.router.embed(principal, body.model, body.texts())
    except SomaError as exc:
        if not isinstance(exc, NotFound | InvalidRequest):
            record_model_call(
                services,
                principal,
                request_id,
                body.model,
                "embedding",
                None,
                time.perf_counter() - started,
                exc.code,
            )
        raise
    dimensions = len(result.vectors[0]) if result.vectors else 0
    if body.dimensions is not None and body.dimensions > dimensions:
        raise InvalidRequest(
            f"'dimensions' = {body.dimensions} is larger than the model's {dimensions}", param="dimensions"
        )
    record_model_call(
        services,
        principal,
        request_id,
        result.model,
        "embedding",
        Usage(result.prompt_tokens, 0),
        time.perf_counter() - started,
        "ok",
    )
    payload = embeddings_json(result, body.encoding_format, body.dimensions)
    return Response(orjson.dumps(payload), media_type="application/json")
