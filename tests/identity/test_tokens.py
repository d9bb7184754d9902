"""SomaAgent's own access tokens on a real, freshly migrated database (SQLite and PostgreSQL): every claim
survives the round trip, every forged or misused token is refused with a clear code, the low-level JWS
check passes the RFC 8037 and RFC 7520 vectors, keys rotate (by hand and by age, one replica at a time)
without breaking live tokens, and revocations reach a second replica within a second."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import importlib.util
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import jwcrypto
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwcrypto import jwk as jwc_jwk
from jwcrypto import jwt as jwc_jwt
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.core.clock import utcnow
from somaagent.core.errors import Unauthenticated
from somaagent.db import migrate
from somaagent.db.engine import create_engine, session_factory
from somaagent.identity import signing_keys
from somaagent.identity.secret_box import SecretBox
from somaagent.identity.tables import RevokedToken, SigningKey
from somaagent.identity.tokens import (
    TokenService,
    TokenSettings,
    looks_like_jwt,
    retired_key_window_s,
    unverified_issuer,
)
from tests.support.postgres import create_database, drop_database

SECRET = secrets.token_bytes(32)
SETTINGS = TokenSettings(
    issuer="somaagent",
    audience="somaagent",
    algorithm="EdDSA",
    access_ttl_s=900,
    key_max_age_s=30 * 86_400,
    poll_s=0.5,
)
CAPS = frozenset({"chat:use", "memory:read", "account:self"})


def box() -> SecretBox:
    return SecretBox(SECRET, signing_keys.SEALING_PURPOSE)


@asynccontextmanager
async def replica(
    url: str, settings: TokenSettings = SETTINGS, *, started: bool = False, secret: bytes = SECRET
) -> AsyncIterator[tuple[TokenService, async_sessionmaker[AsyncSession]]]:
    """One server process's token service: its own engine (pool) on the shared database."""
    engine = create_engine(url)
    sessions = session_factory(engine)
    service = TokenService(sessions, SecretBox(secret, signing_keys.SEALING_PURPOSE), settings)
    if started:
        service.start()
    try:
        yield service, sessions
    finally:
        await service.close()
        await engine.dispose()


async def issue(service: TokenService, *, user: str = "usr_alice", family: str | None = "fam_1") -> str:
    issued = await service.issue_access_token(
        user_id=user,
        tenant_id="ten_acme",
        tenant_name="acme",
        role="member",
        capabilities=CAPS,
        family_id=family,
        amr=["pwd", "otp"],
    )
    return issued.token


async def rejected(service: TokenService, token: str) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as caught:
        await service.verify_access_token(token)
    return caught.value


