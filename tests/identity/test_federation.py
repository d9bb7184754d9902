"""OIDC federation against a real OpenID provider (npm `oidc-provider`, client-credentials JWTs).

Trust rows are managed on a fresh database per backend; the verifier fetches the provider's real
discovery document and JWKS; the HTTP tests go through a real `soma serve`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import typer
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from typer.testing import CliRunner

from somaagent.cli.admin import tenants_create
from somaagent.cli.federation_cmd import trust_oidc
from somaagent.core.errors import Conflict, Forbidden, InvalidRequest, NotFound, Unauthenticated
from somaagent.core.principal import Principal
from somaagent.db import migrate
from somaagent.db.engine import create_engine, session_factory
from somaagent.events.tables import OutboxEvent
from somaagent.identity import service, trusts
from somaagent.identity.capabilities import ROLE_CAPABILITIES, TENANT_CAPABILITIES, Capability
from somaagent.identity.federation import FederationVerifier
from somaagent.identity.tables import Tenant, TrustedIssuer
from tests.conftest import TenantCtx
from tests.support.oidc import OidcProvider, new_signing_key, private_key, start_oidc_provider
from tests.support.postgres import create_database, drop_database
from tests.support.processes import SomaServer, free_port

# The engine and the verifiers' HTTP clients live on the session loop; so do the tests that use them.
on_session_loop = pytest.mark.asyncio(loop_scope="session")

ROLE_MAP = {"soma-admins": "admin", "soma-readers": "viewer", "soma-owners": "owner"}
Sessions = async_sessionmaker[AsyncSession]


@pytest.fixture(scope="module")
def idp() -> Iterator[OidcProvider]:
    # It signs with the RSA key and also publishes an EC and an Ed25519 key, which tests sign with.
    provider = start_oidc_provider(
        [new_signing_key("rsa"), new_signing_key("ec", "ES256"), new_signing_key("ed", "EdDSA")]
    )
    yield provider
    provider.stop()


@pytest.fixture(scope="module")
def database_url(backend: str) -> Iterator[str]:
    if backend == "postgres":
        name, url = create_database()
        migrate.upgrade(url)
        yield url
        drop_database(name)
    else:
        url = f"sqlite+aiosqlite:///{Path(tempfile.mkdtemp()) / 'federation.db'}"
        migrate.upgrade(url)
        yield url


@pytest.fixture(scope="module")
async def sessions(database_url: str) -> AsyncIterator[Sessions]:
    engine = create_engine(database_url)
    yield session_factory(engine)
    await engine.dispose()


@pytest.fixture
async def verifier(sessions: Sessions) -> AsyncIterator[FederationVerifier]:
    verifying = FederationVerifier(sessions, min_refetch_s=0.2, http_timeout_s=2.0)
    yield verifying
    await verifying.close()


def unique_audience() -> str:
    # (issuer, audience) is unique across tenants, and the IdP grants any resource as the audience.
    return f"https://soma.test/{secrets.token_hex(4)}"


async def new_tenant(sessions: Sessions) -> Tenant:
    async with sessions() as session:
        tenant = await service.create_tenant(session, None, f"fed-{secrets.token_hex(4)}")
        await session.commit()
    return tenant


async def trust(
    sessions: Sessions, tenant: Tenant, issuer: str, audience: str, **overrides: Any
) -> TrustedIssuer:
    options: dict[str, Any] = {"role_claim": "roles", "role_map": ROLE_MAP, "default_role": None}
    options.update(overrides)
    async with sessions() as session:
        row = await trusts.trust_issuer(
            session, None, tenant.name, issuer=issuer, audience=audience, **options
        )
        await session.commit()
    return row


def claims_of(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def sign(jwk: dict[str, Any], claims: dict[str, Any], alg: str | None = None) -> str:
    """A token signed with one of the IdP's own private keys: for claims or algorithms it would not issue."""
    return jwt.encode(claims, private_key(jwk), algorithm=alg or jwk["alg"], headers={"kid": jwk["kid"]})


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


async def refused(verifier: FederationVerifier, token: str, fragment: str) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as caught:
        await verifier.verify(token)
    assert caught.value.code == "invalid_token"
    assert fragment in caught.value.message, caught.value.message
    return caught.value


