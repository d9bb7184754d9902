"""The tenant's constitution: a signed, hashed document of principles and rules, versioned append-only.

Owns: `ActiveConstitution`, `ValidationResult`, `VersionInfo`, `ConstitutionInvalid` and the
`Constitutions` service (reads verified and cached, writes that emit `constitution.updated`); the
document's shape is `constitution_document`, signing is `constitution_signing` (both re-exported here).
May import: core, db, events, policy. Never: identity, api (the signing key is passed in).

A stored row is trusted only after its signature and its hash are checked again on every load: a row
changed in the database raises `ConstitutionInvalid`, and callers fail closed on it.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.core.clock import utcnow
from somaagent.core.errors import Conflict, InvalidRequest, NotFound, SomaError
from somaagent.core.principal import Principal
from somaagent.events.outbox import add_event, audit
from somaagent.events.schemas import CONSTITUTION_UPDATED, Event
from somaagent.policy.constitution_document import (
    DEFAULT_CONSTITUTION,
    DocumentProblem,
    document_problems,
    parse_constitution,
)
from somaagent.policy.constitution_signing import (
    ConstitutionSigner,
    canonical_bytes,
    document_sha256,
)
from somaagent.policy.document import Rule
from somaagent.policy.tables import ConstitutionVersion

__all__ = [
    "DEFAULT_CONSTITUTION",
    "ActiveConstitution",
    "ConstitutionInvalid",
    "Constitutions",
    "DocumentProblem",
    "ValidationResult",
    "VersionInfo",
    "document_problems",
    "parse_constitution",
]

log = logging.getLogger(__name__)


class ConstitutionInvalid(SomaError):
    """The stored constitution failed verification (changed in the database); nothing may rely on it."""

    code = "constitution_invalid"


@dataclass(frozen=True, slots=True)
class ActiveConstitution:
    """One verified version of a tenant's constitution (version 0: the platform default)."""

    tenant_id: str
    version: int
    sha256: str
    rules: list[Rule]
    principles: list[str]
    document: dict[str, Any]
    signature: str = ""
    signing_key_id: str = ""
    created_at: datetime | None = None
    created_by: str | None = None


@dataclass(frozen=True, slots=True)
class ValidationResult:
    """What `PUT /v1/constitution` would say about a document and signature, without storing them."""

    valid: bool
    sha256: str | None
    errors: tuple[DocumentProblem, ...]
    signature_valid: bool | None  # None: no signature was given
    signing_key_id: str | None

    def to_json(self) -> dict[str, Any]:
        """The `/v1/constitution/validate` response body."""
        return {
            "valid": self.valid,
            "sha256": self.sha256,
            "errors": [{"param": e.param, "message": e.message} for e in self.errors],
            "signature_valid": self.signature_valid,
            "signing_key_id": self.signing_key_id,
        }


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """One stored version, without its document."""

    version: int
    sha256: str
    name: str
    signing_key_id: str
    created_at: datetime
    created_by: str


