"""`GET /.well-known/jwks.json`: the public keys that verify SomaAgent's access tokens (RFC 7517), for
resource servers and other replicas. Unauthenticated by design: it holds only public keys."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from somaagent.identity.tokens import TokenService

router = APIRouter(tags=["Identity"])

# Verifiers may cache the set this long; a rotated-out key stays published for a token lifetime more.
CACHE_CONTROL = "public, max-age=60"


class JsonWebKeySet(BaseModel):
    """RFC 7517 §5: the active signing key first, then retired keys whose tokens have not expired."""

    keys: list[dict[str, Any]] = Field(
        description="Public JWKs (`kty`, `crv`/`x` or `n`/`e`, `kid` = RFC 7638 thumbprint, `alg`, `use`).",
        examples=[
            [
                {
                    "kty": "OKP",
                    "crv": "Ed25519",
                    "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
                    "kid": "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k",
                    "alg": "EdDSA",
                    "use": "sig",
                }
            ]
        ],
    )


@router.get(
    "/.well-known/jwks.json",
    summary="Public keys that verify access tokens",
    response_model=JsonWebKeySet,
)
async def jwks(request: Request, response: Response) -> JsonWebKeySet:
    """The JWKS of this server's token signing keys."""
    tokens: TokenService = request.app.state.services.tokens
    response.headers["Cache-Control"] = CACHE_CONTROL
    return JsonWebKeySet(keys=(await tokens.jwks())["keys"])
