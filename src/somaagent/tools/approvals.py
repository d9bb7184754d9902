"""Human approval of risky tool calls: the gate that holds a call until a person decides, and the
decisions.

Owns: `ApprovalGate` (wraps a `ToolCaller`), the life of `approvals` rows (pending → approved |
rejected | expired | cancelled) and their audit events, `RUN_DEADLINE`.
May import: core, db, events, tools. Never: api, agents, identity, policy — the tenant's approval
rules (`tools/approval_rules.py`) and the two-key policy check are injected.

The gate writes a pending row, tells the run (`approval.required`), then waits: a decision made in
this process wakes it at once, one made by another replica is seen by polling the row. Waiting is not
working: the run's wall-clock limit is paused meanwhile when the runner publishes its deadline in
`RUN_DEADLINE`. Two-key approvals need a second person, and the policy's consent at decision time
(with no policy check configured, the second person suffices).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from datetime import timedelta
from typing import Any, Literal, Protocol

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.core.clock import utcnow
from somaagent.core.errors import Conflict, Forbidden, NotFound, PolicyDenied, SomaError
from somaagent.core.ids import new_id
from somaagent.core.principal import Principal
from somaagent.events.notices import notification_event
from somaagent.events.outbox import add_event, audit
from somaagent.events.schemas import Event
from somaagent.tools.approval_rules import ApprovalSettingsFor, Requirement, requirement
from somaagent.tools.manifest import validate_arguments
from somaagent.tools.registry import (
    ToolCaller,
    ToolContext,
    ToolOutcome,
    ToolRegistry,
    ToolStatus,
    arguments_digest,
    parse_arguments,
)
from somaagent.tools.tables import Approval

log = logging.getLogger(__name__)
Decision = Literal["approve", "reject"]
_SYSTEM = "system"  # the actor of decisions nobody made: expiry, a run that ended while waiting

# The runner's `asyncio.timeout` of the current run (set inside the run's task): the gate pauses it
# while a person decides, so a slow approver does not eat the run's `limits.timeout_s`.
RUN_DEADLINE: ContextVar[asyncio.Timeout | None] = ContextVar("run_deadline", default=None)


class PolicyVerdict(Protocol):
    """What a policy check answers (a `policy.evaluator.Decision`)."""

    @property
    def allowed(self) -> bool: ...
    def to_json(self) -> dict[str, Any]: ...


# (approver, the tool, arguments JSON) → allowed? Asked when a two-key approval is granted.
PolicyCheck = Callable[[Principal, ToolStatus, str], Awaitable[bool | PolicyVerdict]]


class ApprovalNotPending(Conflict):
    """The approval was decided already (or expired); `extra` carries its current status."""

    code = "approval_not_pending"


class ApprovalGate:
    """Holds calls that need a person until one decides; decides them (`decide`) for the API."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        approval_settings: ApprovalSettingsFor,
        ttl_s: float,
        poll_s: float = 0.25,
        *,
        policy_check: PolicyCheck | None = None,
        registry: ToolRegistry | None = None,
        on_outbox: Callable[[], None] | None = None,
    ) -> None:
        if policy_check is not None and registry is None:
            raise ValueError("a policy check needs the registry, to find the tool a two-key call names")
        self._sessions = sessions
        self._settings = approval_settings
        self._ttl_s = ttl_s
        self._poll_s = poll_s
        # None: no policy configured, so a two-key approval needs only the second person.
        self._policy_check = policy_check
        self._registry = registry
        self._on_outbox = on_outbox  # pokes the relay: the audit events just committed go out now
        self._waiting: dict[str, asyncio.Event] = {}  # approval id → wakes its waiter in this process

    # --- the gate ---------------------------------------------------------------------------------

    def wrap(self, next_call: ToolCaller) -> ToolCaller:
        """`next_call`, held for a person's decision whenever the tenant's settings ask for one."""

        async def call(status: ToolStatus, context: ToolContext, arguments_json: str) -> ToolOutcome:
            rules = await self._settings(context.principal.tenant_id)
            needed = requirement(rules, status)
            if needed is None:
                return await next_call(status, context, arguments_json)
            try:  # a call that cannot run is not worth a person's time: `next_call` says what is wrong
                arguments = parse_arguments(status.tool.name, arguments_json)
                validate_arguments(status.tool.manifest, arguments)
            except SomaError:
                return await next_call(status, context, arguments_json)
            if context.run_id is None:  # nobody to pause: a direct call cannot wait for a person
                return ToolOutcome(
                    status.tool.name,
                    f"tool {status.tool.name!r} needs a person's approval ({needed.reason}); call it from an "
                    "agent run (POST /v1/sessions/{id}/messages), which waits for the decision",
                    True,
                    0.0,
                    "approval_required",
                )
            ttl_s = rules.ttl_s or self._ttl_s
            return await self._hold(next_call, status, context, arguments_json, arguments, needed, ttl_s)

        return call

    async def _hold(
        self,
        next_call: ToolCaller,
        status: ToolStatus,
        context: ToolContext,
        arguments_json: str,
        arguments: dict[str, Any],
        needed: Requirement,
        ttl_s: float,
    ) -> ToolOutcome:
        started = time.perf_counter()
        row = await self._request(status, context, arguments_json, needed, ttl_s)
        try:  # from here on, a run that ends (cancelled, timed out) takes its approval with it
            if context.record is not None:
                await context.record(
                    "approval.required",
                    {
                        "approval_id": row.id,
                        "tool": row.tool,
                        "args": arguments,
                        "reason": row.reason,
                        "expires_at": row.expires_at.isoformat(),
                        "two_key": row.two_key,
                    },
                )
            decided = await self._wait(row.tenant_id, row.id)
        except asyncio.CancelledError:
            # The run was cancelled or timed out: nobody may approve a call that can no longer run.
            note = "the run ended before a decision"
            try:
                await asyncio.shield(self._close(row.tenant_id, row.id, "cancelled", note))
            except Exception:  # the run still ends; the row expires at its time instead
                log.exception("could not cancel approval %s", row.id)
            raise
        if context.record is not None:
            await context.record(
                "approval.decided",
                {
                    "approval_id": decided.id,
                    "decision": decided.status,
                    "decided_by": decided.decided_by,
                    "note": decided.note,
                },
            )
        if decided.status == "approved":
            return await next_call(status, context, arguments_json)
        seconds = time.perf_counter() - started
        if decided.status == "rejected":
            message = (
                f"a person rejected this call to {row.tool!r} (approval {row.id}): "
                f"{decided.note or 'no reason given'}. Do not repeat it unchanged."
            )
            return ToolOutcome(row.tool, message, True, seconds, "approval_rejected")
        message = (
            f"nobody approved this call to {row.tool!r} within {ttl_s:g} s (approval {row.id} "
            f"{decided.status}); it did not run"
        )
        return ToolOutcome(row.tool, message, True, seconds, "approval_expired")

    async def _request(
        self,
        status: ToolStatus,
        context: ToolContext,
        arguments_json: str,
        needed: Requirement,
        ttl_s: float,
    ) -> Approval:
        principal = context.principal
        now = utcnow()
        row = Approval(
            id=new_id("apr"),
            tenant_id=principal.tenant_id,
            session_id=context.session_id,
            run_id=context.run_id,
            call_id=context.call_id,
            tool=status.tool.name,
            arguments=arguments_json,
            reason=needed.reason,
            side_effect=status.tool.manifest.side_effect,
            two_key=needed.two_key,
            status="pending",
            requested_by=principal.subject,
            created_at=now,
            expires_at=now + timedelta(seconds=ttl_s),
        )
        async with self._sessions() as db, db.begin():
            db.add(row)
            _audit(db, row, "approval.requested", principal.subject)
            add_event(db, _approval_notice(row))
        self._committed()
        return row

    async def _wait(self, tenant_id: str, approval_id: str) -> Approval:
        wake = self._waiting[approval_id] = asyncio.Event()
        try:
            with _deadline_paused():
                while True:
                    row = await self._load(tenant_id, approval_id)
                    if row.status != "pending":
                        return row
                    left = (row.expires_at - utcnow()).total_seconds()
                    if left <= 0:
                        await self._close(tenant_id, approval_id, "expired", None)
                        continue  # expired now, or decided just before: the next read says which
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(min(self._poll_s, left)):
                            await wake.wait()
        finally:
            self._waiting.pop(approval_id, None)

    async def _load(self, tenant_id: str, approval_id: str) -> Approval:
        async with self._sessions() as db:
            row = await db.get(Approval, approval_id)
        if row is None or row.tenant_id != tenant_id:
            raise NotFound(f"approval {approval_id!r} disappeared while its call waited")
        return row

    async def _close(self, tenant_id: str, approval_id: str, status: str, note: str | None) -> bool:
        """Mark a pending approval expired/cancelled (audited); False if it was decided already."""
        async with self._sessions() as db, db.begin():
            closed = (
                await db.scalars(
                    update(Approval)
                    .where(
                        Approval.id == approval_id,
                        Approval.tenant_id == tenant_id,
                        Approval.status == "pending",
                    )
                    .values(status=status, decided_by=_SYSTEM, note=note, decided_at=utcnow())
                    .returning(Approval)
                )
            ).first()
            if closed is not None:
                _audit(db, closed, f"approval.{status}", _SYSTEM)
        if closed is not None:
            self._committed()
        return closed is not None

    def _committed(self) -> None:
        if self._on_outbox is not None:
            self._on_outbox()

    # --- deciding, reading -------------------------------------------------------------------------

    async def decide(
        self,
        principal: Principal,
        approval_id: str,
        decision: Decision,
        note: str | None,
        requester_person: str | None = None,
    ) -> Approval:
        """Approve or reject a pending approval of the caller's tenant (audited in the same transaction).
        `requester_person`: the user behind the credential that asked (`user:<id>`), for two-key approvals."""
        await self.expire_overdue(principal.tenant_id)
        row = await self.get(principal, approval_id)
        if row.status != "pending":
            raise _not_pending(row)
        if decision == "approve" and row.two_key:
            await self._check_second_key(principal, row, requester_person)
        status = "approved" if decision == "approve" else "rejected"
        async with self._sessions() as db, db.begin():
            decided = (
                await db.scalars(
                    update(Approval)
                    .where(
                        Approval.id == approval_id,
                        Approval.tenant_id == principal.tenant_id,
                        Approval.status == "pending",
                        Approval.expires_at > utcnow(),
                    )
                    .values(status=status, decided_by=principal.subject, note=note, decided_at=utcnow())
                    .returning(Approval)
                )
            ).first()
            if decided is not None:
                _audit(db, decided, f"approval.{status}", principal.subject)
        if decided is None:  # decided, or expired, since it was read
            await self.expire_overdue(principal.tenant_id)
            raise _not_pending(await self.get(principal, approval_id))
        self._committed()
        wake = self._waiting.get(approval_id)
        if wake is not None:
            wake.set()
        return decided

    async def _check_second_key(
        self, principal: Principal, row: Approval, requester_person: str | None
    ) -> None:
        # Two people, not two credentials: the approver signs in as a user, and is neither the caller nor
        # the person whose API key the caller is.
        if principal.user_id is None:
            raise Forbidden(
                f"approval {row.id} is two-key: a person approves it, signed in as a user (an access token "
                "from POST /v1/auth/token), not with an API key",
                code="four_eyes_required",
            )
        if f"user:{principal.user_id}" in (row.requested_by, requester_person):
            raise Forbidden(
                f"approval {row.id} is two-key: it must be approved by someone other than who asked for "
                "the call",
                code="four_eyes_required",
            )
        if self._policy_check is None or self._registry is None:
            return
        async with self._sessions() as db:
            statuses = {s.tool.name: s for s in await self._registry.statuses(db, principal)}
        status = statuses.get(row.tool)
        if status is None:
            raise Conflict(
                f"tool {row.tool!r} of approval {row.id} is no longer available; reject the approval",
                code="tool_unavailable",
            )
        verdict = await self._policy_check(principal, status, row.arguments)
        if not (verdict if isinstance(verdict, bool) else verdict.allowed):
            denied = PolicyDenied(
                f"the policy does not allow this call to {row.tool!r} now, so approval {row.id} cannot be "
                "granted; it stays pending — reject it, or change the policy first"
            )
            if not isinstance(verdict, bool):
                denied.extra["decision"] = verdict.to_json()
            raise denied

    async def get(self, principal: Principal, approval_id: str) -> Approval:
        """One approval of the caller's tenant (another tenant's does not exist)."""
        async with self._sessions() as db:
            row = await db.scalar(
                select(Approval).where(Approval.id == approval_id, Approval.tenant_id == principal.tenant_id)
            )
        if row is None:
            raise NotFound(f"no approval {approval_id!r}; GET /v1/approvals lists them", param="approval_id")
        return row

    async def list_approvals(
        self,
        principal: Principal,
        status: str | None,
        session_id: str | None,
        limit: int,
        after: str | None,
    ) -> list[Approval]:
        """The tenant's approvals, newest first, `limit` at a time before the id `after`."""
        await self.expire_overdue(principal.tenant_id)
        query = (
            select(Approval)
            .where(Approval.tenant_id == principal.tenant_id)
            .order_by(Approval.id.desc())
            .limit(limit)
        )
        if status is not None:
            query = query.where(Approval.status == status)
        if session_id is not None:
            query = query.where(Approval.session_id == session_id)
        if after is not None:
            query = query.where(Approval.id < after)
        async with self._sessions() as db:
            return list((await db.scalars(query)).all())

    async def expire_overdue(self, tenant_id: str) -> int:
        """Mark the tenant's pending approvals past their time `expired` (their run may have died)."""
        overdue = (
            Approval.tenant_id == tenant_id,
            Approval.status == "pending",
            Approval.expires_at <= utcnow(),
        )
        async with self._sessions() as db:  # a read first: most calls find nothing, and need no write
            if await db.scalar(select(Approval.id).where(*overdue).limit(1)) is None:
                return 0
        async with self._sessions() as db, db.begin():
            now = utcnow()
            expired = (
                await db.scalars(
                    update(Approval)
                    .where(
                        Approval.tenant_id == tenant_id,
                        Approval.status == "pending",
                        Approval.expires_at <= now,
                    )
                    .values(status="expired", decided_by=_SYSTEM, decided_at=now)
                    .returning(Approval)
                )
            ).all()
            for row in expired:
                _audit(db, row, "approval.expired", _SYSTEM)
        if expired:
            self._committed()
        return len(expired)


