"""Token-signing keys: Ed25519 or RSA-2048 material, RFC 7638 key ids, the low-level JWS check, the key
lifecycle in `signing_keys` (create, rotate, settle races between replicas, prune) and `KeyRing`, the
process's cached view of them.

Owns: signing-key material and its rows. May import: core, db, identity.tables, identity.secret_box.
Never: builds or checks claims (identity/tokens.py does).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import math
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from jwt.algorithms import OKPAlgorithm, RSAAlgorithm
from sqlalchemy import delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.core.clock import utcnow
from somaagent.events.outbox import audit
from somaagent.identity.secret_box import SecretBox
from somaagent.identity.tables import SigningKey

# The only algorithms this server signs with, hence the only ones it accepts: `none`, HS* and the rest
# are not even registered with the JWS object below, so no header can select them.
ALGORITHMS = ("EdDSA", "RS256")
SEALING_PURPOSE = "signing-keys"
RSA_BITS = 2048
# A token naming a kid we do not know makes us re-read the keys (another replica may have rotated), but
# at most this often, so junk kids cannot turn verification into database load.
RELOAD_MIN_S = 0.5
_JWS = jwt.PyJWS(algorithms=list(ALGORITHMS))
# RFC 7638 §3.2: the members that identify a key, per key type, in lexicographic order.
_THUMBPRINT_MEMBERS = {"OKP": ("crv", "kty", "x"), "RSA": ("e", "kty", "n")}

PrivateKey = Ed25519PrivateKey | rsa.RSAPrivateKey
PublicKey = Ed25519PublicKey | rsa.RSAPublicKey


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A public key that verifies tokens until `expires_at` (None while it is the active key)."""

    kid: str
    alg: str
    public_key: PublicKey
    jwk: dict[str, Any]
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class ActiveKey:
    """The key that signs new tokens."""

    kid: str
    alg: str
    private_key: PrivateKey
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Rotation:
    """The outcome of a rotation: the new key, and each retired key with when it stops verifying."""

    kid: str
    alg: str
    retired: list[tuple[str, datetime]]


def thumbprint(jwk: dict[str, Any]) -> str:
    """The RFC 7638 JWK thumbprint (SHA-256, base64url without padding): our `kid`."""
    members = _THUMBPRINT_MEMBERS[jwk["kty"]]
    canonical = orjson.dumps({name: jwk[name] for name in members})  # members are already sorted
    return base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()


def public_jwk(public_key: PublicKey, alg: str) -> dict[str, Any]:
    """The JWK published in the JWKS, with its `kid`, `alg` and `use`."""
    if isinstance(public_key, Ed25519PublicKey):
        jwk = OKPAlgorithm.to_jwk(public_key, as_dict=True)
    else:
        jwk = RSAAlgorithm.to_jwk(public_key, as_dict=True)
    jwk = {name: jwk[name] for name in _THUMBPRINT_MEMBERS[jwk["kty"]]}
    return {**jwk, "kid": thumbprint(jwk), "alg": alg, "use": "sig"}


def verification_key(jwk: dict[str, Any], alg: str, expires_at: datetime | None = None) -> VerificationKey:
    """A verification key from a public JWK; ValueError if the JWK does not fit `alg`."""
    if alg == "EdDSA" and jwk.get("kty") == "OKP" and jwk.get("crv") == "Ed25519":
        loaded: Any = OKPAlgorithm.from_jwk(jwk)
    elif alg == "RS256" and jwk.get("kty") == "RSA":
        loaded = RSAAlgorithm.from_jwk(jwk)
    else:
        raise ValueError(f"a {jwk.get('kty')!r} JWK cannot verify {alg!r}")
    if not isinstance(loaded, Ed25519PublicKey | rsa.RSAPublicKey):
        raise ValueError("the JWK is not a public key")
    kid = jwk.get("kid") or thumbprint(jwk)
    return VerificationKey(kid=kid, alg=alg, public_key=loaded, jwk=jwk, expires_at=expires_at)


def verify_jws(token: str, key: VerificationKey) -> bytes:
    """The payload of a compact JWS whose signature `key` verifies, under `key.alg` only. Raises
    `jwt.InvalidSignatureError` for a bad signature and `jwt.InvalidTokenError` for anything malformed."""
    payload: bytes = _JWS.decode_complete(token, key.public_key, algorithms=[key.alg])["payload"]
    return payload


