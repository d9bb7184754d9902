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


# Settles and give-backs running past their caller's cancellation: the loop keeps only weak references.
_IN_FLIGHT: set[asyncio.Future[None]] = set()


def _keep(work: asyncio.Future[None]) -> asyncio.Future[None]:
    _IN_FLIGHT.add(work)
    work.add_done_callback(_IN_FLIGHT.discard)
    return work


class GovernedCall:
    """One admitted call: checks its output, then settles exactly once."""

    def __init__(
        self,
        limiter: RateLimiter,
        budgets: Budgets,
        lease: RateLease | None,
        reservation: Reservation | None,
        guard: OutputGuard | None,
    ) -> None:
        self._limiter = limiter
        self._budgets = budgets
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
        await asyncio.shield(
            _keep(asyncio.ensure_future(self._settle(model, prompt_tokens, completion_tokens)))
        )

    async def _settle(self, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        try:
            if self._reservation is not None:
                await self._budgets.settle(self._reservation, prompt_tokens, completion_tokens, model=model)
        except Exception:  # the sweeper settles it (in full) once it expires
            log.exception("could not settle budget reservation for %s", model)
        try:
            if self._lease is not None:
                await self._limiter.release(self._lease, prompt_tokens + completion_tokens)
        except Exception:  # the lease's deadline frees it
            log.exception("could not release a rate-limit lease for %s", model)


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
        """Take the rate limits and reserve the budgets, or raise `RateLimited` / `BudgetExceeded`.

        Admission runs shielded: a caller cancelled half way (the client left) must not leave a lease or a
        reservation behind that nobody settles; what a finished admission took is given back at once."""
        work = asyncio.ensure_future(self._admit(principal, kind, models, prompt_tokens, max_output_tokens))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            work.add_done_callback(_give_back)
            raise

    async def _admit(
        self, principal: Principal, kind: str, models: list[str], prompt_tokens: int, max_output_tokens: int
    ) -> GovernedCall:
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
            await GovernedCall(self._limiter, self._budgets, lease, reservation, None).settle("", 0, 0)
            raise
        if lease is not None:
            add_response_headers(lease.headers)
        return GovernedCall(self._limiter, self._budgets, lease, reservation, guard)

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


def _give_back(work: asyncio.Future[GovernedCall]) -> None:
    """After an admission whose caller was cancelled: release what it took, if it took anything."""
    if work.cancelled() or work.exception() is not None:
        return
    _keep(asyncio.ensure_future(work.result().settle("", 0, 0)))
