"""Starting, running, cancelling and recovering runs. One run per session at a time.

A run is claimed on its session row (`active_run_id`, a conditional UPDATE, so two processes cannot
both start one), its first events are committed, and then it runs as a background task of this
process: a client that disconnects does not stop it (it reconnects with `Last-Event-ID`); cancelling
does. A heartbeat marks this process's runs alive and picks up cancellations made in other
processes; a run whose heartbeat went stale died with its process and is marked failed (`interrupted`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.agents.context import Conversation
from somaagent.agents.event_log import LiveStreams
from somaagent.agents.loop import AgentDeps, RunInput, RunState, RunStopped, drive
from somaagent.agents.personas import PersonaSpec, get_persona
from somaagent.agents.recorder import Pending, RunRecorder
from somaagent.agents.recovery import mark_interrupted, stale_runs
from somaagent.agents.schemas import ForcedTool, MessageIn
from somaagent.agents.sessions import as_message, get_session, history_rows
from somaagent.agents.tables import AgentRun, AgentSession
from somaagent.core.clock import utcnow
from somaagent.core.errors import Conflict, InvalidRequest, NotFound, PolicyDenied, SomaError
from somaagent.core.ids import new_id
from somaagent.core.principal import Principal
from somaagent.events.schemas import CONVERSATION_EVENTS, Event
from somaagent.models.messages import Message, ToolChoice, Usage
from somaagent.policy.decisions import PolicyService, denied
from somaagent.policy.evaluator import Decision, EvalRequest
from somaagent.tools.approvals import RUN_DEADLINE

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunSettings:
    """Knobs from `Settings`."""

    default_model: str
    history_chars: int = 6_000
    heartbeat_s: float = 1.0
    stale_s: float = 30.0


@dataclass(frozen=True, slots=True)
class StartedRun:
    """A run that has begun: its id, and the session's last event id before it (to follow from)."""

    run_id: str
    after: int


