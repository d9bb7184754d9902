"""Dependency aliases: each route's signature states the capability it needs (`ChatUseDep`,
`KeysAdminDep`, …). The OpenAPI document lists that capability as the route's OAuth2 scope, which is
how tests prove no route is unguarded."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.security import OAuth2PasswordBearer, SecurityScopes
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.api.services import Services
from somaagent.core.errors import Forbidden
from somaagent.core.principal import Principal
from somaagent.identity.capabilities import Capability

# Declared for the OpenAPI document; authentication itself reads the raw header so that a missing or
# malformed credential gets our precise error instead of a generic one. Bearer values are API keys
# (`sk-soma-…`), access tokens from `/v1/auth/token`, or a trusted OIDC provider's access tokens.
_bearer = OAuth2PasswordBearer(
    tokenUrl="/v1/auth/token",
    auto_error=False,
    scopes={c.value: c.name.lower().replace("_", " ") for c in Capability},
    description="An API key (`Authorization: Bearer sk-soma-...`) or an access token.",
)


async def get_services(request: Request) -> Services:
    """The process's shared services (async: FastAPI would run a sync dependency in a thread)."""
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def authorize(
    security_scopes: SecurityScopes,
    request: Request,
    services: ServicesDep,
    _token: Annotated[str | None, Depends(_bearer)],
) -> Principal:
    """The authenticated caller, who must hold every capability the route names."""
    principal = await services.authenticator.authenticate(request.headers.get("authorization"))
    for capability in security_scopes.scopes:
        if not principal.can(capability):
            raise Forbidden(
                f"this needs the `{capability}` capability, which your credential does not carry; "
                "ask a tenant admin for a role or key that has it",
                code="missing_capability",
            )
    return principal


def requires(capability: Capability) -> Any:
    """The dependency that authenticates the caller and checks `capability`."""
    return Security(authorize, scopes=[capability.value])


ChatUseDep = Annotated[Principal, requires(Capability.CHAT_USE)]
MemoryReadDep = Annotated[Principal, requires(Capability.MEMORY_READ)]
MemoryWriteDep = Annotated[Principal, requires(Capability.MEMORY_WRITE)]
ToolsExecuteDep = Annotated[Principal, requires(Capability.TOOLS_EXECUTE)]
ToolsAdminDep = Annotated[Principal, requires(Capability.TOOLS_ADMIN)]
ToolsApproveDep = Annotated[Principal, requires(Capability.TOOLS_APPROVE)]
AgentsAdminDep = Annotated[Principal, requires(Capability.AGENTS_ADMIN)]
ModelsAdminDep = Annotated[Principal, requires(Capability.MODELS_ADMIN)]
PolicyAdminDep = Annotated[Principal, requires(Capability.POLICY_ADMIN)]
BillingReadDep = Annotated[Principal, requires(Capability.BILLING_READ)]
AnalyticsReadDep = Annotated[Principal, requires(Capability.ANALYTICS_READ)]
NotificationsReadDep = Annotated[Principal, requires(Capability.NOTIFICATIONS_READ)]
NotificationsSendDep = Annotated[Principal, requires(Capability.NOTIFICATIONS_SEND)]
AuditReadDep = Annotated[Principal, requires(Capability.AUDIT_READ)]
UsersAdminDep = Annotated[Principal, requires(Capability.USERS_ADMIN)]
KeysAdminDep = Annotated[Principal, requires(Capability.KEYS_ADMIN)]
TrainingAdminDep = Annotated[Principal, requires(Capability.TRAINING_ADMIN)]
AccountSelfDep = Annotated[Principal, requires(Capability.ACCOUNT_SELF)]
OperatorDep = Annotated[Principal, requires(Capability.TENANTS_ADMIN)]


async def get_inference_caller(principal: ChatUseDep, services: ServicesDep) -> Principal:
    """A `chat:use` caller whose tenant is not locked for training (or who holds the lock)."""
    await services.training.admit_inference(principal)
    return principal


# Routes that run a model: chat, embeddings, agent runs. The training lock applies to them.
InferenceDep = Annotated[Principal, Depends(get_inference_caller)]


async def get_session(services: ServicesDep) -> AsyncIterator[AsyncSession]:
    """A database session for the request; the route commits what it changes."""
    async with services.sessions() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]
