"""The agent loop as an explicit state machine: `Recall → CallModel → (RunTools → CallModel)* → Finish`.

Each node's `advance` returns the next node; the return annotations list the possible next states.
Limits (model calls, tool calls) raise `RunStopped` with a reason; the wall-clock limit and
cancellation are applied around the whole loop by the runner. Every state change is recorded (and
committed) by the `RunRecorder` before it is streamed.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from somaagent.agents.context import Conversation
from somaagent.agents.personas import PersonaSpec
from somaagent.agents.recorder import Pending, RunRecorder
from somaagent.agents.schemas import Attachment
from somaagent.core.errors import ContextLengthExceeded
from somaagent.core.principal import Principal
from somaagent.memory.service import MemoryService, Recalled
from somaagent.models.assemble import collect_stream
from somaagent.models.messages import ChatChunk, ChatRequest, Message, ToolCall, ToolChoice, ToolSpec, Usage
from somaagent.models.router import ModelRouter
from somaagent.tools.registry import (
    ToolCaller,
    ToolContext,
    ToolOutcome,
    ToolRegistry,
    ToolStatus,
    tool_call_event,
)

# (principal, request id, model, usage or None, seconds, status): metering, injected by the app.
Meter = Callable[[Principal, str, str, str, Usage | None, float, str], None]
# Tries at shrinking the history when the model says the prompt does not fit.
MAX_TRIMS = 4


class RunStopped(Exception):
    """The run cannot go on: `reason` is a stable code (`max_steps`, `max_tool_calls`, …)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class RunInput:
    """What the user asked for in this run."""

    content: str
    attachments: tuple[Attachment, ...] = ()
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    model: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None

    def user_message(self) -> Message:
        """The user's turn as the model sees it, attachments included."""
        parts = [self.content]
        for attachment in self.attachments:
            parts.append(
                f"\n\n[attachment {attachment.name} ({attachment.media_type})]\n{attachment.content}"
            )
        return Message("user", "".join(parts))


@dataclass
class AgentDeps:
    """What the loop calls: models, memory, tools, metering."""

    router: ModelRouter
    memory: MemoryService
    tools: ToolRegistry
    meter: Meter
    embedding_model: str
    # How a tool is called: the gates (policy, approval) around `tools.call`, composed by the app
    # factory; None calls the registry directly.
    call_tool: ToolCaller | None = None


@dataclass
class RunState:
    """Everything one run knows; nodes read and update it."""

    principal: Principal
    persona: PersonaSpec
    run_input: RunInput
    recorder: RunRecorder
    deps: AgentDeps
    conversation: Conversation
    tools: dict[str, ToolStatus]
    namespace: str
    steps: int = 0
    tool_calls: int = 0
    trims: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model_used: str | None = None
    next_choice: ToolChoice = field(default_factory=ToolChoice)
    remembered: list[str] = field(default_factory=list)

    @property
    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def run_columns(self) -> dict[str, Any]:
        """The run row's progress columns (the model only once one answered: it names the one that did)."""
        columns: dict[str, Any] = {
            "steps": self.steps,
            "tool_calls": self.tool_calls,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }
        if self.model_used is not None:
            columns["model"] = self.model_used
        return columns


@dataclass(frozen=True, slots=True)
class Finish:
    """The run's answer."""

    message: Message


@dataclass(frozen=True, slots=True)
class Recall:
    """Recall memories for the user's message and put them in the prompt."""

    async def advance(self, state: RunState) -> CallModel:
        policy = state.persona.memory
        if not policy.recall:
            return CallModel()
        started = time.perf_counter()
        async with state.recorder.db() as db:
            found, tokens = await state.deps.memory.recall(
                db,
                state.principal,
                state.run_input.content,
                policy.top_k,
                state.namespace,
                {},
                policy.min_score,
            )
        state.deps.meter(
            state.principal,
            state.recorder.run_id,
            state.deps.embedding_model,
            "embedding",
            Usage(tokens, 0),
            time.perf_counter() - started,
            "ok",
        )
        fresh = [r for r in found if not state.conversation.mentions(r.item.text)]
        state.conversation.recalled = [r.item.text for r in fresh]
        await state.recorder.record(
            "memory.recalled", {"namespace": state.namespace, "items": [_recalled(r) for r in fresh]}
        )
        return CallModel()


