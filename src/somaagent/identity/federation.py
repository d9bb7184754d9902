"""OIDC federation: `FederationVerifier` turns the access token of a provider some tenant trusts
(`identity/trusts.py`) into a `Principal` of that tenant.

Owns provider discovery and JWKS caching. May import core, db and identity; never api or cli.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.core.errors import Unauthenticated
from somaagent.core.principal import Principal
from somaagent.identity.capabilities import ROLE_CAPABILITIES, ROLE_RANK
from somaagent.identity.tables import Tenant, TrustedIssuer
from somaagent.identity.trusts import url_problem

log = logging.getLogger(__name__)

INVALID_TOKEN = "invalid_token"  # noqa: S105 - an error code, not a secret
# Only asymmetric signatures: an HMAC key would have to be shared with us, and `none` is no signature.
ALGORITHMS_BY_KEY_TYPE = {"RSA": ("RS256", "PS256"), "EC": ("ES256",), "OKP": ("EdDSA",)}
ACCEPTED_ALGORITHMS = frozenset(a for algs in ALGORITHMS_BY_KEY_TYPE.values() for a in algs)
_CURVES = {"ES256": ("P-256",), "EdDSA": ("Ed25519", "Ed448")}
# The public members of each key type: a JWKS that leaks private members must not make us hold one.
_PUBLIC_MEMBERS = {"RSA": ("n", "e"), "EC": ("crv", "x", "y"), "OKP": ("crv", "x")}
LEEWAY_S = 30.0  # clock skew tolerated on exp / nbf / iat
MAX_TOKEN_CHARS = 16_384
MAX_DOCUMENT_BYTES = 1 << 20  # discovery documents and JWKS are a few kilobytes
MAX_CACHED_ISSUERS = 10_000
# Common providers' subjects are 20-45 characters; the Principal's subject adds ~43 and must fit the
# columns that record it (memory documents hold 128).
MAX_SUBJECT_CHARS = 80


@dataclass(frozen=True, slots=True)
class _Trust:
    """A trust row joined with its tenant, as the verifier caches it."""

    id: str
    tenant_id: str
    tenant_name: str
    tenant_disabled: bool
    audience: str
    subject_claim: str
    role_claim: str
    role_map: dict[str, str]
    default_role: str | None


@dataclass
class _IssuerKeys:
    """One issuer's discovery result and signing keys, with when they were last fetched (monotonic)."""

    jwks_uri: str | None = None
    discovered_at: float = float("-inf")
    keys: list[dict[str, Any]] = field(default_factory=list)
    fetched_at: float = float("-inf")
    attempted_at: float = float("-inf")
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def find(self, kid: str | None) -> dict[str, Any] | None:
        if kid is None:  # a token without `kid` is only unambiguous against a single key
            return self.keys[0] if len(self.keys) == 1 else None
        return next((k for k in self.keys if k.get("kid") == kid), None)


class _FetchError(Exception):
    """The identity provider's discovery document or JWKS could not be fetched or made no sense."""


def _refuse(message: str) -> Unauthenticated:
    return Unauthenticated(message, code=INVALID_TOKEN)


