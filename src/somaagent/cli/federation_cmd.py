"""`soma tenants trust-oidc`: make a tenant accept an external OIDC provider's access tokens."""

from __future__ import annotations

from typing import Annotated

import typer

from somaagent.cli.db import run_in_session
from somaagent.config import Settings
from somaagent.core.errors import SomaError
from somaagent.identity import trusts
from somaagent.identity.capabilities import ROLES


def parse_role_map(pairs: list[str]) -> dict[str, str]:
    """`["soma-admins=admin"]` → `{"soma-admins": "admin"}`; a bad pair raises typer.BadParameter."""
    role_map: dict[str, str] = {}
    for pair in pairs:
        value, sep, role = pair.rpartition("=")
        if not sep or not value or not role:
            raise typer.BadParameter(f"{pair!r} is not VALUE=ROLE (soma-admins=admin)", param_hint="--map")
        role_map[value] = role
    return role_map


def trust_oidc(
    tenant: Annotated[str, typer.Option(help="Tenant name or id.")],
    issuer: Annotated[str, typer.Option(help="The provider's issuer URL, exactly as its tokens' `iss`.")],
    audience: Annotated[str, typer.Option(help="The `aud` its access tokens must carry.")],
    role_claim: Annotated[str, typer.Option(help="The claim with the caller's groups or roles.")] = "roles",
    role_map: Annotated[
        list[str] | None,
        typer.Option("--map", help=f"VALUE=ROLE, repeatable; roles: {', '.join(ROLES)}. Highest match wins."),
    ] = None,
    default_role: Annotated[
        str | None, typer.Option(help="Role for tokens whose claims map to none (default: refuse them).")
    ] = None,
    subject_claim: Annotated[str, typer.Option(help="The claim naming the caller.")] = "sub",
) -> None:
    """Trust an OIDC provider: its access tokens for AUDIENCE then act in TENANT with the mapped role."""
    mapping = parse_role_map(role_map or [])
    try:
        trust = run_in_session(
            Settings(),
            lambda s: trusts.trust_issuer(
                s,
                None,
                tenant,
                issuer=issuer,
                audience=audience,
                role_claim=role_claim,
                role_map=mapping,
                default_role=default_role,
                subject_claim=subject_claim,
            ),
        )
    except SomaError as exc:
        typer.secho(f"error: {exc.message}", fg="red", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"tenant {tenant} now trusts {trust.issuer} for audience {trust.audience} ({trust.id})")
    mapped = ", ".join(f"{value} → {role}" for value, role in sorted(trust.role_map.items())) or "nothing"
    typer.echo(f"`{trust.role_claim}` maps {mapped}; otherwise {trust.default_role or 'refused'}")
    typer.echo("running servers accept its tokens within a few seconds")
