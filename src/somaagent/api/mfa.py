"""`/v1/auth/mfa`: a logged-in user's own second factor (TOTP enrollment, recovery codes, turning it off).

Every route needs `account:self`, which only user tokens carry; the user is always the caller, loaded by
the token's user id inside the token's tenant.
"""

from __future__ import annotations

import base64
import time
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.api.deps import AccountSelfDep, ServicesDep, SessionDep
from somaagent.api.openai.docs import error_responses
from somaagent.core.errors import Forbidden, NotFound
from somaagent.core.principal import Principal
from somaagent.identity import mfa
from somaagent.identity.tables import User

router = APIRouter(prefix="/v1/auth/mfa", tags=["Authentication"])

# Secrets and recovery codes must not linger in browser or proxy caches.
_NO_STORE = {"cache-control": "no-store"}


class _CodeShape(ValueError):
    code = "invalid_mfa_code"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TotpCodeIn(_Strict):
    """A code from the authenticator app being enrolled."""

    code: str = Field(min_length=1, max_length=32, examples=["123456"])

    @field_validator("code")
    @classmethod
    def _six_digits(cls, value: str) -> str:
        normalized = mfa.normalize_totp_code(value)
        if normalized is None:
            raise _CodeShape("'code' must be the 6-digit code your authenticator app shows")
        return normalized


class SecondFactorIn(_Strict):
    """A current TOTP code, or one of the recovery codes (dashes and case do not matter)."""

    code: str = Field(min_length=1, max_length=32, examples=["123456", "abcd-efgh-jkmn"])

    @field_validator("code")
    @classmethod
    def _code_shape(cls, value: str) -> str:
        if mfa.normalize_totp_code(value) is None and mfa.normalize_recovery_code(value) is None:
            raise _CodeShape(
                "'code' must be the 6-digit code your authenticator app shows, or a recovery code "
                "like abcd-efgh-jkmn"
            )
        return value


class MfaStatusOut(_Strict):
    object: Literal["mfa_status"] = "mfa_status"
    enabled: bool
    pending_enrollment: bool = Field(description="An enrollment was begun and awaits its first code.")
    confirmed_at: datetime | None
    recovery_codes_left: int


class TotpEnrollmentOut(_Strict):
    """Shown once: put the secret (or the QR code) into an authenticator app, then confirm a code."""

    secret: str = Field(description="The shared secret, base32 without padding.")
    otpauth_uri: str
    qr_png_base64: str = Field(description="The otpauth URI as a QR code, PNG, base64.")


class RecoveryCodesOut(_Strict):
    """Shown once: each code signs in once if the authenticator is lost. Store them somewhere safe."""

    recovery_codes: list[str]


async def _caller(session: AsyncSession, principal: Principal) -> User:
    """The calling user's row, by the token's user id within the token's tenant."""
    if principal.user_id is None:
        raise Forbidden(
            "MFA is for user accounts: log in as a user (POST /v1/auth/token) instead of using an API key",
            code="user_account_required",
        )
    user = await session.scalar(
        select(User).where(User.id == principal.user_id, User.tenant_id == principal.tenant_id)
    )
    if user is None:
        raise NotFound("your user account no longer exists", code="user_not_found")
    return user


@router.get("", response_model=MfaStatusOut, responses=error_responses(401, 403, 404))
async def mfa_status(principal: AccountSelfDep, session: SessionDep) -> MfaStatusOut:
    """Whether your account has a second factor, and how many recovery codes are left."""
    user = await _caller(session, principal)
    return MfaStatusOut(
        enabled=mfa.mfa_enabled(user),
        pending_enrollment=user.totp_secret is not None and user.totp_confirmed_at is None,
        confirmed_at=user.totp_confirmed_at,
        recovery_codes_left=await mfa.recovery_codes_left(session, user),
    )


@router.post("/totp/enroll", response_model=TotpEnrollmentOut, responses=error_responses(401, 403, 404, 409))
async def enroll_totp(
    principal: AccountSelfDep, services: ServicesDep, session: SessionDep, response: Response
) -> TotpEnrollmentOut:
    """Begin TOTP enrollment (replacing one begun and not confirmed); confirm it with a code."""
    user = await _caller(session, principal)
    enrollment = await mfa.begin_totp_enrollment(
        session, services.mfa_box, user, services.settings.mfa_issuer
    )
    await session.commit()
    response.headers.update(_NO_STORE)
    return TotpEnrollmentOut(
        secret=enrollment.secret,
        otpauth_uri=enrollment.otpauth_uri,
        qr_png_base64=base64.b64encode(enrollment.qr_png).decode("ascii"),
    )


_PNG: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {}}, "description": "The pending enrollment's otpauth URI as a QR code"}
}


@router.get("/totp/qr.png", response_class=Response, responses={**_PNG, **error_responses(401, 403, 404)})
async def enrollment_qr(principal: AccountSelfDep, services: ServicesDep, session: SessionDep) -> Response:
    """The pending enrollment's QR code as a PNG (404 when no enrollment is pending)."""
    user = await _caller(session, principal)
    enrollment = await mfa.pending_enrollment(session, services.mfa_box, user, services.settings.mfa_issuer)
    return Response(enrollment.qr_png, media_type="image/png", headers=_NO_STORE)


@router.post(
    "/totp/confirm", response_model=RecoveryCodesOut, responses=error_responses(400, 401, 403, 404, 409)
)
async def confirm_totp(
    body: TotpCodeIn,
    principal: AccountSelfDep,
    services: ServicesDep,
    session: SessionDep,
    response: Response,
) -> RecoveryCodesOut:
    """Activate MFA with a code from the new authenticator; returns 10 recovery codes, shown once."""
    user = await _caller(session, principal)
    codes = await services.logins.check_code(
        session,
        user,
        lambda: mfa.confirm_totp_enrollment(
            session, services.mfa_box, services.recovery_key, user, body.code, time.time()
        ),
    )
    await services.logins.end_other_logins(session, user, principal.login_id)
    await session.commit()
    response.headers.update(_NO_STORE)
    return RecoveryCodesOut(recovery_codes=codes)


@router.post(
    "/recovery-codes", response_model=RecoveryCodesOut, responses=error_responses(400, 401, 403, 404, 409)
)
async def regenerate_recovery_codes(
    body: SecondFactorIn,
    principal: AccountSelfDep,
    services: ServicesDep,
    session: SessionDep,
    response: Response,
) -> RecoveryCodesOut:
    """Replace your recovery codes with 10 new ones (given a current code); the old ones stop working."""
    user = await _caller(session, principal)
    codes = await services.logins.check_code(
        session,
        user,
        lambda: mfa.regenerate_recovery_codes(
            session, services.mfa_box, services.recovery_key, user, body.code, time.time()
        ),
    )
    await session.commit()
    response.headers.update(_NO_STORE)
    return RecoveryCodesOut(recovery_codes=codes)


@router.delete(
    "/totp", status_code=204, response_class=Response, responses=error_responses(400, 401, 403, 404, 409)
)
async def disable_totp(
    body: SecondFactorIn, principal: AccountSelfDep, services: ServicesDep, session: SessionDep
) -> Response:
    """Turn MFA off (given a current code); refused with 409 while your tenant requires MFA."""
    user = await _caller(session, principal)
    await services.logins.check_code(
        session,
        user,
        lambda: mfa.disable_totp(
            session, services.mfa_box, services.recovery_key, user, body.code, time.time()
        ),
    )
    await session.commit()
    return Response(status_code=204)
