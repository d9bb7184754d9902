"""Turning normalized messages into a local model's prompt, and its output back into tool calls.

Local models get tools the way SmolLM2 and most small instruct models were trained on them: a
system-prompt listing and a `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` reply.
When a call is forced, the provider primes the reply and constrains it with a JSON-schema grammar,
so the arguments always validate; in `auto` mode the reply is parsed and validated afterwards.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import jsonschema
from jinja2 import Template
from jinja2.sandbox import ImmutableSandboxedEnvironment

from somaagent.core.ids import new_id
from somaagent.models.messages import ChatRequest, Message, ToolCall, ToolSpec

TOOL_OPEN = "<tool_call>"
TOOL_CLOSE = "</tool_call>"
JSON_INSTRUCTION = "Reply with a single JSON value and nothing else."

_jinja = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)


@dataclass(frozen=True, slots=True)
class PromptPlan:
    """What to feed the model and how to read its output.

    `primer` is text appended after the assistant header (the start of a forced tool call);
    `schema` constrains generation; `forced_tool` names the function whose arguments are being
    generated (the output is the arguments object), `any_tool` means the output is
    `{"name", "arguments"}` for one of the tools.
    """

    prompt: str
    primer: str = ""
    schema: dict[str, Any] | None = None
    forced_tool: str | None = None
    any_tool: bool = False
    parse_tool_calls: bool = False


def _tools_text(tools: tuple[ToolSpec, ...]) -> str:
    listing = json.dumps(
        [{"name": t.name, "description": t.description, "parameters": t.parameters} for t in tools]
    )
    return (
        "You can call functions. Available functions:\n"
        f"<tools>{listing}</tools>\n"
        f'To call a function reply with only {TOOL_OPEN}{{"name": <function name>, "arguments": '
        f"<JSON object>}}{TOOL_CLOSE}."
    )


def _as_template_message(message: Message) -> dict[str, str]:
    content = message.content or ""
    if message.role == "assistant" and message.tool_calls:
        calls = "".join(
            f'{TOOL_OPEN}{{"name": {json.dumps(c.name)}, "arguments": {c.arguments}}}{TOOL_CLOSE}'
            for c in message.tool_calls
        )
        content = content + calls
    if message.role == "tool":
        # ChatML models know the "tool" role poorly; a labelled user turn reads unambiguously.
        name = f" {message.name}" if message.name else ""
        return {"role": "user", "content": f"Result of function{name}: {content}"}
    return {"role": message.role, "content": content}


def plan_prompt(template: str, request: ChatRequest) -> PromptPlan:
    """Render the chat template and decide the decoding constraints for this request."""
    messages = [_as_template_message(m) for m in request.messages]
    system_extra: list[str] = []
    tools = request.tools if request.tool_choice.mode != "none" else ()
    if tools:
        system_extra.append(_tools_text(tools))
    fmt = request.response_format
    if fmt.type != "text" and not tools:
        system_extra.append(JSON_INSTRUCTION)
        if fmt.schema is not None:
            system_extra.append("The JSON must follow this schema: " + json.dumps(fmt.schema))
    if system_extra:
        extra = "\n\n".join(system_extra)
        if messages and messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": f"{messages[0]['content']}\n\n{extra}"}
        else:
            messages.insert(0, {"role": "system", "content": extra})
    prompt = _compiled(template).render(messages=messages, add_generation_prompt=True)

    choice = request.tool_choice
    if tools and choice.mode == "function":
        spec = next(t for t in tools if t.name == choice.function)
        primer = f'{TOOL_OPEN}{{"name": {json.dumps(spec.name)}, "arguments": '
        return PromptPlan(
            prompt, primer=primer, schema=_object_schema(spec.parameters), forced_tool=spec.name
        )
    if tools and choice.mode == "required":
        any_of = [
            {
                "type": "object",
                "properties": {"name": {"const": t.name}, "arguments": _object_schema(t.parameters)},
                "required": ["name", "arguments"],
            }
            for t in tools
        ]
        return PromptPlan(prompt, primer=TOOL_OPEN, schema={"anyOf": any_of}, any_tool=True)
    if tools:
        return PromptPlan(prompt, parse_tool_calls=True)
    if fmt.type == "json_schema" and fmt.schema is not None:
        return PromptPlan(prompt, schema=fmt.schema)
    if fmt.type == "json_object":
        return PromptPlan(prompt, schema={"type": "object"})
    return PromptPlan(prompt)


@functools.lru_cache(maxsize=16)
def _compiled(template: str) -> Template:
    """Compile a chat template once (compiling costs milliseconds, rendering microseconds)."""
    return _jinja.from_string(template)


def _object_schema(parameters: dict[str, Any]) -> dict[str, Any]:
    # A function with no declared parameters still takes an (empty) object.
    return parameters if parameters else {"type": "object", "properties": {}}


def new_tool_call_id() -> str:
    """An OpenAI-style tool call id."""
    return new_id("call")


def forced_call(name: str, arguments_text: str) -> ToolCall:
    """The tool call produced by a forced-function generation (the text is the arguments)."""
    return ToolCall(id=new_tool_call_id(), name=name, arguments=_compact(arguments_text))


def any_tool_call(output: str) -> ToolCall:
    """The tool call produced by a `required` generation (`{"name", "arguments"}`)."""
    data = json.loads(output)
    return ToolCall(id=new_tool_call_id(), name=data["name"], arguments=json.dumps(data["arguments"]))


def parse_auto(output: str, tools: tuple[ToolSpec, ...]) -> tuple[str | None, tuple[ToolCall, ...]]:
    """Split free output into text and valid tool calls; invalid calls stay text."""
    if TOOL_OPEN not in output:
        return output, ()
    calls: list[ToolCall] = []
    text_parts: list[str] = []
    rest = output
    by_name = {t.name: t for t in tools}
    while TOOL_OPEN in rest:
        before, _, after = rest.partition(TOOL_OPEN)
        body, closed, rest = after.partition(TOOL_CLOSE)
        text_parts.append(before)
        call = _valid_call(body, by_name)
        if call is None:
            text_parts.append(TOOL_OPEN + body + (TOOL_CLOSE if closed else ""))
        else:
            calls.append(call)
    text_parts.append(rest)
    text = "".join(text_parts).strip()
    return (text or None), tuple(calls)


def _valid_call(body: str, tools: dict[str, ToolSpec]) -> ToolCall | None:
    try:
        data = json.loads(body)
        spec = tools[data["name"]]
        arguments = data.get("arguments", {})
        jsonschema.validate(arguments, _object_schema(spec.parameters))
    except (ValueError, KeyError, TypeError, jsonschema.ValidationError, jsonschema.SchemaError):
        return None
    return ToolCall(id=new_tool_call_id(), name=spec.name, arguments=json.dumps(arguments))


def _compact(text: str) -> str:
    try:
        return json.dumps(json.loads(text))
    except ValueError:
        return text.strip()