# --- the verifier against the real IdP ---------------------------------------------------------------


@on_session_loop
async def test_client_credentials_tokens_map_to_the_trusting_tenant_and_role(
    idp: OidcProvider, sessions: Sessions, verifier: FederationVerifier
) -> None:
    tenant = await new_tenant(sessions)
    audience = unique_audience()
    row = await trust(sessions, tenant, idp.issuer, audience)

    token = idp.token("acme-admin", audience)
    principal = await verifier.verify(token)
    assert principal == Principal(
        tenant_id=tenant.id,
        tenant_name=tenant.name,
        subject=f"oidc:{row.id}:acme-admin",
        key_id=None,
        capabilities=ROLE_CAPABILITIES["admin"],
        user_id=None,
        role="admin",
        token_id=claims_of(token)["jti"],
    )
    assert Capability.ACCOUNT_SELF not in principal.capabilities
    assert not principal.is_admin

    reader = await verifier.verify(idp.token("acme-reader", audience))
    assert reader is not None
    assert (reader.role, reader.capabilities) == ("viewer", ROLE_CAPABILITIES["viewer"])
    # Several groups: the highest mapped role wins, unmapped values are ignored.
    multi = await verifier.verify(idp.token("acme-multi", audience))
    assert multi is not None and multi.role == "admin"
    # The role claim may be a plain string.
    single = await verifier.verify(idp.token("acme-string", audience))
    assert single is not None and single.role == "viewer"


@on_session_loop
async def test_a_token_mapping_to_no_role_is_refused_unless_the_trust_has_a_default(
    idp: OidcProvider, sessions: Sessions, verifier: FederationVerifier
) -> None:
    tenant = await new_tenant(sessions)
    strict, lenient = unique_audience(), unique_audience()
    await trust(sessions, tenant, idp.issuer, strict)
    await trust(sessions, tenant, idp.issuer, lenient, default_role="member")

    await refused(verifier, idp.token("nobody", strict), "maps to no SomaAgent role")
    principal = await verifier.verify(idp.token("nobody", lenient))
    assert principal is not None
    assert (principal.role, principal.capabilities) == ("member", ROLE_CAPABILITIES["member"])


@on_session_loop
async def test_wrong_audience_is_refused(
    idp: OidcProvider, sessions: Sessions, verifier: FederationVerifier
) -> None:
    tenant = await new_tenant(sessions)
    await trust(sessions, tenant, idp.issuer, unique_audience())
    await refused(verifier, idp.token("acme-admin", "https://someone-else.test/api"), "audience")


@on_session_loop
async def test_a_token_of_an_issuer_nobody_trusts_is_not_ours_to_judge(
    sessions: Sessions, verifier: FederationVerifier
) -> None:
    stranger = start_oidc_provider()
    try:
        assert await verifier.verify(stranger.token("acme-admin")) is None
    finally:
        stranger.stop()


@on_session_loop
async def test_tampered_and_forged_tokens_are_refused(
    idp: OidcProvider, sessions: Sessions, verifier: FederationVerifier
) -> None:
    tenant = await new_tenant(sessions)
    audience = unique_audience()
    await trust(sessions, tenant, idp.issuer, audience)
    token = idp.token("acme-reader", audience)
    header, _payload, signature = token.split(".")

    escalated = {**claims_of(token), "roles": ["soma-owners"]}
    await refused(verifier, f"{header}.{b64(escalated)}.{signature}", "signature does not verify")
    unsigned = b64({"alg": "none", "typ": "JWT"})
    await refused(verifier, f"{unsigned}.{b64(escalated)}.", "'none' are not accepted")
    # HMAC with the provider's public modulus as the "secret": the classic algorithm confusion.
    modulus = idp.keys[0]["n"]
    hmac = jwt.encode(escalated, modulus, algorithm="HS256", headers={"kid": idp.keys[0]["kid"]})
    await refused(verifier, hmac, "'HS256' are not accepted")
    await refused(verifier, "not-a-jwt", "malformed access token")

    now = int(time.time())
    base = {"iss": idp.issuer, "aud": audience, "sub": "forged", "roles": ["soma-readers"], "iat": now}
    key = idp.keys[0]
    await refused(verifier, sign(key, {**base, "exp": now - 120}), "expired")
    await refused(verifier, sign(key, {**base, "exp": now + 600, "nbf": now + 300}), "not valid yet")
    without_aud = {k: v for k, v in base.items() if k != "aud"} | {"exp": now + 60}
    await refused(verifier, sign(key, without_aud), "no `aud` claim")
    without_sub = {k: v for k, v in base.items() if k != "sub"} | {"exp": now + 60}
    await refused(verifier, sign(key, without_sub), "`sub` claim")
    await refused(verifier, sign(key, {**base, "sub": "s" * 81, "exp": now + 60}), "`sub` claim")
    await refused(verifier, sign(key, {**base}), "`exp` claim")
    stranger_key = new_signing_key("not-published")
    await refused(verifier, sign(stranger_key, {**base, "exp": now + 60}), "does not publish")
    # Within the leeway, and signed by the published key: accepted (this is the IdP's real key).
    accepted = await verifier.verify(sign(key, {**base, "exp": now - 5}))
    assert accepted is not None and accepted.role == "viewer"


