"""Budget alerts: tell a tenant's admins (and a user, of their own budget) when a budget's spend in its
current period reaches 80 % and 100 % of its limit.

Owns: `BudgetAlerts` (a periodic pass over every budget's counters). May import: core, db, events,
policy. Never: delivers anything (it stages `notifications.outbound` events; notifications decides who
hears what, where and when).

Why a periodic pass, not a check in `settle`: the pass reads every budget's counters in one store round
trip every `interval_s`, so the request path pays nothing; an alert a few seconds late is fine, and a call
that would overspend is refused at reservation anyway. Every replica runs the pass; the notification id
is derived from (budget, period, threshold), so however many replicas see a crossing, people hear of it
once per period.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from somaagent.core.periodic import Periodic
from somaagent.events.notices import Severity, notification_event
from somaagent.events.outbox import insert_events
from somaagent.events.schemas import Event
from somaagent.policy.budgets import Budgets, BudgetStatus

log = logging.getLogger(__name__)

THRESHOLDS: tuple[tuple[int, Severity], ...] = ((100, "critical"), (80, "warning"))  # highest first


def _amount(status: BudgetStatus, amount: int) -> str:
    if status.budget.unit == "usd":
        return f"${amount / 1_000_000:,.2f}"
    return f"{amount:,} tokens"


def _notices(status: BudgetStatus) -> list[Event]:
    """The alerts `status` calls for: the highest threshold reached, none below 80 %."""
    budget = status.budget
    if budget.limit <= 0:
        return []
    percent = status.spent * 100 // budget.limit
    for threshold, severity in THRESHOLDS:
        if percent < threshold:
            continue
        period = status.period_start.date().isoformat()
        message = (
            f"Budget {budget.id} ({budget.scope} {budget.scope_id}, {budget.period}) has used {percent}% "
            f"of its limit: {_amount(status, status.spent)} of {_amount(status, budget.limit)}"
        )
        metadata = {
            "budget_id": budget.id,
            "scope": budget.scope,
            "scope_id": budget.scope_id,
            "unit": budget.unit,
            "limit": budget.limit,
            "spent": status.spent,
            "threshold": threshold,
            "period_start": status.period_start.isoformat(),
            "resets_at": status.resets_at.isoformat() if status.resets_at else None,
        }
        key = f"budget:{budget.id}:{period}:{threshold}"
        found = [
            notification_event(
                budget.tenant_id,
                kind="budget.threshold",
                severity=severity,
                message=message,
                metadata=metadata,
                dedupe_key=key,
            )
        ]
        if budget.scope == "user":  # the person whose budget it is hears of it too
            found.append(
                notification_event(
                    budget.tenant_id,
                    kind="budget.threshold",
                    severity=severity,
                    message=message,
                    audience="user",
                    user_id=budget.scope_id,
                    metadata=metadata,
                    dedupe_key=f"{key}:user",
                )
            )
        return found
    return []


class BudgetAlerts:
    """Checks every budget every `interval_s` and stages an alert per crossing, once per process and
    period (the notification id makes it once across processes)."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        budgets: Budgets,
        interval_s: float,
        on_outbox: Callable[[], None],
    ) -> None:
        self._sessions = sessions
        self._budgets = budgets
        self._on_outbox = on_outbox
        self._told: set[str] = set()  # notification ids staged by this process
        self._periodic = Periodic("budget alert pass", self.check, interval_s, log=log)

    async def check(self) -> int:
        """One pass: stage the alerts not yet staged; returns how many."""
        budgets = await self._budgets.every_budget()
        if not budgets:
            return 0
        notices = [event for status in await self._budgets.statuses(budgets) for event in _notices(status)]
        # Only what still crosses needs remembering: a past period's ids (or a raised limit's) go, so the
        # set stays as small as the budgets over a threshold now.
        self._told &= {event.data["notification_id"] for event in notices}
        fresh = [event for event in notices if event.data["notification_id"] not in self._told]
        if fresh:
            async with self._sessions() as session, session.begin():
                await insert_events(session, fresh)
            self._told.update(e.data["notification_id"] for e in fresh)
            self._on_outbox()
        return len(fresh)

    def start(self) -> None:
        """Check in the background every `interval_s`."""
        self._periodic.start()

    async def close(self) -> None:
        """Stop checking."""
        await self._periodic.close()