class Constitutions:
    """Each tenant's constitution: the one in force (verified, cached for `cache_ttl_s`), its history,
    validation and new versions. One per process."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        signer: ConstitutionSigner,
        cache_ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessions = sessions
        self.signer = signer
        self._ttl_s = cache_ttl_s
        self._clock = clock
        # tenant id -> (expires at, the verified constitution, or why the stored one was refused)
        self._cache: dict[str, tuple[float, ActiveConstitution | str]] = {}
        self._default = signer.sign(DEFAULT_CONSTITUTION)
        _, self._default_rules = parse_constitution(DEFAULT_CONSTITUTION)

    @property
    def default_sha256(self) -> str:
        """The hash of the platform default (version 0)."""
        return self._default.sha256

    async def active(self, tenant_id: str) -> ActiveConstitution:
        """The constitution in force for the tenant; raises `ConstitutionInvalid` when the stored one fails
        verification (callers fail closed)."""
        now = self._clock()
        cached = self._cache.get(tenant_id)
        if cached is not None and cached[0] > now:
            if isinstance(cached[1], str):
                raise ConstitutionInvalid(cached[1])
            return cached[1]
        async with self._sessions() as session:
            row = await session.scalar(
                select(ConstitutionVersion)
                .where(ConstitutionVersion.tenant_id == tenant_id)
                .order_by(ConstitutionVersion.version.desc())
                .limit(1)
            )
        try:
            found = self._default_for(tenant_id) if row is None else self._verified(row)
        except ConstitutionInvalid as exc:
            # Cached too, so a hot path refusing requests does not reread (and relog) on every call.
            self._cache[tenant_id] = (now + self._ttl_s, exc.message)
            raise
        self._cache[tenant_id] = (now + self._ttl_s, found)
        return found

    async def current_hash(self, tenant_id: str) -> str:
        """The SHA-256 of the tenant's constitution in force (what access tokens carry)."""
        return (await self.active(tenant_id)).sha256

    def invalidate(self, tenant_id: str) -> None:
        """Forget the cached constitution after a committed change (other processes: within the TTL)."""
        self._cache.pop(tenant_id, None)

    async def version(self, session: AsyncSession, tenant_id: str, version: int) -> ActiveConstitution:
        """One version of the tenant's constitution, verified (0: the default)."""
        if version == 0:
            return self._default_for(tenant_id)
        row = await session.get(ConstitutionVersion, (tenant_id, version))
        if row is None:
            raise NotFound(
                f"the tenant has no constitution version {version}; list them at /v1/constitution/versions",
                param="version",
            )
        return self._verified(row)

    async def versions(
        self, session: AsyncSession, tenant_id: str, limit: int, before: int | None = None
    ) -> tuple[list[VersionInfo], bool]:
        """Stored versions newest first (below `before`, if given), and whether more follow."""
        query = select(ConstitutionVersion).where(ConstitutionVersion.tenant_id == tenant_id)
        if before is not None:
            query = query.where(ConstitutionVersion.version < before)
        rows = list(
            (await session.scalars(query.order_by(ConstitutionVersion.version.desc()).limit(limit + 1))).all()
        )
        infos = [
            VersionInfo(
                version=row.version,
                sha256=row.sha256,
                name=str(row.document.get("name", "")) if isinstance(row.document, dict) else "",
                signing_key_id=row.signing_key_id,
                created_at=row.created_at,
                created_by=row.created_by,
            )
            for row in rows[:limit]
        ]
        return infos, len(rows) > limit

    def validate(
        self,
        document: Any,
        signature: str | None,
        signing_key_id: str | None = None,
        claimed_sha256: str | None = None,
    ) -> ValidationResult:
        """Check a document (and its signature, when given) the way `put` would, storing nothing."""
        problems, _rules = document_problems(document)
        errors = [DocumentProblem(p.param or "document", p.message) for p in problems]
        digest: str | None = None
        if isinstance(document, Mapping):
            try:
                digest = document_sha256(document)
            except InvalidRequest:
                digest = None  # already among the problems
        signature_valid: bool | None = None
        signed_by: str | None = None
        if signature is not None or signing_key_id is not None:
            signature_valid = False
            if digest is not None and isinstance(document, Mapping):
                try:
                    signed_by = self.signer.verify(document, signature, signing_key_id, claimed_sha256)
                    signature_valid = True
                except InvalidRequest as exc:
                    errors.append(DocumentProblem(exc.param or "signature", exc.message))
        return ValidationResult(not errors, digest, tuple(errors), signature_valid, signed_by)

    async def put(
        self,
        session: AsyncSession,
        principal: Principal,
        document: Any,
        signature: str | None,
        signing_key_id: str | None = None,
        claimed_sha256: str | None = None,
    ) -> ActiveConstitution:
        """Store a signed document as the next version of `principal.tenant_id`'s constitution, with a
        `constitution.updated` event and an audit record in the same transaction (the caller commits,
        then calls `invalidate`)."""
        if not isinstance(document, Mapping):
            raise InvalidRequest(
                "a constitution is a JSON object {name, principles, rules}", param="document"
            )
        # The signature first: an untrusted document's rules are not even compiled.
        signed_by = self.signer.verify(document, signature, signing_key_id, claimed_sha256)
        assert signature is not None  # verify refuses an unsigned document
        principles, rules = parse_constitution(document)
        tenant_id = principal.tenant_id
        previous = await session.scalar(
            select(ConstitutionVersion)
            .where(ConstitutionVersion.tenant_id == tenant_id)
            .order_by(ConstitutionVersion.version.desc())
            .limit(1)
        )
        version = 1 if previous is None else previous.version + 1
        previous_sha256 = self._default.sha256 if previous is None else previous.sha256
        stored: dict[str, Any] = json.loads(
            canonical_bytes(document)
        )  # a private copy the caller cannot edit
        digest = document_sha256(stored)
        row = ConstitutionVersion(
            tenant_id=tenant_id,
            version=version,
            document=stored,
            sha256=digest,
            signature=signature,
            signing_key_id=signed_by,
            created_at=utcnow(),
            created_by=principal.subject,
        )
        session.add(row)
        facts = {
            "version": version,
            "sha256": digest,
            "previous_sha256": previous_sha256,
            "signing_key_id": signed_by,
        }
        add_event(
            session,
            Event(
                topic=CONSTITUTION_UPDATED,
                type=CONSTITUTION_UPDATED,
                tenant_id=tenant_id,
                actor=principal.subject,
                data={"tenant_id": tenant_id, **facts},
            ),
        )
        audit(session, principal.subject, tenant_id, "constitution.updated", **facts)
        try:
            await session.flush()
        except IntegrityError as exc:  # another writer took this version number first
            raise Conflict(
                f"the constitution changed while version {version} was being stored; send it again",
                code="constitution_conflict",
            ) from exc
        return self._active(row, principles, rules)

    def _default_for(self, tenant_id: str) -> ActiveConstitution:
        signed = self._default
        return ActiveConstitution(
            tenant_id=tenant_id,
            version=0,
            sha256=signed.sha256,
            rules=list(self._default_rules),
            principles=list(DEFAULT_CONSTITUTION["principles"]),
            document=copy.deepcopy(DEFAULT_CONSTITUTION),
            signature=signed.signature,
            signing_key_id=signed.signing_key_id,
        )

    def _verified(self, row: ConstitutionVersion) -> ActiveConstitution:
        """The row as an `ActiveConstitution`, once its hash, signature and rules check out again."""
        try:
            actual = document_sha256(row.document)
            if actual != row.sha256:
                raise InvalidRequest(f"its document hashes to {actual}, not to the stored {row.sha256}")
            self.signer.verify(row.document, row.signature, row.signing_key_id)
            principles, rules = parse_constitution(row.document)
        except InvalidRequest as exc:
            log.error(
                "constitution version %d of tenant %s failed verification and is not used: %s",
                row.version,
                row.tenant_id,
                exc.message,
            )
            raise ConstitutionInvalid(
                f"the constitution in force for this tenant (version {row.version}) failed verification, so "
                "requests that depend on it are refused; an operator must store a signed one again "
                "(`soma constitution put --tenant T FILE`)"
            ) from exc
        return self._active(row, principles, rules)

    @staticmethod
    def _active(row: ConstitutionVersion, principles: list[str], rules: list[Rule]) -> ActiveConstitution:
        return ActiveConstitution(
            tenant_id=row.tenant_id,
            version=row.version,
            sha256=row.sha256,
            rules=rules,
            principles=principles,
            document=copy.deepcopy(row.document),
            signature=row.signature,
            signing_key_id=row.signing_key_id,
            created_at=row.created_at,
            created_by=row.created_by,
        )