@on_session_loop
async def test_every_asymmetric_algorithm_verifies_with_its_own_key_type_only(
    idp: OidcProvider, sessions: Sessions, verifier: FederationVerifier
) -> None:
    tenant = await new_tenant(sessions)
    audience = unique_audience()
    await trust(sessions, tenant, idp.issuer, audience)
    now = int(time.time())
    claims = {"iss": idp.issuer, "aud": audience, "sub": "svc", "exp": now + 60, "roles": ["soma-admins"]}
    rsa_key, ec_key, ed_key = idp.keys
    for key in (ec_key, ed_key):
        principal = await verifier.verify(sign(key, claims))
        assert principal is not None and principal.role == "admin", key["alg"]
    await refused(verifier, sign(rsa_key, claims, alg="PS256"), "its signing key is for RS256")
    mislabelled = jwt.encode(claims, private_key(rsa_key), algorithm="RS256", headers={"kid": "ec"})
    await refused(verifier, mislabelled, "of type 'EC'")


@on_session_loop
async def test_claims_can_be_read_from_other_and_nested_names(
    idp: OidcProvider, sessions: Sessions, verifier: FederationVerifier
) -> None:
    tenant = await new_tenant(sessions)
    by_client, nested = unique_audience(), unique_audience()
    await trust(sessions, tenant, idp.issuer, by_client, subject_claim="client_id")
    row = await trust(
        sessions, tenant, idp.issuer, nested, role_claim="realm_access.roles", role_map={"ops": "owner"}
    )
    principal = await verifier.verify(idp.token("acme-admin", by_client))
    assert principal is not None and principal.subject.endswith(":acme-admin")

    now = int(time.time())
    claims = {
        "iss": idp.issuer,
        "aud": nested,
        "sub": "u1",
        "exp": now + 60,
        "realm_access": {"roles": ["ops"]},
    }
    owner = await verifier.verify(sign(idp.keys[0], claims))
    assert owner is not None
    assert (owner.role, owner.subject) == ("owner", f"oidc:{row.id}:u1")


@on_session_loop
async def test_an_unreachable_provider_is_a_refusal_not_a_crash(
    idp: OidcProvider, sessions: Sessions, verifier: FederationVerifier
) -> None:
    tenant = await new_tenant(sessions)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: a real connection refusal
    await trust(sessions, tenant, dead, "soma")
    now = int(time.time())
    token = sign(idp.keys[0], {"iss": dead, "aud": "soma", "sub": "x", "exp": now + 60})
    started = time.monotonic()
    await refused(verifier, token, "could not get the signing keys")
    await refused(verifier, token, "could not get the signing keys")  # rate-limited: no second wait
    assert time.monotonic() - started < 5


