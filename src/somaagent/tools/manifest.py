"""Tool manifests: what a tool is, its canonical bytes, their SHA-256 digest and Ed25519 signature.

Owns: `Manifest`, `SignedManifest`, `canonical_json`, `digest`, `sign_manifest`, `verify_manifest`,
`validate_arguments`, Ed25519 key helpers, and the errors they raise.
May import: core. Never: db, models, api — trust is decided from bytes and keys alone.

A manifest is signed over its canonical JSON (RFC 8785, `core.canonical_json`), so any change after
signing — a word of the description, a schema keyword, the version — changes the bytes and is refused.
Structure is checked too (name pattern, side-effect class, a valid self-contained Draft 2020-12
schema), but only after the signature is known good, so untrusted schemas are never even compiled.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import jsonschema
import referencing
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from somaagent.core.canonical_json import canonicalize
from somaagent.core.errors import Forbidden, InvalidRequest

SideEffect = Literal["read", "write", "external"]
SIDE_EFFECTS: tuple[str, ...] = get_args(SideEffect)

NAME_PATTERN = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
# semver.org's own regular expression (2.0.0), without the leading "v" some tags carry.
SEMVER_PATTERN = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?"
)
_MANIFEST_FIELDS = frozenset({"name", "description", "parameters", "version", "side_effect", "publisher"})
_REQUIRED_FIELDS = _MANIFEST_FIELDS - {"publisher"}
# I-JSON (RFC 7493): integers beyond 2**53 do not survive a round trip through other JSON parsers,
# so two implementations could canonicalize them differently.
KEY_ID_HEX_CHARS = 16
# No resources at all: a `$ref` that is not local to the schema fails instead of being fetched.
_NO_REMOTE_REFS: referencing.Registry[Any] = referencing.Registry()


class ManifestRejected(Forbidden):
    """The manifest is not trusted: unsigned, signed by an unknown key, tampered with, or a bad signature."""

    code = "manifest_rejected"


class InvalidManifest(InvalidRequest):
    """The manifest is malformed: bad name, version, side-effect class or JSON schema."""

    code = "invalid_manifest"


class InvalidArguments(InvalidRequest):
    """Tool arguments fail the tool's schema; `param` is the JSON path of the first failing value."""

    code = "invalid_tool_arguments"


