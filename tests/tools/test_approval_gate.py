"""The approval gate against a real database (SQLite and PostgreSQL), real built-in tools and a real
run recorder: which calls wait, waking on a decision here or in another replica, rejection, expiry,
cancellation, two keys (four eyes, and the policy's consent at decision time), the run's paused
wall clock, audit events in the decision's transaction, paging and tenant isolation."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.agents.event_log import read_events
from somaagent.agents.recorder import RunRecorder
from somaagent.core.errors import Forbidden, NotFound, PolicyDenied
from somaagent.core.principal import Principal
from somaagent.db.engine import create_engine, session_factory
from somaagent.events.schemas import AUDIT_EVENTS
from somaagent.events.tables import OutboxEvent
from somaagent.identity.capabilities import ROLE_CAPABILITIES
from somaagent.policy.document import ApprovalSettings, PolicyDocument, parse_rules
from somaagent.policy.evaluator import CompiledPolicy, Decision, EvalRequest
from somaagent.tools.approval_rules import ApprovalRules, requirement
from somaagent.tools.approvals import RUN_DEADLINE, ApprovalGate, ApprovalNotPending
from somaagent.tools.registry import ToolOutcome, ToolStatus
from somaagent.tools.tables import Approval
from tests.support.runs import builtins, run_context

ADMIN = ROLE_CAPABILITIES["admin"]
REQUESTER = Principal("ten_gate", "gate", "key:requester", "requester", ADMIN)
APPROVER = Principal("ten_gate", "gate", "key:approver", "approver", ADMIN)
STRANGER = Principal("ten_other", "other", "key:stranger", "stranger", ADMIN)
TOKYO = '{"timezone": "Asia/Tokyo"}'


def rules(settings: ApprovalSettings) -> Any:
    async def of_tenant(_tenant_id: str) -> ApprovalRules:
        return settings

    return of_tenant


async def logged(sessions: async_sessionmaker[AsyncSession], recorder: RunRecorder) -> list[Any]:
    async with sessions() as db:
        return await read_events(db, recorder.tenant_id, recorder.session_id, 0)


async def audited(sessions: async_sessionmaker[AsyncSession], approval_id: str) -> list[OutboxEvent]:
    async with sessions() as db:
        rows = (await db.scalars(select(OutboxEvent).where(OutboxEvent.topic == AUDIT_EVENTS))).all()
    return [r for r in rows if r.data.get("approval_id") == approval_id]


async def pending_of(gate: ApprovalGate, principal: Principal, count: int = 1) -> list[Approval]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = await gate.list_approvals(principal, "pending", None, 100, None)
        if len(found) >= count:
            return found
        await asyncio.sleep(0.02)
    raise AssertionError("no pending approval appeared")


def test_which_calls_need_a_person() -> None:
    _, tools = builtins()
    clock, fetch, python = tools["current_time"], tools["http_fetch"], tools["python"]
    default = ApprovalSettings()  # write and external calls wait
    assert requirement(default, clock) is None
    needed = requirement(default, fetch)
    assert needed is not None and not needed.two_key and "side effect 'external'" in needed.reason
    assert requirement(ApprovalSettings(tools={"http_fetch": "never"}), fetch) is None
    always = requirement(ApprovalSettings(tools={"current_time": "always"}), clock)
    assert always is not None and "always" in always.reason
    # The most specific glob wins.
    globbed = ApprovalSettings(side_effects=[], tools={"*": "always", "py*": "never", "http_*": "two_key"})
    assert requirement(globbed, python) is None
    two = requirement(globbed, fetch)
    assert two is not None and two.two_key
    assert requirement(globbed, clock) is not None


async def test_an_approved_call_runs_woken_at_once(sessions: async_sessionmaker[AsyncSession]) -> None:
    registry, tools = builtins()
    # A long poll: only the in-process wake-up can bring the decision back quickly.
    gate = ApprovalGate(sessions, rules(ApprovalSettings(side_effects=["read"])), ttl_s=60, poll_s=30)
    context, recorder = await run_context(sessions, REQUESTER)
    call = asyncio.create_task(gate.wrap(registry.call)(tools["current_time"], context, TOKYO))
    (pending,) = await pending_of(gate, REQUESTER)
    assert (pending.tool, pending.arguments, pending.side_effect) == ("current_time", TOKYO, "read")
    assert (pending.session_id, pending.run_id, pending.call_id) == (
        context.session_id,
        context.run_id,
        context.call_id,
    )
    assert pending.requested_by == "key:requester" and "approvals.side_effects" in pending.reason
    assert not call.done()

    decided_at = time.monotonic()
    decided = await gate.decide(APPROVER, pending.id, "approve", "looks fine")
    assert (decided.status, decided.decided_by, decided.note) == ("approved", "key:approver", "looks fine")
    outcome: ToolOutcome = await asyncio.wait_for(call, 10)
    assert time.monotonic() - decided_at < 10  # far below the 30 s poll
    assert not outcome.is_error and json.loads(outcome.content)["timezone"] == "Asia/Tokyo"

    events = await logged(sessions, recorder)
    assert [e.type for e in events] == ["approval.required", "approval.decided"]
    required, done = events[0].data, events[1].data
    assert required["approval_id"] == pending.id and required["args"] == {"timezone": "Asia/Tokyo"}
    assert required["tool"] == "current_time" and required["two_key"] is False
    assert required["expires_at"] == pending.expires_at.isoformat() and required["reason"] == pending.reason
    assert done == {
        "approval_id": pending.id,
        "decision": "approved",
        "decided_by": "key:approver",
        "note": "looks fine",
    }

    audit = await audited(sessions, pending.id)
    assert [(e.type, e.actor) for e in audit] == [
        ("approval.requested", "key:requester"),
        ("approval.approved", "key:approver"),
    ]
    assert audit[1].data["status"] == "approved" and len(audit[1].data["args_sha256"]) == 64
    assert "Tokyo" not in json.dumps(audit[1].data)  # a digest of the arguments, never them

    with pytest.raises(ApprovalNotPending) as again:
        await gate.decide(APPROVER, pending.id, "reject", None)
    assert again.value.extra == {"status": "approved"} and "approved already" in again.value.message


async def test_a_rejected_call_does_not_run_and_the_model_reads_the_note(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    registry, tools = builtins()
    gate = ApprovalGate(sessions, rules(ApprovalSettings(side_effects=["read"])), ttl_s=60)
    context, recorder = await run_context(sessions, REQUESTER)
    call = asyncio.create_task(gate.wrap(registry.call)(tools["current_time"], context, TOKYO))
    (pending,) = await pending_of(gate, REQUESTER)
    await gate.decide(REQUESTER, pending.id, "reject", "not during the audit freeze")
    outcome = await asyncio.wait_for(call, 10)
    assert outcome.is_error and outcome.error_code == "approval_rejected"
    assert "not during the audit freeze" in outcome.content and "datetime" not in outcome.content
    assert [e.type for e in await logged(sessions, recorder)] == ["approval.required", "approval.decided"]
    assert [e.type for e in await audited(sessions, pending.id)][-1] == "approval.rejected"


async def test_a_decision_made_by_another_replica_is_seen_by_polling(
    sessions: async_sessionmaker[AsyncSession],
    migrated_database: str,
) -> None:
    registry, tools = builtins()
    settings = rules(ApprovalSettings(side_effects=["read"]))
    here = ApprovalGate(sessions, settings, ttl_s=60, poll_s=0.1)
    engine = create_engine(migrated_database)  # its own pool, as another process would have
    try:
        there = ApprovalGate(session_factory(engine), settings, ttl_s=60)
        context, _ = await run_context(sessions, REQUESTER)
        call = asyncio.create_task(here.wrap(registry.call)(tools["current_time"], context, TOKYO))
        (pending,) = await pending_of(there, APPROVER)
        await there.decide(APPROVER, pending.id, "approve", None)
        outcome = await asyncio.wait_for(call, 10)
        assert not outcome.is_error
    finally:
        await engine.dispose()


async def test_an_undecided_call_expires(sessions: async_sessionmaker[AsyncSession]) -> None:
    registry, tools = builtins()
    gate = ApprovalGate(sessions, rules(ApprovalSettings(side_effects=["read"], ttl_s=0.4)), ttl_s=60)
    context, recorder = await run_context(sessions, REQUESTER)
    outcome = await asyncio.wait_for(gate.wrap(registry.call)(tools["current_time"], context, TOKYO), 10)
    assert outcome.is_error and outcome.error_code == "approval_expired"
    assert "within 0.4 s" in outcome.content
    (row,) = await gate.list_approvals(REQUESTER, "expired", context.session_id, 10, None)
    assert row.decided_by == "system"
    events = await logged(sessions, recorder)
    assert events[-1].type == "approval.decided" and events[-1].data["decision"] == "expired"
    assert [e.type for e in await audited(sessions, row.id)] == ["approval.requested", "approval.expired"]
    with pytest.raises(ApprovalNotPending) as late:
        await gate.decide(APPROVER, row.id, "approve", None)
    assert late.value.extra == {"status": "expired"}


async def test_a_cancelled_run_leaves_no_approval_pending(sessions: async_sessionmaker[AsyncSession]) -> None:
    registry, tools = builtins()
    gate = ApprovalGate(sessions, rules(ApprovalSettings(side_effects=["read"])), ttl_s=60)
    context, _ = await run_context(sessions, REQUESTER)
    call = asyncio.create_task(gate.wrap(registry.call)(tools["current_time"], context, TOKYO))
    (pending,) = await pending_of(gate, REQUESTER)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    row = await gate.get(REQUESTER, pending.id)
    assert (row.status, row.decided_by) == ("cancelled", "system")
    assert [e.type for e in await audited(sessions, pending.id)][-1] == "approval.cancelled"
    with pytest.raises(ApprovalNotPending):
        await gate.decide(APPROVER, pending.id, "approve", None)


async def test_waiting_for_a_person_pauses_the_runs_wall_clock(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    registry, tools = builtins()
    gate = ApprovalGate(sessions, rules(ApprovalSettings(side_effects=["read"])), ttl_s=60)
    context, _ = await run_context(sessions, REQUESTER)
    limit_s = 1.0

    async def run() -> tuple[ToolOutcome, float]:
        # What the runner does: the run's whole limit, published for the gate.
        async with asyncio.timeout(limit_s) as deadline:
            RUN_DEADLINE.set(deadline)
            outcome = await gate.wrap(registry.call)(tools["current_time"], context, TOKYO)
            when = deadline.when()
            assert when is not None  # the clock runs again after the decision
            return outcome, when - asyncio.get_running_loop().time()

    task = asyncio.create_task(run())
    (pending,) = await pending_of(gate, REQUESTER)
    await asyncio.sleep(limit_s * 1.5)  # longer than the run may take
    await gate.decide(APPROVER, pending.id, "approve", None)
    outcome, left = await asyncio.wait_for(task, 10)
    assert not outcome.is_error
    assert 0 < left <= limit_s


async def test_two_keys_need_another_person_and_the_policys_consent(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    registry, tools = builtins()
    denying = parse_rules(
        [{"id": "no-tokyo", "kind": "keywords", "actions": ["tool.call"], "words": ["Tokyo"]}]
    )
    policy = {"now": CompiledPolicy.compile([], PolicyDocument(rules=denying), "c" * 64, 1)}
    asked: list[str] = []

    async def policy_check(principal: Principal, status: ToolStatus, arguments_json: str) -> Decision:
        asked.append(principal.subject)
        request = EvalRequest(
            "tool.call",
            principal.subject,
            status.tool.name,
            arguments_json,
            {"tool": status.tool.name, "side_effect": status.tool.manifest.side_effect},
        )
        return policy["now"].evaluate(request)

    settings = ApprovalSettings(side_effects=[], tools={"current_time": "two_key"})
    gate = ApprovalGate(sessions, rules(settings), ttl_s=60, policy_check=policy_check, registry=registry)
    user = Principal("ten_gate", "gate", "user:usr_1", None, ADMIN, user_id="usr_1")
    users_key = Principal("ten_gate", "gate", "key:of-usr_1", "of-usr_1", ADMIN, user_id="usr_1")
    context, recorder = await run_context(sessions, user)
    call = asyncio.create_task(gate.wrap(registry.call)(tools["current_time"], context, TOKYO))
    (pending,) = await pending_of(gate, user)
    assert pending.two_key and "two-key" in pending.reason

    other = Principal("ten_gate", "gate", "user:usr_2", None, ADMIN, user_id="usr_2")
    for same_person in (user, users_key):
        with pytest.raises(Forbidden) as four_eyes:
            await gate.decide(same_person, pending.id, "approve", None)
        assert four_eyes.value.code == "four_eyes_required"
    # A key is a credential, not a person: two-key approvals are decided by a signed-in user.
    with pytest.raises(Forbidden) as keyed:
        await gate.decide(APPROVER, pending.id, "approve", None)
    assert keyed.value.code == "four_eyes_required" and "API key" in keyed.value.message
    # The person behind the requesting credential (a key's maker) is the requester too.
    with pytest.raises(Forbidden):
        await gate.decide(other, pending.id, "approve", None, requester_person="user:usr_2")
    with pytest.raises(PolicyDenied) as refused:
        await gate.decide(other, pending.id, "approve", None)
    assert refused.value.extra["decision"]["allowed"] is False and asked == ["user:usr_2"]
    assert (await gate.get(APPROVER, pending.id)).status == "pending"  # someone may still decide

    policy["now"] = CompiledPolicy.compile([], PolicyDocument(), "c" * 64, 2)  # the policy changed
    await gate.decide(other, pending.id, "approve", None)
    outcome = await asyncio.wait_for(call, 10)
    assert not outcome.is_error
    assert (await logged(sessions, recorder))[0].data["two_key"] is True


async def test_a_call_that_cannot_run_asks_nobody(sessions: async_sessionmaker[AsyncSession]) -> None:
    registry, tools = builtins()
    gate = ApprovalGate(sessions, rules(ApprovalSettings(side_effects=["read"])), ttl_s=60)
    context, recorder = await run_context(sessions, REQUESTER)
    outcome = await gate.wrap(registry.call)(tools["current_time"], context, '{"timezone": 5}')
    assert outcome.is_error and outcome.error_code == "invalid_tool_arguments"
    assert await gate.list_approvals(REQUESTER, None, context.session_id, 10, None) == []
    assert await logged(sessions, recorder) == []


async def test_listing_pages_filters_and_stays_in_the_tenant(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    registry, tools = builtins()
    gate = ApprovalGate(sessions, rules(ApprovalSettings(side_effects=["read"])), ttl_s=60)
    contexts = [(await run_context(sessions, REQUESTER))[0] for _ in range(3)]
    calls = [asyncio.create_task(gate.wrap(registry.call)(tools["current_time"], c, TOKYO)) for c in contexts]
    try:
        everything = await pending_of(gate, REQUESTER, 3)
        assert [a.id for a in everything] == sorted((a.id for a in everything), reverse=True)  # newest first
        first = await gate.list_approvals(REQUESTER, "pending", None, 2, None)
        rest = await gate.list_approvals(REQUESTER, "pending", None, 2, first[-1].id)
        assert [a.id for a in first + rest] == [a.id for a in everything]
        (one,) = await gate.list_approvals(REQUESTER, None, contexts[1].session_id, 10, None)
        assert one.session_id == contexts[1].session_id
        assert await gate.list_approvals(REQUESTER, "approved", None, 10, None) == []

        assert await gate.list_approvals(STRANGER, None, None, 10, None) == []
        for attempt in (gate.get(STRANGER, one.id), gate.decide(STRANGER, one.id, "approve", None)):
            with pytest.raises(NotFound):
                await attempt
        assert (await gate.get(REQUESTER, one.id)).status == "pending"
    finally:
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