@on_session_loop
async def test_provider_key_rotation_needs_no_restart(sessions: Sessions) -> None:
    old, new = new_signing_key("old"), new_signing_key("new")
    provider = start_oidc_provider([old])
    verifier = FederationVerifier(sessions, jwks_ttl_s=1.0, min_refetch_s=0.3, http_timeout_s=2.0)
    try:
        tenant = await new_tenant(sessions)
        audience = unique_audience()
        await trust(sessions, tenant, provider.issuer, audience)
        old_token = provider.token("acme-admin", audience)
        assert await verifier.verify(old_token) is not None

        # The provider rolls over: signs with the new key, still publishes the old one.
        provider.restart([new, old])
        new_token = provider.token("acme-admin", audience)
        assert jwt.get_unverified_header(new_token)["kid"] == "new"
        await asyncio.sleep(0.3)  # past min_refetch_s since the first fetch
        assert await verifier.verify(new_token) is not None  # unknown kid → one refetch
        assert await verifier.verify(old_token) is not None

        # The old key is withdrawn: its tokens stop verifying once our cached JWKS expires.
        provider.restart([new])
        await asyncio.sleep(1.1)
        await refused(verifier, old_token, "does not publish")
        assert await verifier.verify(new_token) is not None
    finally:
        await verifier.close()
        provider.stop()


@on_session_loop
async def test_an_untrusted_issuer_stops_working_within_the_trust_cache_time(
    idp: OidcProvider, sessions: Sessions, verifier: FederationVerifier
) -> None:
    tenant = await new_tenant(sessions)
    audience = unique_audience()
    row = await trust(sessions, tenant, idp.issuer, audience)
    token = idp.token("acme-admin", audience)
    replica = FederationVerifier(sessions, trust_ttl_s=0.5)  # another process that cached the trust
    try:
        assert await verifier.verify(token) is not None
        assert await replica.verify(token) is not None
        async with sessions() as session:
            await trusts.untrust_issuer(session, None, tenant.name, row.id)
            await session.commit()
        verifier.forget()  # what the API does in the process that revoked it
        await refused_or_unknown(verifier, token)
        await asyncio.sleep(0.6)
        await refused_or_unknown(replica, token)
    finally:
        await replica.close()


async def refused_or_unknown(verifier: FederationVerifier, token: str) -> None:
    """Other tests' trusts of the same issuer may remain: then the audience no longer matches; else the
    issuer is unknown. Either way, no principal."""
    try:
        assert await verifier.verify(token) is None
    except Unauthenticated as exc:
        assert "audience" in exc.message


# --- managing trust rows -------------------------------------------------------------------------------


@on_session_loop
async def test_trust_validates_its_input(idp: OidcProvider, sessions: Sessions) -> None:
    tenant = await new_tenant(sessions)

    async def attempt(**overrides: Any) -> InvalidRequest:
        options: dict[str, Any] = {"issuer": idp.issuer, "audience": unique_audience()} | overrides
        with pytest.raises(InvalidRequest) as caught:
            await trust(sessions, tenant, **options)
        return caught.value

    assert (await attempt(role_map={"g": "superuser"})).param == "role_map"
    assert (await attempt(default_role="root")).param == "default_role"
    assert (await attempt(role_claim="has space")).param == "role_claim"
    assert (await attempt(subject_claim="")).param == "subject_claim"
    assert (await attempt(audience="")).param == "audience"
    for bad in (
        "http://idp.example.com",
        "ftp://idp.example.com",
        "https://user:pw@idp.example.com",
        "https://idp.example.com/?x=1",
        "idp.example.com",
        "https://idp.example.com:99999",
    ):
        error = await attempt(issuer=bad)
        assert error.param == "issuer", bad
    assert "https" in (await attempt(issuer="http://idp.example.com")).message

    for good in ("https://idp.example.com/realms/acme", "http://localhost:8081", "http://[::1]:8081"):
        row = await trust(sessions, tenant, good, unique_audience())
        assert row.issuer == good


@on_session_loop
async def test_an_issuer_and_audience_pair_belongs_to_one_tenant(
    idp: OidcProvider, sessions: Sessions
) -> None:
    first, second = await new_tenant(sessions), await new_tenant(sessions)
    audience = unique_audience()
    await trust(sessions, first, idp.issuer, audience)
    for tenant in (first, second):
        with pytest.raises(Conflict):
            await trust(sessions, tenant, idp.issuer, audience)


