"""`/v1/constitution`: read a tenant's constitution and its hash (`chat:use`), validate and store signed
versions (`policy:admin`). Operators may name any tenant; everyone else sees only their own (others: 404)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from somaagent.api.deps import ChatUseDep, OperatorDep, PolicyAdminDep, ServicesDep, SessionDep
from somaagent.api.openai.docs import error_responses
from somaagent.identity.service import act_for_tenant, get_tenant
from somaagent.policy.constitution import ActiveConstitution, ValidationResult, VersionInfo

router = APIRouter(prefix="/v1/constitution", tags=["Governance"])

TenantQuery = Annotated[
    str | None, Query(max_length=63, description="Tenant id or name (operators: any; others: their own).")
]
_DOCUMENT = "The constitution document: `{name, principles: [str], rules: [Rule]}`."


class ConstitutionOut(BaseModel):
    """A tenant's constitution (version 0 is the platform default, in force until one is stored)."""

    object: Literal["constitution"] = "constitution"
    tenant_id: str
    version: int = Field(description="1, 2, …; 0 is the platform default.")
    sha256: str = Field(description="Hex SHA-256 of the document's canonical JSON (RFC 8785).")
    signature: str = Field(description="base64url (no padding) Ed25519 signature over the canonical bytes.")
    signing_key_id: str = Field(description="First 16 hex of SHA-256 of the signing key's raw public key.")
    document: dict[str, Any] = Field(description=_DOCUMENT)
    created_at: datetime | None = Field(description="When this version was stored (null for the default).")
    created_by: str | None = Field(description="Who stored it (`key:…`, `user:…`, `cli`).")

    @classmethod
    def of(cls, found: ActiveConstitution) -> ConstitutionOut:
        return cls(
            tenant_id=found.tenant_id,
            version=found.version,
            sha256=found.sha256,
            signature=found.signature,
            signing_key_id=found.signing_key_id,
            document=found.document,
            created_at=found.created_at,
            created_by=found.created_by,
        )


class ConstitutionHashOut(BaseModel):
    """The hash of the constitution in force: what access tokens carry as `constitution_hash`."""

    object: Literal["constitution.hash"] = "constitution.hash"
    tenant_id: str
    tenant: str = Field(description="The tenant's name.")
    version: int
    sha256: str


class ConstitutionIn(BaseModel):
    """A signed constitution: the envelope `soma constitution sign FILE` prints."""

    model_config = ConfigDict(extra="forbid")

    document: dict[str, Any] = Field(description=_DOCUMENT)
    signature: str | None = Field(
        default=None, max_length=128, description="base64url Ed25519 signature over the canonical document."
    )
    signing_key_id: str | None = Field(
        default=None, max_length=64, description="The signing key's id; default: any trusted key."
    )
    sha256: str | None = Field(
        default=None, max_length=64, description="The hash the document was signed with; checked if given."
    )
    tenant: str | None = Field(
        default=None, max_length=63, description="Tenant id or name; default: the caller's tenant."
    )


class ValidateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    document: dict[str, Any] = Field(description=_DOCUMENT)
    signature: str | None = Field(default=None, max_length=128, description="Checked too, when given.")
    signing_key_id: str | None = Field(default=None, max_length=64)
    sha256: str | None = Field(
        default=None, max_length=64, description="Checked against the document, if given."
    )


class ProblemOut(BaseModel):
    param: str = Field(description="The field at fault, e.g. `rules[2].pattern` or `signature`.")
    message: str


class ValidationOut(BaseModel):
    """Whether `PUT /v1/constitution` would accept this document (and signature), and why not."""

    object: Literal["constitution.validation"] = "constitution.validation"
    valid: bool = Field(description="No errors in the document (nor in the signature, when one was given).")
    sha256: str | None = Field(description="The document's hash (null when it has no canonical form).")
    errors: list[ProblemOut]
    signature_valid: bool | None = Field(description="null when no signature was given.")
    signing_key_id: str | None = Field(description="The trusted key that made the signature, if it verifies.")

    @classmethod
    def of(cls, result: ValidationResult) -> ValidationOut:
        return cls(
            valid=result.valid,
            sha256=result.sha256,
            errors=[ProblemOut(param=e.param, message=e.message) for e in result.errors],
            signature_valid=result.signature_valid,
            signing_key_id=result.signing_key_id,
        )


