"""Where users log in from: a successful login from an address the user has never used before tells
them (a `security.new_login` notification), so a stolen password shows itself.

Owns: `note_login_address`. May import: core, db, events, identity.tables. Never: delivers (it stages
the notification in the login's own transaction).
"""

from __future__ import annotations

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from somaagent.core.clock import utcnow
from somaagent.db.statements import insert_skipping_duplicates
from somaagent.events.notices import notification_event
from somaagent.events.outbox import add_event
from somaagent.identity.tables import LoginAddress, User


async def note_login_address(session: AsyncSession, user: User, address: str | None, method: str) -> bool:
    """Record `address` for `user` in the login's transaction; True (and a notification staged) when it
    is new and not the user's first login ever, which needs no warning."""
    if not address:
        return False
    now = utcnow()
    inserted = await session.execute(
        insert_skipping_duplicates(session, LoginAddress, ["user_id", "address"]).values(
            user_id=user.id, address=address, tenant_id=user.tenant_id, first_seen_at=now, last_seen_at=now
        )
    )
    if getattr(inserted, "rowcount", 0) != 1:  # known address: only refresh when it was last used
        await session.execute(
            update(LoginAddress)
            .where(LoginAddress.user_id == user.id, LoginAddress.address == address)
            .values(last_seen_at=now)
        )
        return False
    # Only a new address needs the count: the usual login, from a known one, costs two statements.
    addresses = await session.scalar(
        select(func.count()).select_from(LoginAddress).where(LoginAddress.user_id == user.id)
    )
    if addresses == 1:  # the one just inserted: a first login ever is not news
        return False
    add_event(
        session,
        notification_event(
            user.tenant_id,
            kind="security.new_login",
            severity="warning",
            message=f"New sign-in to your account {user.username!r} from {address} ({method}). "
            "If this was not you, change your password and reset your MFA.",
            audience="user",
            user_id=user.id,
            metadata={"address": address, "method": method, "at": now.isoformat()},
            actor=f"user:{user.id}",
        ),
    )
    return True
