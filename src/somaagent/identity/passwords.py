"""Password and client-secret hashing with argon2id, off the event loop, in constant time for unknown
accounts too (so timing does not tell an attacker which usernames exist)."""

from __future__ import annotations

import asyncio

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

MIN_PASSWORD_CHARS = 12
# argon2 is deliberately slow; an unbounded password would let one request burn a core.
MAX_PASSWORD_CHARS = 256

# RFC 9106's second recommended option (64 MiB, t=3), with p=1: this runs one hash per login, in a
# thread, on small machines. ~60 ms on one 2 GHz core.
_HASHER = PasswordHasher(time_cost=3, memory_cost=64 * 1024, parallelism=1)
# Verified against when the account does not exist, so both paths cost one argon2 verification.
_DUMMY_HASH = _HASHER.hash("not a password of anyone's")
# At most this many argon2 computations at once: each holds 64 MiB.
_SLOTS = asyncio.Semaphore(4)


def password_problem(password: str) -> str | None:
    """Why `password` is not acceptable, or None."""
    if len(password) < MIN_PASSWORD_CHARS:
        return f"passwords need at least {MIN_PASSWORD_CHARS} characters"
    if len(password) > MAX_PASSWORD_CHARS:
        return f"passwords are at most {MAX_PASSWORD_CHARS} characters"
    if password.strip() == "" or len(set(password)) < 4:
        return "that password is too easy to guess; use a longer, varied passphrase"
    return None


async def hash_secret(secret: str) -> str:
    """The argon2id hash of a password or client secret."""
    async with _SLOTS:
        return await asyncio.to_thread(_HASHER.hash, secret)


async def verify_secret(stored_hash: str | None, secret: str) -> bool:
    """Whether `secret` matches `stored_hash`; with None (no such account) it still spends the same time."""
    if len(secret) > MAX_PASSWORD_CHARS:
        return False
    async with _SLOTS:
        return await asyncio.to_thread(_verify, stored_hash, secret)


def _verify(stored_hash: str | None, secret: str) -> bool:
    try:
        matched = _HASHER.verify(stored_hash or _DUMMY_HASH, secret)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
    return matched and stored_hash is not None


def needs_rehash(stored_hash: str) -> bool:
    """Whether a stored hash uses older parameters than today's (rehash it on the next good login)."""
    return _HASHER.check_needs_rehash(stored_hash)