class RunEngine:
    """This process's runs."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        streams: LiveStreams,
        deps: AgentDeps,
        settings: RunSettings,
        policy: PolicyService,
        on_outbox: Any = None,
    ) -> None:
        self._sessions = sessions
        self.streams = streams
        self._deps = deps
        self._policy = policy
        self._settings = settings
        self._on_outbox = on_outbox
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stop_reasons: dict[str, tuple[str, str]] = {}
        self._heartbeat: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Begin the heartbeat (which also recovers runs of dead processes)."""
        self._heartbeat = asyncio.create_task(self._beat(), name="agent-runs-heartbeat")

    async def close(self) -> None:
        """Stop local runs (recorded as `interrupted`) and the heartbeat."""
        for run_id, task in list(self._tasks.items()):
            self._stop_reasons[run_id] = ("interrupted", "the server shut down during the run")
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=10)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat

    # --- starting -------------------------------------------------------------------------------

    async def start_run(self, principal: Principal, session_id: str, body: MessageIn) -> StartedRun:
        """Validate, claim the session, commit `run.started` with the user's message, start the task."""
        async with self._sessions() as db:
            row = await get_session(db, principal, session_id)
            persona = await _persona(db, principal, row.persona)
            model = body.model or row.model or persona.model or self._settings.default_model
            await self._deps.router.candidates(principal, model)  # unknown model: 404 now, not a failed run
            tools = {s.tool.name: s for s in await self._deps.tools.enabled(db, principal, persona.tools)}
            choice = _tool_choice(body.tool_choice, tools)
            history = [as_message(m) for m in await history_rows(db, principal.tenant_id, session_id)]
        run_input = RunInput(
            body.content, tuple(body.attachments), choice, model, body.max_tokens, body.temperature, body.seed
        )
        screened = await self._screen(principal, row, run_input, history, model, persona.name)
        run_id = new_id("run")
        next_seq = await self._claim(principal, session_id, run_id, model, screened.constitution_hash)
        recorder = RunRecorder(
            self._sessions, self.streams, principal.tenant_id, session_id, run_id, next_seq, self._on_outbox
        )
        user = run_input.user_message()
        conversation = Conversation(persona.system_prompt, history, [user])
        dropped = conversation.fit(self._settings.history_chars)
        started: list[tuple[str, dict[str, Any]]] = []
        if row.constitution_hash is not None and row.constitution_hash != screened.constitution_hash:
            started.append(
                (
                    "constitution.changed",
                    {
                        "previous_hash": row.constitution_hash,
                        "constitution_hash": screened.constitution_hash,
                        "reevaluated": screened.to_json(),
                    },
                )
            )
        started.append(
            (
                "run.started",
                {
                    "content": body.content,
                    "attachments": [a.name for a in body.attachments],
                    "persona": persona.name,
                    "model": model,
                    "tools": sorted(tools),
                },
            )
        )
        if dropped:
            started.append(
                (
                    "context.trimmed",
                    {
                        "strategy": "dropped_oldest",
                        "dropped_messages": dropped,
                        "kept_messages": conversation.size,
                    },
                )
            )
        await recorder.record_many(started, Pending(messages=[user]))
        namespace = persona.memory.namespace.replace("{persona}", persona.name or "default").replace(
            "{session}", session_id
        )
        state = RunState(
            principal,
            persona,
            run_input,
            recorder,
            self._deps,
            conversation,
            tools,
            namespace,
            next_choice=choice,
        )
        self._tasks[run_id] = asyncio.create_task(self._execute(state), name=f"run-{run_id}")
        return StartedRun(run_id, next_seq - 1)

    async def _screen(
        self,
        principal: Principal,
        row: AgentSession,
        run_input: RunInput,
        history: list[Message],
        model: str,
        persona: str | None,
    ) -> Decision:
        """The `run.input` check of the user's message, then of the session's history if it was not yet
        decided under this constitution: an imported history, the earlier messages of an `agent:<persona>`
        completion, or a session last run under an older constitution (no strikes: a history is not a new
        offence). A history the constitution and policy now deny ends the session's runs. Answers the
        decision to record."""
        context = {"model": model, "persona": persona}
        resource = f"session:{row.id}"
        content = run_input.user_message().content or ""
        decision = await self._policy.require(
            principal, EvalRequest("run.input", principal.subject, resource, content, context)
        )
        if not history or row.constitution_hash == decision.constitution_hash:
            return decision
        text = "\n".join(m.content for m in history if m.content and m.role in ("user", "assistant"))
        request = EvalRequest("run.input", principal.subject, resource, text, context)
        reevaluated = await self._policy.evaluate(principal, request, count_strikes=False)
        if not reevaluated.allowed:
            raise denied(reevaluated, "this session's history")
        return reevaluated

    async def _claim(
        self, principal: Principal, session_id: str, run_id: str, model: str, constitution_hash: str
    ) -> int:
        for _ in range(2):
            async with self._sessions() as db, db.begin():
                claimed = await db.execute(
                    update(AgentSession)
                    .where(
                        AgentSession.id == session_id,
                        AgentSession.tenant_id == principal.tenant_id,
                        AgentSession.active_run_id.is_(None),
                    )
                    .values(active_run_id=run_id, constitution_hash=constitution_hash)
                    .returning(AgentSession.last_seq)
                )
                last_seq = claimed.scalar()
                if last_seq is not None:
                    now = utcnow()
                    db.add(
                        AgentRun(
                            id=run_id,
                            tenant_id=principal.tenant_id,
                            session_id=session_id,
                            status="running",
                            model=model,
                            steps=0,
                            tool_calls=0,
                            prompt_tokens=0,
                            completion_tokens=0,
                            cancel_requested=False,
                            started_at=now,
                            heartbeat_at=now,
                        )
                    )
                    return int(last_seq) + 1
                active = await db.scalar(
                    select(AgentSession.active_run_id).where(
                        AgentSession.id == session_id, AgentSession.tenant_id == principal.tenant_id
                    )
                )
            if active is None:
                raise NotFound(f"no session {session_id!r}", param="session_id")
            if not await self.recover_stale(active):
                raise Conflict(
                    f"session {session_id!r} is busy with run {active!r}; wait for it to end or cancel it "
                    f"(POST /v1/sessions/{session_id}/runs/{active}/cancel)",
                    code="session_busy",
                )
        raise Conflict(f"session {session_id!r} is busy; try again", code="session_busy")

    # --- running --------------------------------------------------------------------------------

    async def _execute(self, state: RunState) -> None:
        recorder = state.recorder
        started = time.perf_counter()
        try:
            async with asyncio.timeout(state.persona.limits.timeout_s) as deadline:
                RUN_DEADLINE.set(deadline)  # a call waiting for a person pauses it (tools/approvals.py)
                finish = await drive(state)
            await self._remember(state, finish.message.content or "")
            answer = finish.message.content or ""
            end = {
                "status": "completed",
                "finished_at": utcnow(),
                "duration_s": time.perf_counter() - started,
                **state.run_columns(),
            }
            await recorder.record_many(
                [
                    ("assistant.message", {"content": answer, "model": state.model_used}),
                    (
                        "run.completed",
                        {
                            "usage": state.usage,
                            "steps": state.steps,
                            "tool_calls": state.tool_calls,
                            "remembered": state.remembered,
                        },
                    ),
                ],
                Pending(
                    messages=[finish.message],
                    outbox=[_conversation_event(state, "completed", None, time.perf_counter() - started)],
                    run=end,
                    release_session=True,
                ),
            )
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            reason, message = self._stop_reasons.pop(recorder.run_id, ("cancelled", "the run was cancelled"))
            await self._fail(
                state, reason, message, started, "cancelled" if reason == "cancelled" else "failed"
            )
        except TimeoutError:
            limit = state.persona.limits.timeout_s
            await self._fail(
                state, "timeout", f"the run took longer than {limit:g} s (limits.timeout_s)", started
            )
        except RunStopped as stop:
            await self._fail(state, stop.reason, stop.message, started)
        except PolicyDenied as exc:  # the output broke a rule mid-stream: say which, then end the run
            await self._fail(state, exc.code, exc.message, started, denial=exc.extra.get("decision"))
        except SomaError as exc:
            await self._fail(state, exc.code, exc.message, started)
        except Exception:
            log.exception("run %s failed", recorder.run_id)
            await self._fail(state, "internal_error", f"the run failed (run id {recorder.run_id})", started)
        finally:
            self.streams.run_ended(recorder.session_id, recorder.run_id)
            self._tasks.pop(recorder.run_id, None)

    async def _remember(self, state: RunState, answer: str) -> None:
        texts = {"user": state.run_input.content, "assistant": answer}
        for role in state.persona.memory.remember:
            text = texts[role].strip()
            if not text:
                continue
            started = time.perf_counter()
            try:
                async with self._sessions() as db:
                    done = await self._deps.memory.remember(
                        db,
                        state.principal,
                        text,
                        {
                            "session_id": state.recorder.session_id,
                            "run_id": state.recorder.run_id,
                            "role": role,
                        },
                        state.namespace,
                        None,
                    )
                    await db.commit()
                state.remembered.append(done.item.id)
                state.deps.meter(
                    state.principal,
                    state.recorder.run_id,
                    state.deps.embedding_model,
                    "embedding",
                    Usage(done.tokens, 0),
                    time.perf_counter() - started,
                    "ok",
                )
            except SomaError as exc:  # a run's answer stands even if memory could not be written
                log.warning(
                    "run %s could not remember its %s turn: %s", state.recorder.run_id, role, exc.message
                )

    async def _fail(
        self,
        state: RunState,
        reason: str,
        message: str,
        started: float,
        status: str = "failed",
        denial: dict[str, Any] | None = None,
    ) -> None:
        seconds = time.perf_counter() - started
        events: list[tuple[str, dict[str, Any]]] = []
        if denial is not None:
            events.append(("policy.denied", {"action": "model.output", **denial}))
        events.append(
            ("run.failed", {"reason": reason, "message": message, "usage": state.usage, "steps": state.steps})
        )
        try:
            await state.recorder.record_many(
                events,
                Pending(
                    outbox=[_conversation_event(state, status, reason, seconds)],
                    run={
                        "status": status,
                        "reason": reason,
                        "finished_at": utcnow(),
                        "duration_s": seconds,
                        **state.run_columns(),
                    },
                    release_session=True,
                ),
            )
        except Exception:  # the heartbeat's recovery will mark it once the database is back
            log.exception("could not record the end of run %s", state.recorder.run_id)

    # --- cancelling, waiting --------------------------------------------------------------------

    async def cancel(self, principal: Principal, session_id: str, run_id: str) -> AgentRun:
        """Stop a run (here, or in the process running it); returns the run once it has ended."""
        row = await self.get_run(principal, session_id, run_id)
        if row.status != "running":
            return row
        task = self._tasks.get(run_id)
        if task is not None:
            self._stop_reasons.setdefault(run_id, ("cancelled", "the run was cancelled"))
            task.cancel()
            await asyncio.wait({task}, timeout=10)
        else:
            async with self._sessions() as db, db.begin():
                await db.execute(
                    update(AgentRun)
                    .where(AgentRun.id == run_id, AgentRun.tenant_id == principal.tenant_id)
                    .values(cancel_requested=True)
                )
            deadline = time.monotonic() + max(5.0, self._settings.heartbeat_s * 5)
            while time.monotonic() < deadline:
                row = await self.get_run(principal, session_id, run_id)
                if row.status != "running":
                    break
                await asyncio.sleep(0.1)
        return await self.get_run(principal, session_id, run_id)

    async def wait(self, run_id: str) -> None:
        """Until a run of this process has ended."""
        task = self._tasks.get(run_id)
        if task is not None:
            await asyncio.shield(task)

    async def get_run(self, principal: Principal, session_id: str, run_id: str) -> AgentRun:
        """One run of the tenant's session."""
        async with self._sessions() as db:
            row = await db.scalar(
                select(AgentRun).where(
                    AgentRun.id == run_id,
                    AgentRun.session_id == session_id,
                    AgentRun.tenant_id == principal.tenant_id,
                )
            )
        if row is None:
            raise NotFound(f"no run {run_id!r} in session {session_id!r}", param="run_id")
        return row

    # --- heartbeat and recovery ------------------------------------------------------------------

    async def _beat(self) -> None:
        last_sweep = 0.0
        while True:
            try:
                if self._tasks:
                    await self._touch_local_runs()
                if time.monotonic() - last_sweep >= self._settings.stale_s / 2:
                    last_sweep = time.monotonic()
                    await self._sweep()
            except Exception:  # the heartbeat must outlive a database hiccup
                log.exception("agent run heartbeat failed")
            await asyncio.sleep(self._settings.heartbeat_s)

    async def _touch_local_runs(self) -> None:
        ids = list(self._tasks)
        async with self._sessions() as db, db.begin():
            await db.execute(update(AgentRun).where(AgentRun.id.in_(ids)).values(heartbeat_at=utcnow()))
            wanted = (
                await db.scalars(select(AgentRun.id).where(AgentRun.id.in_(ids), AgentRun.cancel_requested))
            ).all()
        for run_id in wanted:
            task = self._tasks.get(run_id)
            if task is not None and run_id not in self._stop_reasons:
                self._stop_reasons[run_id] = ("cancelled", "the run was cancelled")
                task.cancel()

    async def _sweep(self) -> None:
        for run_id in await stale_runs(self._sessions, self._settings.stale_s):
            if run_id not in self._tasks:
                await self.recover_stale(run_id)

    async def recover_stale(self, run_id: str) -> bool:
        """Mark a run whose process died as failed (`interrupted`) and free its session; False if it lives."""
        if run_id in self._tasks:
            return False
        return await mark_interrupted(self._sessions, run_id, self._settings.stale_s)


