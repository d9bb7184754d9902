"""`/v1/auth`: the token endpoint (password, MFA step, refresh, client credentials), logout and revocation."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.responses import Response

from somaagent.api.deps import AccountSelfDep, ServicesDep, UsersAdminDep
from somaagent.api.errors import translate_validation
from somaagent.api.openai.docs import error_responses
from somaagent.core.errors import Forbidden, InvalidRequest, SomaError
from somaagent.identity.auth_schemas import RevokedOut, RevokeRequest, TokenRequest, TokenResponse
from somaagent.identity.login import MFA_GRANT, TokenGrant
from somaagent.identity.users import ensure_may_manage, get_user

router = APIRouter(prefix="/v1/auth", tags=["Authentication"])

_FORM = "application/x-www-form-urlencoded"
# The token endpoint reads its body itself (form or JSON), so its schema is added to the document by hand.
OPENAPI_SCHEMAS: dict[str, Any] = {
    "TokenRequest": TokenRequest.model_json_schema(ref_template="#/components/schemas/{model}")
}
_TOKEN_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            _FORM: {"schema": {"$ref": "#/components/schemas/TokenRequest"}},
            "application/json": {"schema": {"$ref": "#/components/schemas/TokenRequest"}},
        },
    }
}


async def _token_fields(request: Request) -> dict[str, Any]:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == _FORM:
        form = await request.form()
        return {k: v for k, v in form.items() if isinstance(v, str)}
    if media_type == "application/json":
        try:
            parsed = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(f"the body is not valid JSON ({exc})", code="invalid_json") from None
        if not isinstance(parsed, dict):
            raise InvalidRequest("the body must be a JSON object", code="invalid_json")
        return parsed
    raise InvalidRequest(
        f"send the token request as {_FORM} (RFC 6749) or application/json", code="unsupported_media_type"
    )


def _need(body: TokenRequest, *names: str) -> list[str]:
    values = []
    for name in names:
        value = getattr(body, name)
        if not value:
            raise InvalidRequest(
                f"grant_type={body.grant_type} needs '{name}'", param=name, code="missing_required_parameter"
            )
        values.append(value)
    return values


@router.post(
    "/token",
    response_model=TokenResponse,
    responses=error_responses(400, 401, 429),
    openapi_extra=_TOKEN_BODY,
    summary="Log in: get an access token (and a refresh token)",
)
async def issue_token(request: Request, services: ServicesDep) -> Response:
    """OAuth2 token endpoint. A password login of an MFA user answers 401 `mfa_required` with an `mfa_token`;
    send it back with `grant_type=urn:somaagent:grant-type:mfa-otp` and an `otp`."""
    try:
        body = TokenRequest(**await _token_fields(request))
    except ValidationError as exc:
        raise translate_validation([dict(e) for e in exc.errors()]) from None
    address = request.client.host if request.client else None
    logins = services.logins
    grant: TokenGrant
    if body.grant_type == "password":
        tenant, username, password = _need(body, "tenant", "username", "password")
        grant = await logins.password_grant(tenant, username, password, body.otp, address)
    elif body.grant_type == MFA_GRANT:
        mfa_token, otp = _need(body, "mfa_token", "otp")
        grant = await logins.mfa_grant(mfa_token, otp, address)
    elif body.grant_type == "refresh_token":
        (refresh,) = _need(body, "refresh_token")
        grant = await logins.refresh_grant(refresh)
    else:
        client_id, client_secret = _need(body, "client_id", "client_secret")
        grant = await logins.client_credentials_grant(client_id, client_secret, address)
    out = TokenResponse(
        access_token=grant.access_token,
        expires_in=grant.expires_in,
        refresh_token=grant.refresh_token,
        scope=grant.scope,
    )
    # RFC 6749 §5.1: token responses must not be cached.
    return Response(
        out.model_dump_json(exclude_none=True),
        media_type="application/json",
        headers={"cache-control": "no-store", "pragma": "no-cache"},
    )


@router.post("/logout", response_model=RevokedOut, responses=error_responses(401, 403))
async def logout(principal: AccountSelfDep, services: ServicesDep) -> RevokedOut:
    """End your login: this access token at once, and its refresh token family."""
    await services.logins.logout(principal)
    return RevokedOut(revoked="login")


@router.post("/revoke", response_model=RevokedOut, responses=error_responses(400, 401, 403, 404))
async def revoke(body: RevokeRequest, principal: UsersAdminDep, services: ServicesDep) -> RevokedOut:
    """Revoke one access token of your tenant, every token of one of its users, or (operators) a `jti`.
    Every replica refuses the revoked tokens within a second."""
    if sum(x is not None for x in (body.token, body.user, body.jti)) != 1:
        raise InvalidRequest("send exactly one of token, user, jti")
    async with services.sessions() as session:
        if body.user is not None:
            user = await get_user(session, principal, body.user)
            ensure_may_manage(principal, user)
            await services.logins.revoke_user_tokens(session, principal, user)
            await session.commit()
            return RevokedOut(revoked="user")
        if body.jti is not None:
            if not principal.is_admin:
                raise Forbidden("only operators revoke a bare jti; send the token itself, or the user")
            await services.logins.revoke_token_id(session, principal, principal.tenant_id, body.jti)
            await session.commit()
            return RevokedOut(revoked="jti")
        assert body.token is not None
        try:
            owner = await services.tokens.verify_access_token(body.token)
        except SomaError as exc:
            raise InvalidRequest(
                f"not a live access token of this server: {exc.message}", param="token"
            ) from exc
        if not principal.can_act_for(owner.tenant_id):
            raise InvalidRequest("not a live access token of this server", param="token")
        await services.logins.revoke_token_id(
            session, principal, owner.tenant_id, owner.token_id or "", owner.login_id
        )
        await session.commit()
        return RevokedOut(revoked="token")