@contextlib.contextmanager
def _deadline_paused() -> Iterator[None]:
    """Stop the run's wall clock (`RUN_DEADLINE`) inside the block; it resumes with what was left."""
    deadline = RUN_DEADLINE.get()
    when = deadline.when() if deadline is not None else None
    if deadline is None or when is None or deadline.expired():
        yield
        return
    loop = asyncio.get_running_loop()
    left = when - loop.time()
    deadline.reschedule(None)
    try:
        yield
    finally:
        if not deadline.expired():
            deadline.reschedule(loop.time() + max(left, 0.0))


def _not_pending(row: Approval) -> ApprovalNotPending:
    error = ApprovalNotPending(
        f"approval {row.id} is {row.status} already"
        + (f" (by {row.decided_by})" if row.decided_by and row.decided_by != _SYSTEM else "")
        + "; only a pending approval can be decided",
        param="approval_id",
    )
    error.extra["status"] = row.status
    return error


def _audit(session: AsyncSession, row: Approval, action: str, actor: str) -> None:
    """The `audit.events` fact of one step of an approval (a digest of the arguments, never them)."""
    audit(
        session,
        actor,
        row.tenant_id,
        action,
        approval_id=row.id,
        tool=row.tool,
        side_effect=row.side_effect,
        two_key=row.two_key,
        session_id=row.session_id,
        run_id=row.run_id,
        call_id=row.call_id,
        args_sha256=arguments_digest(row.arguments),
        requested_by=row.requested_by,
        status=row.status,
        note=row.note,
    )


def _approval_notice(row: Approval) -> Event:
    """Tell the tenant's approvers that a call waits for them (what, not the arguments)."""
    keys = "two people" if row.two_key else "a person"
    return notification_event(
        row.tenant_id,
        kind="approval.pending",
        severity="warning",
        message=f"Tool call `{row.tool}` ({row.side_effect}) waits for {keys} to approve it: {row.reason}",
        metadata={
            "approval_id": row.id,
            "tool": row.tool,
            "session_id": row.session_id,
            "run_id": row.run_id,
            "expires_at": row.expires_at.isoformat(),
            "two_key": row.two_key,
        },
        actor=row.requested_by,
    )


def arguments_of(row: Approval) -> Any:
    """The call's arguments as JSON (the text as sent when it is not JSON)."""
    try:
        return json.loads(row.arguments)
    except json.JSONDecodeError:
        return row.arguments
