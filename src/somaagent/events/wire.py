"""The wire form of an event: the JSON envelope of ARCHITECTURE §6 as bytes, and back."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson

from somaagent.events.schemas import Event


class EnvelopeInvalid(ValueError):
    """Bytes that are not an event envelope (not JSON, or a required field missing or mistyped)."""


def encode_event(event: Event) -> bytes:
    """The envelope `{id, type, version, tenant_id, occurred_at, actor, data}` as UTF-8 JSON."""
    return orjson.dumps(event.to_json())


def decode_event(topic: str, payload: bytes) -> Event:
    """The event in `payload`, read from `topic`; `EnvelopeInvalid` says what is wrong."""
    try:
        raw: Any = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise EnvelopeInvalid(f"not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise EnvelopeInvalid("the envelope is not a JSON object")
    try:
        event_id, type_, version = raw["id"], raw["type"], raw["version"]
        occurred_at = datetime.fromisoformat(raw["occurred_at"])
        data = raw["data"]
    except (KeyError, TypeError, ValueError) as exc:
        raise EnvelopeInvalid(f"envelope field missing or invalid: {exc!r}") from exc
    tenant_id, actor = raw.get("tenant_id"), raw.get("actor")
    if not (
        isinstance(event_id, str)
        and isinstance(type_, str)
        and isinstance(version, int)
        and isinstance(data, dict)
        and (tenant_id is None or isinstance(tenant_id, str))
        and (actor is None or isinstance(actor, str))
        and occurred_at.tzinfo is not None
    ):
        raise EnvelopeInvalid("envelope fields have the wrong types (or occurred_at has no zone)")
    return Event(
        topic=topic,
        type=type_,
        tenant_id=tenant_id,
        actor=actor,
        data=data,
        id=event_id,
        occurred_at=occurred_at,
        version=version,
    )
