"""Billing reports, all from the rollups or streamed in keyset batches: `GET /v1/billing/summary`,
`GET /v1/billing/invoices/{YYYY-MM}` (JSON or printable HTML) and `GET /v1/exports/billing-ledger`
(JSON or CSV). `billing:read`, tenant-scoped; operators name a tenant with `?tenant=`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from somaagent.api.billing_ledger import LedgerEntryOut, TenantQuery
from somaagent.api.billing_params import acting_tenant, parse_range
from somaagent.api.deps import BillingReadDep, ServicesDep, SessionDep
from somaagent.api.openai.docs import error_responses
from somaagent.billing.export import FORMATS, export_chunks
from somaagent.billing.invoices import Invoice, build_invoice, invoice_html
from somaagent.billing.ledger import LedgerFilter
from somaagent.billing.money import usd
from somaagent.billing.summary import GROUPS, Totals, summarize
from somaagent.core.clock import utcnow
from somaagent.core.errors import InvalidRequest

router = APIRouter(tags=["Billing"])


class TotalsOut(BaseModel):
    entries: int = Field(description="Ledger entries, corrections included.")
    requests: int = Field(description="Calls billed.")
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    amount_micros: int
    amount_usd: str

    @classmethod
    def of(cls, totals: Totals) -> TotalsOut:
        return cls(
            entries=totals.entries,
            requests=totals.requests,
            prompt_tokens=totals.prompt_tokens,
            completion_tokens=totals.completion_tokens,
            cached_tokens=totals.cached_tokens,
            amount_micros=totals.amount_micros,
            amount_usd=usd(totals.amount_micros),
        )


class SummaryRowOut(TotalsOut):
    group: str | None = Field(description="Model/tool, key id, user id or UTC day; null: no key / no user.")
    kind: str | None = Field(description="With `group_by=model`: model, tool or correction.")


class SummaryOut(BaseModel):
    object: Literal["billing.summary"] = "billing.summary"
    tenant_id: str
    group_by: str
    since: datetime | None
    until: datetime | None
    data: list[SummaryRowOut]
    total: TotalsOut


class InvoiceLineOut(BaseModel):
    kind: str
    item: str
    quantity: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    amount_micros: int
    amount_usd: str


class InvoiceOut(BaseModel):
    object: Literal["billing.invoice"] = "billing.invoice"
    number: str = Field(description="Stable for the tenant and month.")
    tenant_id: str
    tenant_name: str
    month: str
    period_start: datetime
    period_end: datetime = Field(description="Exclusive.")
    status: Literal["open", "closed"]
    issued_at: datetime
    currency: Literal["USD"] = "USD"
    lines: list[InvoiceLineOut]
    corrections: list[LedgerEntryOut]
    subtotal_micros: int
    subtotal_usd: str
    corrections_micros: int
    corrections_usd: str
    total_micros: int
    total_usd: str

    @classmethod
    def of(cls, invoice: Invoice) -> InvoiceOut:
        return cls(
            number=invoice.number,
            tenant_id=invoice.tenant_id,
            tenant_name=invoice.tenant_name,
            month=invoice.month,
            period_start=invoice.period_start,
            period_end=invoice.period_end,
            status=invoice.status,
            issued_at=invoice.issued_at,
            lines=[
                InvoiceLineOut(
                    kind=line.kind,
                    item=line.item,
                    quantity=line.quantity,
                    prompt_tokens=line.prompt_tokens,
                    completion_tokens=line.completion_tokens,
                    cached_tokens=line.cached_tokens,
                    amount_micros=line.amount_micros,
                    amount_usd=usd(line.amount_micros),
                )
                for line in invoice.lines
            ],
            corrections=[LedgerEntryOut.of(c) for c in invoice.corrections],
            subtotal_micros=invoice.subtotal_micros,
            subtotal_usd=usd(invoice.subtotal_micros),
            corrections_micros=invoice.corrections_micros,
            corrections_usd=usd(invoice.corrections_micros),
            total_micros=invoice.total_micros,
            total_usd=usd(invoice.total_micros),
        )


def _format(value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise InvalidRequest(f"`format` must be one of {', '.join(allowed)}, not {value!r}", param="format")
    return value


@router.get("/v1/billing/summary", response_model=SummaryOut, responses=error_responses(400, 401, 404))
async def billing_summary(
    principal: BillingReadDep,
    services: ServicesDep,
    session: SessionDep,
    group_by: Annotated[str, Query(description="`model`, `key`, `user` or `day`.")] = "model",
    tenant: TenantQuery = None,
    since: Annotated[str | None, Query(description="On the hour (RFC 3339), or YYYY-MM-DD.")] = None,
    until: Annotated[
        str | None, Query(description="On the hour (RFC 3339), or YYYY-MM-DD; exclusive.")
    ] = None,
) -> SummaryOut:
    """Totals grouped by model/tool, key, user or UTC day, from the hourly and daily rollups."""
    if group_by not in GROUPS:
        raise InvalidRequest(
            f"`group_by` must be one of {', '.join(GROUPS)}, not {group_by!r}", param="group_by"
        )
    start, end = parse_range(since, until)
    acting = await acting_tenant(session, principal, tenant)
    await services.catch_up()
    rows = await summarize(session, acting.tenant_id, group_by, start, end)
    total = Totals()
    for row in rows:
        total.add(row.totals)
    return SummaryOut(
        tenant_id=acting.tenant_id,
        group_by=group_by,
        since=start,
        until=end,
        data=[SummaryRowOut(group=r.group, kind=r.kind, **TotalsOut.of(r.totals).model_dump()) for r in rows],
        total=TotalsOut.of(total),
    )


@router.get(
    "/v1/billing/invoices/{month}",
    response_model=InvoiceOut,
    responses={**error_responses(400, 401, 404), 200: {"content": {"text/html": {}}}},
)
async def billing_invoice(
    month: str,
    principal: BillingReadDep,
    services: ServicesDep,
    session: SessionDep,
    tenant: TenantQuery = None,
    format: Annotated[str, Query(description="`json` or `html` (printable).")] = "json",
) -> Response:
    """The tenant's invoice for a calendar month (UTC), `YYYY-MM`: lines per model and tool, the month's
    corrections, totals."""
    fmt = _format(format, ("json", "html"))
    acting = await acting_tenant(session, principal, tenant)
    await services.catch_up()
    invoice = await build_invoice(session, acting.tenant_id, acting.tenant_name, month, utcnow())
    if fmt == "html":
        return HTMLResponse(invoice_html(invoice))
    return Response(InvoiceOut.of(invoice).model_dump_json(), media_type="application/json")


@router.get(
    "/v1/exports/billing-ledger",
    responses={
        **error_responses(400, 401, 404),
        200: {"content": {"application/json": {}, "text/csv": {}}, "description": "The entries, streamed."},
    },
)
async def export_ledger(
    principal: BillingReadDep,
    services: ServicesDep,
    session: SessionDep,
    tenant: TenantQuery = None,
    format: Annotated[str, Query(description="`json` (one array) or `csv` (header row).")] = "json",
    since: Annotated[str | None, Query(description="RFC 3339 or YYYY-MM-DD; entries at or after.")] = None,
    until: Annotated[
        str | None, Query(description="RFC 3339 or YYYY-MM-DD; entries before (default now).")
    ] = None,
) -> StreamingResponse:
    """Every matching ledger entry, oldest first, streamed in batches (the shape of `/v1/billing/ledger`
    entries; amounts as integer micro-USD and an exact USD string)."""
    fmt = _format(format, FORMATS)
    start, end = parse_range(since, until)
    acting = await acting_tenant(session, principal, tenant)
    await services.catch_up()
    # A fixed end: entries recorded while the export streams do not shift it.
    where = LedgerFilter(acting.tenant_id, start, end if end is not None else utcnow())
    media = "text/csv; charset=utf-8" if fmt == "csv" else "application/json"
    name = f"billing-ledger-{acting.tenant_name}.{fmt}"
    return StreamingResponse(
        export_chunks(services.sessions, where, fmt),
        media_type=media,
        headers={"content-disposition": f'attachment; filename="{name}"'},
    )