class VersionOut(BaseModel):
    version: int
    sha256: str
    name: str = Field(description="The document's `name`.")
    signing_key_id: str
    created_at: datetime
    created_by: str

    @classmethod
    def of(cls, info: VersionInfo) -> VersionOut:
        return cls(
            version=info.version,
            sha256=info.sha256,
            name=info.name,
            signing_key_id=info.signing_key_id,
            created_at=info.created_at,
            created_by=info.created_by,
        )


class VersionsOut(BaseModel):
    """Stored versions, newest first (the default, version 0, is never stored)."""

    object: Literal["list"] = "list"
    data: list[VersionOut]
    has_more: bool


@router.get("", response_model=ConstitutionOut, responses=error_responses(400, 401, 403, 404))
async def read_constitution(
    principal: ChatUseDep,
    services: ServicesDep,
    session: SessionDep,
    tenant: TenantQuery = None,
    version: Annotated[
        int | None, Query(ge=0, description="A past version; default: the one in force.")
    ] = None,
) -> ConstitutionOut:
    """The constitution in force for the caller's tenant (or one of its versions), verified."""
    acting = await act_for_tenant(session, principal, tenant)
    if version is not None:
        return ConstitutionOut.of(await services.constitutions.version(session, acting.tenant_id, version))
    return ConstitutionOut.of(await services.constitutions.active(acting.tenant_id))


@router.get("/versions", response_model=VersionsOut, responses=error_responses(400, 401, 403, 404))
async def list_versions(
    principal: ChatUseDep,
    services: ServicesDep,
    session: SessionDep,
    tenant: TenantQuery = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    before: Annotated[int | None, Query(ge=1, description="Versions below this one (paging).")] = None,
) -> VersionsOut:
    """The tenant's stored constitution versions, newest first."""
    acting = await act_for_tenant(session, principal, tenant)
    infos, has_more = await services.constitutions.versions(session, acting.tenant_id, limit, before)
    return VersionsOut(data=[VersionOut.of(i) for i in infos], has_more=has_more)


@router.get("/{tenant}/hash", response_model=ConstitutionHashOut, responses=error_responses(401, 403, 404))
async def read_hash(
    tenant: str, principal: ChatUseDep, services: ServicesDep, session: SessionDep
) -> ConstitutionHashOut:
    """The hash of a tenant's constitution in force (by id or name; operators: any tenant)."""
    found = await get_tenant(session, principal, tenant)
    active = await services.constitutions.active(found.id)
    return ConstitutionHashOut(
        tenant_id=found.id, tenant=found.name, version=active.version, sha256=active.sha256
    )


@router.post("/validate", response_model=ValidationOut, responses=error_responses(400, 401, 403))
async def validate_constitution(
    body: ValidateIn, _principal: PolicyAdminDep, services: ServicesDep
) -> ValidationOut:
    """Check a document (and signature) without storing it: every problem, each naming its field."""
    return ValidationOut.of(
        services.constitutions.validate(body.document, body.signature, body.signing_key_id, body.sha256)
    )


@router.put("", response_model=ConstitutionOut, responses=error_responses(400, 401, 403, 404, 409))
async def put_constitution(
    body: ConstitutionIn, principal: OperatorDep, services: ServicesDep, session: SessionDep
) -> ConstitutionOut:
    """Store a signed document as the tenant's next constitution version (operators only: a tenant admin
    could otherwise install any document the platform ever signed, an old version or the rule-less
    default among them); emits `constitution.updated`.
    Unsigned: 400 `constitution_unsigned`; a foreign key or a document changed after signing: 400
    `constitution_signature_invalid`."""
    acting = await act_for_tenant(session, principal, body.tenant)
    stored = await services.constitutions.put(
        session, acting, body.document, body.signature, body.signing_key_id, body.sha256
    )
    await session.commit()
    # This replica applies it at once; others within `SOMA_POLICY_CACHE_TTL_S`.
    services.constitutions.invalidate(acting.tenant_id)
    services.relay.poke()
    return ConstitutionOut.of(stored)
