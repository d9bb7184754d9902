"""SomaAgent's own tokens: access JWTs (RFC 9068, `typ: at+jwt`) and short MFA challenges, signed with
rotating keys (identity/signing_keys.py), verified on every request without touching the database, and
revocable by token, login family or user (identity/revocation.py) on every replica within a second.

Owns: issuing and verifying our JWTs, the JWKS document, rotation by age. May import: core, db, identity.
Never: decides who may log in (the login flow does) or maps errors to HTTP (api/errors.py does).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeGuard

import jwt
import orjson
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.core.clock import utcnow
from somaagent.core.errors import Unauthenticated
from somaagent.core.ids import new_id
from somaagent.core.principal import Principal
from somaagent.identity import signing_keys
from somaagent.identity.revocation import Revocation, RevocationList, add_revocation, prune_revocations
from somaagent.identity.secret_box import SecretBox
from somaagent.identity.signing_keys import ActiveKey, KeyRing, VerificationKey

log = logging.getLogger(__name__)

ACCESS_TYP = "at+jwt"
ACCESS_TYPS = frozenset({"at+jwt", "application/at+jwt"})  # RFC 9068 §4 accepts both spellings
MFA_TYP = "mfa-challenge+jwt"
MFA_TYPS = frozenset({MFA_TYP})
# Replicas' clocks differ a little: a token may say it was issued (or becomes valid) this far ahead.
CLOCK_SKEW_S = 5.0
MAX_TOKEN_CHARS = 16_384
# Tokens whose signature was checked, so a client reusing its token (the usual case) costs a dict lookup
# and the claim checks, not a signature verification. Only tokens our keys signed get in (PyJWT refuses
# non-canonical base64, so one token has one spelling).
MAX_VERIFIED = 10_000
PRUNE_EVERY_S = 60.0
# Expired keys stay a day so an operator can still tell which key signed an old token in the logs.
KEEP_EXPIRED_KEYS = timedelta(days=1)
RESERVED_CLAIMS = frozenset(
    {"iss", "aud", "sub", "tenant_id", "tenant", "role", "caps", "iat", "nbf", "exp", "jti", "sid", "amr"}
)
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


@dataclass(frozen=True, slots=True)
class TokenSettings:
    """How tokens are issued and checked (from `Settings`)."""

    issuer: str
    audience: str
    algorithm: str  # "EdDSA" (Ed25519) or "RS256" (RSA-2048): what new keys use
    access_ttl_s: int
    key_max_age_s: float  # the active key is rotated once it is older than this
    poll_s: float  # how often new revocations and key changes are read


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A signed access token with its id and lifetime."""

    token: str
    token_id: str
    expires_in: int


def looks_like_jwt(value: str) -> bool:
    """Whether a bearer value has the shape of a compact JWS (three base64url segments)."""
    return len(value) <= MAX_TOKEN_CHARS and _JWT_SHAPE.fullmatch(value) is not None


def unverified_issuer(token: str) -> str | None:
    """The `iss` a token claims, without trusting it (to route it to the right verifier)."""
    if not looks_like_jwt(token):
        return None
    segment = token.split(".", 2)[1]
    try:
        claims = orjson.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, binascii.Error):
        return None
    issuer = claims.get("iss") if isinstance(claims, dict) else None
    return issuer if isinstance(issuer, str) else None


def retired_key_window_s(access_ttl_s: float, poll_s: float) -> float:
    """How long a retired key keeps verifying: a token's lifetime, plus time for every replica to notice
    the rotation (two polls; until then it may still sign) and a second of clock difference."""
    return access_ttl_s + 2 * poll_s + 1.0


