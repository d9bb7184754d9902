"""`soma users create|list|disable|enable|reset-mfa|unlock`: a tenant's users, from the command line."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Annotated

import typer
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.cli.db import run_in_session
from somaagent.config import Settings
from somaagent.core.clock import utcnow
from somaagent.core.errors import SomaError
from somaagent.core.principal import Principal
from somaagent.identity import mfa
from somaagent.identity.capabilities import OPERATOR_CAPABILITIES
from somaagent.identity.login import end_refresh_tokens
from somaagent.identity.revocation import add_revocation
from somaagent.identity.service import revoke_keys_created_by
from somaagent.identity.tables import User
from somaagent.identity.users import (
    CreatedUser,
    create_user,
    get_user,
    list_users,
    unlock_user,
    update_user,
)

users = typer.Typer(help="Create and manage a tenant's users and service accounts.", no_args_is_help=True)

TenantOption = Annotated[str, typer.Option(help="Tenant name or id.")]
UserArgument = Annotated[str, typer.Argument(help="User id or username.")]


def _fail(exc: SomaError) -> None:
    typer.secho(f"error: {exc.message}", fg="red", err=True)
    raise typer.Exit(1)


def _end_logins(session: AsyncSession, settings: Settings, user: User) -> None:
    """Revoke every token of `user`; running servers apply it within their revocation poll."""
    now = utcnow()
    until = now + timedelta(seconds=settings.access_token_ttl_s + 60)
    add_revocation(session, "subject", user.id, now, until)


@users.command("create")
def users_create(
    tenant: TenantOption,
    username: Annotated[str, typer.Option(help="Login name (lowercased), e.g. an email address.")],
    role: Annotated[str, typer.Option(help="owner, admin, member or viewer.")] = "member",
    service: Annotated[
        bool, typer.Option("--service", help="A service account (client credentials) instead of a person.")
    ] = False,
) -> None:
    """Create a user: people get a password ($SOMA_USER_PASSWORD or a prompt), service accounts a secret."""
    settings = Settings()
    password = None
    if not service:
        password = os.environ.get("SOMA_USER_PASSWORD") or typer.prompt(
            "Password", hide_input=True, confirmation_prompt=True
        )

    async def work(session: AsyncSession) -> CreatedUser:
        return await create_user(
            session, None, tenant, username, role, kind="service" if service else "human", password=password
        )

    try:
        created = run_in_session(settings, work)
    except SomaError as exc:
        _fail(exc)
    typer.echo(f"created {created.user.kind} user {created.user.username} ({created.user.id}), role {role}")
    if created.client_secret is not None:
        typer.echo(f"client_id: {created.user.id}")
        typer.echo(f"client_secret: {created.client_secret}")
        typer.echo("# the secret is shown once — store it now", err=True)
    else:
        typer.echo(
            f"next: POST /v1/auth/token grant_type=password tenant={tenant} username={created.user.username}"
        )


@users.command("list")
def users_list(tenant: TenantOption) -> None:
    """List a tenant's users."""
    try:
        rows = run_in_session(Settings(), lambda s: list_users(s, None, tenant))
    except SomaError as exc:
        _fail(exc)
    for user in rows:
        state = "disabled" if user.disabled else "active"
        factor = "mfa" if mfa.mfa_enabled(user) else "no-mfa"
        typer.echo(f"{user.id}  {user.username}  {user.kind}  {user.role}  {state}  {factor}")


def _set_disabled(tenant: str, user_ref: str, disabled: bool) -> User:
    settings = Settings()

    async def work(session: AsyncSession) -> User:
        user = await get_user(session, None, user_ref, tenant)
        if await update_user(session, None, user, disabled=disabled) and disabled:
            _end_logins(session, settings, user)
            await end_refresh_tokens(session, None, user)
            await revoke_keys_created_by(session, f"user:{user.id}", "cli")
        return user

    try:
        return run_in_session(settings, work)
    except SomaError as exc:
        _fail(exc)
        raise  # unreachable: _fail exits


@users.command("disable")
def users_disable(user: UserArgument, tenant: TenantOption) -> None:
    """Disable a user; their tokens stop working on every server within a second."""
    found = _set_disabled(tenant, user, True)
    typer.echo(f"disabled {found.username} ({found.id}); their tokens are revoked")


@users.command("enable")
def users_enable(user: UserArgument, tenant: TenantOption) -> None:
    """Enable a disabled user again."""
    found = _set_disabled(tenant, user, False)
    typer.echo(f"enabled {found.username} ({found.id})")


@users.command("reset-mfa")
def users_reset_mfa(user: UserArgument, tenant: TenantOption) -> None:
    """Remove a user's second factor (a lost phone); they enroll again after their next login."""
    settings = Settings()

    async def work(session: AsyncSession) -> User:
        found = await get_user(session, None, user, tenant)
        operator = Principal(found.tenant_id, tenant, "cli", None, OPERATOR_CAPABILITIES)
        await mfa.reset_mfa(session, operator, found)
        _end_logins(session, settings, found)
        await end_refresh_tokens(session, None, found)
        return found

    try:
        found = run_in_session(settings, work)
    except SomaError as exc:
        _fail(exc)
    typer.echo(f"reset MFA of {found.username} ({found.id}); their tokens are revoked")


@users.command("unlock")
def users_unlock(user: UserArgument, tenant: TenantOption) -> None:
    """Clear a user's failed-login lockout."""

    async def work(session: AsyncSession) -> tuple[User, bool]:
        found = await get_user(session, None, user, tenant)
        return found, await unlock_user(session, None, found)

    try:
        found, was_locked = run_in_session(Settings(), work)
    except SomaError as exc:
        _fail(exc)
    typer.echo(f"{found.username}: {'unlocked' if was_locked else 'was not locked'}")