def unverified_header(token: str) -> dict[str, Any]:
    """The JOSE header, not yet trusted (to pick the key); raises `jwt.DecodeError` if malformed.

    Only the first segment is decoded (PyJWT's own helper decodes the whole token, which doubled the
    cost of verification); `verify_jws` then checks the full token, header included."""
    segment = token.split(".", 1)[0]
    try:
        header = orjson.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, binascii.Error) as exc:
        raise jwt.DecodeError(f"invalid header: {exc}") from None
    if not isinstance(header, dict):
        raise jwt.DecodeError("invalid header: not a JSON object")
    return header


def sign_jws(payload: bytes, key: ActiveKey, typ: str) -> str:
    """A compact JWS of `payload` signed by the active key, with `kid` and `typ` in its header."""
    return _JWS.encode(payload, key.private_key, algorithm=key.alg, headers={"kid": key.kid, "typ": typ})


def _generate(alg: str) -> PrivateKey:
    if alg == "EdDSA":
        return Ed25519PrivateKey.generate()
    if alg == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    raise ValueError(f"unsupported signing algorithm {alg!r}; use one of {', '.join(ALGORITHMS)}")


class SealedKeyError(RuntimeError):
    """The active signing key does not open with this server's secret."""


def open_private_key(box: SecretBox, row: SigningKey) -> ActiveKey:
    """The row's private key, unsealed; `SealedKeyError` if it was sealed under another server secret."""
    try:
        pem = box.open(row.private_key)
    except ValueError:
        raise SealedKeyError(
            f"signing key {row.kid} does not open with this server's secret (did SOMA_SECRET_KEY change, or "
            "do replicas have different ones?); give every replica the same secret, or make a new key "
            "with `soma keys rotate-signing`"
        ) from None
    private_key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(private_key, Ed25519PrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"signing key {row.kid} is not an Ed25519 or RSA key")
    return ActiveKey(kid=row.kid, alg=row.alg, private_key=private_key, created_at=row.created_at)


async def new_key_row(box: SecretBox, alg: str) -> SigningKey:
    """A fresh key as an unsaved row (RSA generation runs in a thread: it takes tens of milliseconds)."""
    private_key = await asyncio.to_thread(_generate, alg) if alg == "RS256" else _generate(alg)
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    jwk = public_jwk(private_key.public_key(), alg)
    return SigningKey(kid=jwk["kid"], alg=alg, private_key=box.seal(pem), public_jwk=jwk, created_at=utcnow())


def pick_active(rows: list[SigningKey]) -> SigningKey | None:
    """The signing key among unretired rows: the newest (ties by kid), the same choice on every replica."""
    live = [row for row in rows if row.retired_at is None]
    return max(live, key=lambda row: (row.created_at, row.kid)) if live else None


async def _retire(session: AsyncSession, kids: list[str], verify_for_s: float) -> list[tuple[str, datetime]]:
    now = utcnow()
    expires_at = now + timedelta(seconds=verify_for_s)
    retired = []
    for kid in kids:
        # Conditional: of two replicas retiring the same key, only the first sets its times.
        done = await session.execute(
            update(SigningKey)
            .where(SigningKey.kid == kid, SigningKey.retired_at.is_(None))
            .values(retired_at=now, expires_at=expires_at)
        )
        if done.rowcount:  # type: ignore[attr-defined]
            retired.append((kid, expires_at))
    return retired


async def rotate(
    session: AsyncSession,
    box: SecretBox,
    alg: str,
    verify_for_s: float,
    *,
    only_if_active: str | None = None,
    actor: str = "system",
) -> Rotation | None:
    """Retire the active key (it keeps verifying for `verify_for_s`) and add a new one, in the caller's
    transaction. With `only_if_active`, rotate only if that key is still unretired: of replicas racing to
    rotate it, the one whose conditional UPDATE changes the row wins and the others get None."""
    if only_if_active is not None:
        retired = await _retire(session, [only_if_active], verify_for_s)
        if not retired:
            return None
    else:
        live = await session.scalars(select(SigningKey.kid).where(SigningKey.retired_at.is_(None)))
        retired = await _retire(session, list(live), verify_for_s)
    row = await new_key_row(box, alg)
    session.add(row)
    # An operator action that concerns every tenant: the event has no tenant.
    audit(
        session,
        actor,
        None,
        "signing_key.rotated",
        kid=row.kid,
        alg=alg,
        retired=[kid for kid, _ in retired],
    )
    await session.flush()
    return Rotation(kid=row.kid, alg=alg, retired=retired)


