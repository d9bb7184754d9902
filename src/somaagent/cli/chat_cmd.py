"""`soma chat`: an interactive terminal chat that streams tokens through the HTTP API."""

from __future__ import annotations

import os
from typing import Annotated

import typer


def chat(
    model: Annotated[str, typer.Option(help="Model id or profile:ROLE.")] = "smollm2-135m-instruct",
    url: Annotated[
        str, typer.Option(envvar="SOMA_URL", help="Base URL of a running server.")
    ] = "http://127.0.0.1:8080/v1",
    key: Annotated[str | None, typer.Option(envvar="SOMA_API_KEY", help="API key (SOMA_API_KEY).")] = None,
    system: Annotated[str | None, typer.Option(help="A system prompt.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Cap per answer.")] = 256,
) -> None:
    """Chat with a model; answers stream as they are generated. Ctrl-D or /exit ends."""
    from somaagent.cli.chat_session import ChatSession

    if not key:
        typer.secho(
            "No API key: pass --key or set SOMA_API_KEY (create one with `soma keys create --tenant T`).",
            fg="red",
            err=True,
        )
        raise typer.Exit(2)
    session = ChatSession(url, key, model, system, max_tokens)
    try:
        session.check()
    except RuntimeError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"chatting with {model} at {url} — /exit or Ctrl-D to leave", err=True)
    interactive = os.isatty(0)
    while True:
        try:
            line = input("you> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            typer.echo("", err=True)
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if not line.strip():
            continue
        typer.echo("assistant> ", nl=False)
        try:
            for piece in session.send(line):
                typer.echo(piece, nl=False)
        except RuntimeError as exc:
            typer.secho(f"\nerror: {exc}", fg="red", err=True)
        typer.echo("")
