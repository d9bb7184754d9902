"""`soma memory reindex`: re-embed stored memories with the configured model."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from somaagent.config import Settings
from somaagent.core.errors import SomaError
from somaagent.core.principal import Principal
from somaagent.db import migrate
from somaagent.identity.capabilities import OPERATOR_CAPABILITIES

memory = typer.Typer(help="Manage long-term memory.", no_args_is_help=True)


@memory.command("reindex")
def reindex(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant (name or id).")] = None,
    namespace: Annotated[str | None, typer.Option(help="Only this namespace.")] = None,
    everything: Annotated[
        bool, typer.Option("--all", help="Re-embed every memory, not only those made by another model.")
    ] = False,
) -> None:
    """Re-embed memories with SOMA_MEMORY_EMBEDDING_MODEL; running servers pick the vectors up on their
    next recall (their indexes are rebuilt from the database)."""
    from somaagent.api.app import build_catalog
    from somaagent.db.engine import create_engine, session_factory
    from somaagent.identity.service import get_tenant
    from somaagent.memory.reembed import reembed_memories
    from somaagent.observability.metrics import Metrics

    settings = Settings()
    migrate.upgrade(settings.resolved_database_url)
    catalog, clients, _checks = build_catalog(settings, Metrics())
    operator = Principal("cli", "cli", "cli", None, OPERATOR_CAPABILITIES)

    async def run() -> int:
        engine = create_engine(settings.resolved_database_url)
        sessions = session_factory(engine)
        try:
            tenant_id = None
            if tenant is not None:
                async with sessions() as session:
                    tenant_id = (await get_tenant(session, None, tenant)).id
            embedder = catalog.embedder(operator, settings.memory_embedding_model)
            return await reembed_memories(
                sessions, embedder.embed, embedder.id, tenant_id, namespace, everything
            )
        finally:
            await catalog.close()
            for client in clients:
                await client.close()
            await engine.dispose()

    try:
        count = asyncio.run(run())
    except SomaError as exc:
        typer.secho(f"error: {exc.message}", fg="red", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"re-embedded {count} memories with {settings.memory_embedding_model}")
