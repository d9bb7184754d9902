"""Signing constitutions: canonical bytes, their SHA-256, and the platform's Ed25519 signature over them.

Owns: `canonical_bytes`, `document_sha256`, `key_id`, `SignedDocument`, `ConstitutionSigner` and the
signature errors. May import: core. Never: identity (the app factory derives the key and passes it in).

A constitution is signed over its canonical JSON (RFC 8785, `core.canonical_json`), so the same document
hashes and verifies the same however its keys are ordered, and any change after signing is refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from somaagent.core.canonical_json import canonicalize
from somaagent.core.errors import InvalidRequest

KEY_ID_HEX_CHARS = 16
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
_SIGNATURE_BYTES = 64
_ENVELOPE_FIELDS = frozenset({"document", "signature", "signing_key_id", "sha256"})


class ConstitutionUnsigned(InvalidRequest):
    """A constitution was sent without a signature."""

    code = "constitution_unsigned"


class ConstitutionSignatureInvalid(InvalidRequest):
    """The signature is malformed, by a key this server does not trust, or over other bytes (the
    document changed after it was signed)."""

    code = "constitution_signature_invalid"


def canonical_bytes(document: Mapping[str, Any]) -> bytes:
    """The exact bytes that are hashed and signed (RFC 8785 canonical JSON)."""
    return canonicalize(document)


def document_sha256(document: Mapping[str, Any]) -> str:
    """Hex SHA-256 of the document's canonical bytes: the constitution's hash."""
    return hashlib.sha256(canonical_bytes(document)).hexdigest()


def key_id(public_key: Ed25519PublicKey) -> str:
    """A key's id: the first 16 hex characters of SHA-256 of its 32 raw public bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_HEX_CHARS]


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _signature_bytes(signature: str) -> bytes:
    if not _BASE64URL.fullmatch(signature):
        raise ConstitutionSignatureInvalid(
            "the signature must be base64url without padding (A-Z a-z 0-9 - _)", param="signature"
        )
    try:
        raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ConstitutionSignatureInvalid(
            f"the signature is not base64url: {exc}", param="signature"
        ) from exc
    if len(raw) != _SIGNATURE_BYTES:
        raise ConstitutionSignatureInvalid(
            f"an Ed25519 signature is 64 bytes, this one is {len(raw)}", param="signature"
        )
    return raw


@dataclass(frozen=True, slots=True)
class SignedDocument:
    """A constitution document with its hash and the signature over its canonical bytes."""

    document: dict[str, Any]
    signature: str  # base64url (no padding) of the 64-byte Ed25519 signature
    signing_key_id: str
    sha256: str

    def to_json(self) -> dict[str, Any]:
        """The envelope `{document, signature, signing_key_id, sha256}` (what `soma constitution sign`
        prints and `PUT /v1/constitution` accepts)."""
        return {
            "document": self.document,
            "signature": self.signature,
            "signing_key_id": self.signing_key_id,
            "sha256": self.sha256,
        }

    @classmethod
    def from_json(cls, data: Any) -> SignedDocument:
        """Parse an envelope, refusing unknown fields; a missing signature is `ConstitutionUnsigned`."""
        if not is_envelope(data):
            raise InvalidRequest(
                "a signed constitution is a JSON object {document, signature, signing_key_id, sha256}",
                param="document",
            )
        signature = data.get("signature")
        if not signature:
            raise ConstitutionUnsigned(
                "this constitution has no signature; sign it with `soma constitution sign FILE`",
                param="signature",
            )
        document, kid, digest = data["document"], data.get("signing_key_id"), data.get("sha256")
        if (
            not isinstance(signature, str)
            or not isinstance(kid, str | None)
            or not isinstance(digest, str | None)
        ):
            raise InvalidRequest("signature, signing_key_id and sha256 must be strings", param="signature")
        if not isinstance(document, dict):
            raise InvalidRequest("`document` must be a JSON object", param="document")
        return cls(document, signature, kid or "", digest or "")


def is_envelope(data: Any) -> bool:
    """Whether `data` is a signed envelope rather than a bare document (a document has no `document`)."""
    return isinstance(data, Mapping) and "document" in data and set(data) <= _ENVELOPE_FIELDS


class ConstitutionSigner:
    """Signs with the platform key and verifies against it and any extra trusted public keys."""

    def __init__(
        self, private_key: Ed25519PrivateKey, trusted: Mapping[str, Ed25519PublicKey] | None = None
    ) -> None:
        self._private_key = private_key
        self.key_id = key_id(private_key.public_key())
        self._trusted: dict[str, Ed25519PublicKey] = {self.key_id: private_key.public_key()}
        for kid, public_key in (trusted or {}).items():
            if key_id(public_key) != kid:
                raise ValueError(f"trusted key entry {kid!r} holds key {key_id(public_key)!r}")
            self._trusted[kid] = public_key

    @classmethod
    def from_seed(
        cls, seed: bytes, trusted: Mapping[str, Ed25519PublicKey] | None = None
    ) -> ConstitutionSigner:
        """A signer whose Ed25519 private key is the 32-byte `seed` (derived from the server secret)."""
        return cls(Ed25519PrivateKey.from_private_bytes(seed), trusted)

    @property
    def trusted_key_ids(self) -> list[str]:
        """The ids of every key whose signatures verify (the platform's first)."""
        return list(self._trusted)

    def sign(self, document: Mapping[str, Any]) -> SignedDocument:
        """Sign the document's canonical bytes with the platform key."""
        body = canonical_bytes(document)
        return SignedDocument(
            document=dict(document),
            signature=_b64url(self._private_key.sign(body)),
            signing_key_id=self.key_id,
            sha256=hashlib.sha256(body).hexdigest(),
        )

    def verify(
        self,
        document: Mapping[str, Any],
        signature: str | None,
        signing_key_id: str | None = None,
        claimed_sha256: str | None = None,
    ) -> str:
        """The id of the trusted key whose signature over the canonical document this is; raises
        `ConstitutionUnsigned` without a signature and `ConstitutionSignatureInvalid` otherwise."""
        if not signature:
            raise ConstitutionUnsigned(
                "this constitution has no signature; sign it with `soma constitution sign FILE` and send "
                "the envelope's `signature`",
                param="signature",
            )
        raw = _signature_bytes(signature)
        body = canonical_bytes(document)
        actual = hashlib.sha256(body).hexdigest()
        if claimed_sha256 and not hmac.compare_digest(claimed_sha256, actual):
            raise ConstitutionSignatureInvalid(
                f"the document's sha256 is {actual} but it was signed as {claimed_sha256}: the document "
                "changed after signing; sign the new text again",
                param="document",
            )
        if signing_key_id:
            public_key = self._trusted.get(signing_key_id)
            if public_key is None:
                raise ConstitutionSignatureInvalid(
                    f"signed by key {signing_key_id!r}, which this server does not trust; sign it with "
                    f"the platform key ({self.key_id}) via `soma constitution sign FILE`",
                    param="signing_key_id",
                )
            candidates = {signing_key_id: public_key}
        else:
            candidates = self._trusted
        for kid, public_key in candidates.items():
            try:
                public_key.verify(raw, body)
            except InvalidSignature:
                continue
            return kid
        raise ConstitutionSignatureInvalid(
            "the signature does not verify with any key this server trusts: the document changed after "
            "signing, or another key signed it; sign the exact document with `soma constitution sign FILE`",
            param="signature",
        )
