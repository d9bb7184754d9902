"""`soma migrate`, `soma tenants …`, `soma keys …`, `soma models …`: the operator's commands."""

from __future__ import annotations

from typing import Annotated

import typer
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.cli.db import run_in_session
from somaagent.config import Settings
from somaagent.core.errors import SomaError
from somaagent.db import migrate
from somaagent.identity import service
from somaagent.models.profiles import ROLES, list_profiles

tenants = typer.Typer(help="Create and list tenants.", no_args_is_help=True)
keys = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
models = typer.Typer(help="List models and manage per-tenant model profiles.", no_args_is_help=True)
profile = typer.Typer(help="Per-tenant model profiles (role → ordered fallback list).", no_args_is_help=True)
models.add_typer(profile, name="profile")


def _fail(exc: SomaError) -> None:
    typer.secho(f"error: {exc.message}", fg="red", err=True)
    raise typer.Exit(1)


def migrate_cmd() -> None:
    """Apply database migrations (serve does this too)."""
    settings = Settings()
    migrate.upgrade(settings.resolved_database_url)
    typer.echo(f"database at revision {migrate.current(settings.resolved_database_url)}")


@tenants.command("create")
def tenants_create(name: str) -> None:
    """Create a tenant."""
    try:
        tenant = run_in_session(Settings(), lambda s: service.create_tenant(s, None, name))
    except SomaError as exc:
        _fail(exc)
    typer.echo(f"created tenant {tenant.name} ({tenant.id})")
    typer.echo(f"next: soma keys create --tenant {tenant.name} --name ci")


@tenants.command("list")
def tenants_list() -> None:
    """List tenants."""
    for tenant in run_in_session(Settings(), lambda s: service.list_tenants(s, None)):
        state = " (disabled)" if tenant.disabled else ""
        typer.echo(f"{tenant.id}  {tenant.name}{state}  created {tenant.created_at:%Y-%m-%d %H:%M}")


@keys.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant name or id.")],
    name: Annotated[str, typer.Option(help="A label for the key.")] = "default",
    admin: Annotated[bool, typer.Option("--admin", help="An admin key (manages every tenant).")] = False,
    role: Annotated[
        str | None, typer.Option(help="owner, admin, member (default) or viewer: what the key may do.")
    ] = None,
) -> None:
    """Create an API key; it is printed once."""
    settings = Settings()
    secret = settings.resolved_secret_key()
    try:
        created = run_in_session(
            settings,
            lambda s: service.create_key(
                s, None, secret, tenant, name, "admin" if admin else "tenant", role=role
            ),
        )
    except SomaError as exc:
        _fail(exc)
    typer.echo(created.secret)
    typer.echo(
        f"# key {created.key.id} for tenant {tenant} ({created.key.role or created.key.scope}); shown once — "
        "store it now.",
        err=True,
    )


@keys.command("list")
def keys_list(tenant: Annotated[str | None, typer.Option(help="Tenant name or id.")] = None) -> None:
    """List keys (never their secrets)."""
    try:
        rows = run_in_session(Settings(), lambda s: service.list_keys(s, None, tenant))
    except SomaError as exc:
        _fail(exc)
    for key in rows:
        state = f"revoked {key.revoked_at:%Y-%m-%d}" if key.revoked_at else "active"
        used = f"last used {key.last_used_at:%Y-%m-%d %H:%M}" if key.last_used_at else "never used"
        typer.echo(f"{key.id}  {key.prefix}…  {key.name}  {key.scope}  {state}  {used}")


@keys.command("revoke")
def keys_revoke(key: Annotated[str, typer.Argument(help="Key id or visible prefix.")]) -> None:
    """Revoke a key (running servers notice within a second)."""
    try:
        revoked = run_in_session(Settings(), lambda s: service.revoke_key(s, None, key))
    except SomaError as exc:
        _fail(exc)
    typer.echo(f"revoked {revoked.id} ({revoked.prefix}…)")


@models.command("list")
def models_list() -> None:
    """List the models this configuration serves."""
    for spec in Settings().catalog:
        where = spec.base_url or spec.path or "bundled"
        who = ", ".join(spec.tenants) if spec.tenants else "all tenants"
        typer.echo(f"{spec.id}  {spec.kind}  {spec.provider}  {where}  ({who})")


@profile.command("set")
def profile_set(
    tenant: Annotated[str, typer.Option(help="Tenant name or id.")],
    role: Annotated[str, typer.Argument(help=f"One of {', '.join(ROLES)}.")],
    model_ids: Annotated[list[str], typer.Argument(help="Models in fallback order.")],
) -> None:
    """Set a tenant's model profile; clients then send model="profile:ROLE"."""
    from somaagent.api.app import build_catalog
    from somaagent.core.principal import Principal
    from somaagent.identity.capabilities import OPERATOR_CAPABILITIES
    from somaagent.models.profiles import set_profile
    from somaagent.observability.metrics import Metrics

    settings = Settings()
    catalog, _clients, _checks = build_catalog(settings, Metrics())

    async def work(session: AsyncSession) -> list[str]:
        found = await service.get_tenant(session, None, tenant)
        operator = Principal(found.id, found.name, "cli", None, OPERATOR_CAPABILITIES)
        saved = await set_profile(session, catalog, operator, found.id, role, model_ids)
        return list(saved.models)

    try:
        saved = run_in_session(settings, work)
    except SomaError as exc:
        _fail(exc)
    typer.echo(f"profile:{role} for {tenant} → {' → '.join(saved)}")


@profile.command("list")
def profile_list(tenant: Annotated[str, typer.Option(help="Tenant name or id.")]) -> None:
    """Show a tenant's model profiles."""

    async def work(session: AsyncSession) -> list[tuple[str, list[str]]]:
        found = await service.get_tenant(session, None, tenant)
        return [(p.role, list(p.models)) for p in await list_profiles(session, found.id)]

    try:
        rows = run_in_session(Settings(), work)
    except SomaError as exc:
        _fail(exc)
    for role, model_ids in rows:
        typer.echo(f"profile:{role}  {' → '.join(model_ids)}")