@dataclass(frozen=True, slots=True)
class Manifest:
    """A tool's public contract, checked on construction; `parameters` is a JSON Schema for its args."""

    name: str
    description: str
    parameters: Mapping[str, Any]
    version: str
    side_effect: SideEffect
    publisher: str | None = None

    def __post_init__(self) -> None:
        _check_fields(self)
        # A private deep copy: later edits to the caller's dict must not change what was checked/signed.
        object.__setattr__(self, "parameters", json.loads(canonicalize(self.parameters)))
        _check_schema(self.name, self.parameters)

    def to_dict(self) -> dict[str, Any]:
        """The manifest as JSON-ready data (the exact object that is canonicalized and signed)."""
        data: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "parameters": json.loads(canonicalize(self.parameters)),
            "version": self.version,
            "side_effect": self.side_effect,
        }
        # Omitted rather than null, so adding optional fields later leaves old digests unchanged.
        if self.publisher is not None:
            data["publisher"] = self.publisher
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """Parse a manifest from JSON data, refusing unknown or missing fields."""
        if not isinstance(data, Mapping):
            raise InvalidManifest(f"a manifest must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - _MANIFEST_FIELDS)
        if unknown:
            raise InvalidManifest(
                f"unknown manifest field(s) {unknown}; allowed: {sorted(_MANIFEST_FIELDS)}", param=unknown[0]
            )
        missing = sorted(_REQUIRED_FIELDS - set(data))
        if missing:
            raise InvalidManifest(f"manifest is missing required field(s) {missing}", param=missing[0])
        return cls(
            name=data["name"],
            description=data["description"],
            parameters=data["parameters"],
            version=data["version"],
            side_effect=data["side_effect"],
            publisher=data.get("publisher"),
        )


@dataclass(frozen=True, slots=True)
class SignedManifest:
    """A manifest with the SHA-256 digest of its canonical JSON and an Ed25519 signature over those bytes."""

    manifest: Manifest
    digest: str
    signature: str  # base64 (standard alphabet, padded) of the 64-byte Ed25519 signature
    key_id: str

    def to_dict(self) -> dict[str, Any]:
        """The signed manifest as JSON-ready data: {manifest, digest, signature, key_id}."""
        return {
            "manifest": self.manifest.to_dict(),
            "digest": self.digest,
            "signature": self.signature,
            "key_id": self.key_id,
        }


# --- canonical bytes and digest -----------------------------------------------------------------


def canonical_json(manifest: Manifest) -> bytes:
    """The canonical JSON bytes of `manifest` (see `canonicalize` for the exact rules)."""
    return canonicalize(manifest.to_dict())


def digest(manifest: Manifest) -> str:
    """SHA-256 hex digest of the manifest's canonical JSON."""
    return hashlib.sha256(canonical_json(manifest)).hexdigest()


# --- structure ------------------------------------------------------------------------------------


def _check_fields(manifest: Manifest) -> None:
    name = manifest.name
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        raise InvalidManifest(
            f"tool name {name!r} is invalid: use 1-64 characters of a-z, 0-9, '_', '.', '-', "
            "starting with a letter (e.g. 'http_fetch')",
            param="name",
        )
    if not isinstance(manifest.description, str) or not manifest.description.strip():
        raise InvalidManifest(f"tool {name!r} needs a non-empty description", param="description")
    if not isinstance(manifest.version, str) or SEMVER_PATTERN.fullmatch(manifest.version) is None:
        raise InvalidManifest(
            f"tool {name!r} version {manifest.version!r} is not semantic versioning (e.g. '1.2.0')",
            param="version",
        )
    if manifest.side_effect not in SIDE_EFFECTS:
        raise InvalidManifest(
            f"tool {name!r} side_effect {manifest.side_effect!r} is invalid; use one of {list(SIDE_EFFECTS)}",
            param="side_effect",
        )
    if manifest.publisher is not None and (
        not isinstance(manifest.publisher, str) or not manifest.publisher.strip()
    ):
        raise InvalidManifest(
            f"tool {name!r} publisher must be a non-empty string or absent", param="publisher"
        )
    if not isinstance(manifest.parameters, Mapping):
        raise InvalidManifest(f"tool {name!r} parameters must be a JSON Schema object", param="parameters")


def _check_schema(name: str, schema: Mapping[str, Any]) -> None:
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "(root)"
        raise InvalidManifest(
            f"tool {name!r} parameters is not a valid JSON Schema (Draft 2020-12) at {where}: {exc.message}",
            param="parameters",
        ) from exc
    # Arguments arrive as a JSON object (OpenAI function calling and MCP both require it).
    if schema.get("type") != "object":
        raise InvalidManifest(
            f'tool {name!r} parameters must be a schema with "type": "object"', param="parameters"
        )
    remote = _remote_ref(schema)
    if remote is not None:
        # Resolving it would make the validator fetch a URL chosen by the manifest's author.
        raise InvalidManifest(
            f"tool {name!r} parameters refers to {remote!r}; schemas must be self-contained ('#/$defs/...')",
            param="parameters",
        )


def _remote_ref(node: Any) -> str | None:
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key in ("$ref", "$dynamicRef") and isinstance(value, str) and not value.startswith("#"):
                return value
            found = _remote_ref(value)
            if found is not None:
                return found
    elif isinstance(node, list):
        for item in node:
            found = _remote_ref(item)
            if found is not None:
                return found
    return None


# --- keys -----------------------------------------------------------------------------------------


def new_signing_key() -> Ed25519PrivateKey:
    """A fresh random Ed25519 private key."""
    return Ed25519PrivateKey.generate()


def key_id(public_key: Ed25519PublicKey) -> str:
    """The key's id: the first 16 hex characters of SHA-256 of its 32 raw public bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_HEX_CHARS]


def private_key_to_pem(private_key: Ed25519PrivateKey, password: bytes | None = None) -> bytes:
    """PKCS#8 PEM of a private key, encrypted when `password` is given."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def private_key_from_pem(pem: bytes, password: bytes | None = None) -> Ed25519PrivateKey:
    """Load an Ed25519 private key from PKCS#8 PEM; other key types are refused."""
    try:
        key = serialization.load_pem_private_key(pem, password=password)
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"not a readable PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidRequest(f"manifest signing keys must be Ed25519, got {type(key).__name__}")
    return key


def public_key_to_pem(public_key: Ed25519PublicKey) -> bytes:
    """SubjectPublicKeyInfo PEM of a public key."""
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_key_from_pem(pem: bytes) -> Ed25519PublicKey:
    """Load an Ed25519 public key from SubjectPublicKeyInfo PEM; other key types are refused."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"not a readable PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidRequest(f"manifest signing keys must be Ed25519, got {type(key).__name__}")
    return key


def public_key_from_raw(raw: bytes) -> Ed25519PublicKey:
    """Load an Ed25519 public key from its 32 raw bytes (RFC 8032 encoding)."""
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise InvalidRequest(f"not a 32-byte Ed25519 public key: {exc}") from exc


def trusted_keys_from(*public_keys: Ed25519PublicKey) -> dict[str, Ed25519PublicKey]:
    """A trust map {key_id: key} for `verify_manifest`."""
    return {key_id(k): k for k in public_keys}


# --- sign / verify --------------------------------------------------------------------------------


def sign_manifest(manifest: Manifest, private_key: Ed25519PrivateKey) -> SignedManifest:
    """Sign the manifest's canonical JSON with Ed25519."""
    body = canonical_json(manifest)
    signature = private_key.sign(body)
    return SignedManifest(
        manifest=manifest,
        digest=hashlib.sha256(body).hexdigest(),
        signature=base64.b64encode(signature).decode("ascii"),
        key_id=key_id(private_key.public_key()),
    )


def verify_manifest(
    signed: SignedManifest | Manifest | Mapping[str, Any], trusted_keys: Mapping[str, Ed25519PublicKey]
) -> Manifest:
    """Return the manifest if it is signed by a trusted key and untampered; raise otherwise.

    Accepts a `SignedManifest`, its `to_dict()` JSON form (as stored or received), or a bare `Manifest`
    (always refused as unsigned). Signature first, structure second.
    """
    if isinstance(signed, Manifest):
        raise ManifestRejected(
            f"tool manifest {signed.name!r} is unsigned; sign it with `sign_manifest` and a trusted key",
            code="manifest_unsigned",
        )
    if isinstance(signed, SignedManifest):
        body, name = canonical_json(signed.manifest), signed.manifest.name
        claimed_digest, signature, kid = signed.digest, signed.signature, signed.key_id
    else:
        body, name, claimed_digest, signature, kid = _wire_parts(signed)

    if not signature or not kid:
        raise ManifestRejected(
            f"tool manifest {name!r} is unsigned; sign it with `sign_manifest` and a trusted key",
            code="manifest_unsigned",
        )
    public_key = trusted_keys.get(kid)
    if public_key is None:
        raise ManifestRejected(
            f"tool manifest {name!r} is signed by unknown key {kid!r}; add the publisher's public key "
            "to the trusted keys first",
            code="manifest_unknown_key",
        )
    if key_id(public_key) != kid:
        raise ManifestRejected(
            f"trusted key entry {kid!r} holds key {key_id(public_key)!r}; fix the trusted-key map",
            code="manifest_unknown_key",
        )
    actual_digest = hashlib.sha256(body).hexdigest()
    if not isinstance(claimed_digest, str) or not hmac.compare_digest(claimed_digest, actual_digest):
        raise ManifestRejected(
            f"tool manifest {name!r} was changed after signing: digest {claimed_digest!r} was signed, "
            f"the content now hashes to {actual_digest!r}",
            code="manifest_tampered",
        )
    try:
        raw_signature = base64.b64decode(signature, validate=True)
        public_key.verify(raw_signature, body)
    except (binascii.Error, ValueError, InvalidSignature) as exc:
        raise ManifestRejected(
            f"tool manifest {name!r} has a signature that does not verify with key {kid!r}",
            code="manifest_bad_signature",
        ) from exc

    if isinstance(signed, SignedManifest):
        # Re-check a constructed object anyway: cheap, and frozen dataclasses can still be forced.
        _check_fields(signed.manifest)
        _check_schema(signed.manifest.name, signed.manifest.parameters)
        return signed.manifest
    return Manifest.from_dict(signed["manifest"])


def _wire_parts(data: Mapping[str, Any]) -> tuple[bytes, str, Any, str, str]:
    if not isinstance(data, Mapping) or not isinstance(data.get("manifest"), Mapping):
        raise InvalidManifest("a signed manifest is a JSON object {manifest, digest, signature, key_id}")
    manifest = data["manifest"]
    name = manifest.get("name")
    signature, kid = data.get("signature"), data.get("key_id")
    if signature is not None and not isinstance(signature, str):
        raise ManifestRejected(f"tool manifest {name!r} signature must be a base64 string")
    if kid is not None and not isinstance(kid, str):
        raise ManifestRejected(f"tool manifest {name!r} key_id must be a string")
    # Canonicalize exactly what was received (unknown fields included), so nothing unsigned slips in.
    return canonicalize(manifest), str(name), data.get("digest"), signature or "", kid or ""


# --- arguments ------------------------------------------------------------------------------------


def validate_arguments(manifest: Manifest, args: Mapping[str, Any]) -> None:
    """Check tool-call arguments against the manifest's schema; the error names the failing path."""
    validator = jsonschema.Draft202012Validator(manifest.parameters, registry=_NO_REMOTE_REFS)
    errors = sorted(validator.iter_errors(args), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    if not errors:
        return
    first = errors[0]
    path = list(first.absolute_path)
    # `required` and `additionalProperties` fail at the parent object; point at the culprit instead.
    if first.validator == "required" and isinstance(first.instance, Mapping):
        missing = [p for p in first.validator_value if p not in first.instance]
        path += missing[:1]
    elif first.validator == "additionalProperties" and isinstance(first.instance, Mapping):
        allowed = set(first.schema.get("properties", {}))
        extra = sorted(k for k in first.instance if k not in allowed)
        path += extra[:1]
    where = _json_path(path)
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    raise InvalidArguments(
        f"arguments for tool {manifest.name!r} are invalid at {where}: {first.message}{more}", param=where
    )


def _json_path(path: list[Any]) -> str:
    text = "$"
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text
