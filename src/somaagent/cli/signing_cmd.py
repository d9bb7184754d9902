"""`soma keys rotate-signing`: retire the token-signing key and sign with a new one, from the command line."""

from __future__ import annotations

import typer
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.cli.db import run_in_session
from somaagent.config import Settings
from somaagent.identity import signing_keys
from somaagent.identity.secret_box import SecretBox
from somaagent.identity.tokens import retired_key_window_s


def rotate_signing() -> None:
    """Rotate the access-token signing key now (servers rotate by age on their own too)."""
    settings = Settings()
    box = SecretBox(settings.resolved_secret_key(), signing_keys.SEALING_PURPOSE)
    window_s = retired_key_window_s(settings.access_token_ttl_s, settings.revocation_poll_s)

    async def work(session: AsyncSession) -> signing_keys.Rotation | None:
        return await signing_keys.rotate(session, box, settings.jwt_algorithm, window_s, actor="cli")

    rotation = run_in_session(settings, work)
    if rotation is None:  # an unconditional rotation always rotates
        typer.secho("error: the signing key was not rotated; try again", fg="red", err=True)
        raise typer.Exit(1)
    typer.echo(f"new signing key {rotation.kid} ({rotation.alg}) signs every new access token")
    if not rotation.retired:
        typer.echo("there was no previous key")
    for kid, expires_at in rotation.retired:
        typer.echo(
            f"retired {kid}: it still verifies the tokens it signed until {expires_at:%Y-%m-%d %H:%M:%S} UTC "
            "(one token lifetime), then leaves /.well-known/jwks.json"
        )
    typer.echo(f"running servers switch to the new key within {settings.revocation_poll_s:g}s")
