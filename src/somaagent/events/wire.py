"""The wire form of an event: the JSON envelope of ARCHITECTURE §6 as bytes, and back."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import String

from somaagent.events.schemas import Event
from somaagent.events.tables import OutboxEvent


def _column_length(name: str) -> int:
    column_type = OutboxEvent.__table__.c[name].type
    assert isinstance(column_type, String) and column_type.length is not None
    return column_type.length


# The envelope's strings must fit the columns an event is recorded in (its outbox row, a dead letter,
# a group's mark): a longer one would fail that insert after the envelope was accepted, and a message
# no group can record or dead-letter would stall its partition. So it is refused here, as invalid.
_MAX_LENGTHS = {name: _column_length(name) for name in ("id", "type", "tenant_id", "actor")}


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
    for name, value in (("id", event_id), ("type", type_), ("tenant_id", tenant_id), ("actor", actor)):
        if value is not None and len(value) > _MAX_LENGTHS[name]:
            raise EnvelopeInvalid(f"envelope field {name} is longer than {_MAX_LENGTHS[name]} characters")
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
