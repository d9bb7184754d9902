"""A tiny MCP stdio server for tests: `echo` (description read from a file at every listing), `sleep`, `add`.

Env: MCP_FIXTURE_DESCRIPTION_FILE (the echo tool's description; changing it is a "rug pull"),
MCP_FIXTURE_PID_FILE (the process writes its pid there, so a test can kill it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server

DEFAULT_DESCRIPTION = "Echo the text back."


def _echo_description() -> str:
    path = os.environ.get("MCP_FIXTURE_DESCRIPTION_FILE")
    if path and Path(path).is_file():
        return Path(path).read_text().strip() or DEFAULT_DESCRIPTION
    return DEFAULT_DESCRIPTION


def _tools() -> list[types.Tool]:
    return [
        types.Tool(
            name="echo",
            description=_echo_description(),
            input_schema={
                "type": "object",
                "properties": {"text": {"type": "string", "maxLength": 1000}},
                "required": ["text"],
                "additionalProperties": False,
            },
        ),
        types.Tool(
            name="sleep",
            description="Sleep for some seconds, then answer 'slept'.",
            input_schema={
                "type": "object",
                "properties": {"seconds": {"type": "number", "minimum": 0, "maximum": 60}},
                "required": ["seconds"],
            },
        ),
        types.Tool(
            name="add",
            description="Add two integers.",
            input_schema={
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        ),
    ]


async def list_tools(_ctx: Any, _params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
    return types.ListToolsResult(tools=_tools())


async def call_tool(_ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
    args = params.arguments or {}
    if params.name == "echo":
        text = str(args.get("text", ""))
        return types.CallToolResult(content=[types.TextContent(type="text", text=text)])
    if params.name == "sleep":
        await anyio.sleep(float(args.get("seconds", 0)))
        return types.CallToolResult(content=[types.TextContent(type="text", text="slept")])
    if params.name == "add":
        total = int(args["a"]) + int(args["b"])
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=str(total))], structured_content={"sum": total}
        )
    unknown = types.TextContent(type="text", text=f"no tool {params.name}")
    return types.CallToolResult(content=[unknown], is_error=True)


async def main() -> None:
    pid_file = os.environ.get("MCP_FIXTURE_PID_FILE")
    if pid_file:
        Path(pid_file).write_text(str(os.getpid()))
    server: Server[Any] = Server(
        "soma-fixture", version="1.0.0", on_list_tools=list_tools, on_call_tool=call_tool
    )
    async with stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())


if __name__ == "__main__":
    anyio.run(main)