class FederationVerifier:
    """Verifies access tokens of trusted external OIDC providers. Trust rows are cached `trust_ttl_s`
    (so a revoked trust stops working that quickly on every replica), keys `jwks_ttl_s`; a token signed
    by a key we do not know refetches the JWKS, at most once per `min_refetch_s`, so the provider's key
    rotation needs no restart."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        jwks_ttl_s: float = 300,
        min_refetch_s: float = 5.0,
        http_timeout_s: float = 5.0,
        trust_ttl_s: float = 5.0,
    ) -> None:
        self._sessions = sessions
        self._jwks_ttl_s = jwks_ttl_s
        # Refetching less often than the keys expire would leave expired keys unreplaceable for a while.
        self._min_refetch_s = min(min_refetch_s, jwks_ttl_s)
        self._trust_ttl_s = trust_ttl_s
        # No redirects: the discovery document and JWKS must be where the trusted issuer says they are.
        self._http = httpx.AsyncClient(timeout=http_timeout_s, follow_redirects=False)
        self._trusts: dict[str, tuple[tuple[_Trust, ...], float]] = {}
        self._keys: dict[str, _IssuerKeys] = {}

    async def verify(self, token: str) -> Principal | None:
        """The principal for a trusted issuer's access token; None when no tenant trusts its `iss`;
        `Unauthenticated` (code `invalid_token`) when it is trusted but the token is not valid."""
        if len(token) > MAX_TOKEN_CHARS:
            raise _refuse(f"the access token is longer than {MAX_TOKEN_CHARS} characters")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise _refuse(f"malformed access token: {exc}") from exc
        issuer = unverified.get("iss")
        if not isinstance(issuer, str) or not issuer or len(issuer) > 512:
            return None
        trusts = await self._trusts_of(issuer)
        if not trusts:
            return None
        alg = header.get("alg")
        if alg not in ACCEPTED_ALGORITHMS:
            raise _refuse(
                f"access tokens signed with {alg!r} are not accepted; the identity provider must sign with "
                f"one of {', '.join(sorted(ACCEPTED_ALGORITHMS))}"
            )
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _refuse("the access token's `kid` header must be a string")
        key = await self._verification_key(issuer, kid, str(alg))
        claims = self._decode(token, key, str(alg), issuer, trusts)
        return self._principal(claims, self._trust_for(claims, trusts))

    def forget(self) -> None:
        """Drop the cached trust rows (after a trust or untrust in this process)."""
        self._trusts.clear()

    async def close(self) -> None:
        """Release the HTTP connections."""
        await self._http.aclose()

    async def _trusts_of(self, issuer: str) -> tuple[_Trust, ...]:
        cached = self._trusts.get(issuer)
        now = time.monotonic()
        if cached is not None and cached[1] > now:
            return cached[0]
        async with self._sessions() as session:
            rows = await session.execute(
                select(TrustedIssuer, Tenant.name, Tenant.disabled)
                .join(Tenant, Tenant.id == TrustedIssuer.tenant_id)
                .where(TrustedIssuer.issuer == issuer)
            )
            trusts = tuple(
                _Trust(
                    id=row.id,
                    tenant_id=row.tenant_id,
                    tenant_name=name,
                    tenant_disabled=disabled,
                    audience=row.audience,
                    subject_claim=row.subject_claim,
                    role_claim=row.role_claim,
                    role_map=dict(row.role_map),
                    default_role=row.default_role,
                )
                for row, name, disabled in rows
            )
        if len(self._trusts) >= MAX_CACHED_ISSUERS:  # any `iss` reaches here, trusted or not
            self._trusts.clear()
        self._trusts[issuer] = (trusts, now + self._trust_ttl_s)
        return trusts

    async def _verification_key(self, issuer: str, kid: str | None, alg: str) -> jwt.PyJWK:
        state = self._keys.get(issuer)
        if state is None:
            state = self._keys[issuer] = _IssuerKeys()
        if time.monotonic() - state.fetched_at >= self._jwks_ttl_s:
            await self._refresh(issuer, state)
            if time.monotonic() - state.fetched_at >= self._jwks_ttl_s:
                raise _refuse(
                    f"cannot verify the access token now: could not get the signing keys of {issuer} "
                    "(the server log says why); try again shortly"
                )
        jwk = state.find(kid)
        if jwk is None:  # the provider may have rotated its keys since we fetched them
            await self._refresh(issuer, state)
            jwk = state.find(kid)
        if jwk is None:
            which = f"key {kid!r}" if kid is not None else "a key it does not name (no `kid`)"
            raise _refuse(f"the access token is signed with {which}, which {issuer} does not publish")
        return _key_from_jwk(jwk, alg)

    async def _refresh(self, issuer: str, state: _IssuerKeys) -> None:
        seen = state.attempted_at
        async with state.lock:
            now = time.monotonic()
            # Another request refreshed while this one waited, or one did so too recently: however many
            # tokens with unknown keys arrive, the provider sees one fetch per `min_refetch_s`.
            if state.attempted_at != seen or now - seen < self._min_refetch_s:
                return
            state.attempted_at = now
            try:
                if state.jwks_uri is None or now - state.discovered_at >= self._jwks_ttl_s:
                    state.jwks_uri = await self._discover(issuer)
                    state.discovered_at = now
                state.keys = await self._fetch_keys(state.jwks_uri)
                state.fetched_at = now
            except _FetchError as exc:
                state.jwks_uri = None  # rediscover next time: the JWKS may have moved
                log.warning("OIDC issuer %s: cannot fetch its signing keys: %s", issuer, exc)

    async def _discover(self, issuer: str) -> str:
        document = await self._get_json(issuer.rstrip("/") + "/.well-known/openid-configuration")
        if document.get("issuer") != issuer:
            raise _FetchError(f"its discovery document names issuer {document.get('issuer')!r}")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise _FetchError("its discovery document has no jwks_uri")
        problem = url_problem(jwks_uri)
        if problem is not None:
            raise _FetchError(f"its jwks_uri {jwks_uri!r} is not usable: {problem}")
        return jwks_uri

    async def _fetch_keys(self, jwks_uri: str) -> list[dict[str, Any]]:
        document = await self._get_json(jwks_uri)
        keys = document.get("keys")
        if not isinstance(keys, list):
            raise _FetchError(f"{jwks_uri} is not a JWKS (no `keys` list)")
        return [k for k in keys if isinstance(k, dict) and k.get("use", "sig") == "sig"]

    async def _get_json(self, url: str) -> dict[str, Any]:
        body = bytearray()
        try:
            async with self._http.stream("GET", url, headers={"accept": "application/json"}) as response:
                if response.status_code != 200:
                    raise _FetchError(f"GET {url} answered {response.status_code}")
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_DOCUMENT_BYTES:
                        raise _FetchError(f"GET {url} answered more than {MAX_DOCUMENT_BYTES} bytes")
        except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:
            raise _FetchError(f"GET {url} failed: {exc!r}") from exc
        try:
            document = json.loads(body)
        except ValueError as exc:
            raise _FetchError(f"GET {url} answered something that is not JSON") from exc
        if not isinstance(document, dict):
            raise _FetchError(f"GET {url} answered JSON that is not an object")
        return document

    def _decode(
        self, token: str, key: jwt.PyJWK, alg: str, issuer: str, trusts: tuple[_Trust, ...]
    ) -> dict[str, Any]:
        try:
            return jwt.decode(
                token,
                key,
                algorithms=[alg],
                issuer=issuer,
                audience=[t.audience for t in trusts],
                leeway=LEEWAY_S,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise _refuse(f"the access token has expired; get a new one from {issuer}") from exc
        except jwt.ImmatureSignatureError as exc:
            raise _refuse("the access token is not valid yet (nbf or iat is in the future)") from exc
        except jwt.InvalidAudienceError as exc:
            raise _refuse(
                f"the access token's audience is not one SomaAgent trusts for {issuer}; request a token for "
                "the audience your operator configured"
            ) from exc
        except jwt.InvalidSignatureError as exc:
            raise _refuse("the access token's signature does not verify") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise _refuse(f"the access token has no `{exc.claim}` claim") from exc
        except jwt.PyJWTError as exc:
            raise _refuse(f"invalid access token: {exc}") from exc

    @staticmethod
    def _trust_for(claims: dict[str, Any], trusts: tuple[_Trust, ...]) -> _Trust:
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        matched = [t for t in trusts if t.audience in audiences]
        if len(matched) != 1:  # PyJWT already checked at least one matches
            names = ", ".join(t.audience for t in matched)
            raise _refuse(f"the access token is for several trusted audiences ({names}); ask for one")
        return matched[0]

    @staticmethod
    def _principal(claims: dict[str, Any], trust: _Trust) -> Principal:
        subject = _claim(claims, trust.subject_claim)
        if not isinstance(subject, str) or not subject or len(subject) > MAX_SUBJECT_CHARS:
            raise _refuse(
                f"the access token's `{trust.subject_claim}` claim must be a string of 1-{MAX_SUBJECT_CHARS} "
                "characters"
            )
        if trust.tenant_disabled:
            raise _refuse(f"tenant {trust.tenant_name!r} is disabled")
        role = _role(_claim(claims, trust.role_claim), trust)
        jti = claims.get("jti")
        return Principal(
            tenant_id=trust.tenant_id,
            tenant_name=trust.tenant_name,
            subject=f"oidc:{trust.id}:{subject}",
            key_id=None,
            capabilities=ROLE_CAPABILITIES[role],
            user_id=None,
            role=role,
            token_id=jti if isinstance(jti, str) else None,
        )


def _claim(claims: dict[str, Any], name: str) -> Any:
    """A claim by name; a dotted name not present as such walks nested objects (`realm_access.roles`)."""
    if name in claims:
        return claims[name]
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _role(value: Any, trust: _Trust) -> str:
    """The highest role the claim's values map to, else the trust's default role, else refused."""
    values = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    mapped = [trust.role_map[v] for v in values if isinstance(v, str) and v in trust.role_map]
    if mapped:
        return max(mapped, key=lambda role: ROLE_RANK[role])
    if trust.default_role is not None:
        return trust.default_role
    raise _refuse(
        f"the access token's `{trust.role_claim}` claim maps to no SomaAgent role and tenant "
        f"{trust.tenant_name!r} gives none by default; ask your identity provider's admin for a mapped group"
    )


def _key_from_jwk(jwk: dict[str, Any], alg: str) -> jwt.PyJWK:
    """The public key of `jwk` for `alg`, refusing a key whose type, curve or own `alg` disagree."""
    kty = jwk.get("kty")
    if alg not in ALGORITHMS_BY_KEY_TYPE.get(str(kty), ()):
        raise _refuse(f"the access token says {alg} but its signing key is of type {kty!r}")
    if jwk.get("alg") not in (None, alg):
        raise _refuse(f"the access token says {alg} but its signing key is for {jwk.get('alg')}")
    if alg in _CURVES and jwk.get("crv") not in _CURVES[alg]:
        raise _refuse(f"the access token says {alg} but its signing key is on curve {jwk.get('crv')!r}")
    public = {"kty": kty, **{m: jwk[m] for m in _PUBLIC_MEMBERS[str(kty)] if m in jwk}}
    try:
        return jwt.PyJWK(public, algorithm=alg)
    except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError) as exc:
        log.warning("unusable OIDC signing key %s: %s", jwk.get("kid"), exc)
        raise _refuse(f"the access token's signing key {jwk.get('kid')!r} is unusable") from exc
