"""`/v1/users`: a tenant's users and service accounts (`users:admin`), and `/v1/users/me` for yourself."""

from __future__ import annotations

from fastapi import APIRouter

from somaagent.api.deps import AccountSelfDep, ServicesDep, SessionDep, UsersAdminDep
from somaagent.api.openai.docs import error_responses
from somaagent.core.errors import Forbidden
from somaagent.core.pagination import ListOut
from somaagent.core.principal import Principal
from somaagent.identity import mfa
from somaagent.identity.auth_schemas import (
    PasswordChange,
    UnlockOut,
    UserCreate,
    UserCreated,
    UserOut,
    UserPatch,
)
from somaagent.identity.service import revoke_keys_created_by
from somaagent.identity.tables import User
from somaagent.identity.users import (
    change_password,
    create_user,
    ensure_may_manage,
    get_user,
    list_users,
    unlock_user,
    update_user,
)

router = APIRouter(prefix="/v1/users", tags=["Users"])


async def _me(session: SessionDep, principal: Principal) -> User:
    if principal.user_id is None:
        raise Forbidden("this is for user accounts; log in with POST /v1/auth/token")
    return await get_user(session, principal, principal.user_id)


@router.post(
    "", response_model=UserCreated, status_code=201, responses=error_responses(400, 401, 403, 404, 409)
)
async def create(body: UserCreate, principal: UsersAdminDep, session: SessionDep) -> UserCreated:
    created = await create_user(
        session,
        principal,
        body.tenant or principal.tenant_id,
        body.username,
        body.role,
        kind=body.kind,
        password=body.password,
    )
    await session.commit()
    out = UserOut.of(created.user).model_dump()
    if created.client_secret is not None:
        return UserCreated(**out, client_id=created.user.id, client_secret=created.client_secret)
    return UserCreated(**out)


@router.get("", response_model=ListOut[UserOut], responses=error_responses(401, 403, 404))
async def list_all(
    principal: UsersAdminDep, session: SessionDep, tenant: str | None = None
) -> ListOut[UserOut]:
    return ListOut(data=[UserOut.of(u) for u in await list_users(session, principal, tenant)])


@router.get("/me", response_model=UserOut, responses=error_responses(401, 403))
async def me(principal: AccountSelfDep, session: SessionDep) -> UserOut:
    return UserOut.of(await _me(session, principal))


@router.post("/me/password", response_model=UserOut, responses=error_responses(400, 401, 403))
async def set_password(
    body: PasswordChange, principal: AccountSelfDep, services: ServicesDep, session: SessionDep
) -> UserOut:
    """Change your password; every login of yours, this one too, is revoked: log in again with it.
    Wrong current passwords count against the account's login throttle."""
    user = await _me(session, principal)
    await services.logins.check_code(
        session, user, lambda: change_password(session, user, body.current_password, body.new_password)
    )
    await services.logins.revoke_user_tokens(session, principal, user)
    await session.commit()
    return UserOut.of(user)


@router.get("/{user}", response_model=UserOut, responses=error_responses(401, 403, 404))
async def get(user: str, principal: UsersAdminDep, session: SessionDep) -> UserOut:
    return UserOut.of(await get_user(session, principal, user))


@router.patch("/{user}", response_model=UserOut, responses=error_responses(400, 401, 403, 404))
async def update(
    user: str, body: UserPatch, principal: UsersAdminDep, services: ServicesDep, session: SessionDep
) -> UserOut:
    """Change a role or disable/enable; the user's existing tokens are revoked, so it applies at once."""
    found = await get_user(session, principal, user)
    if await update_user(session, principal, found, role=body.role, disabled=body.disabled):
        await services.logins.revoke_user_tokens(session, principal, found)
        await revoke_keys_created_by(session, f"user:{found.id}", principal.subject)
    await session.commit()
    services.authenticator.invalidate()
    return UserOut.of(found)


@router.post("/{user}/reset-mfa", response_model=UserOut, responses=error_responses(401, 403, 404))
async def reset_mfa(
    user: str, principal: UsersAdminDep, services: ServicesDep, session: SessionDep
) -> UserOut:
    """Remove a user's second factor (a lost phone); they enroll again at their next login."""
    found = await get_user(session, principal, user)
    ensure_may_manage(principal, found)
    await mfa.reset_mfa(session, principal, found)
    await services.logins.revoke_user_tokens(session, principal, found)
    await session.commit()
    return UserOut.of(found)


@router.post("/{user}/unlock", response_model=UnlockOut, responses=error_responses(401, 403, 404))
async def unlock(user: str, principal: UsersAdminDep, session: SessionDep) -> UnlockOut:
    """Clear a user's failed-login lockout."""
    found = await get_user(session, principal, user)
    was_locked = await unlock_user(session, principal, found)
    await session.commit()
    return UnlockOut(user_id=found.id, was_locked=was_locked)