async def _persona(db: AsyncSession, principal: Principal, name: str | None) -> PersonaSpec:
    if name is None:
        return PersonaSpec.of(None)
    try:
        return PersonaSpec.of(await get_persona(db, principal, name))
    except NotFound:
        return PersonaSpec.of(None)  # the persona was deleted: the session goes on with the default


def _tool_choice(choice: str | ForcedTool, tools: dict[str, Any]) -> ToolChoice:
    if isinstance(choice, ForcedTool):
        if choice.name not in tools:
            available = ", ".join(sorted(tools)) or "none"
            raise InvalidRequest(
                f"tool_choice names {choice.name!r}, which this agent cannot use; available: {available}",
                param="tool_choice",
            )
        return ToolChoice("function", choice.name)
    if choice == "required" and not tools:
        raise InvalidRequest(
            "tool_choice 'required' but this agent has no tools enabled", param="tool_choice"
        )
    return ToolChoice(choice)  # type: ignore[arg-type]


def _conversation_event(state: RunState, status: str, reason: str | None, seconds: float) -> Event:
    return Event(
        topic=CONVERSATION_EVENTS,
        type=f"run.{status}",
        tenant_id=state.principal.tenant_id,
        actor=state.principal.subject,
        data={
            "session_id": state.recorder.session_id,
            "run_id": state.recorder.run_id,
            "persona": state.persona.name,
            "model": state.model_used,
            "status": status,
            "reason": reason,
            "steps": state.steps,
            "tool_calls": state.tool_calls,
            "usage": state.usage,
            "duration_ms": round(seconds * 1000),
        },
    )
