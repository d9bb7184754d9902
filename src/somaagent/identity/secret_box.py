"""Sealing secrets at rest (TOTP seeds, signing keys) with AES-256-GCM under a key derived from the
server secret: a copy of the database alone does not yield them."""

from __future__ import annotations

import base64
import os

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_VERSION = "v1"


def derive_key(server_secret: bytes, purpose: str) -> bytes:
    """A 32-byte key for one purpose (HMAC of recovery codes, refresh tokens), independent of the others."""
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"somaagent/key/" + purpose.encode()
    ).derive(server_secret)


class SecretBox:
    """Seals and opens short secrets. Each purpose gets its own derived key, bound as associated data."""

    def __init__(self, server_secret: bytes, purpose: str) -> None:
        self._purpose = purpose.encode()
        key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"somaagent/" + self._purpose
        ).derive(server_secret)
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes) -> str:
        """`v1.<nonce+ciphertext, base64url>`."""
        nonce = os.urandom(12)
        sealed = nonce + self._aead.encrypt(nonce, plaintext, self._purpose)
        return f"{_VERSION}.{base64.urlsafe_b64encode(sealed).decode()}"

    def open(self, sealed: str) -> bytes:
        """The plaintext; raises ValueError if the value was not sealed by this box (or was altered)."""
        version, _, body = sealed.partition(".")
        if version != _VERSION:
            raise ValueError("unknown sealed-secret version")
        raw = base64.urlsafe_b64decode(body)
        try:
            return self._aead.decrypt(raw[:12], raw[12:], self._purpose)
        except Exception as exc:  # cryptography's InvalidTag carries no message
            raise ValueError("sealed secret does not open with this server secret") from exc
