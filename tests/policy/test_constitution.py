"""The constitution service on a real, freshly migrated database (SQLite and PostgreSQL): canonical hashing
independent of key order, Ed25519 sign/verify, refusal of unsigned, tampered and foreign-signed documents,
append-only versions with `constitution.updated` and audit events in the outbox, and fail-closed refusal of a
row changed in the database."""

from __future__ import annotations

import base64
import copy
import hashlib
import logging
import secrets
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.core.errors import InvalidRequest
from somaagent.core.principal import Principal
from somaagent.events.schemas import AUDIT_EVENTS, CONSTITUTION_UPDATED
from somaagent.events.tables import OutboxEvent
from somaagent.identity.capabilities import OPERATOR_CAPABILITIES
from somaagent.identity.service import create_tenant
from somaagent.policy.constitution import (
    DEFAULT_CONSTITUTION,
    ConstitutionInvalid,
    Constitutions,
    parse_constitution,
)
from somaagent.policy.constitution_signing import (
    ConstitutionSignatureInvalid,
    ConstitutionSigner,
    ConstitutionUnsigned,
    SignedDocument,
    canonical_bytes,
    document_sha256,
    key_id,
)
from somaagent.policy.tables import ConstitutionVersion

PLATFORM_KEY = Ed25519PrivateKey.generate()
FOREIGN_KEY = Ed25519PrivateKey.generate()
SIGNER = ConstitutionSigner(PLATFORM_KEY)
FOREIGN = ConstitutionSigner(FOREIGN_KEY)

DOCUMENT: dict[str, Any] = {
    "name": "acme",
    "principles": ["Never reveal customer data.", "Cite sources."],
    "rules": [
        {"id": "no-secrets", "kind": "pii", "detectors": ["secret"], "weight": 1.0, "severity": "high"},
        {"id": "no-exploits", "kind": "keywords", "words": ["zero day exploit"], "weight": 0.6},
    ],
}