async def settle_active(session: AsyncSession, verify_for_s: float) -> list[tuple[str, datetime]]:
    """Retire every unretired key but the newest. Two replicas that each created a key at once (the
    first key, or concurrent rotations) both end up signing with the same one; the loser's tokens verify
    until they expire."""
    rows = list(await session.scalars(select(SigningKey).where(SigningKey.retired_at.is_(None))))
    keep = pick_active(rows)
    losers = [row.kid for row in rows if keep is not None and row.kid != keep.kid]
    return await _retire(session, losers, verify_for_s) if losers else []


async def prune_keys(session: AsyncSession, older_than: datetime) -> int:
    """Delete keys whose verification window ended before `older_than` (their tokens expired long ago)."""
    done = await session.execute(
        delete(SigningKey).where(SigningKey.expires_at.is_not(None), SigningKey.expires_at < older_than)
    )
    return int(done.rowcount)  # type: ignore[attr-defined]


class KeyRing:
    """The keys as this process sees them: parsed public keys by kid (active and retired-but-unexpired)
    and the active private key. Refreshed by the token service's poll and, for an unknown kid, on demand."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], box: SecretBox) -> None:
        self._sessions = sessions
        self._box = box
        self._keys: dict[str, VerificationKey] = {}
        self._active: ActiveKey | None = None
        self._refresh_lock = asyncio.Lock()
        self._next_reload: asyncio.Task[None] | None = None
        self._last_reload = -math.inf
        self.unretired = 0  # unretired rows at the last refresh: more than one is a race to settle

    @property
    def active(self) -> ActiveKey | None:
        """The key new tokens are signed with, if there is one."""
        return self._active

    def get(self, kid: str) -> VerificationKey | None:
        """A known verification key (no database access)."""
        return self._keys.get(kid)

    def published(self, now: datetime) -> list[dict[str, Any]]:
        """The public JWKs that verify tokens now: the active key first, then retired ones."""
        live = [key for key in self._keys.values() if key.expires_at is None or key.expires_at > now]
        live.sort(key=lambda key: (key.expires_at is not None, key.kid))
        return [key.jwk for key in live]

    async def refresh(self) -> None:
        """Re-read the keys; unseal the active private key when it changed."""
        async with self._refresh_lock:
            now = utcnow()
            async with self._sessions() as session:
                unexpired = or_(SigningKey.expires_at.is_(None), SigningKey.expires_at > now)
                rows = list(await session.scalars(select(SigningKey).where(unexpired)))
            keys: dict[str, VerificationKey] = {}
            for row in rows:
                known = self._keys.get(row.kid)
                if known is not None and known.expires_at == row.expires_at:
                    keys[row.kid] = known  # parsing a public key costs more than the whole poll
                else:
                    keys[row.kid] = verification_key(row.public_jwk, row.alg, row.expires_at)
            self._keys = keys
            self.unretired = sum(1 for row in rows if row.retired_at is None)
            chosen = pick_active(rows)
            if chosen is None:
                self._active = None
            elif self._active is None or self._active.kid != chosen.kid:
                # Verification goes on with the public keys above even if this fails.
                self._active = None
                self._active = open_private_key(self._box, chosen)

    async def find(self, kid: str) -> VerificationKey | None:
        """A verification key, re-reading the table if `kid` is new to us (another replica's new key)."""
        key = self._keys.get(kid)
        if key is not None or len(kid) > 64:
            return key
        if self._next_reload is None:
            self._next_reload = asyncio.get_running_loop().create_task(self._reload_soon())
        # Every caller missing a kid meanwhile shares this one reload; shielded so that one cancelled
        # request does not cancel the reload the others wait for.
        await asyncio.shield(self._next_reload)
        return self._keys.get(kid)

    async def _reload_soon(self) -> None:
        delay = self._last_reload + RELOAD_MIN_S - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        # From here on the read begins after every waiter asked; later askers need a later read.
        self._next_reload = None
        self._last_reload = time.monotonic()
        await self.refresh()