def _show(value: object) -> str:
    """An attacker-supplied value, short enough for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


class _Rejected(Exception):
    """Why a token is refused; the public verifiers turn it into `Unauthenticated`."""

    def __init__(self, reason: str, code: str = "invalid_token") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


def _signed_claims(token: str, key: VerificationKey, alg: str) -> dict[str, Any]:
    """The claims of `token` if `key` verifies its signature."""
    if key.alg != alg:
        raise _Rejected(f"key {key.kid} signs with {key.alg}, not {_show(alg)}")
    if key.expires_at is not None and key.expires_at <= utcnow():
        raise _Rejected(f"signing key {key.kid} was retired and no longer verifies; get a new token")
    try:
        payload = signing_keys.verify_jws(token, key)
    except jwt.InvalidSignatureError:
        raise _Rejected("signature verification failed") from None
    except jwt.InvalidTokenError as exc:
        raise _Rejected(f"malformed token ({exc})") from None
    try:
        claims = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise _Rejected("the payload is not JSON") from None
    if not isinstance(claims, dict):
        raise _Rejected("the payload is not a JSON object")
    return claims


class TokenService:
    """Issues and verifies access tokens and MFA challenges; rotates signing keys; applies revocations.

    Verification uses cached parsed keys and an in-memory revocation list, so it never reads the
    database except when a token names a key this process has not seen. `start()` begins the poll that
    picks up other replicas' revocations and key changes and rotates the key when it gets old."""

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], box: SecretBox, settings: TokenSettings
    ) -> None:
        if settings.algorithm not in signing_keys.ALGORITHMS:
            raise ValueError(
                f"jwt_algorithm {settings.algorithm!r} is not supported; use one of "
                f"{', '.join(signing_keys.ALGORITHMS)}"
            )
        self._sessions = sessions
        self._box = box
        self._settings = settings
        self._keys = KeyRing(sessions, box)
        self._revocations = RevocationList()
        self._verified: dict[str, tuple[str | None, str, dict[str, Any]]] = {}
        self._mfa_audience = f"{settings.audience}:mfa"
        self._loaded = False
        self._load_lock = asyncio.Lock()
        self._create_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._last_prune = time.monotonic()

    @property
    def verify_for_s(self) -> float:
        """How long a key retired now keeps verifying."""
        return retired_key_window_s(self._settings.access_ttl_s, self._settings.poll_s)

    # Issuing.

    async def issue_access_token(
        self,
        *,
        user_id: str,
        tenant_id: str,
        tenant_name: str,
        role: str | None,
        capabilities: frozenset[str],
        family_id: str | None,
        amr: list[str],
        extra_claims: dict[str, Any] | None = None,
    ) -> IssuedToken:
        """A signed access token for a user; `extra_claims` may add claims (e.g. `constitution_hash`)."""
        claims: dict[str, Any] = {
            "sub": user_id,
            "tenant_id": tenant_id,
            "tenant": tenant_name,
            "role": role,
            "caps": sorted(capabilities),
            "amr": list(amr),
        }
        if family_id is not None:
            claims["sid"] = family_id
        if extra_claims:
            clash = RESERVED_CLAIMS & extra_claims.keys()
            if clash:
                raise ValueError(f"extra_claims may not set {', '.join(sorted(clash))}")
            claims.update(extra_claims)
        ttl_s = self._settings.access_ttl_s
        token, token_id = await self._sign(claims, ACCESS_TYP, self._settings.audience, ttl_s)
        return IssuedToken(token=token, token_id=token_id, expires_in=ttl_s)

    async def issue_mfa_challenge(self, *, user_id: str, tenant_id: str, ttl_s: int = 300) -> str:
        """A short-lived token proving the first factor passed; only `verify_mfa_challenge` accepts it."""
        claims = {"sub": user_id, "tenant_id": tenant_id}
        token, _ = await self._sign(claims, MFA_TYP, self._mfa_audience, ttl_s)
        return token

    async def _sign(self, claims: dict[str, Any], typ: str, audience: str, ttl_s: int) -> tuple[str, str]:
        key = await self._signing_key()
        now = time.time()
        token_id = new_id("jti")
        # iat keeps milliseconds (RFC 7519 NumericDate allows fractions) so that a login right after a
        # "revoke every token of this user" is not caught by it; nbf and exp are whole seconds.
        registered = {
            "iss": self._settings.issuer,
            "aud": audience,
            "iat": int(now * 1000) / 1000,
            "nbf": int(now),
            "exp": int(now) + ttl_s,
            "jti": token_id,
        }
        return signing_keys.sign_jws(orjson.dumps({**registered, **claims}), key, typ), token_id

    async def ensure_signing_key(self) -> None:
        """Load keys and revocations and make sure a signing key exists. Call it outside any transaction
        of your own before issuing: on SQLite, creating the first key while the caller holds a write lock
        would wait on that very caller. `start()` does it first thing too."""
        await self._signing_key()

    async def _signing_key(self) -> ActiveKey:
        await self._ensure_loaded()
        key = self._keys.active
        if key is not None:
            return key
        async with self._create_lock:
            if self._keys.active is None:
                await self._keys.refresh()
            if self._keys.active is None:
                await self._create_first_key()
        key = self._keys.active
        if key is None:  # pragma: no cover - the table was emptied under us
            raise RuntimeError("no signing key after creating one")
        return key

    async def _create_first_key(self) -> None:
        row = await signing_keys.new_key_row(self._box, self._settings.algorithm)
        async with self._sessions() as session, session.begin():
            session.add(row)
        # Another replica may have created one at the same moment: both keep the newest, in a later
        # transaction so that at least one of the two sees both rows.
        async with self._sessions() as session, session.begin():
            await signing_keys.settle_active(session, self.verify_for_s)
        await self._keys.refresh()
        log.info("created signing key %s (%s)", self._keys.active.kid if self._keys.active else "?", row.alg)

    # Verifying.

    async def verify_access_token(self, token: str) -> Principal:
        """The principal an access token stands for, or `Unauthenticated` saying what is wrong with it."""
        claims = await self._verified_claims(token, ACCESS_TYPS, self._settings.audience, "access token")
        sub, tenant_id, tenant, jti = (claims.get(name) for name in ("sub", "tenant_id", "tenant", "jti"))
        caps, role, sid = claims.get("caps"), claims.get("role"), claims.get("sid")
        if not (
            isinstance(sub, str)
            and isinstance(tenant_id, str)
            and isinstance(tenant, str)
            and isinstance(jti, str)
            and isinstance(caps, list)
            and all(isinstance(cap, str) for cap in caps)
            and (role is None or isinstance(role, str))
            and (sid is None or isinstance(sid, str))
        ):
            raise Unauthenticated(
                "invalid access token: it lacks sub, tenant_id, tenant, caps or jti", code="invalid_token"
            )
        self._check_revoked(jti, sid, sub, claims["iat"], "access token")
        return Principal(
            tenant_id=tenant_id,
            tenant_name=tenant,
            subject=f"user:{sub}",
            key_id=None,
            capabilities=frozenset(caps),
            user_id=sub,
            role=role,
            token_id=jti,
            login_id=sid,
        )

    async def verify_mfa_challenge(self, token: str) -> tuple[str, str]:
        """(user id, tenant id) of a valid MFA challenge; `Unauthenticated` otherwise."""
        claims = await self._verified_claims(token, MFA_TYPS, self._mfa_audience, "MFA challenge")
        sub, tenant_id, jti = claims.get("sub"), claims.get("tenant_id"), claims.get("jti")
        if not (isinstance(sub, str) and isinstance(tenant_id, str) and isinstance(jti, str)):
            raise Unauthenticated(
                "invalid MFA challenge: it lacks sub, tenant_id or jti", code="invalid_token"
            )
        self._check_revoked(jti, None, sub, claims["iat"], "MFA challenge")
        return sub, tenant_id

    def _check_revoked(self, jti: str, sid: str | None, sub: str, iat: float, what: str) -> None:
        reason = self._revocations.reason(jti, sid, sub, iat)
        if reason is not None:
            raise Unauthenticated(f"{what} revoked: {reason}; sign in again", code="token_revoked")

    async def _verified_claims(
        self, token: str, typs: frozenset[str], audience: str, what: str
    ) -> dict[str, Any]:
        """The claims of a token whose header, signature, issuer, audience and times all check out."""
        try:
            return await self._checked_claims(token, typs, audience)
        except _Rejected as exc:
            raise Unauthenticated(f"invalid {what}: {exc.reason}", code=exc.code) from None

    async def _checked_claims(self, token: str, typs: frozenset[str], audience: str) -> dict[str, Any]:
        signed = self._verified.get(token)
        if signed is None:
            signed = await self._checked_signature(token)
            if len(self._verified) >= MAX_VERIFIED:
                self._verified.clear()
            self._verified[token] = signed
        typ, kid, claims = signed
        if typ is None or typ.lower() not in typs:
            raise _Rejected(f"token type {_show(typ)} is not {' or '.join(sorted(typs))}")
        # A cached token is only as good as its key: once the key leaves the ring, so does the token.
        key = self._keys.get(kid)
        if key is None or (key.expires_at is not None and key.expires_at <= utcnow()):
            raise _Rejected(f"signing key {kid} was retired and no longer verifies; get a new token")
        now = time.time()
        if claims.get("iss") != self._settings.issuer:
            raise _Rejected(f"issuer {_show(claims.get('iss'))} is not {self._settings.issuer!r}")
        aud = claims.get("aud")
        if not (aud == audience or (isinstance(aud, list) and audience in aud)):
            raise _Rejected(f"audience {_show(aud)} is not {audience!r}")
        exp, nbf, iat = claims.get("exp"), claims.get("nbf"), claims.get("iat")
        if not (_is_number(exp) and _is_number(nbf) and _is_number(iat)):
            raise _Rejected("exp, nbf and iat must be numbers")
        if exp <= now:
            raise _Rejected(f"it expired {int(now - exp)}s ago; get a new one", "token_expired")
        if nbf > now + CLOCK_SKEW_S:
            raise _Rejected(f"it is not valid for another {int(nbf - now)}s (nbf)")
        if iat > now + CLOCK_SKEW_S:
            raise _Rejected("it claims to be issued in the future (iat)")
        return claims

    async def _checked_signature(self, token: str) -> tuple[str | None, str, dict[str, Any]]:
        """(typ, kid, claims) of a token one of our keys signed."""
        if not looks_like_jwt(token):
            raise _Rejected("not a JWT (expected three base64url segments separated by dots)")
        if not self._loaded:
            await self._ensure_loaded()
        try:
            header = signing_keys.unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise _Rejected(f"malformed header ({exc})") from None
        alg, typ, kid = header.get("alg"), header.get("typ"), header.get("kid")
        # Only our own algorithms: `none`, and HS* (an HMAC "signed" with our public key as the secret),
        # are refused before any key is looked at.
        if alg not in signing_keys.ALGORITHMS:
            raise _Rejected(f"algorithm {_show(alg)} is not accepted; tokens are signed with EdDSA or RS256")
        if not isinstance(kid, str) or not kid:
            raise _Rejected("the header names no signing key (kid)")
        key = await self._keys.find(kid)
        if key is None:
            raise _Rejected(f"unknown signing key {_show(kid)}; get a new token")
        claims = _signed_claims(token, key, alg)
        return (typ if isinstance(typ, str) else None), kid, claims

    # Keys.

    async def jwks(self) -> dict[str, Any]:
        """The JWKS: the active key and every retired key that still verifies."""
        await self._ensure_loaded()
        return {"keys": self._keys.published(utcnow())}

    async def rotate_signing_key(self) -> str:
        """Retire the active key (it verifies until its last tokens expire) and sign with a new one."""
        await self._ensure_loaded()
        async with self._sessions() as session, session.begin():
            rotation = await signing_keys.rotate(
                session, self._box, self._settings.algorithm, self.verify_for_s
            )
        async with self._sessions() as session, session.begin():
            await signing_keys.settle_active(session, self.verify_for_s)
        await self._keys.refresh()
        if rotation is None:  # pragma: no cover - an unconditional rotation always rotates
            raise RuntimeError("rotation did not happen")
        retired = [kid for kid, _ in rotation.retired]
        log.info("rotated signing key: %s is active; retired %s", rotation.kid, retired)
        return rotation.kid

    # Revocations.

    async def revoke_token_id(self, session: AsyncSession, token_id: str, expires_at: datetime) -> None:
        """Revoke one token (until `expires_at`, its expiry), in the caller's transaction; here at once."""
        self._revoke(session, "jti", token_id, expires_at)

    async def revoke_family(self, session: AsyncSession, family_id: str, expires_at: datetime) -> None:
        """Revoke every token of a login family (its `sid`), in the caller's transaction; here at once."""
        self._revoke(session, "family", family_id, expires_at)

    async def revoke_subject(self, session: AsyncSession, user_id: str) -> None:
        """Revoke every token of a user issued before now, in the caller's transaction; here at once."""
        expires_at = utcnow() + timedelta(seconds=self._settings.access_ttl_s + CLOCK_SKEW_S)
        self._revoke(session, "subject", user_id, expires_at)

    def _revoke(self, session: AsyncSession, kind: str, value: str, expires_at: datetime) -> None:
        revoked_at = utcnow()
        add_revocation(session, kind, value, revoked_at, expires_at)
        # Applied before the caller commits: if it rolls back, this process over-revokes until restart,
        # which errs on the safe side.
        self._revocations.apply(Revocation(kind, value, revoked_at.timestamp(), expires_at.timestamp()))

    # Background work.

    async def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        async with self._load_lock:
            if self._loaded:
                return
            try:
                await self._keys.refresh()
            except signing_keys.SealedKeyError as exc:  # verifying needs only the public keys
                log.error("%s", exc)
            async with self._sessions() as session:
                await self._revocations.load(session, utcnow())
            self._loaded = True

    def start(self) -> None:
        """Begin polling revocations and key changes, rotating keys by age and pruning expired rows (its
        first round is `ensure_signing_key()`)."""
        if self._task is None:
            self._task = asyncio.create_task(self._poll_forever(), name="token-poll")

    async def close(self) -> None:
        """Stop the poll."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _poll_forever(self) -> None:
        prepared = False
        while True:
            try:
                if not prepared:
                    await self.ensure_signing_key()
                    prepared = True
                await self.poll_once()
            except Exception as exc:  # a database blip must not kill the poller
                log.warning("token poll failed: %s", exc)
            await asyncio.sleep(self._settings.poll_s)

    async def poll_once(self) -> None:
        """One round of the background work (public so tests and tools can drive it)."""
        if not self._loaded:
            await self._ensure_loaded()
        else:
            async with self._sessions() as session:
                await self._revocations.poll(session)
            await self._keys.refresh()
        if self._keys.unretired > 1:
            async with self._sessions() as session, session.begin():
                await signing_keys.settle_active(session, self.verify_for_s)
            await self._keys.refresh()
        await self._rotate_if_old()
        if time.monotonic() - self._last_prune >= PRUNE_EVERY_S:
            await self._prune()

    async def _rotate_if_old(self) -> None:
        active = self._keys.active
        if active is None:
            return
        age_s = (utcnow() - active.created_at).total_seconds()
        if age_s < self._settings.key_max_age_s:
            return
        async with self._sessions() as session, session.begin():
            rotation = await signing_keys.rotate(
                session, self._box, self._settings.algorithm, self.verify_for_s, only_if_active=active.kid
            )
        if rotation is not None:
            log.info("signing key %s is %.0fs old: rotated to %s", active.kid, age_s, rotation.kid)
        await self._keys.refresh()

    async def _prune(self) -> None:
        self._last_prune = time.monotonic()
        now = utcnow()
        async with self._sessions() as session, session.begin():
            await prune_revocations(session, now)
            await signing_keys.prune_keys(session, now - KEEP_EXPIRED_KEYS)
        self._revocations.forget_expired(time.time())
