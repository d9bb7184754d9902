"""`/v1/tenants/{tenant}/oidc-issuers`: the external OIDC providers a tenant trusts (operators only)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from somaagent.api.deps import OperatorDep, ServicesDep, SessionDep
from somaagent.api.openai.docs import error_responses
from somaagent.core.pagination import ListOut
from somaagent.identity import trusts
from somaagent.identity.tables import TrustedIssuer

router = APIRouter(prefix="/v1/tenants/{tenant}/oidc-issuers", tags=["Federation"])


class TrustedIssuerCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    issuer: str = Field(
        min_length=1,
        max_length=512,
        description="The provider's issuer URL, as in its tokens' `iss` (https; http only on loopback).",
        examples=["https://login.example.com/realms/acme"],
    )
    audience: str = Field(
        min_length=1, max_length=255, description="The `aud` the tokens must carry.", examples=["soma-api"]
    )
    role_claim: str = Field(
        default="roles",
        max_length=64,
        description="The claim holding the caller's groups or roles (a string or a list of strings); a "
        "dotted name such as `realm_access.roles` reads a nested claim.",
    )
    role_map: dict[str, str] = Field(
        default_factory=dict,
        description="Claim value → SomaAgent role (owner, admin, member, viewer); the highest match wins.",
        examples=[{"soma-admins": "admin", "soma-readers": "viewer"}],
    )
    default_role: str | None = Field(
        default=None, description="The role of tokens whose claims map to none; null refuses them."
    )
    subject_claim: str = Field(default="sub", max_length=64, description="The claim naming the caller.")


class TrustedIssuerOut(BaseModel):
    object: Literal["oidc_issuer"] = "oidc_issuer"
    id: str
    tenant_id: str
    issuer: str
    audience: str
    subject_claim: str
    role_claim: str
    role_map: dict[str, str]
    default_role: str | None
    created_at: datetime

    @classmethod
    def of(cls, trust: TrustedIssuer) -> TrustedIssuerOut:
        return cls(
            id=trust.id,
            tenant_id=trust.tenant_id,
            issuer=trust.issuer,
            audience=trust.audience,
            subject_claim=trust.subject_claim,
            role_claim=trust.role_claim,
            role_map=dict(trust.role_map),
            default_role=trust.default_role,
            created_at=trust.created_at,
        )


@router.post(
    "", response_model=TrustedIssuerOut, status_code=201, responses=error_responses(400, 401, 403, 404, 409)
)
async def trust_issuer(
    tenant: str, body: TrustedIssuerCreate, principal: OperatorDep, services: ServicesDep, session: SessionDep
) -> TrustedIssuerOut:
    trust = await trusts.trust_issuer(
        session,
        principal,
        tenant,
        issuer=body.issuer,
        audience=body.audience,
        role_claim=body.role_claim,
        role_map=body.role_map,
        default_role=body.default_role,
        subject_claim=body.subject_claim,
    )
    await session.commit()
    services.federation.forget()
    return TrustedIssuerOut.of(trust)


@router.get("", response_model=ListOut[TrustedIssuerOut], responses=error_responses(401, 403, 404))
async def list_trusted_issuers(
    tenant: str, principal: OperatorDep, session: SessionDep
) -> ListOut[TrustedIssuerOut]:
    found = await trusts.list_trusted_issuers(session, principal, tenant)
    return ListOut(data=[TrustedIssuerOut.of(t) for t in found])


@router.delete("/{issuer_id}", response_model=TrustedIssuerOut, responses=error_responses(401, 403, 404))
async def untrust_issuer(
    tenant: str, issuer_id: str, principal: OperatorDep, services: ServicesDep, session: SessionDep
) -> TrustedIssuerOut:
    trust = await trusts.untrust_issuer(session, principal, tenant, issuer_id)
    await session.commit()
    services.federation.forget()  # effective here at once; other replicas within their trust cache time
    return TrustedIssuerOut.of(trust)
