"""The platform's constitution signer, composed from the server secret (identity) and the Ed25519 signer
(policy). Its own module so the CLI signs without importing the HTTP app."""

from __future__ import annotations

from somaagent.identity.secret_box import derive_key
from somaagent.policy.constitution_signing import ConstitutionSigner


def platform_signer(secret: bytes) -> ConstitutionSigner:
    """The platform's constitution signer: an Ed25519 key derived from the server secret, so every replica
    sharing `SOMA_SECRET_KEY` (and the local CLI) signs and trusts the same constitutions."""
    return ConstitutionSigner.from_seed(derive_key(secret, "constitution"))
