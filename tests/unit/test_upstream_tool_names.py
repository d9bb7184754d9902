"""Tool names with dots (`mcp.time.get_current_time`) go to OpenAI-compatible upstreams in the form
OpenAI accepts (`^[a-zA-Z0-9_-]{1,64}$`) and come back as ours."""

from __future__ import annotations

import re

from somaagent.models.messages import ChatRequest, Message, ToolCall, ToolChoice, ToolSpec
from somaagent.models.providers.openai_compat import request_body, wire_names

OPENAI_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def test_names_are_mapped_both_ways_without_collisions() -> None:
    request = ChatRequest(
        model="m",
        messages=(
            Message("user", "hi"),
            Message("assistant", None, (ToolCall("c1", "mcp.time.get_current_time", "{}"),)),
            Message("tool", "12:00", tool_call_id="c1", name="mcp.time.get_current_time"),
        ),
        tools=(
            ToolSpec("mcp.time.get_current_time"),
            ToolSpec("mcp_time_get_current_time"),  # what the first would naively become
            ToolSpec("python"),
        ),
        tool_choice=ToolChoice("function", "mcp.time.get_current_time"),
    )
    names = wire_names(request)
    assert names["python"] == "python" and names["mcp_time_get_current_time"] == "mcp_time_get_current_time"
    assert len(set(names.values())) == 3 and all(OPENAI_NAME.fullmatch(n) for n in names.values())
    body = request_body(request, "upstream", stream=False)
    sent = [t["function"]["name"] for t in body["tools"]]
    assert sent == [names[t.name] for t in request.tools]
    assert body["tool_choice"]["function"]["name"] == names["mcp.time.get_current_time"]
    assert body["messages"][1]["tool_calls"][0]["function"]["name"] == names["mcp.time.get_current_time"]
    assert body["messages"][2]["name"] == names["mcp.time.get_current_time"]
    assert wire_names(request) == names  # deterministic: the answer maps back with the same call
