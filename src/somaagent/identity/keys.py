"""API key material: generation, the keyed hash we store, and the visible prefix."""

from __future__ import annotations

import hashlib
import hmac
import secrets

KEY_PREFIX = "sk-soma-"
PREFIX_CHARS = 12  # what listings show: "sk-soma-AbCd"


def generate_key() -> str:
    """A new key: the fixed prefix and 32 random bytes, URL-safe base64 (43 characters)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(secret: bytes, key: str) -> str:
    """The stored form of a key: HMAC-SHA256 under the server secret, hex."""
    return hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()


def visible_prefix(key: str) -> str:
    """The part of a key that may be shown again after creation."""
    return key[:PREFIX_CHARS]


def looks_like_key(value: str) -> bool:
    """Cheap shape check before hashing, so junk never reaches the database."""
    return value.startswith(KEY_PREFIX) and 40 <= len(value) <= 80
