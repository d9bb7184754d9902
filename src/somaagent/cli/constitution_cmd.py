"""`soma constitution sign|put|show|verify`: a tenant's signed constitution, from the command line.

Files are YAML or JSON: a bare document `{name, principles, rules}`, or the signed envelope
`{document, signature, signing_key_id, sha256}` that `sign` prints. The key is the platform's, derived
from the server secret in the data dir (or `SOMA_SECRET_KEY`), so the CLI signs what servers trust.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
import yaml
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.api.constitution_signer import platform_signer
from somaagent.config import Settings
from somaagent.core.errors import SomaError
from somaagent.core.principal import Principal
from somaagent.db import migrate
from somaagent.db.engine import create_engine, session_factory
from somaagent.identity.capabilities import OPERATOR_CAPABILITIES
from somaagent.identity.service import get_tenant
from somaagent.policy.constitution import ActiveConstitution, Constitutions, document_problems
from somaagent.policy.constitution_signing import SignedDocument, document_sha256, is_envelope

T = TypeVar("T")

constitution = typer.Typer(help="Sign, store, show and verify tenants' constitutions.", no_args_is_help=True)

FileArgument = Annotated[Path, typer.Argument(help="A YAML or JSON file.", exists=True, dir_okay=False)]
TenantOption = Annotated[str, typer.Option(help="Tenant name or id.")]


def _fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(1)


def _load(path: Path) -> Any:
    """The file's JSON value: JSON read as JSON (YAML 1.1 reads `1e3` as a string), the rest as YAML."""
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json" or text.lstrip().startswith(("{", "[")):
            return json.loads(text)
        return yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        _fail(f"{path} is not valid JSON or YAML: {exc}")


def _document_of(path: Path) -> dict[str, Any]:
    """A checked document from a file holding a document or an envelope."""
    data = _load(path)
    document = data["document"] if is_envelope(data) else data
    problems, _rules = document_problems(document)
    if problems:
        lines = "\n".join(f"  {p.param or 'document'}: {p.message}" for p in problems)
        _fail(f"{path} is not a valid constitution:\n{lines}")
    assert isinstance(document, dict)
    return document


def _run(settings: Settings, work: Callable[[Constitutions, AsyncSession], Awaitable[T]]) -> T:
    """Migrate, then run `work` with the constitution service and a session it commits."""
    migrate.upgrade(settings.resolved_database_url)
    signer = platform_signer(settings.resolved_secret_key())

    async def go() -> T:
        engine = create_engine(settings.resolved_database_url)
        try:
            sessions = session_factory(engine)
            service = Constitutions(sessions, signer, cache_ttl_s=0)
            async with sessions() as session:
                result = await work(service, session)
                await session.commit()
                return result
        finally:
            await engine.dispose()

    try:
        return asyncio.run(go())
    except SomaError as exc:
        _fail(exc.message)


def _shown(found: ActiveConstitution, tenant_name: str) -> dict[str, Any]:
    return {
        "tenant_id": found.tenant_id,
        "tenant": tenant_name,
        "version": found.version,
        "sha256": found.sha256,
        "signing_key_id": found.signing_key_id,
        "signature": found.signature,
        "created_at": found.created_at.isoformat() if found.created_at else None,
        "created_by": found.created_by,
        "document": found.document,
    }


@constitution.command("sign")
def sign(
    file: FileArgument,
    out: Annotated[Path | None, typer.Option(help="Write the envelope here instead of printing it.")] = None,
) -> None:
    """Sign a constitution with the platform key: prints {document, signature, signing_key_id, sha256}."""
    document = _document_of(file)
    try:
        signed = platform_signer(Settings().resolved_secret_key()).sign(document)
    except SomaError as exc:
        _fail(exc.message)
    text = json.dumps(signed.to_json(), indent=2, ensure_ascii=False) + "\n"
    if out is None:
        typer.echo(text, nl=False)
        return
    out.write_text(text, encoding="utf-8")
    typer.echo(f"signed {file} → {out} (sha256 {signed.sha256}, key {signed.signing_key_id})", err=True)


@constitution.command("put")
def put(tenant: TenantOption, file: FileArgument) -> None:
    """Store a constitution as the tenant's next version (an envelope as signed; a document signed now)."""
    data = _load(file)
    document = _document_of(file)
    try:
        envelope = SignedDocument.from_json(data) if is_envelope(data) else None
    except SomaError as exc:
        _fail(exc.message)

    async def work(service: Constitutions, session: AsyncSession) -> tuple[ActiveConstitution, str]:
        found = await get_tenant(session, None, tenant)
        operator = Principal(found.id, found.name, "cli", None, OPERATOR_CAPABILITIES)
        signed = envelope or service.signer.sign(document)
        stored = await service.put(
            session,
            operator,
            signed.document,
            signed.signature,
            signed.signing_key_id or None,
            signed.sha256 or None,
        )
        return stored, found.name

    stored, name = _run(Settings(), work)
    typer.echo(f"stored constitution version {stored.version} for {name} (sha256 {stored.sha256})")
    typer.echo("running servers use it within SOMA_POLICY_CACHE_TTL_S", err=True)


@constitution.command("show")
def show(tenant: TenantOption) -> None:
    """Print the tenant's constitution in force (verified) as JSON."""

    async def work(service: Constitutions, session: AsyncSession) -> dict[str, Any]:
        found = await get_tenant(session, None, tenant)
        return _shown(await service.active(found.id), found.name)

    typer.echo(json.dumps(_run(Settings(), work), indent=2, ensure_ascii=False))


@constitution.command("verify")
def verify(file: FileArgument) -> None:
    """Check a signed envelope: the document is valid and the platform key (or a trusted one) signed it."""
    data = _load(file)
    if not is_envelope(data):
        _fail(f"{file} is not a signed envelope; make one with `soma constitution sign {file}`")
    document = _document_of(file)
    try:
        signed = SignedDocument.from_json(data)
        signer = platform_signer(Settings().resolved_secret_key())
        kid = signer.verify(document, signed.signature, signed.signing_key_id or None, signed.sha256 or None)
        digest = document_sha256(document)
    except SomaError as exc:
        _fail(exc.message)
    typer.echo(f"valid: sha256 {digest}, signed by key {kid}")
