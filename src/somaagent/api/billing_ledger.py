"""`/v1/billing/ledger` (entries, filtered and paged) and `/v1/billing/corrections` (operators only):
`billing:read` to read, tenant-scoped; operators name a tenant with `?tenant=`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from somaagent.api.billing_params import acting_tenant, parse_range
from somaagent.api.deps import BillingReadDep, OperatorDep, ServicesDep, SessionDep
from somaagent.api.openai.docs import error_responses
from somaagent.billing.corrections import MAX_AMOUNT, MAX_REASON, post_correction
from somaagent.billing.ledger import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    LedgerFilter,
    decode_cursor,
    get_entry,
    list_entries,
)
from somaagent.billing.money import usd
from somaagent.billing.tables import LedgerEntry

router = APIRouter(prefix="/v1/billing", tags=["Billing"])


class LedgerEntryOut(BaseModel):
    """One ledger entry: a model call, a tool call, or a correction of an earlier entry."""

    object: Literal["billing.ledger_entry"] = "billing.ledger_entry"
    id: str
    tenant_id: str
    occurred_at: datetime
    recorded_at: datetime
    kind: Literal["model", "tool", "correction"]
    item: str = Field(description="The model id or tool name.")
    status: str = Field(description="`ok` or the call's error code.")
    request_id: str | None
    source_event_id: str | None = Field(description="The event billed (idempotency key).")
    key_id: str | None
    subject: str | None = Field(description="Who called: `key:…`, `user:…`, `oidc:…`.")
    user_id: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = Field(description="Part of `prompt_tokens` served from a prompt cache.")
    quantity: int = Field(description="Calls billed (0 for a correction).")
    amount_micros: int = Field(description="Micro-USD (1 USD = 1000000); signed for corrections.")
    amount_usd: str = Field(description="The same amount as an exact decimal string.")
    priced: bool = Field(description="False when no price was in force: usage recorded at 0.")
    price_version: int | None
    corrects: str | None = Field(description="For a correction: the entry it corrects.")
    reason: str | None
    recorded_by: str | None

    @classmethod
    def of(cls, entry: LedgerEntry) -> LedgerEntryOut:
        return cls(
            id=entry.id,
            tenant_id=entry.tenant_id,
            occurred_at=entry.occurred_at,
            recorded_at=entry.recorded_at,
            kind=entry.kind,
            item=entry.item,
            status=entry.status,
            request_id=entry.request_id,
            source_event_id=entry.source_event_id,
            key_id=entry.key_id,
            subject=entry.subject,
            user_id=entry.user_id,
            prompt_tokens=entry.prompt_tokens,
            completion_tokens=entry.completion_tokens,
            cached_tokens=entry.cached_tokens,
            quantity=entry.quantity,
            amount_micros=entry.amount_micros,
            amount_usd=usd(entry.amount_micros),
            priced=entry.priced,
            price_version=entry.price_version,
            corrects=entry.corrects,
            reason=entry.reason,
            recorded_by=entry.recorded_by,
        )


class LedgerListOut(BaseModel):
    object: Literal["list"] = "list"
    data: list[LedgerEntryOut]
    has_more: bool
    next_after: str | None


class CorrectionIn(BaseModel):
    """A correction: a new ledger entry adding `amount_micros` (negative: a credit) to an entry."""

    model_config = ConfigDict(extra="forbid")

    tenant: str | None = Field(default=None, max_length=63, description="Tenant id or name of the entry.")
    entry_id: str = Field(min_length=1, max_length=40)
    amount_micros: int = Field(ge=-MAX_AMOUNT, le=MAX_AMOUNT, description="Signed micro-USD, not 0.")
    reason: str = Field(min_length=1, max_length=MAX_REASON)
    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="Sending the same key again returns the first correction instead of adding another.",
    )


TenantQuery = Annotated[
    str | None, Query(max_length=63, description="Tenant id or name (operators: any; others: their own).")
]


@router.get("/ledger", response_model=LedgerListOut, responses=error_responses(400, 401, 404))
async def read_ledger(
    principal: BillingReadDep,
    services: ServicesDep,
    session: SessionDep,
    tenant: TenantQuery = None,
    since: Annotated[str | None, Query(description="RFC 3339 or YYYY-MM-DD; entries at or after.")] = None,
    until: Annotated[str | None, Query(description="RFC 3339 or YYYY-MM-DD; entries before.")] = None,
    model: Annotated[
        str | None, Query(min_length=1, max_length=160, description="Model id or tool name.")
    ] = None,
    kind: Annotated[str | None, Query(description="`model`, `tool` or `correction`.")] = None,
    key_id: Annotated[str | None, Query(min_length=1, max_length=40)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    after: Annotated[str | None, Query(min_length=1, max_length=200, description="`next_after`.")] = None,
) -> LedgerListOut:
    """The tenant's ledger entries, oldest first (by time, then id). A call appears within about a second."""
    start, end = parse_range(since, until)
    cursor = decode_cursor(after) if after is not None else None
    acting = await acting_tenant(session, principal, tenant)
    await services.catch_up()
    where = LedgerFilter(acting.tenant_id, start, end, model, kind, key_id)
    page = await list_entries(session, where, limit, cursor)
    return LedgerListOut(
        data=[LedgerEntryOut.of(e) for e in page.entries], has_more=page.has_more, next_after=page.next_after
    )


@router.get("/ledger/{entry_id}", response_model=LedgerEntryOut, responses=error_responses(401, 404))
async def read_entry(
    entry_id: str, principal: BillingReadDep, session: SessionDep, tenant: TenantQuery = None
) -> LedgerEntryOut:
    """One ledger entry of the tenant."""
    acting = await acting_tenant(session, principal, tenant)
    return LedgerEntryOut.of(await get_entry(session, acting.tenant_id, entry_id))


@router.post(
    "/corrections", response_model=LedgerEntryOut, status_code=201, responses=error_responses(400, 401, 404)
)
async def create_correction(
    body: CorrectionIn, principal: OperatorDep, services: ServicesDep, session: SessionDep
) -> Response | LedgerEntryOut:
    """Correct an entry by a signed amount (a new entry; the original never changes), audited. A repeated
    `idempotency_key` answers 200 with the first correction."""
    acting = await acting_tenant(session, principal, body.tenant)
    entry, created = await post_correction(
        session,
        principal.subject,
        acting.tenant_id,
        body.entry_id,
        body.amount_micros,
        body.reason,
        body.idempotency_key,
    )
    await session.commit()
    services.relay.poke()
    out = LedgerEntryOut.of(entry)
    if created:
        return out
    return Response(out.model_dump_json(), status_code=200, media_type="application/json")
