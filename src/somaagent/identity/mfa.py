"""Multi-factor authentication of users: TOTP enrollment, second-factor checks with replay protection,
single-use recovery codes, and the admin reset. Every change writes an audit event in its transaction.

Owns: users' TOTP columns and recovery_codes. May import: core, db, events, identity. Never: api.
The caller owns the transaction: these functions stage changes and events, the caller commits.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value

from somaagent.core.errors import Conflict, Forbidden, InvalidRequest, NotFound, SomaError, Unauthenticated
from somaagent.core.principal import Principal
from somaagent.events.notices import notification_event
from somaagent.events.outbox import add_event, audit
from somaagent.identity import totp
from somaagent.identity.capabilities import Capability
from somaagent.identity.secret_box import SecretBox
from somaagent.identity.tables import RecoveryCode, Tenant, User

RECOVERY_CODE_COUNT = 10
# No 0/o, 1/i/l: codes get read off paper and typed by hand.
RECOVERY_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"
RECOVERY_CODE_CHARS = 12  # 31^12 ≈ 2^59
TOTP_WINDOW = 1  # accept the previous and the next 30-second step: clock drift and typing time
TOTP_DIGITS = 6

_TOTP_SHAPE = re.compile(r"[0-9]{6}")
_RECOVERY_SHAPE = re.compile(f"[{RECOVERY_ALPHABET}]{{{RECOVERY_CODE_CHARS}}}")
_SEPARATORS = re.compile(r"[\s-]+")

SecondFactor = Literal["otp", "recovery"]


@dataclass(frozen=True)
class TotpEnrollment:
    """A pending enrollment, shown to the user once: the base32 secret, its otpauth URI and that URI's QR."""

    secret: str
    otpauth_uri: str
    qr_png: bytes


def mfa_enabled(user: User) -> bool:
    """Whether the user has a confirmed second factor."""
    return user.totp_secret is not None and user.totp_confirmed_at is not None


def normalize_totp_code(code: str) -> str | None:
    """The six digits of a TOTP code typed with or without spaces, or None if it is not one."""
    candidate = "".join(code.split())
    return candidate if _TOTP_SHAPE.fullmatch(candidate) else None


def normalize_recovery_code(code: str) -> str | None:
    """A recovery code in its stored form (lower case, no dashes or spaces), or None if it is not one."""
    candidate = _SEPARATORS.sub("", code).lower()
    return candidate if _RECOVERY_SHAPE.fullmatch(candidate) else None


def hash_recovery_code(recovery_key: bytes, user_id: str, normalized: str) -> str:
    """The stored form of a recovery code: HMAC-SHA256 under the recovery key, bound to its user, hex."""
    return hmac.new(recovery_key, f"{user_id}:{normalized}".encode(), hashlib.sha256).hexdigest()


def _new_recovery_code() -> str:
    raw = "".join(secrets.choice(RECOVERY_ALPHABET) for _ in range(RECOVERY_CODE_CHARS))
    return "-".join(raw[i : i + 4] for i in range(0, RECOVERY_CODE_CHARS, 4))


def _at(now: float) -> datetime:
    return datetime.fromtimestamp(now, UTC)


def _audit(session: AsyncSession, actor: str, user: User, action: str, **data: object) -> None:
    audit(session, actor, user.tenant_id, action, user_id=user.id, **data)


def _require_human(user: User) -> None:
    if user.kind != "human":
        raise Forbidden(
            "MFA is for user accounts that log in with a password; service accounts use client credentials",
            code="mfa_not_applicable",
        )


def _require_active(user: User) -> None:
    if not mfa_enabled(user):
        raise Conflict(
            "MFA is not enabled for this account; enroll with POST /v1/auth/mfa/totp/enroll",
            code="mfa_not_enabled",
        )


def _open_secret(box: SecretBox, user: User) -> bytes:
    assert user.totp_secret is not None
    try:
        return box.open(user.totp_secret)
    except ValueError as exc:
        # The server secret changed since enrollment: no code can ever match, and only a reset helps.
        raise SomaError(
            "this account's TOTP secret does not open with the server's secret (was SOMA_SECRET_KEY "
            "changed?); a tenant admin must reset the user's MFA so they can enroll again",
            code="mfa_secret_unreadable",
        ) from exc


async def _account_label(session: AsyncSession, user: User) -> str:
    # Users are unique per tenant, so the tenant tells apart two accounts in one authenticator app.
    tenant_name = await session.scalar(select(Tenant.name).where(Tenant.id == user.tenant_id))
    return f"{tenant_name}/{user.username}" if tenant_name else user.username


async def _enrollment(session: AsyncSession, secret: bytes, user: User, issuer: str) -> TotpEnrollment:
    uri = totp.otpauth_uri(secret, await _account_label(session, user), issuer)
    return TotpEnrollment(secret=totp.base32_secret(secret), otpauth_uri=uri, qr_png=totp.qr_png(uri))