async def within(seconds: float, check: Callable[[], Awaitable[bool]]) -> float:
    """How long `check` took to become true; fails after `seconds`."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < seconds, f"not true within {seconds}s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def active_private_key(sessions: async_sessionmaker[AsyncSession]) -> signing_keys.ActiveKey:
    """The active signing key read back from the table and unsealed, as an attacker with the key would."""
    async with sessions() as session:
        rows = list(await session.scalars(select(SigningKey)))
    chosen = signing_keys.pick_active(rows)
    assert chosen is not None
    return signing_keys.open_private_key(box(), chosen)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"


def alg_none(alg: str, kid: str) -> str:
    return unsigned({"alg": alg, "kid": kid, "typ": "at+jwt"}, good_claims()) + "."


def good_claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": "somaagent",
        "aud": "somaagent",
        "sub": "usr_alice",
        "tenant_id": "ten_acme",
        "tenant": "acme",
        "role": "member",
        "caps": sorted(CAPS),
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "jti": "jti_forged",
        "amr": ["pwd"],
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


# Round trip.


@pytest.mark.parametrize("algorithm", ["EdDSA", "RS256"])
async def test_issue_verify_round_trip_carries_every_claim(migrated_database: str, algorithm: str) -> None:
    async with replica(migrated_database, replace(SETTINGS, algorithm=algorithm)) as (tokens, _):
        issued = await tokens.issue_access_token(
            user_id="usr_alice",
            tenant_id="ten_acme",
            tenant_name="acme",
            role="admin",
            capabilities=CAPS,
            family_id="fam_42",
            amr=["pwd", "otp"],
            extra_claims={"constitution_hash": "sha256:abc"},
        )
        assert issued.expires_in == 900
        assert looks_like_jwt(issued.token) and unverified_issuer(issued.token) == "somaagent"

        principal = await tokens.verify_access_token(issued.token)
        assert principal.tenant_id == "ten_acme" and principal.tenant_name == "acme"
        assert principal.subject == "user:usr_alice" and principal.user_id == "usr_alice"
        assert principal.key_id is None and principal.role == "admin"
        assert principal.capabilities == CAPS and principal.token_id == issued.token_id

        # An independent verifier (jwcrypto) with nothing but our published JWKS agrees.
        published = await tokens.jwks()
        assert len(published["keys"]) == 1
        public = published["keys"][0]
        assert public["alg"] == algorithm and public["use"] == "sig"
        assert not {"d", "p", "q", "dp", "dq", "qi"} & public.keys()
        key = jwc_jwk.JWK(**public)
        assert public["kid"] == key.thumbprint()  # RFC 7638
        checked = jwc_jwt.JWT(jwt=issued.token, key=jwc_jwk.JWKSet.from_json(json.dumps(published)))
        header, claims = json.loads(checked.header), json.loads(checked.claims)
        assert header == {"alg": algorithm, "kid": public["kid"], "typ": "at+jwt"}
        assert claims["iss"] == "somaagent" and claims["aud"] == "somaagent"
        assert claims["sub"] == "usr_alice" and claims["tenant_id"] == "ten_acme"
        assert claims["tenant"] == "acme"
        assert claims["role"] == "admin" and claims["caps"] == sorted(CAPS)
        assert claims["jti"] == issued.token_id and claims["sid"] == "fam_42"
        assert claims["amr"] == ["pwd", "otp"]
        assert claims["constitution_hash"] == "sha256:abc"
        assert claims["nbf"] <= claims["iat"] < claims["nbf"] + 1 and claims["exp"] == claims["nbf"] + 900
        assert abs(claims["iat"] - time.time()) < 5


async def test_reserved_claims_cannot_be_overridden(migrated_database: str) -> None:
    async with replica(migrated_database) as (tokens, _):
        with pytest.raises(ValueError, match="sub"):
            await tokens.issue_access_token(
                user_id="u",
                tenant_id="t",
                tenant_name="n",
                role=None,
                capabilities=frozenset(),
                family_id=None,
                amr=[],
                extra_claims={"sub": "someone-else"},
            )
        # Without a family (client credentials) the token has no sid and still verifies.
        principal = await tokens.verify_access_token(await issue(tokens, family=None))
        assert principal.user_id == "usr_alice"


def test_shape_helpers() -> None:
    assert not looks_like_jwt("sk-soma-" + "a" * 40)
    assert not looks_like_jwt("a.b")
    assert not looks_like_jwt("a.b.c.d")
    assert not looks_like_jwt("a!.b.c")
    assert looks_like_jwt("eyJhbGciOiJub25lIn0.e30.")
    assert not looks_like_jwt("a" * 20_000 + ".b.c")
    assert unverified_issuer(unsigned({"alg": "none"}, {"iss": "https://idp.example"}) + ".") == (
        "https://idp.example"
    )
    assert unverified_issuer(unsigned({"alg": "none"}, {"iss": 7}) + ".") is None
    assert unverified_issuer("eyJhbGciOiJub25lIn0.bm90IGpzb24.") is None  # "not json"
    assert unverified_issuer("garbage") is None


# Rejections.


async def test_every_forgery_and_misuse_is_refused(migrated_database: str) -> None:
    async with replica(migrated_database) as (tokens, sessions):
        genuine = await issue(tokens)
        await tokens.verify_access_token(genuine)
        ours = await active_private_key(sessions)
        kid = ours.kid
        public_pem = ours.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        public_x = (await tokens.jwks())["keys"][0]["x"].encode()

        def hs256(secret: bytes) -> str:
            head = unsigned({"alg": "HS256", "kid": kid, "typ": "at+jwt"}, good_claims())
            return f"{head}.{b64(hmac.new(secret, head.encode(), hashlib.sha256).digest())}"

        def signed(claims: dict[str, Any], *, key: Any = ours.private_key, **header: Any) -> str:
            headers = {k: v for k, v in {"kid": kid, "typ": "at+jwt", **header}.items() if v is not None}
            return jwt.encode(claims, key, algorithm="EdDSA", headers={"typ": None, **headers})

        mfa = await tokens.issue_mfa_challenge(user_id="usr_alice", tenant_id="ten_acme")
        head, body, signature = genuine.split(".")
        flipped_body = body[:10] + ("A" if body[10] != "A" else "B") + body[11:]
        flipped_signature = ("A" if signature[0] != "A" else "B") + signature[1:]
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        now = int(time.time())
        # A payload that is valid base64 but not JSON, under a genuine signature.
        our_header = b64(json.dumps({"alg": "EdDSA", "kid": kid, "typ": "at+jwt"}).encode())
        not_json_input = f"{our_header}.{b64(b'[1,')}"
        not_json = f"{not_json_input}.{b64(ours.private_key.sign(not_json_input.encode()))}"
        mfa_claims = jwt.decode(mfa, options={"verify_signature": False})

        # what -> (token, words its message must contain); every one is `invalid_token`.
        forgeries: dict[str, tuple[str, str]] = {
            "alg none": (alg_none("none", kid), "algorithm 'none' is not accepted"),
            "alg None": (alg_none("None", kid), "algorithm 'None' is not accepted"),
            "HS256 keyed with our public key PEM": (hs256(public_pem), "algorithm 'HS256' is not accepted"),
            "HS256 keyed with our raw public key": (hs256(public_x), "algorithm 'HS256' is not accepted"),
            "RS256 header on our EdDSA key": (
                jwt.encode(good_claims(), rsa_key, algorithm="RS256", headers={"kid": kid, "typ": "at+jwt"}),
                "signs with EdDSA, not 'RS256'",
            ),
            "a foreign key using our kid": (
                signed(good_claims(), key=Ed25519PrivateKey.generate()),
                "signature verification failed",
            ),
            "an unknown kid": (
                signed(good_claims(), kid="not-a-key-of-ours"),
                "unknown signing key 'not-a-key-of-ours'",
            ),
            "no kid": (signed(good_claims(), kid=None), "names no signing key"),
            "not yet valid": (signed(good_claims(nbf=now + 3600)), "not valid for another"),
            "issued in the future": (signed(good_claims(iat=now + 3600)), "issued in the future"),
            "wrong audience": (
                signed(good_claims(aud="another-service")),
                "audience 'another-service' is not 'somaagent'",
            ),
            "wrong issuer": (
                signed(good_claims(iss="https://evil.example")),
                "issuer 'https://evil.example' is not 'somaagent'",
            ),
            "no exp": (signed(good_claims(exp=None)), "exp, nbf and iat must be numbers"),
            "exp not a number": (signed(good_claims(exp="tomorrow")), "exp, nbf and iat must be numbers"),
            "no caps": (signed(good_claims(caps=None)), "lacks sub, tenant_id, tenant, caps or jti"),
            "typ JWT": (signed(good_claims(), typ="JWT"), "token type 'JWT' is not"),
            "no typ": (signed(good_claims(), typ=None), "token type None is not"),
            "an MFA challenge as an access token": (mfa, "token type 'mfa-challenge+jwt' is not"),
            "an MFA challenge relabelled at+jwt": (
                signed(mfa_claims, typ="at+jwt"),
                "audience 'somaagent:mfa' is not 'somaagent'",
            ),
            "one payload byte flipped": (f"{head}.{flipped_body}.{signature}", ""),
            "one signature byte flipped": (
                f"{head}.{body}.{flipped_signature}",
                "signature verification failed",
            ),
            "signature cut off": (f"{head}.{body}.", "signature verification failed"),
            "not a JWT": ("hello", "not a JWT"),
            "header not JSON": (f"{b64(b'{nope')}.{body}.{signature}", "malformed header"),
            "payload not JSON": (not_json, "payload is not JSON"),
        }
        for what, (token, words) in forgeries.items():
            error = await rejected(tokens, token)
            assert error.code == "invalid_token", (what, error.code, error.message)
            assert error.message.startswith("invalid access token: "), (what, error.message)
            assert words in error.message, (what, error.message)

        expired = await rejected(tokens, signed(good_claims(exp=now - 30)))
        assert expired.code == "token_expired" and "expired 3" in expired.message, expired.message

        # The mirror image: an access token is not an MFA challenge.
        with pytest.raises(Unauthenticated, match="token type 'at\\+jwt' is not mfa-challenge\\+jwt"):
            await tokens.verify_mfa_challenge(genuine)
        assert await tokens.verify_mfa_challenge(mfa) == ("usr_alice", "ten_acme")
        # The genuine token still verifies after all that.
        assert (await tokens.verify_access_token(genuine)).token_id is not None


async def test_unknown_kids_do_not_hammer_the_database(migrated_database: str) -> None:
    async with replica(migrated_database) as (tokens, sessions):
        await tokens.verify_access_token(await issue(tokens))
        ours = await active_private_key(sessions)
        started = time.monotonic()
        headers = [{"kid": f"junk-{i}", "typ": "at+jwt"} for i in range(200)]
        junk = [jwt.encode(good_claims(), ours.private_key, "EdDSA", headers=h) for h in headers]
        results = await asyncio.gather(*(tokens.verify_access_token(t) for t in junk), return_exceptions=True)
        assert all(isinstance(r, Unauthenticated) and "unknown signing key" in r.message for r in results)
        # 200 concurrent unknown kids share one re-read of the keys (at most one per 0.5 s).
        assert time.monotonic() - started < 2.0


# RFC vectors through the same low-level JWS check the verifier uses.


def _cookbook() -> ModuleType:
    path = Path(jwcrypto.__file__).parent / "tests-cookbook.py"
    spec = importlib.util.spec_from_file_location("jwcrypto_cookbook", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rfc_8037_a4_ed25519_vector() -> None:
    # RFC 8037 §A.1/A.2 key, §A.3 thumbprint, §A.4 signature (published values).
    public = {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
    assert signing_keys.thumbprint(public) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
    token = (
        "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc."
        "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"
    )
    key = signing_keys.verification_key(public, "EdDSA")
    assert signing_keys.verify_jws(token, key) == b"Example of Ed25519 signing"
    tampered = token.replace("RXhhbXBsZSBvZi", "RXhhbXBsZSBvZj")
    with pytest.raises(jwt.InvalidSignatureError):
        signing_keys.verify_jws(tampered, key)
    # The vector's key, signing with our code, gives the published signature (Ed25519 is deterministic).
    private = Ed25519PrivateKey.from_private_bytes(
        base64.urlsafe_b64decode("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A=")
    )
    assert signing_keys.public_jwk(private.public_key(), "EdDSA")["kid"] == key.kid
    signing_input = token.rsplit(".", 1)[0].encode()
    assert token.endswith("." + b64(private.sign(signing_input)))


def test_rfc_7520_4_1_rs256_vector() -> None:
    cookbook = _cookbook()
    token = cookbook.JWS_compact_4_1_3
    public = dict(cookbook.RSA_Public_Key_3_3)
    key = signing_keys.verification_key(public, "RS256")
    assert key.kid == "bilbo.baggins@hobbiton.example"  # the JWK's own kid is kept
    payload = signing_keys.verify_jws(token, key)
    assert payload == base64.urlsafe_b64decode(cookbook.Payload_plaintext_b64_4 + "==")
    assert payload.startswith("It\u2019s a dangerous business, Frodo".encode())
    # Our RFC 7638 thumbprint of the cookbook key matches jwcrypto's.
    assert signing_keys.thumbprint(public) == jwc_jwk.JWK(**public).thumbprint()
    head, body, signature = token.split(".")
    with pytest.raises(jwt.InvalidSignatureError):
        signing_keys.verify_jws(f"{head}.{body[:-2]}Yg.{signature}", key)
    # The right signature under the wrong algorithm is refused, not re-interpreted.
    with pytest.raises(ValueError):
        signing_keys.verification_key(public, "EdDSA")


# Rotation.


async def test_rotation_keeps_old_tokens_until_they_expire(migrated_database: str) -> None:
    short = replace(SETTINGS, access_ttl_s=2, poll_s=0.1)
    async with replica(migrated_database, short) as (tokens, sessions):
        old_token = await issue(tokens)
        old_kid = jwt.get_unverified_header(old_token)["kid"]
        new_kid = await tokens.rotate_signing_key()
        assert new_kid != old_kid
        new_token = await issue(tokens)
        assert jwt.get_unverified_header(new_token)["kid"] == new_kid
        await tokens.verify_access_token(old_token)
        await tokens.verify_access_token(new_token)
        assert [k["kid"] for k in (await tokens.jwks())["keys"]] == [new_kid, old_kid]  # active first

        async with sessions() as session:
            old = await session.get(SigningKey, old_kid)
        assert old is not None and old.retired_at is not None and old.expires_at is not None
        window = old.expires_at - old.retired_at
        assert window == timedelta(seconds=retired_key_window_s(2, 0.1))

        # Once its last token has expired, the old key leaves the JWKS.
        await within(6, lambda: _jwks_kids(tokens, [new_kid]))
        assert (await rejected(tokens, old_token)).code in {"token_expired", "invalid_token"}


async def _jwks_kids(tokens: TokenService, expected: list[str]) -> bool:
    return [k["kid"] for k in (await tokens.jwks())["keys"]] == expected


async def test_second_replica_verifies_keys_created_after_it_started(migrated_database: str) -> None:
    async with (
        replica(migrated_database, started=True) as (first, _),
        replica(migrated_database, started=True) as (
            second,
            _,
        ),
    ):
        token = await issue(first)
        assert (await second.verify_access_token(token)).user_id == "usr_alice"
        await second.ensure_signing_key()  # `second` has read the keys; the next one is news to it
        new_kid = await first.rotate_signing_key()
        rotated = await issue(first)
        assert jwt.get_unverified_header(rotated)["kid"] == new_kid
        await second.verify_access_token(rotated)  # at once: an unknown kid makes it re-read the keys
        await second.verify_access_token(token)
        # And within a poll `second` signs with the new key too.
        await within(2, lambda: _signs_with(second, new_kid))


async def _signs_with(tokens: TokenService, kid: str) -> bool:
    return bool(jwt.get_unverified_header(await issue(tokens))["kid"] == kid)


async def test_two_replicas_creating_the_first_key_at_once_agree(migrated_database: str) -> None:
    async with (
        replica(migrated_database, started=True) as (first, sessions),
        replica(migrated_database, started=True) as (second, _),
    ):
        tokens = await asyncio.gather(*(issue(s) for s in (first, second) for _ in range(3)))
        for token in tokens:
            await first.verify_access_token(token)
            await second.verify_access_token(token)
        active = (await active_private_key(sessions)).kid
        await within(3, lambda: _signs_with(first, active))
        await within(3, lambda: _signs_with(second, active))
        async with sessions() as session:
            unretired = await session.scalar(
                select(func.count()).select_from(SigningKey).where(SigningKey.retired_at.is_(None))
            )
        assert unretired == 1


async def test_keys_rotate_by_age_on_exactly_one_replica(migrated_database: str) -> None:
    aging = replace(SETTINGS, key_max_age_s=1.5, poll_s=0.1)
    async with replica(migrated_database, aging) as (setup, _):
        token = await issue(setup)  # the first key exists before the replicas start
    first_kid = jwt.get_unverified_header(token)["kid"]
    async with (
        replica(migrated_database, aging, started=True) as (first, sessions),
        replica(migrated_database, aging, started=True) as (second, _),
    ):

        async def rotated() -> bool:
            return (await active_private_key(sessions)).kid != first_kid

        await within(5, rotated)
        async with sessions() as session:
            rows = list(await session.scalars(select(SigningKey)))
        # Both replicas saw the key age; one conditional UPDATE won, so exactly one new key exists.
        assert len(rows) == 2, [(r.kid, r.created_at, r.retired_at) for r in rows]
        assert sum(1 for r in rows if r.retired_at is None) == 1
        await first.verify_access_token(token)
        await second.verify_access_token(token)
        new_kid = (await active_private_key(sessions)).kid
        await within(2, lambda: _signs_with(first, new_kid))
        await within(2, lambda: _signs_with(second, new_kid))


def test_cli_rotate_signing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from somaagent.cli.signing_cmd import rotate_signing

    secret = secrets.token_hex(32)
    monkeypatch.setenv("SOMA_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SOMA_SECRET_KEY", secret)
    rotate_signing()
    first = capsys.readouterr().out
    assert "there was no previous key" in first
    rotate_signing()
    second = capsys.readouterr().out
    first_kid = first.split()[3]
    second_kid = second.split()[3]
    assert first_kid != second_kid
    assert f"retired {first_kid}: it still verifies the tokens it signed until" in second
    assert "leaves /.well-known/jwks.json" in second

    async def check() -> None:
        engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'soma.db'}")
        service = TokenService(
            session_factory(engine), SecretBox(secret.encode(), signing_keys.SEALING_PURPOSE), SETTINGS
        )
        try:
            assert jwt.get_unverified_header(await issue(service))["kid"] == second_kid
            assert [k["kid"] for k in (await service.jwks())["keys"]] == [second_kid, first_kid]
        finally:
            await engine.dispose()

    asyncio.run(check())


async def test_a_replica_with_another_secret_verifies_but_cannot_sign(migrated_database: str) -> None:
    async with (
        replica(migrated_database) as (good, _),
        replica(migrated_database, secret=b"x" * 32) as (odd, _),
    ):
        token = await issue(good)
        # The private key is sealed under the server secret; the public keys need none.
        assert (await odd.verify_access_token(token)).user_id == "usr_alice"
        with pytest.raises(signing_keys.SealedKeyError, match="SOMA_SECRET_KEY"):
            await issue(odd)
        await good.verify_access_token(await issue(good))


# Revocation.


async def test_revocations_reach_another_replica_within_a_second(migrated_database: str) -> None:
    async with (
        replica(migrated_database, started=True) as (here, sessions),
        replica(migrated_database, started=True) as (there, _),
    ):
        expires = utcnow() + timedelta(seconds=900)

        async def refused_there(token: str) -> bool:
            try:
                await there.verify_access_token(token)
            except Unauthenticated as exc:
                assert exc.code == "token_revoked", exc.message
                return True
            return False

        # By token id.
        by_jti = await issue(here, family="fam_a")
        other = await issue(here, family="fam_b")
        await there.verify_access_token(by_jti)
        jti = jwt.decode(by_jti, options={"verify_signature": False})["jti"]
        async with sessions() as session, session.begin():
            await here.revoke_token_id(session, jti, expires)
        assert (await rejected(here, by_jti)).code == "token_revoked"  # here: at once
        assert await within(1.0, lambda: refused_there(by_jti)) < 1.0
        await there.verify_access_token(other)

        # By login family (the token's sid).
        family_tokens = [await issue(here, family="fam_c") for _ in range(2)]
        async with sessions() as session, session.begin():
            await here.revoke_family(session, "fam_c", expires)
        assert "signed out" in (await rejected(here, family_tokens[0])).message
        assert await within(1.0, lambda: refused_there(family_tokens[0])) < 1.0
        assert await refused_there(family_tokens[1])
        await there.verify_access_token(other)

        # By subject: every token of the user issued before now, not the ones after.
        before = await issue(here, user="usr_bob", family="fam_d")
        bystander = await issue(here, user="usr_carol", family="fam_e")
        async with sessions() as session, session.begin():
            await here.revoke_subject(session, "usr_bob")
        after = await issue(here, user="usr_bob", family="fam_f")
        assert (await rejected(here, before)).code == "token_revoked"
        assert await within(1.0, lambda: refused_there(before)) < 1.0
        for token in (after, bystander):
            await here.verify_access_token(token)
            await there.verify_access_token(token)

        # A replica started later loads every revocation still in force.
        async with replica(migrated_database) as (late, _):
            for token in (by_jti, *family_tokens, before):
                assert (await rejected(late, token)).code == "token_revoked"
            await late.verify_access_token(after)

        async with sessions() as session:
            kinds = sorted(r.kind for r in await session.scalars(select(RevokedToken)))
        assert kinds == ["family", "jti", "subject"]


async def test_mfa_challenges_obey_revocation_and_expiry(migrated_database: str) -> None:
    async with replica(migrated_database) as (tokens, sessions):
        challenge = await tokens.issue_mfa_challenge(user_id="usr_dave", tenant_id="ten_acme", ttl_s=1)
        assert await tokens.verify_mfa_challenge(challenge) == ("usr_dave", "ten_acme")
        claims = jwt.decode(challenge, options={"verify_signature": False})
        assert jwt.get_unverified_header(challenge)["typ"] == "mfa-challenge+jwt"
        assert claims["aud"] == "somaagent:mfa" and claims["exp"] - claims["nbf"] == 1
        async with sessions() as session, session.begin():
            await tokens.revoke_token_id(session, claims["jti"], utcnow() + timedelta(seconds=60))
        with pytest.raises(Unauthenticated) as caught:
            await tokens.verify_mfa_challenge(challenge)
        assert caught.value.code == "token_revoked"
        fresh = await tokens.issue_mfa_challenge(user_id="usr_dave", tenant_id="ten_acme", ttl_s=1)
        await asyncio.sleep(2.1)
        with pytest.raises(Unauthenticated) as caught:
            await tokens.verify_mfa_challenge(fresh)
        assert caught.value.code == "token_expired"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    name, url = create_database()
    migrate.upgrade(url)
    yield url
    drop_database(name)


@pytest.mark.postgres
async def test_a_revocation_committed_out_of_sequence_order_is_not_missed(postgres_url: str) -> None:
    """PostgreSQL hands out `seq` at insert and shows the row at commit: seq 2 may be visible before seq 1."""
    async with (
        replica(postgres_url, started=True) as (here, sessions),
        replica(postgres_url, started=True) as (there, _),
    ):
        slow, fast = await issue(here, family="fam_slow"), await issue(here, family="fam_fast")
        expires = utcnow() + timedelta(seconds=900)
        async with sessions() as slow_session:
            await here.revoke_family(slow_session, "fam_slow", expires)
            await slow_session.flush()  # takes its seq now, commits later
            async with sessions() as fast_session, fast_session.begin():
                await here.revoke_family(fast_session, "fam_fast", expires)

            async def refused(token: str) -> bool:
                try:
                    await there.verify_access_token(token)
                except Unauthenticated:
                    return True
                return False

            await within(1.0, lambda: refused(fast))
            await asyncio.sleep(0.6)  # `there` has polled past the later seq
            await there.verify_access_token(slow)
            await slow_session.commit()
        assert await within(1.0, lambda: refused(slow)) < 1.0


async def test_expired_revocations_and_keys_are_pruned(migrated_database: str) -> None:
    short = replace(SETTINGS, access_ttl_s=1, poll_s=0.1)
    async with replica(migrated_database, short) as (tokens, sessions):
        await issue(tokens)
        await tokens.rotate_signing_key()
        now = utcnow()
        async with sessions() as session, session.begin():
            await tokens.revoke_token_id(session, "jti_old_1", now - timedelta(seconds=5))
            await tokens.revoke_token_id(session, "jti_old_2", now - timedelta(seconds=5))
            await tokens.revoke_token_id(session, "jti_live", now + timedelta(seconds=600))
            await tokens.revoke_token_id(session, "jti_last", now - timedelta(seconds=5))
        async with sessions() as session, session.begin():
            old = await session.scalar(select(SigningKey).where(SigningKey.retired_at.is_not(None)))
            assert old is not None
            old.expires_at = now - timedelta(days=2)
        async with sessions() as session, session.begin():
            from somaagent.identity.revocation import prune_revocations

            assert await prune_revocations(session, utcnow()) == 2
            assert await signing_keys.prune_keys(session, utcnow() - timedelta(days=1)) == 1
        async with sessions() as session:
            left = sorted(r.value for r in await session.scalars(select(RevokedToken)))
            keys = list(await session.scalars(select(SigningKey)))
        # The newest row stays even though it expired: SQLite would hand its seq out again.
        assert left == ["jti_last", "jti_live"]
        assert len(keys) == 1 and keys[0].retired_at is None
