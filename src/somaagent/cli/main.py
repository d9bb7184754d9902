"""The `soma` command."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from somaagent.cli import (
    admin,
    chat_cmd,
    constitution_cmd,
    events_cmd,
    federation_cmd,
    memory_cmd,
    serve_cmd,
    signing_cmd,
    users_cmd,
)

app = typer.Typer(
    name="soma",
    help="SomaAgent: a governed, OpenAI-compatible door to language models and agents.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.command("serve")(serve_cmd.serve)
app.command("migrate")(admin.migrate_cmd)
app.command("chat")(chat_cmd.chat)
admin.tenants.command("trust-oidc")(federation_cmd.trust_oidc)
admin.keys.command("rotate-signing")(signing_cmd.rotate_signing)
app.add_typer(admin.tenants, name="tenants")
app.add_typer(admin.keys, name="keys")
app.add_typer(admin.models, name="models")
app.add_typer(memory_cmd.memory, name="memory")
app.add_typer(users_cmd.users, name="users")
app.add_typer(constitution_cmd.constitution, name="constitution")
app.add_typer(events_cmd.events, name="events")


@app.callback()
def main(
    data_dir: Annotated[str | None, typer.Option(help="State directory (SOMA_DATA_DIR).")] = None,
    database_url: Annotated[
        str | None, typer.Option(help="SQLAlchemy async URL (SOMA_DATABASE_URL).")
    ] = None,
) -> None:
    """Options here apply to every command."""
    if data_dir:
        os.environ["SOMA_DATA_DIR"] = data_dir
    if database_url:
        os.environ["SOMA_DATABASE_URL"] = database_url


if __name__ == "__main__":
    sys.exit(app())