async def _advance_last_step(session: AsyncSession, user: User, step: int) -> bool:
    """Record `step` as the last accepted one, unless it (or a later one) already was.

    One conditional UPDATE decides, so two replicas checking the same code at the same moment cannot
    both accept it: the database lets exactly one of them move the step forward."""
    advanced = await session.execute(
        update(User)
        .where(
            User.id == user.id,
            User.tenant_id == user.tenant_id,
            or_(User.totp_last_step.is_(None), User.totp_last_step < step),
        )
        .values(totp_last_step=step)
        .execution_options(synchronize_session=False)
    )
    if advanced.rowcount != 1:  # type: ignore[attr-defined]
        return False
    set_committed_value(user, "totp_last_step", step)
    return True


async def _accept_totp(session: AsyncSession, box: SecretBox, user: User, code: str, now: float) -> bool:
    normalized = normalize_totp_code(code)
    if normalized is None or user.totp_secret is None:
        return False
    step = totp.matching_step(
        _open_secret(box, user), normalized, now, window=TOTP_WINDOW, digits=TOTP_DIGITS
    )
    return step is not None and await _advance_last_step(session, user, step)


async def _use_recovery_code(
    session: AsyncSession, recovery_key: bytes, user: User, code: str, now: float
) -> bool:
    normalized = normalize_recovery_code(code)
    if normalized is None:
        return False
    # Conditional on `used_at IS NULL`: of two concurrent uses of one code, one updates nothing.
    used = await session.execute(
        update(RecoveryCode)
        .where(
            RecoveryCode.user_id == user.id,
            RecoveryCode.code_hash == hash_recovery_code(recovery_key, user.id, normalized),
            RecoveryCode.used_at.is_(None),
        )
        .values(used_at=_at(now))
        .execution_options(synchronize_session=False)
    )
    return bool(used.rowcount == 1)  # type: ignore[attr-defined]


async def _check_code(
    session: AsyncSession, box: SecretBox, recovery_key: bytes, user: User, code: str, now: float
) -> SecondFactor | None:
    if await _accept_totp(session, box, user, code, now):
        return "otp"
    if await _use_recovery_code(session, recovery_key, user, code, now):
        _audit(
            session,
            f"user:{user.id}",
            user,
            "mfa.recovery_code_used",
            remaining=await recovery_codes_left(session, user),
        )
        return "recovery"
    return None


async def _replace_recovery_codes(
    session: AsyncSession, recovery_key: bytes, user: User, now: float
) -> list[str]:
    await session.execute(delete(RecoveryCode).where(RecoveryCode.user_id == user.id))
    codes = [_new_recovery_code() for _ in range(RECOVERY_CODE_COUNT)]
    created = _at(now)
    for code in codes:
        normalized = normalize_recovery_code(code)
        assert normalized is not None
        session.add(
            RecoveryCode(
                user_id=user.id,
                code_hash=hash_recovery_code(recovery_key, user.id, normalized),
                created_at=created,
                used_at=None,
            )
        )
    return codes


def _clear(user: User, now: float) -> None:
    user.totp_secret = None
    user.totp_confirmed_at = None
    user.totp_last_step = None
    user.updated_at = _at(now)


async def recovery_codes_left(session: AsyncSession, user: User) -> int:
    """How many of the user's recovery codes are still unused."""
    left = await session.scalar(
        select(func.count())
        .select_from(RecoveryCode)
        .where(RecoveryCode.user_id == user.id, RecoveryCode.used_at.is_(None))
    )
    return int(left or 0)


async def begin_totp_enrollment(
    session: AsyncSession, box: SecretBox, user: User, issuer: str
) -> TotpEnrollment:
    """Store a new sealed, unconfirmed TOTP secret (replacing an earlier unconfirmed one) and return it."""
    _require_human(user)
    if mfa_enabled(user):
        raise Conflict(
            "MFA is already active for this account; to enroll a new authenticator, turn it off first "
            "(DELETE /v1/auth/mfa/totp with a current code) or ask a tenant admin to reset your MFA",
            code="mfa_already_enabled",
        )
    secret = totp.generate_secret()
    user.totp_secret = box.seal(secret)
    user.totp_confirmed_at = None
    user.totp_last_step = None
    user.updated_at = datetime.now(UTC)
    return await _enrollment(session, secret, user, issuer)


async def pending_enrollment(
    session: AsyncSession, box: SecretBox, user: User, issuer: str
) -> TotpEnrollment:
    """The enrollment begun and not yet confirmed (for showing its QR code again)."""
    if user.totp_secret is None or user.totp_confirmed_at is not None:
        raise NotFound(
            "no TOTP enrollment is pending; start one with POST /v1/auth/mfa/totp/enroll",
            code="no_pending_enrollment",
        )
    return await _enrollment(session, _open_secret(box, user), user, issuer)


