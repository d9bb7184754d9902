"""The governed model call: rate limits, budget reservations and output checks around every model call.

Owns: `ModelCallGovernor` (the router's `CallGuard`) and `GovernedCall` (its ticket).
May import: core, events, observability, policy. Never: api, agents, models (it is handed ids and counts).

Admission takes the caller's rate limits (requests, worst-case tokens, a concurrency lease) and
reserves the worst case on every budget over the caller, all or nothing; settling gives back what was
not used. Settling runs shielded from cancellation: a client that disconnects cancels the request's
task, and a settle cut off half way would leave the reservation to the sweeper (charged in full).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from somaagent.core.ids import new_id
from somaagent.core.principal import Principal
from somaagent.observability.context import add_response_headers
from somaagent.policy.budgets import Budgets, Reservation
from somaagent.policy.decisions import OutputGuard, PolicyService
from somaagent.policy.limits import RateLimits
from somaagent.policy.prices import PriceBook, cost_micros
from somaagent.policy.ratelimit import RateLease, RateLimiter

log = logging.getLogger(__name__)


class GovernedCall:
    """One admitted call: checks its output, then settles exactly once."""

    def __init__(
        self,
        governor: ModelCallGovernor,
        lease: RateLease | None,
        reservation: Reservation | None,
        guard: OutputGuard | None,
    ) -> None:
        self._governor = governor
        self._lease = lease
        self._reservation = reservation
        self._guard = guard
        self._settled = False

    async def output(self, text: str) -> str:
        """The part of the output so far that is checked and may be shown."""
        return await self._guard.feed(text) if self._guard is not None else text

    async def finish_output(self) -> str:
        """The checked tail once the model has finished."""
        return await self._guard.finish() if self._guard is not None else ""

    async def settle(self, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Give back what the call did not use (idempotent; survives the caller's cancellation)."""
        if self._settled:
            return
        self._settled = True
        work = asyncio.ensure_future(self._governor.settle(self, model, prompt_tokens, completion_tokens))
        await asyncio.shield(work)


class ModelCallGovernor:
    """The router's `CallGuard`."""

    def __init__(
        self,
        limits: RateLimits,
        limiter: RateLimiter,
        budgets: Budgets,
        prices: PriceBook,
        policy: PolicyService,
    ) -> None:
        self._limits = limits
        self._limiter = limiter
        self._budgets = budgets
        self._prices = prices
        self._policy = policy

    async def admit(
        self, principal: Principal, kind: str, models: list[str], prompt_tokens: int, max_output_tokens: int
    ) -> GovernedCall:
        """Take the rate limits and reserve the budgets, or raise `RateLimited` / `BudgetExceeded`."""
        scopes = await self._limits.for_principal(principal)
        lease = None
        if scopes:
            lease = await self._limiter.acquire(new_id("lease"), scopes, prompt_tokens + max_output_tokens)
        reservation = None
        try:
            model = await self._priciest(models, prompt_tokens, max_output_tokens)
            reservation = await self._budgets.reserve(principal, model, prompt_tokens, max_output_tokens)
            guard = None
            if kind == "chat":
                guard = await self._policy.output_guard(principal, {"model": models[0] if models else None})
        except BaseException:
            if reservation is not None:
                await self._budgets.settle(reservation, 0, 0)
            if lease is not None:
                await self._limiter.release(lease, 0)
            raise
        if lease is not None:
            add_response_headers(lease.headers)
        return GovernedCall(self, lease, reservation, guard)

    async def settle(
        self, call: GovernedCall, model: str, prompt_tokens: int, completion_tokens: int
    ) -> None:
        """Settle the budgets to the real usage and free the rate-limit lease."""
        try:
            if call._reservation is not None:
                await self._budgets.settle(call._reservation, prompt_tokens, completion_tokens, model=model)
        except Exception:  # the sweeper settles it (in full) once it expires
            log.exception("could not settle budget reservation for %s", model)
        try:
            if call._lease is not None:
                await self._limiter.release(call._lease, prompt_tokens + completion_tokens)
        except Exception:  # the lease's deadline frees it
            log.exception("could not release a rate-limit lease for %s", model)

    async def _priciest(self, models: Sequence[str], prompt_tokens: int, max_output_tokens: int) -> str:
        """The candidate whose worst case costs most (a fallback may answer): reserving its price covers
        whichever answers. An unpriced candidate comes first, so a money budget refuses it by name."""
        if len(models) <= 1:
            return models[0] if models else ""
        costs = []
        for model in models:
            price = await self._prices.price(model)
            if price is None:
                return model
            costs.append((cost_micros(price, prompt_tokens, max_output_tokens), model))
        return max(costs)[1]