@dataclass(frozen=True, slots=True)
class CallModel:
    """Ask the model for the next step: an answer, or tool calls."""

    async def advance(self, state: RunState) -> RunTools | Finish | CallModel:
        limits = state.persona.limits
        if state.steps >= limits.max_steps:
            raise RunStopped(
                "max_steps", f"the run reached its limit of {limits.max_steps} model calls (limits.max_steps)"
            )
        state.steps += 1
        choice, state.next_choice = state.next_choice, ToolChoice()
        if choice.mode in ("required", "function"):
            state.next_choice = ToolChoice("none")  # a forced call is followed by an answer
        request = ChatRequest(
            model=state.run_input.model,
            messages=tuple(state.conversation.prompt()),
            max_tokens=state.run_input.max_tokens or limits.max_tokens,
            temperature=_first(state.run_input.temperature, limits.temperature),
            seed=state.run_input.seed,
            tools=tuple(_spec(s) for s in state.tools.values()) if choice.mode != "none" else (),
            tool_choice=choice if state.tools else ToolChoice("none"),
        )
        started = time.perf_counter()
        try:
            result = await collect_stream(
                request.model, _streamed(state.deps.router.stream(state.principal, request), state.recorder)
            )
        except ContextLengthExceeded as exc:
            state.steps -= 1
            state.deps.meter(
                state.principal, state.recorder.run_id, request.model, "chat", None, 0.0, exc.code
            )
            return await _trim(state, exc)
        request_id = f"{state.recorder.run_id}.{state.steps}"
        state.deps.meter(
            state.principal,
            request_id,
            result.model,
            "chat",
            result.usage,
            time.perf_counter() - started,
            "ok",
        )
        state.model_used = result.model
        state.prompt_tokens += result.usage.prompt_tokens
        state.completion_tokens += result.usage.completion_tokens
        message = result.message
        tool_calls = message.tool_calls
        if tool_calls:
            return RunTools(message)
        return Finish(message)


@dataclass(frozen=True, slots=True)
class RunTools:
    """Run the calls the model asked for, in order, and give it the results."""

    message: Message

    async def advance(self, state: RunState) -> CallModel:
        limits = state.persona.limits
        if state.tool_calls + len(self.message.tool_calls) > limits.max_tool_calls:
            raise RunStopped(
                "max_tool_calls",
                f"the model asked for more than {limits.max_tool_calls} tool calls (limits.max_tool_calls)",
            )
        state.conversation.add(self.message)
        await state.recorder.record_many(
            [("tool.call", _call_data(call)) for call in self.message.tool_calls],
            Pending(messages=[self.message], run=state.run_columns()),
        )
        for call in self.message.tool_calls:
            state.tool_calls += 1
            await _run_one(state, call)
        return CallModel()


async def _run_one(state: RunState, call: ToolCall) -> None:
    status = state.tools.get(call.name)
    if status is None:
        allowed = ", ".join(sorted(state.tools)) or "none"
        outcome = ToolOutcome(
            call.name,
            f"there is no tool {call.name!r} for this agent; available: {allowed}",
            True,
            0.0,
            "unknown_tool",
        )
    else:

        async def record(type_: str, data: dict[str, Any]) -> None:
            await state.recorder.record(type_, data)

        context = ToolContext(
            state.principal,
            state.recorder.session_id,
            state.recorder.run_id,
            status.config,
            call_id=call.id,
            record=record,
        )
        call_tool = state.deps.call_tool or state.deps.tools.call
        outcome = await call_tool(status, context, call.arguments)
    result = Message("tool", outcome.content, tool_call_id=call.id, name=call.name)
    state.conversation.add(result)
    audit = tool_call_event(
        state.principal,
        outcome,
        call.arguments,
        session_id=state.recorder.session_id,
        run_id=state.recorder.run_id,
        call_id=call.id,
    )
    await state.recorder.record(
        "tool.result",
        {
            "call_id": call.id,
            "name": call.name,
            "content": outcome.content,
            "is_error": outcome.is_error,
            "error_code": outcome.error_code if outcome.is_error else None,
            "duration_ms": round(outcome.duration_s * 1000, 1),
        },
        Pending(messages=[result], outbox=[audit], run=state.run_columns()),
    )


async def _streamed(chunks: AsyncIterator[ChatChunk], recorder: RunRecorder) -> AsyncIterator[ChatChunk]:
    """Pass the model's chunks on, publishing each piece of text as an `assistant.delta`."""
    async for chunk in chunks:
        if chunk.content:
            recorder.live("assistant.delta", {"text": chunk.content})
        yield chunk


async def _trim(state: RunState, exc: ContextLengthExceeded) -> CallModel:
    if state.trims >= MAX_TRIMS:
        raise RunStopped("context_length_exceeded", exc.message)
    state.trims += 1
    dropped = state.conversation.drop_oldest_half()
    if not dropped:
        raise RunStopped(
            "context_length_exceeded",
            f"{exc.message} Nothing older is left to trim: shorten the message or its attachments.",
        )
    await state.recorder.record(
        "context.trimmed",
        {"strategy": "dropped_oldest", "dropped_messages": dropped, "kept_messages": state.conversation.size},
    )
    return CallModel()


async def drive(state: RunState) -> Finish:
    """Run the state machine from `Recall` to `Finish`."""
    node: Recall | CallModel | RunTools | Finish = Recall()
    while not isinstance(node, Finish):
        node = await node.advance(state)
    return node


def _spec(status: ToolStatus) -> ToolSpec:
    manifest = status.tool.manifest
    return ToolSpec(manifest.name, manifest.description, dict(manifest.parameters))


def _call_data(call: ToolCall) -> dict[str, Any]:
    return {"call_id": call.id, "name": call.name, "arguments": call.arguments}


def _recalled(found: Recalled) -> dict[str, Any]:
    return {"id": found.item.id, "text": found.item.text, "score": round(found.score, 4)}


def _first(*values: float | None) -> float | None:
    return next((v for v in values if v is not None), None)