async def confirm_totp_enrollment(
    session: AsyncSession, box: SecretBox, recovery_key: bytes, user: User, code: str, now: float
) -> list[str]:
    """Check a code from the new authenticator, activate MFA, return 10 fresh recovery codes (shown once)."""
    _require_human(user)
    if mfa_enabled(user):
        raise Conflict("MFA is already active for this account", code="mfa_already_enabled")
    if user.totp_secret is None:
        raise Conflict(
            "no TOTP enrollment is pending; start one with POST /v1/auth/mfa/totp/enroll",
            code="no_pending_enrollment",
        )
    if not await _accept_totp(session, box, user, code, now):
        raise InvalidRequest(
            "invalid or already used code: enter the current 6-digit code your authenticator app shows "
            "for this account",
            code="invalid_mfa_code",
            param="code",
        )
    user.totp_confirmed_at = _at(now)
    user.updated_at = _at(now)
    codes = await _replace_recovery_codes(session, recovery_key, user, now)
    _audit(session, f"user:{user.id}", user, "mfa.enrolled", method="totp", recovery_codes=len(codes))
    return codes


async def verify_second_factor(
    session: AsyncSession, box: SecretBox, recovery_key: bytes, user: User, code: str, now: float
) -> SecondFactor:
    """`"otp"` or `"recovery"` if `code` is a current TOTP code or an unused recovery code, else raises."""
    method = await _check_code(session, box, recovery_key, user, code, now) if mfa_enabled(user) else None
    if method is None:
        raise Unauthenticated("invalid or already used code", code="invalid_mfa_code")
    return method


async def _verify_for_change(
    session: AsyncSession, box: SecretBox, recovery_key: bytes, user: User, code: str, now: float
) -> SecondFactor:
    _require_active(user)
    method = await _check_code(session, box, recovery_key, user, code, now)
    if method is None:
        raise InvalidRequest(
            "invalid or already used code: enter the current code from your authenticator app, or an unused "
            "recovery code",
            code="invalid_mfa_code",
            param="code",
        )
    return method


async def regenerate_recovery_codes(
    session: AsyncSession, box: SecretBox, recovery_key: bytes, user: User, code: str, now: float
) -> list[str]:
    """Replace every recovery code with 10 new ones, given a valid code; the old ones stop working."""
    method = await _verify_for_change(session, box, recovery_key, user, code, now)
    codes = await _replace_recovery_codes(session, recovery_key, user, now)
    _audit(session, f"user:{user.id}", user, "mfa.recovery_codes_regenerated", verified_with=method)
    return codes


async def disable_totp(
    session: AsyncSession, box: SecretBox, recovery_key: bytes, user: User, code: str, now: float
) -> None:
    """Turn MFA off, given a valid code; refused while the user's tenant requires MFA."""
    _require_active(user)
    required = await session.scalar(select(Tenant.require_mfa).where(Tenant.id == user.tenant_id))
    if required:
        raise Conflict(
            "your tenant requires MFA, so it cannot be turned off; to move to a new authenticator, ask a "
            "tenant admin to reset your MFA and enroll again",
            code="mfa_required",
        )
    method = await _verify_for_change(session, box, recovery_key, user, code, now)
    _clear(user, now)
    await session.execute(delete(RecoveryCode).where(RecoveryCode.user_id == user.id))
    _audit(session, f"user:{user.id}", user, "mfa.disabled", verified_with=method)


async def reset_mfa(session: AsyncSession, actor: Principal, user: User) -> None:
    """An admin's reset: clear the user's TOTP secret and recovery codes so they can enroll again."""
    if not actor.can_act_for(user.tenant_id):
        raise NotFound(f"no user {user.id!r}")
    if not actor.can(Capability.USERS_ADMIN):
        raise Forbidden(
            "resetting a user's MFA needs the `users:admin` capability", code="missing_capability"
        )
    had_mfa = mfa_enabled(user)
    _clear(user, datetime.now(UTC).timestamp())
    await session.execute(delete(RecoveryCode).where(RecoveryCode.user_id == user.id))
    _audit(session, actor.subject or f"user:{user.id}", user, "mfa.reset", was_enabled=had_mfa)
    add_event(
        session,
        notification_event(
            user.tenant_id,
            kind="security.mfa_reset",
            severity="critical" if had_mfa else "warning",
            message=f"The two-factor authentication of {user.username!r} was reset by {actor.subject}; "
            "enroll again at your next sign-in. If you did not ask for this, tell your administrator.",
            audience="user",
            user_id=user.id,
            metadata={"reset_by": actor.subject, "was_enabled": had_mfa},
            actor=actor.subject,
        ),
    )
