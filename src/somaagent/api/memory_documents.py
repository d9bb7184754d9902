"""`/v1/memory/documents`: upload a document (JSON or multipart) to be chunked into memories in the
background, follow its progress, list and delete it — scoped to the caller's tenant."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.datastructures import UploadFile

from somaagent.api.deps import MemoryReadDep, MemoryWriteDep, ServicesDep, SessionDep
from somaagent.api.openai.docs import error_responses
from somaagent.config import Settings
from somaagent.core.errors import InvalidRequest
from somaagent.memory.chunking import TokenCounter, approximate_counter, wordpiece_counter
from somaagent.memory.document_worker import DocumentWorker, UsageSink
from somaagent.memory.documents import DocumentIngest, DocumentSettings, Upload
from somaagent.memory.extraction import MEDIA_TYPES, decode_base64, media_type_of
from somaagent.memory.schemas import DocumentDeletedOut, DocumentIn, DocumentListOut, DocumentOut
from somaagent.memory.service import DEFAULT_NAMESPACE, Embed, MemoryService, Screen
from somaagent.observability.context import current_request_id

router = APIRouter(prefix="/v1/memory/documents", tags=["Memory"])
Namespace = Annotated[str, Query(description="Namespace, e.g. 'default' or 'user:alice'.")]

_FORM = {
    "type": "object",
    "required": ["file"],
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "The document."},
        "name": {"type": "string", "description": "Default: the file name."},
        "media_type": {
            "type": "string",
            "enum": list(MEDIA_TYPES),
            "description": "Default: the part's Content-Type, else from the extension (.txt .md .pdf).",
        },
        "namespace": {"type": "string", "default": DEFAULT_NAMESPACE},
        "metadata": {"type": "string", "description": "A JSON object copied onto every chunk."},
    },
}
_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": DocumentIn.model_json_schema()},  # no route takes it as a body
            "multipart/form-data": {"schema": _FORM},
        },
    }
}


def build_documents(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    memory: MemoryService,
    embed: Embed,
    on_usage: UsageSink,
    screen: Screen | None = None,
) -> tuple[DocumentIngest, DocumentWorker]:
    """The document service and this process's worker, whose embedding calls go to `on_usage`."""
    document_settings = DocumentSettings(
        chunk_tokens=settings.memory_chunk_tokens,
        overlap_tokens=settings.memory_chunk_overlap_tokens,
        max_bytes=settings.memory_document_max_bytes,
        batch=settings.memory_document_batch,
        lease_s=settings.memory_document_lease_s,
        poll_s=settings.memory_document_poll_s,
    )
    count = _token_counter(settings)
    worker = DocumentWorker(sessions, embed, memory, document_settings, count, on_usage=on_usage)
    return DocumentIngest(document_settings, count, screen), worker


def _token_counter(settings: Settings) -> TokenCounter:
    """The memory embedding model's own tokenizer where we have it, else a conservative estimate."""
    spec = next((s for s in settings.catalog if s.id == settings.memory_embedding_model), None)
    if spec is None or spec.provider != "minilm":
        return approximate_counter
    path = spec.path

    def model_dir() -> Path:
        from somaagent.models.providers.minilm import find_model_dir

        return Path(path) if path else find_model_dir()

    return wordpiece_counter(model_dir)


@router.post(
    "",
    response_model=DocumentOut,
    status_code=202,
    responses=error_responses(400, 401, 413),
    openapi_extra=_REQUEST_BODY,
    summary="Upload a document to be chunked into memories",
)
async def create_document(
    request: Request, principal: MemoryWriteDep, services: ServicesDep, session: SessionDep
) -> DocumentOut:
    """JSON (`DocumentIn`) or multipart (`file` plus form fields). Extraction happens now, so a bad
    document is a 400 and nothing is stored; chunks are indexed in the background (poll `GET`)."""
    upload = await _upload_of(request)
    document = await services.documents.submit(session, principal, upload, current_request_id() or "")
    await session.commit()
    services.document_worker.wake()
    return DocumentOut.of(document)


@router.get("", response_model=DocumentListOut, responses=error_responses(400, 401))
async def list_documents(
    principal: MemoryReadDep,
    services: ServicesDep,
    session: SessionDep,
    namespace: Namespace = DEFAULT_NAMESPACE,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(description="Return documents after this id (paging).")] = None,
) -> DocumentListOut:
    rows = await services.documents.list_documents(session, principal, namespace, limit + 1, after)
    return DocumentListOut(data=[DocumentOut.of(r) for r in rows[:limit]], has_more=len(rows) > limit)


@router.get("/{document_id}", response_model=DocumentOut, responses=error_responses(401, 404))
async def get_document(
    document_id: str, principal: MemoryReadDep, services: ServicesDep, session: SessionDep
) -> DocumentOut:
    return DocumentOut.of(await services.documents.get(session, principal, document_id))


@router.delete("/{document_id}", response_model=DocumentDeletedOut, responses=error_responses(401, 404))
async def delete_document(
    document_id: str, principal: MemoryWriteDep, services: ServicesDep, session: SessionDep
) -> DocumentDeletedOut:
    """Delete the document and its chunk memories (also while it is still being indexed)."""
    document, removed = await services.documents.delete(session, principal, document_id)
    await session.commit()
    return DocumentDeletedOut(**DocumentOut.of(document).model_dump(), chunks_deleted=removed)


async def _upload_of(request: Request) -> Upload:
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind == "multipart/form-data":
        return await _from_form(request)
    if kind not in ("application/json", ""):
        raise InvalidRequest(
            f"send the document as application/json or multipart/form-data, not {kind!r}",
            code="unsupported_media_type",
        )
    try:
        body = DocumentIn.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from exc
    if (body.text is None) == (body.content_base64 is None):
        raise InvalidRequest("send the document as exactly one of `text` or `content_base64`", param="text")
    if body.text is not None:
        if body.media_type == "application/pdf":
            raise InvalidRequest("a PDF's bytes are not text: send it as content_base64", param="text")
        content, source = body.text.encode("utf-8"), "text"
    else:
        content, source = decode_base64(body.content_base64 or ""), "content_base64"
    return Upload(body.name, body.media_type, content, body.namespace, body.metadata, source)


async def _from_form(request: Request) -> Upload:
    async with request.form(max_files=1, max_fields=10) as form:
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise InvalidRequest("the multipart body needs the document as a `file` part", param="file")
        fields = {key: value for key, value in form.items() if isinstance(value, str)}
        content = await file.read()
        media_type = media_type_of(
            fields.get("media_type") or file.content_type, None if fields.get("media_type") else file.filename
        )
        name = fields.get("name") or file.filename or ""
    return Upload(
        name,
        media_type,
        content,
        fields.get("namespace") or DEFAULT_NAMESPACE,
        _metadata_field(fields.get("metadata")),
        "file",
    )


def _metadata_field(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"metadata is not valid JSON: {exc}", param="metadata") from exc
    if not isinstance(value, dict):
        raise InvalidRequest("metadata must be a JSON object", param="metadata")
    return value
