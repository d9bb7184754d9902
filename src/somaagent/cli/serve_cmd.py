"""`soma serve`: migrate, bootstrap on first start, then serve HTTP."""

from __future__ import annotations

import os
import shutil
from typing import Annotated

import typer

from somaagent.cli.db import run_in_session
from somaagent.config import Settings
from somaagent.identity.bootstrap import DEFAULT_TENANT, bootstrap_admin_key


def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (SOMA_HOST, default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (SOMA_PORT, default 8080).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes sharing the port.")] = 1,
) -> None:
    """Run the platform: the OpenAI-compatible API and the admin API on one port."""
    import uvicorn

    from somaagent.api.app import create_app

    if host:
        os.environ["SOMA_HOST"] = host
    if port:
        os.environ["SOMA_PORT"] = str(port)
    settings = Settings()
    if not settings.resolved_database_url.startswith("sqlite") and not settings.secret_key:
        typer.secho(
            "warning: SOMA_SECRET_KEY is not set; this host hashes API keys with its own "
            f"{settings.data_dir / 'secret.key'}, so keys made elsewhere will not work here. "
            "Set the same SOMA_SECRET_KEY on every replica.",
            fg="yellow",
            err=True,
        )
    secret = settings.resolved_secret_key()
    admin_key = run_in_session(settings, lambda s: bootstrap_admin_key(s, secret))
    if admin_key is not None:
        typer.echo(f"SomaAgent admin key (shown once, store it now): {admin_key}")
        typer.echo(
            f"More keys: soma keys create --tenant {DEFAULT_TENANT} --name NAME  (or --tenant T after "
            "`soma tenants create T`)"
        )
    typer.echo(
        f"SomaAgent listening on http://{settings.host}:{settings.port} (OpenAI base_url: "
        f"http://{settings.host}:{settings.port}/v1)",
        err=True,
    )
    common = {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "access_log": False,
        "loop": "uvloop",
        "http": "httptools",
        "timeout_graceful_shutdown": 5,
    }
    if workers == 1:
        uvicorn.run(create_app(settings, migrate_on_start=False), **common)  # type: ignore[arg-type]
        return
    # Several processes: metrics are shared through files, migrations already ran here.
    metrics_dir = settings.data_dir / "metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    os.environ["SOMA_MIGRATE_ON_START"] = "0"
    uvicorn.run("somaagent.api.app:app_from_env", factory=True, workers=workers, **common)  # type: ignore[arg-type]