@on_session_loop
async def test_only_operators_manage_trusts_and_each_tenant_sees_its_own(
    idp: OidcProvider, sessions: Sessions
) -> None:
    mine, theirs = await new_tenant(sessions), await new_tenant(sessions)
    row = await trust(sessions, mine, idp.issuer, unique_audience())
    tenant_admin = Principal(mine.id, mine.name, "key:k", "k", TENANT_CAPABILITIES)
    async with sessions() as session:
        with pytest.raises(Forbidden):
            await trusts.trust_issuer(
                session,
                tenant_admin,
                mine.name,
                issuer=idp.issuer,
                audience=unique_audience(),
                role_claim="roles",
                role_map={},
                default_role="viewer",
            )
        with pytest.raises(Forbidden):
            await trusts.list_trusted_issuers(session, tenant_admin, mine.name)
        with pytest.raises(Forbidden):
            await trusts.untrust_issuer(session, tenant_admin, mine.name, row.id)
        assert [t.id for t in await trusts.list_trusted_issuers(session, None, mine.name)] == [row.id]
        assert await trusts.list_trusted_issuers(session, None, theirs.name) == []
        with pytest.raises(NotFound):
            await trusts.untrust_issuer(session, None, theirs.name, row.id)
        with pytest.raises(NotFound):
            await trusts.list_trusted_issuers(session, None, "no-such-tenant")


@on_session_loop
async def test_trust_and_untrust_are_audited(idp: OidcProvider, sessions: Sessions) -> None:
    tenant = await new_tenant(sessions)
    audience = unique_audience()
    row = await trust(sessions, tenant, idp.issuer, audience)
    async with sessions() as session:
        await trusts.untrust_issuer(session, None, tenant.id, row.id)
        await session.commit()
        events = (
            await session.scalars(
                select(OutboxEvent).where(OutboxEvent.tenant_id == tenant.id).order_by(OutboxEvent.seq)
            )
        ).all()
    audit = [(e.topic, e.type, e.actor, e.data.get("trust_id")) for e in events if e.type.startswith("oidc.")]
    assert audit == [
        ("audit.events", "oidc.trusted", "cli", row.id),
        ("audit.events", "oidc.untrusted", "cli", row.id),
    ]
    trusted = next(e for e in events if e.type == "oidc.trusted")
    assert trusted.data["issuer"] == idp.issuer and trusted.data["role_map"] == ROLE_MAP


def test_cli_trust_oidc(database_url: str, idp: OidcProvider) -> None:
    # Registered as `soma tenants trust-oidc` is, on a group of its own (the real one stays untouched).
    group = typer.Typer()
    group.command("create")(tenants_create)
    group.command("trust-oidc")(trust_oidc)
    app = typer.Typer()
    app.add_typer(group, name="tenants")
    env = {"SOMA_DATABASE_URL": database_url}
    name = f"cli-{secrets.token_hex(4)}"
    runner = CliRunner()
    created = runner.invoke(app, ["tenants", "create", name], env=env)
    assert created.exit_code == 0, created.output
    audience = unique_audience()
    args = ["tenants", "trust-oidc", "--tenant", name, "--issuer", idp.issuer, "--audience", audience]
    done = runner.invoke(app, [*args, "--map", "soma-admins=admin", "--map", "soma-readers=viewer"], env=env)
    assert done.exit_code == 0, done.output
    assert f"now trusts {idp.issuer}" in done.output
    again = runner.invoke(app, [*args, "--map", "soma-admins=admin"], env=env)
    assert again.exit_code == 1 and "already trusted" in again.output
    bad = runner.invoke(app, [*args[:-1], unique_audience(), "--map", "soma-admins=god"], env=env)
    assert bad.exit_code == 1 and "unknown role 'god'" in bad.output
    malformed = runner.invoke(app, [*args, "--map", "no-equals-sign"], env=env)
    assert malformed.exit_code == 2 and "VALUE=ROLE" in malformed.output


# --- over HTTP, through a real `soma serve` ------------------------------------------------------------


def issuers_path(tenant: str) -> str:
    return f"/v1/tenants/{tenant}/oidc-issuers"


def trust_body(idp: OidcProvider, audience: str, **overrides: Any) -> dict[str, Any]:
    return {"issuer": idp.issuer, "audience": audience, "role_map": ROLE_MAP} | overrides


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param, error
    return error