def reordered(value: Any) -> Any:
    """The same JSON value with every object's keys in reverse order."""
    if isinstance(value, dict):
        return {k: reordered(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [reordered(v) for v in value]
    return value


async def make_tenant(sessions: async_sessionmaker[AsyncSession]) -> Principal:
    async with sessions() as session:
        tenant = await create_tenant(session, None, f"c-{secrets.token_hex(4)}")
        await session.commit()
        return Principal(tenant.id, tenant.name, "key:key_test", "key_test", OPERATOR_CAPABILITIES)


async def put(
    service: Constitutions,
    sessions: async_sessionmaker[AsyncSession],
    principal: Principal,
    document: dict[str, Any],
) -> int:
    signed = SIGNER.sign(document)
    async with sessions() as session:
        stored = await service.put(
            session, principal, signed.document, signed.signature, signed.signing_key_id
        )
        await session.commit()
    service.invalidate(principal.tenant_id)
    return stored.version


# --- canonical form, hash, signatures (no database) -----------------------------------------------


def test_canonical_bytes_and_hash_do_not_depend_on_key_order() -> None:
    assert canonical_bytes(reordered(DOCUMENT)) == canonical_bytes(DOCUMENT)
    assert document_sha256(reordered(DOCUMENT)) == document_sha256(DOCUMENT)
    # A fixed vector: members sorted, no whitespace, 1.0 written as 1 (RFC 8785).
    assert canonical_bytes({"b": 1.0, "a": ["x", 0.5]}) == b'{"a":["x",0.5],"b":1}'
    assert (
        document_sha256({"b": 1.0, "a": ["x", 0.5]}) == hashlib.sha256(b'{"a":["x",0.5],"b":1}').hexdigest()
    )
    changed = copy.deepcopy(DOCUMENT)
    changed["principles"][1] = "Cite sources!"
    assert document_sha256(changed) != document_sha256(DOCUMENT)


def test_sign_and_verify_round_trip_with_base64url_signatures() -> None:
    signed = SIGNER.sign(DOCUMENT)
    assert signed.sha256 == document_sha256(DOCUMENT)
    assert len(signed.signature) == 86 and "=" not in signed.signature  # 64 bytes, base64url, no padding
    assert set(signed.signature) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    raw = base64.urlsafe_b64decode(signed.signature + "==")
    PLATFORM_KEY.public_key().verify(raw, canonical_bytes(DOCUMENT))  # plain Ed25519 over the bytes
    assert signed.signing_key_id == key_id(PLATFORM_KEY.public_key()) == SIGNER.key_id
    assert len(SIGNER.key_id) == 16
    # Key order does not matter to verification; the envelope survives JSON.
    assert SIGNER.verify(reordered(DOCUMENT), signed.signature) == SIGNER.key_id
    again = SignedDocument.from_json(signed.to_json())
    assert again == signed
    assert SIGNER.verify(again.document, again.signature, again.signing_key_id, again.sha256) == SIGNER.key_id


def test_tampered_unsigned_malformed_and_foreign_signatures_are_refused() -> None:
    signed = SIGNER.sign(DOCUMENT)
    changed = copy.deepcopy(DOCUMENT)
    changed["rules"][1]["weight"] = 0.1
    with pytest.raises(ConstitutionSignatureInvalid) as tampered:
        SIGNER.verify(changed, signed.signature)
    assert tampered.value.code == "constitution_signature_invalid"
    with pytest.raises(ConstitutionSignatureInvalid) as stale:
        SIGNER.verify(changed, signed.signature, claimed_sha256=signed.sha256)
    assert "changed after signing" in stale.value.message and stale.value.param == "document"
    for missing in (None, ""):
        with pytest.raises(ConstitutionUnsigned) as unsigned:
            SIGNER.verify(DOCUMENT, missing)
        assert unsigned.value.code == "constitution_unsigned" and unsigned.value.param == "signature"
    for garbage in ("not base64!", signed.signature[:40], signed.signature + "="):
        with pytest.raises(ConstitutionSignatureInvalid):
            SIGNER.verify(DOCUMENT, garbage)
    foreign = FOREIGN.sign(DOCUMENT)
    with pytest.raises(ConstitutionSignatureInvalid) as untrusted:
        SIGNER.verify(DOCUMENT, foreign.signature, foreign.signing_key_id)
    assert untrusted.value.param == "signing_key_id" and FOREIGN.key_id in untrusted.value.message
    with pytest.raises(ConstitutionSignatureInvalid):
        SIGNER.verify(DOCUMENT, foreign.signature)  # no key id: every trusted key is tried, none verifies
    with pytest.raises(ConstitutionSignatureInvalid):
        SIGNER.verify(DOCUMENT, foreign.signature, SIGNER.key_id)  # claiming the platform key does not help
    # An extra trusted key is accepted when the signer is told to trust it.
    trusting = ConstitutionSigner(Ed25519PrivateKey.generate(), {FOREIGN.key_id: FOREIGN_KEY.public_key()})
    assert trusting.verify(DOCUMENT, foreign.signature) == FOREIGN.key_id
    with pytest.raises(ValueError, match="holds key"):
        ConstitutionSigner(Ed25519PrivateKey.generate(), {"0" * 16: FOREIGN_KEY.public_key()})


def test_documents_are_validated_field_by_field() -> None:
    principles, rules = parse_constitution(DOCUMENT)
    assert principles == DOCUMENT["principles"] and [r.id for r in rules] == ["no-secrets", "no-exploits"]
    assert parse_constitution(DEFAULT_CONSTITUTION)[1] == []
    cases: list[tuple[Any, str]] = [
        (["not", "an", "object"], "document"),
        ({**DOCUMENT, "extra": 1}, "extra"),
        ({**DOCUMENT, "name": ""}, "name"),
        ({**DOCUMENT, "principles": "be nice"}, "principles"),
        ({**DOCUMENT, "principles": ["ok", 7]}, "principles[1]"),
        ({**DOCUMENT, "rules": {"id": "x"}}, "rules"),
        ({**DOCUMENT, "rules": ["x"]}, "rules[0]"),
        ({**DOCUMENT, "rules": [{"id": "bad", "kind": "regex", "pattern": "("}]}, "rules[0]"),
    ]
    for document, param in cases:
        with pytest.raises(InvalidRequest) as refused:
            parse_constitution(document)
        assert (refused.value.param or "").startswith(param), (document, refused.value.param)
    with pytest.raises(InvalidRequest) as nan:
        parse_constitution({**DOCUMENT, "principles": [float("nan")]})
    assert nan.value.code == "not_canonical_json"


# --- the service on a real database ------------------------------------------------------------------


async def test_default_is_in_force_until_a_version_is_stored(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    service = Constitutions(sessions, SIGNER, cache_ttl_s=60)
    principal = await make_tenant(sessions)
    default = await service.active(principal.tenant_id)
    assert default.version == 0 and default.rules == [] and default.document == DEFAULT_CONSTITUTION
    assert default.sha256 == document_sha256(DEFAULT_CONSTITUTION) == service.default_sha256
    assert SIGNER.verify(default.document, default.signature, default.signing_key_id) == SIGNER.key_id
    default.document["principles"].append("edited")  # a copy: the platform default itself is unchanged
    assert "edited" not in DEFAULT_CONSTITUTION["principles"]
    assert service.default_sha256 == document_sha256(DEFAULT_CONSTITUTION)
    assert await service.current_hash(principal.tenant_id) == service.default_sha256


async def test_versions_append_with_events_in_the_same_transaction(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    service = Constitutions(sessions, SIGNER, cache_ttl_s=60)
    principal = await make_tenant(sessions)
    other = await make_tenant(sessions)
    assert await put(service, sessions, principal, DOCUMENT) == 1
    second = {**DOCUMENT, "principles": ["Only one principle now."]}
    assert await put(service, sessions, principal, second) == 2

    active = await service.active(principal.tenant_id)
    assert active.version == 2 and active.sha256 == document_sha256(second)
    assert active.principles == ["Only one principle now."] and [r.id for r in active.rules] == [
        "no-secrets",
        "no-exploits",
    ]
    assert active.created_by == "key:key_test" and active.signing_key_id == SIGNER.key_id
    assert (await service.active(other.tenant_id)).version == 0  # another tenant is untouched
    async with sessions() as session:
        old = await service.version(session, principal.tenant_id, 1)
        assert old.sha256 == document_sha256(DOCUMENT)
        infos, has_more = await service.versions(session, principal.tenant_id, limit=1)
        assert [i.version for i in infos] == [2] and has_more
        infos, has_more = await service.versions(session, principal.tenant_id, limit=5, before=2)
        assert [(i.version, i.name) for i in infos] == [(1, "acme")] and not has_more
        assert (await service.versions(session, other.tenant_id, limit=5)) == ([], False)

        events = list(
            await session.scalars(
                select(OutboxEvent)
                .where(OutboxEvent.tenant_id == principal.tenant_id)
                .order_by(OutboxEvent.seq)
            )
        )
    updates = [e for e in events if e.topic == CONSTITUTION_UPDATED]
    assert [e.data for e in updates] == [
        {
            "tenant_id": principal.tenant_id,
            "version": 1,
            "sha256": document_sha256(DOCUMENT),
            "previous_sha256": service.default_sha256,
            "signing_key_id": SIGNER.key_id,
        },
        {
            "tenant_id": principal.tenant_id,
            "version": 2,
            "sha256": document_sha256(second),
            "previous_sha256": document_sha256(DOCUMENT),
            "signing_key_id": SIGNER.key_id,
        },
    ]
    assert all(e.type == "constitution.updated" and e.actor == "key:key_test" for e in updates)
    audits = [e for e in events if e.topic == AUDIT_EVENTS and e.type == "constitution.updated"]
    assert [e.data["version"] for e in audits] == [1, 2]


async def test_refused_puts_store_nothing(sessions: async_sessionmaker[AsyncSession]) -> None:
    service = Constitutions(sessions, SIGNER, cache_ttl_s=0)
    principal = await make_tenant(sessions)
    signed = SIGNER.sign(DOCUMENT)
    tampered = {**DOCUMENT, "name": "acme-renamed"}
    foreign = FOREIGN.sign(DOCUMENT)
    invalid = {**DOCUMENT, "rules": [{"id": "r", "kind": "regex", "pattern": "[unclosed"}]}
    attempts: list[tuple[Any, str | None, str]] = [
        (DOCUMENT, None, "constitution_unsigned"),
        (tampered, signed.signature, "constitution_signature_invalid"),
        (DOCUMENT, foreign.signature, "constitution_signature_invalid"),
        (invalid, SIGNER.sign(invalid).signature, "invalid_value"),
    ]
    for document, signature, code in attempts:
        async with sessions() as session:
            with pytest.raises(InvalidRequest) as refused:
                await service.put(session, principal, document, signature)
            await session.commit()
        assert refused.value.code == code, refused.value.message
    assert "rules[0]" in (refused.value.param or "")
    async with sessions() as session:
        assert (await service.versions(session, principal.tenant_id, limit=5)) == ([], False)
        outbox = await session.scalars(select(OutboxEvent).where(OutboxEvent.topic == CONSTITUTION_UPDATED))
        assert [e for e in outbox if e.tenant_id == principal.tenant_id] == []


async def test_validate_reports_every_problem_without_storing(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    service = Constitutions(sessions, SIGNER, cache_ttl_s=0)
    signed = SIGNER.sign(DOCUMENT)
    assert service.validate(DOCUMENT, None).to_json() == {
        "valid": True,
        "sha256": document_sha256(DOCUMENT),
        "errors": [],
        "signature_valid": None,
        "signing_key_id": None,
    }
    good = service.validate(reordered(DOCUMENT), signed.signature)
    assert good.valid and good.signature_valid and good.signing_key_id == SIGNER.key_id
    bad = service.validate({"name": "", "principles": [3], "rules": [{"id": "x"}], "color": "red"}, "abc")
    params = [e.param for e in bad.errors]
    assert not bad.valid and bad.signature_valid is False and bad.signing_key_id is None
    assert "color" in params and "name" in params and "principles[0]" in params and "signature" in params
    assert any(p.startswith("rules[0]") for p in params)
    foreign = service.validate(DOCUMENT, FOREIGN.sign(DOCUMENT).signature)
    assert not foreign.valid and foreign.signature_valid is False


async def test_a_row_changed_in_the_database_is_refused(
    sessions: async_sessionmaker[AsyncSession], caplog: pytest.LogCaptureFixture
) -> None:
    service = Constitutions(sessions, SIGNER, cache_ttl_s=0)
    principal = await make_tenant(sessions)
    await put(service, sessions, principal, DOCUMENT)
    assert (await service.active(principal.tenant_id)).version == 1
    weakened = {**DOCUMENT, "rules": []}
    where = (ConstitutionVersion.tenant_id == principal.tenant_id) & (ConstitutionVersion.version == 1)

    # 1. The document edited in place (the stored hash no longer matches).
    async with sessions() as session:
        await session.execute(update(ConstitutionVersion).where(where).values(document=weakened))
        await session.commit()
    with (
        caplog.at_level(logging.ERROR, logger="somaagent.policy.constitution"),
        pytest.raises(ConstitutionInvalid) as refused,
    ):
        await service.active(principal.tenant_id)
    assert refused.value.code == "constitution_invalid"
    assert any(
        "failed verification" in r.getMessage() and principal.tenant_id in r.getMessage()
        for r in caplog.records
    )
    with pytest.raises(ConstitutionInvalid):
        await service.current_hash(principal.tenant_id)

    # 2. The hash recomputed to match: the signature still gives it away.
    async with sessions() as session:
        await session.execute(
            update(ConstitutionVersion).where(where).values(sha256=document_sha256(weakened))
        )
        await session.commit()
    with pytest.raises(ConstitutionInvalid):
        await service.active(principal.tenant_id)

    # 3. Re-signed by some other key: not trusted either.
    forged = FOREIGN.sign(weakened)
    async with sessions() as session:
        await session.execute(
            update(ConstitutionVersion)
            .where(where)
            .values(signature=forged.signature, signing_key_id=forged.signing_key_id)
        )
        await session.commit()
    with pytest.raises(ConstitutionInvalid):
        await service.active(principal.tenant_id)
    async with sessions() as session:
        with pytest.raises(ConstitutionInvalid):
            await service.version(session, principal.tenant_id, 1)

    # The way out: an operator stores a signed version again.
    assert await put(service, sessions, principal, DOCUMENT) == 2
    assert (await service.active(principal.tenant_id)).sha256 == document_sha256(DOCUMENT)


async def test_active_is_cached_for_the_ttl_and_invalidated_on_demand(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    principal = await make_tenant(sessions)
    writer = Constitutions(sessions, SIGNER, cache_ttl_s=0)
    cached = Constitutions(sessions, SIGNER, cache_ttl_s=3600)  # another replica, trusting its copy long
    assert (await cached.active(principal.tenant_id)).version == 0
    await put(writer, sessions, principal, DOCUMENT)
    assert (await cached.active(principal.tenant_id)).version == 0  # still its cached copy
    assert (await writer.active(principal.tenant_id)).version == 1  # TTL 0 reads the database each time
    cached.invalidate(principal.tenant_id)
    assert (await cached.active(principal.tenant_id)).version == 1
