"""The MFA service on a real, freshly migrated database (SQLite and PostgreSQL): enrollment, second-factor
checks, replay refusal across concurrent sessions, recovery codes, disable, admin reset, and audit rows
that carry no secrets."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from dataclasses import dataclass

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.core.clock import utcnow
from somaagent.core.errors import Conflict, Forbidden, InvalidRequest, NotFound, Unauthenticated
from somaagent.core.ids import new_id
from somaagent.core.principal import Principal
from somaagent.events.schemas import AUDIT_EVENTS
from somaagent.events.tables import OutboxEvent
from somaagent.identity import mfa, totp
from somaagent.identity.capabilities import Capability, capabilities_of_role
from somaagent.identity.secret_box import SecretBox
from somaagent.identity.tables import RecoveryCode, Tenant, User

BOX = SecretBox(secrets.token_bytes(32), "totp")
RECOVERY_KEY = secrets.token_bytes(32)
ISSUER = "SomaAgent"
T0 = 1_800_000_010.0  # 10 s into a 30-second step


@dataclass
class Account:
    tenant_id: str
    tenant_name: str
    user_id: str


async def make_account(
    sessions: async_sessionmaker[AsyncSession], *, kind: str = "human", require_mfa: bool = False
) -> Account:
    now = utcnow()
    tenant = Tenant(
        id=new_id("ten"),
        name=f"t-{secrets.token_hex(4)}",
        created_at=now,
        disabled=False,
        require_mfa=require_mfa,
    )
    user = User(
        id=new_id("usr"),
        tenant_id=tenant.id,
        username="alice",
        kind=kind,
        role="member",
        secret_hash="placeholder-not-a-real-hash",
        disabled=False,
        created_at=now,
        updated_at=now,
    )
    async with sessions() as session:
        session.add(tenant)
        await session.flush()
        session.add(user)
        await session.commit()
    return Account(tenant.id, tenant.name, user.id)


async def load(session: AsyncSession, account: Account) -> User:
    user = await session.scalar(
        select(User).where(User.id == account.user_id, User.tenant_id == account.tenant_id)
    )
    assert user is not None
    return user


async def enroll(sessions: async_sessionmaker[AsyncSession], account: Account) -> tuple[bytes, list[str]]:
    """Enroll and confirm at T0; returns the raw secret and the recovery codes."""
    async with sessions() as session:
        user = await load(session, account)
        enrollment = await mfa.begin_totp_enrollment(session, BOX, user, ISSUER)
        await session.commit()
    secret = totp_secret(enrollment)
    async with sessions() as session:
        user = await load(session, account)
        codes = await mfa.confirm_totp_enrollment(session, BOX, RECOVERY_KEY, user, totp.totp(secret, T0), T0)
        await session.commit()
    return secret, codes


def totp_secret(enrollment: mfa.TotpEnrollment) -> bytes:
    return base64.b32decode(enrollment.secret + "=" * (-len(enrollment.secret) % 8))


def wrong_code(secret: bytes, at: float) -> str:
    """A well-formed code that no step inside the window produces."""
    valid = {totp.totp(secret, at + 30 * offset) for offset in (-1, 0, 1)}
    return next(c for c in ("000000", "111111", "222222", "333333") if c not in valid)


async def verify(
    sessions: async_sessionmaker[AsyncSession],
    account: Account,
    code: str,
    at: float,
    loaded: asyncio.Barrier | None = None,
) -> str | None:
    """One login's second-factor check in its own transaction: the method, or None when refused.
    With `loaded`, waits until every racing login has read the user row before checking."""
    async with sessions() as session:
        user = await load(session, account)
        if loaded is not None:
            await loaded.wait()
        try:
            method = await mfa.verify_second_factor(session, BOX, RECOVERY_KEY, user, code, at)
        except Unauthenticated as exc:
            assert exc.code == "invalid_mfa_code"
            assert exc.message == "invalid or already used code"
            return None
        await session.commit()
        return method


async def audit_rows(sessions: async_sessionmaker[AsyncSession], account: Account) -> list[OutboxEvent]:
    async with sessions() as session:
        rows = await session.scalars(
            select(OutboxEvent)
            .where(OutboxEvent.tenant_id == account.tenant_id, OutboxEvent.topic == "audit.events")
            .order_by(OutboxEvent.seq)
        )
        return list(rows)


async def test_enroll_confirm_verify(sessions: async_sessionmaker[AsyncSession]) -> None:
    account = await make_account(sessions)
    async with sessions() as session:
        user = await load(session, account)
        assert not mfa.mfa_enabled(user)
        enrollment = await mfa.begin_totp_enrollment(session, BOX, user, ISSUER)
        await session.commit()
    secret = totp_secret(enrollment)
    assert len(secret) == 20
    assert enrollment.otpauth_uri.startswith(f"otpauth://totp/{ISSUER}:{account.tenant_name}%2Falice?")
    assert f"secret={enrollment.secret}" in enrollment.otpauth_uri
    assert enrollment.qr_png.startswith(b"\x89PNG\r\n\x1a\n")

    async with sessions() as session:
        user = await load(session, account)
        # Sealed at rest: the stored value is not the secret, and opens back to it.
        assert user.totp_secret is not None
        assert enrollment.secret not in user.totp_secret
        assert BOX.open(user.totp_secret) == secret
        assert user.totp_confirmed_at is None
        assert not mfa.mfa_enabled(user)
        # Not active yet: a code does not pass as a second factor.
        with pytest.raises(Unauthenticated):
            await mfa.verify_second_factor(session, BOX, RECOVERY_KEY, user, totp.totp(secret, T0), T0)
        pending = await mfa.pending_enrollment(session, BOX, user, ISSUER)
        assert pending.secret == enrollment.secret

    async with sessions() as session:
        user = await load(session, account)
        with pytest.raises(InvalidRequest) as wrong:
            await mfa.confirm_totp_enrollment(
                session,
                BOX,
                RECOVERY_KEY,
                user,
                wrong_code(secret, T0),
                T0,
            )
        assert wrong.value.code == "invalid_mfa_code"
        codes = await mfa.confirm_totp_enrollment(session, BOX, RECOVERY_KEY, user, totp.totp(secret, T0), T0)
        await session.commit()
    assert len(codes) == mfa.RECOVERY_CODE_COUNT == len(set(codes))
    assert all(mfa.normalize_recovery_code(c) for c in codes)

    async with sessions() as session:
        user = await load(session, account)
        assert mfa.mfa_enabled(user)
        assert user.totp_confirmed_at is not None
        assert user.totp_last_step == totp.time_step(T0)
        assert await mfa.recovery_codes_left(session, user) == 10
        with pytest.raises(NotFound):
            await mfa.pending_enrollment(session, BOX, user, ISSUER)
        with pytest.raises(Conflict):
            await mfa.begin_totp_enrollment(session, BOX, user, ISSUER)
        stored = set(
            await session.scalars(select(RecoveryCode.code_hash).where(RecoveryCode.user_id == user.id))
        )
    # Stored as keyed hashes, never as the codes.
    assert len(stored) == 10
    assert not stored & {mfa.normalize_recovery_code(c) for c in codes}

    # The confirming code was spent; the next step's code is a valid second factor.
    assert await verify(sessions, account, totp.totp(secret, T0), T0) is None
    assert await verify(sessions, account, totp.totp(secret, T0 + 30), T0 + 30) == "otp"
    assert [r.type for r in await audit_rows(sessions, account)] == ["mfa.enrolled"]


async def test_a_new_enrollment_replaces_an_unconfirmed_one(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    account = await make_account(sessions)
    async with sessions() as session:
        user = await load(session, account)
        first = await mfa.begin_totp_enrollment(session, BOX, user, ISSUER)
        await session.commit()
    async with sessions() as session:
        user = await load(session, account)
        second = await mfa.begin_totp_enrollment(session, BOX, user, ISSUER)
        await session.commit()
    assert first.secret != second.secret
    async with sessions() as session:
        user = await load(session, account)
        with pytest.raises(InvalidRequest):
            await mfa.confirm_totp_enrollment(
                session, BOX, RECOVERY_KEY, user, totp.totp(totp_secret(first), T0), T0
            )
    async with sessions() as session:
        user = await load(session, account)
        await mfa.confirm_totp_enrollment(
            session, BOX, RECOVERY_KEY, user, totp.totp(totp_secret(second), T0), T0
        )
        await session.commit()
        assert mfa.mfa_enabled(user)


async def test_confirm_without_enrollment_and_service_accounts(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    account = await make_account(sessions)
    async with sessions() as session:
        user = await load(session, account)
        with pytest.raises(Conflict) as none_pending:
            await mfa.confirm_totp_enrollment(session, BOX, RECOVERY_KEY, user, "123456", T0)
        assert none_pending.value.code == "no_pending_enrollment"
        with pytest.raises(Unauthenticated):
            await mfa.verify_second_factor(session, BOX, RECOVERY_KEY, user, "123456", T0)
    service = await make_account(sessions, kind="service")
    async with sessions() as session:
        user = await load(session, service)
        with pytest.raises(Forbidden):
            await mfa.begin_totp_enrollment(session, BOX, user, ISSUER)


async def test_replay_and_window(sessions: async_sessionmaker[AsyncSession]) -> None:
    account = await make_account(sessions)
    secret, _ = await enroll(sessions, account)
    at = T0 + 300
    code = totp.totp(secret, at)
    assert await verify(sessions, account, code, at) == "otp"
    assert await verify(sessions, account, code, at) is None  # the same code twice
    assert await verify(sessions, account, code, at + 20) is None  # still inside the window: still a replay
    # One step late is accepted (typing time); then anything at or before that step is a replay.
    later = at + 90
    assert await verify(sessions, account, totp.totp(secret, later - 30), later) == "otp"
    assert await verify(sessions, account, totp.totp(secret, later - 30), later) is None
    # One step early (a fast clock) is accepted, and moves the bar past the current step too.
    assert await verify(sessions, account, totp.totp(secret, later + 30), later) == "otp"
    assert await verify(sessions, account, totp.totp(secret, later), later) is None
    # Two steps away is outside the window.
    far = later + 600
    assert await verify(sessions, account, totp.totp(secret, far + 60), far) is None
    assert await verify(sessions, account, totp.totp(secret, far - 60), far) is None
    assert await verify(sessions, account, totp.totp(secret, far), far) == "otp"
    assert await verify(sessions, account, "12345", far) is None
    assert await verify(sessions, account, "not a code", far) is None


async def test_two_concurrent_verifications_of_one_code(sessions: async_sessionmaker[AsyncSession]) -> None:
    account = await make_account(sessions)
    secret, _ = await enroll(sessions, account)
    for attempt in range(5):
        at = T0 + 600 + 60 * attempt
        code = totp.totp(secret, at)
        # Both have read the row (and its old last step) before either checks: only the database decides.
        loaded = asyncio.Barrier(2)
        results = await asyncio.gather(
            verify(sessions, account, code, at, loaded), verify(sessions, account, code, at, loaded)
        )
        assert sorted(results, key=str) == [None, "otp"], results
    async with sessions() as session:
        assert (await load(session, account)).totp_last_step == totp.time_step(T0 + 600 + 60 * 4)


async def test_recovery_codes_are_single_use(sessions: async_sessionmaker[AsyncSession]) -> None:
    account = await make_account(sessions)
    _, codes = await enroll(sessions, account)
    assert await verify(sessions, account, codes[0], T0) == "recovery"
    assert await verify(sessions, account, codes[0], T0) is None
    # Case, dashes and spaces do not matter.
    typed = codes[1].replace("-", " ").upper()
    assert await verify(sessions, account, typed, T0) == "recovery"
    assert await verify(sessions, account, codes[1], T0) is None
    # Two logins racing with one code: exactly one gets in.
    loaded = asyncio.Barrier(2)
    results = await asyncio.gather(
        verify(sessions, account, codes[2], T0, loaded), verify(sessions, account, codes[2], T0, loaded)
    )
    assert sorted(results, key=str) == [None, "recovery"]
    assert await verify(sessions, account, "abcd-efgh-jkmn", T0) is None
    async with sessions() as session:
        assert await mfa.recovery_codes_left(session, await load(session, account)) == 7
    used = [r for r in await audit_rows(sessions, account) if r.type == "mfa.recovery_code_used"]
    assert [r.data["remaining"] for r in used] == [9, 8, 7]
    assert {r.actor for r in used} == {f"user:{account.user_id}"}


async def test_one_users_recovery_code_does_not_work_for_another(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    alice = await make_account(sessions)
    bob = await make_account(sessions)
    _, alice_codes = await enroll(sessions, alice)
    await enroll(sessions, bob)
    assert await verify(sessions, bob, alice_codes[0], T0) is None
    assert await verify(sessions, alice, alice_codes[0], T0) == "recovery"


async def test_regenerate_invalidates_old_codes(sessions: async_sessionmaker[AsyncSession]) -> None:
    account = await make_account(sessions)
    secret, old = await enroll(sessions, account)
    at = T0 + 60
    async with sessions() as session:
        user = await load(session, account)
        with pytest.raises(InvalidRequest) as refused:
            await mfa.regenerate_recovery_codes(session, BOX, RECOVERY_KEY, user, "abcd-efgh-jkmn", at)
        assert refused.value.code == "invalid_mfa_code"
    async with sessions() as session:
        user = await load(session, account)
        new = await mfa.regenerate_recovery_codes(session, BOX, RECOVERY_KEY, user, totp.totp(secret, at), at)
        await session.commit()
    assert len(new) == 10
    assert not set(new) & set(old)
    for code in old[:3]:
        assert await verify(sessions, account, code, at) is None
    assert await verify(sessions, account, new[0], at) == "recovery"
    # A recovery code may authorize the regeneration itself (the authenticator is lost).
    async with sessions() as session:
        user = await load(session, account)
        newer = await mfa.regenerate_recovery_codes(session, BOX, RECOVERY_KEY, user, new[1], at)
        await session.commit()
        assert await mfa.recovery_codes_left(session, user) == 10
    assert await verify(sessions, account, new[2], at) is None
    assert await verify(sessions, account, newer[0], at) == "recovery"
    kinds = [r.type for r in await audit_rows(sessions, account)]
    assert kinds.count("mfa.recovery_codes_regenerated") == 2


async def test_disable_needs_a_valid_code(sessions: async_sessionmaker[AsyncSession]) -> None:
    account = await make_account(sessions)
    secret, codes = await enroll(sessions, account)
    at = T0 + 120
    async with sessions() as session:
        user = await load(session, account)
        with pytest.raises(InvalidRequest):
            await mfa.disable_totp(session, BOX, RECOVERY_KEY, user, wrong_code(secret, at), at)
        await session.rollback()
    async with sessions() as session:
        user = await load(session, account)
        assert mfa.mfa_enabled(user)
        await mfa.disable_totp(session, BOX, RECOVERY_KEY, user, totp.totp(secret, at), at)
        await session.commit()
    async with sessions() as session:
        user = await load(session, account)
        assert not mfa.mfa_enabled(user)
        assert (user.totp_secret, user.totp_confirmed_at, user.totp_last_step) == (None, None, None)
        assert await mfa.recovery_codes_left(session, user) == 0
        with pytest.raises(Conflict) as off:
            await mfa.disable_totp(session, BOX, RECOVERY_KEY, user, totp.totp(secret, at + 30), at + 30)
        assert off.value.code == "mfa_not_enabled"
    assert await verify(sessions, account, codes[0], at) is None
    assert await verify(sessions, account, totp.totp(secret, at + 60), at + 60) is None
    assert [r.type for r in await audit_rows(sessions, account)][-1] == "mfa.disabled"


async def test_disable_is_refused_when_the_tenant_requires_mfa(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    account = await make_account(sessions, require_mfa=True)
    secret, _ = await enroll(sessions, account)
    at = T0 + 60
    async with sessions() as session:
        user = await load(session, account)
        with pytest.raises(Conflict) as refused:
            await mfa.disable_totp(session, BOX, RECOVERY_KEY, user, totp.totp(secret, at), at)
        assert refused.value.code == "mfa_required"
    # The refusal did not spend the code.
    assert await verify(sessions, account, totp.totp(secret, at), at) == "otp"


def admin_of(account: Account) -> Principal:
    return Principal(
        tenant_id=account.tenant_id,
        tenant_name=account.tenant_name,
        subject="user:usr_admin",
        key_id=None,
        capabilities=capabilities_of_role("admin"),
        user_id="usr_admin",
        role="admin",
    )


async def test_admin_reset_clears_everything(sessions: async_sessionmaker[AsyncSession]) -> None:
    account = await make_account(sessions)
    other = await make_account(sessions)
    secret, codes = await enroll(sessions, account)
    member = Principal(
        tenant_id=account.tenant_id,
        tenant_name=account.tenant_name,
        subject="user:usr_member",
        key_id=None,
        capabilities=capabilities_of_role("member"),
        user_id="usr_member",
        role="member",
    )
    assert Capability.USERS_ADMIN not in member.capabilities
    async with sessions() as session:
        user = await load(session, account)
        with pytest.raises(Forbidden):
            await mfa.reset_mfa(session, member, user)
        with pytest.raises(NotFound):
            await mfa.reset_mfa(session, admin_of(other), user)  # another tenant's admin
        assert mfa.mfa_enabled(user)
        await mfa.reset_mfa(session, admin_of(account), user)
        await session.commit()
    async with sessions() as session:
        user = await load(session, account)
        assert (user.totp_secret, user.totp_confirmed_at, user.totp_last_step) == (None, None, None)
        count = await session.scalar(
            select(func.count()).select_from(RecoveryCode).where(RecoveryCode.user_id == user.id)
        )
        assert count == 0
    assert await verify(sessions, account, codes[0], T0 + 60) is None
    assert await verify(sessions, account, totp.totp(secret, T0 + 60), T0 + 60) is None
    reset = (await audit_rows(sessions, account))[-1]
    assert (reset.type, reset.actor, reset.data) == (
        "mfa.reset",
        "user:usr_admin",
        {"user_id": account.user_id, "was_enabled": True},
    )
    # The user can enroll again.
    await enroll(sessions, account)


async def test_audit_rows_carry_no_secrets(sessions: async_sessionmaker[AsyncSession]) -> None:
    account = await make_account(sessions)
    async with sessions() as session:
        user = await load(session, account)
        enrollment = await mfa.begin_totp_enrollment(session, BOX, user, ISSUER)
        await session.commit()
        sealed = user.totp_secret
    secret = totp_secret(enrollment)
    spent: list[str] = [totp.totp(secret, T0)]
    async with sessions() as session:
        user = await load(session, account)
        codes = await mfa.confirm_totp_enrollment(session, BOX, RECOVERY_KEY, user, spent[0], T0)
        await session.commit()
    assert await verify(sessions, account, codes[0], T0) == "recovery"
    at = T0 + 30
    spent.append(totp.totp(secret, at))
    async with sessions() as session:
        user = await load(session, account)
        new_codes = await mfa.regenerate_recovery_codes(session, BOX, RECOVERY_KEY, user, spent[-1], at)
        await session.commit()
    at += 30
    spent.append(totp.totp(secret, at))
    async with sessions() as session:
        user = await load(session, account)
        await mfa.disable_totp(session, BOX, RECOVERY_KEY, user, spent[-1], at)
        await session.commit()

    rows = await audit_rows(sessions, account)
    assert [r.type for r in rows] == [
        "mfa.enrolled",
        "mfa.recovery_code_used",
        "mfa.recovery_codes_regenerated",
        "mfa.disabled",
    ]
    assert {r.topic for r in rows} == {AUDIT_EVENTS}
    assert {r.actor for r in rows} == {f"user:{account.user_id}"}
    forbidden = {enrollment.secret, enrollment.secret.lower(), secret.hex(), str(sealed)}
    for code in codes + new_codes:
        forbidden |= {code, code.replace("-", ""), code.upper()}
    for row in rows:
        text = json.dumps(row.data)
        assert not [f for f in forbidden if f in text], row.type
        assert row.data["user_id"] == account.user_id
        # Beyond the user id, only small counts and method names: never a code.
        others = [v for k, v in row.data.items() if k != "user_id"]
        assert all(isinstance(v, int) or v in ("totp", "otp", "recovery") for v in others), row.data
        assert not set(map(str, row.data.values())) & set(spent)