def test_operator_trusts_lists_and_untrusts_over_http(
    admin: httpx.Client, tenant: TenantCtx, idp: OidcProvider
) -> None:
    audience = unique_audience()
    created = admin.post(issuers_path(tenant.name), json=trust_body(idp, audience, default_role="viewer"))
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["object"] == "oidc_issuer"
    assert (body["tenant_id"], body["issuer"], body["audience"]) == (tenant.id, idp.issuer, audience)
    assert (body["role_claim"], body["subject_claim"], body["default_role"]) == ("roles", "sub", "viewer")
    assert body["role_map"] == ROLE_MAP

    listed = admin.get(issuers_path(tenant.id)).json()
    assert listed["object"] == "list" and [t["id"] for t in listed["data"]] == [body["id"]]

    def post(body: dict[str, Any], tenant_ref: str = tenant.name) -> httpx.Response:
        return admin.post(issuers_path(tenant_ref), json=body)

    assert_error(post(trust_body(idp, audience)), 409)
    assert_error(post(trust_body(idp, unique_audience(), role_map={"g": "god"})), 400, "role_map")
    assert_error(post(trust_body(idp, unique_audience(), issuer="http://idp.example")), 400, "issuer")
    assert_error(post({**trust_body(idp, unique_audience()), "x": 1}), 400)
    assert_error(post(trust_body(idp, unique_audience()), "no-such-tenant"), 404)

    deleted = admin.delete(f"{issuers_path(tenant.name)}/{body['id']}")
    assert deleted.status_code == 200 and deleted.json()["id"] == body["id"]
    assert admin.get(issuers_path(tenant.name)).json()["data"] == []
    assert_error(admin.delete(f"{issuers_path(tenant.name)}/{body['id']}"), 404)


def test_a_tenant_key_may_not_manage_federation(tenant: TenantCtx, idp: OidcProvider) -> None:
    path = issuers_path(tenant.name)
    for response in (
        tenant.http.post(path, json=trust_body(idp, unique_audience())),
        tenant.http.get(path),
        tenant.http.delete(f"{path}/oidc_whatever"),
    ):
        assert assert_error(response, 403)["code"] == "missing_capability"


def test_trusts_are_isolated_between_tenants(
    admin: httpx.Client, new_tenant: Callable[..., TenantCtx], idp: OidcProvider
) -> None:
    mine, theirs = new_tenant(), new_tenant()
    created = admin.post(issuers_path(mine.name), json=trust_body(idp, unique_audience()))
    assert created.status_code == 201, created.text
    trust_id = created.json()["id"]
    assert admin.get(issuers_path(theirs.name)).json()["data"] == []
    assert_error(admin.delete(f"{issuers_path(theirs.name)}/{trust_id}"), 404)
    assert [t["id"] for t in admin.get(issuers_path(mine.name)).json()["data"]] == [trust_id]


def test_an_idp_token_calls_the_api_until_its_trust_is_revoked(
    server: SomaServer, admin: httpx.Client, tenant: TenantCtx, idp: OidcProvider
) -> None:
    audience = unique_audience()
    created = admin.post(issuers_path(tenant.name), json=trust_body(idp, audience))
    assert created.status_code == 201, created.text

    def models(token: str) -> httpx.Response:
        return httpx.get(server.v1 + "/models", headers={"authorization": f"Bearer {token}"}, timeout=30)

    reader = idp.token("acme-reader", audience)
    answer = models(reader)
    assert answer.status_code == 200, answer.text
    assert answer.json()["object"] == "list"
    for unwelcome in (idp.token("nobody", audience), idp.token("acme-reader", "https://someone-else.test")):
        assert assert_error(models(unwelcome), 401)["code"] == "invalid_token"
    bearer = {"authorization": f"Bearer {reader}"}
    # The caller acts in the trusting tenant only, as a viewer: it may use models but not manage keys.
    assert [t["id"] for t in httpx.get(server.v1 + "/tenants", headers=bearer).json()["data"]] == [tenant.id]
    assert_error(httpx.get(server.v1 + "/keys", headers=bearer), 403)

    assert admin.delete(f"{issuers_path(tenant.name)}/{created.json()['id']}").status_code == 200
    assert assert_error(models(reader), 401)["code"] == "invalid_token"
