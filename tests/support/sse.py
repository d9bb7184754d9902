"""Reading Server-Sent Events the way a client does: `id:`, `event:` and `data:` fields, blank-line framed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx


def events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """Each event's JSON `data`, with the SSE `id` and `event` fields checked against it."""
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if line == "":
            if "data" in fields:
                data = json.loads(fields["data"])
                if "id" in fields:
                    assert int(fields["id"]) == data["id"], fields
                    assert fields.get("event") == data["type"], fields
                else:
                    data = {"type": fields.get("event", "message"), "data": data}
                yield data
            fields = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        fields[name] = value[1:] if value.startswith(" ") else value
