"""The objects one process shares between requests, built once by the app factory."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from somaagent.agents.runs import RunEngine
from somaagent.config import Settings
from somaagent.events.bus import EventBus
from somaagent.events.outbox import BufferedEmitter
from somaagent.events.relay import OutboxRelay
from somaagent.identity.authenticator import Authenticator
from somaagent.identity.federation import FederationVerifier
from somaagent.identity.login import Logins
from somaagent.identity.secret_box import SecretBox
from somaagent.identity.tokens import TokenService
from somaagent.identity.training import TrainingLocks
from somaagent.memory.document_worker import DocumentWorker
from somaagent.memory.documents import DocumentIngest
from somaagent.memory.service import MemoryService
from somaagent.models.catalog import ModelCatalog
from somaagent.models.profiles import ProfileCache
from somaagent.models.providers.upstream_http import UpstreamClient
from somaagent.models.router import ModelRouter
from somaagent.observability.metrics import Metrics
from somaagent.policy.budgets import Budgets
from somaagent.policy.constitution import Constitutions
from somaagent.policy.decisions import PolicyService
from somaagent.policy.limits import RateLimits
from somaagent.policy.prices import PriceBook
from somaagent.policy.ratelimit import RateLimiter
from somaagent.tools.approvals import ApprovalGate
from somaagent.tools.mcp_servers import McpAccess
from somaagent.tools.registry import ToolCaller, ToolRegistry

if TYPE_CHECKING:  # the components' modules import api.deps, which imports this one
    from somaagent.api.analytics import AnalyticsComponent
    from somaagent.api.billing import BillingComponent
    from somaagent.api.notifications import NotificationsComponent


@dataclass
class Services:
    """Everything a route may need, injected through `api/deps.py`."""

    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    secret: bytes
    authenticator: Authenticator
    tokens: TokenService
    logins: Logins
    federation: FederationVerifier
    mfa_box: SecretBox  # seals TOTP secrets
    recovery_key: bytes  # keys the hashes of MFA recovery codes
    catalog: ModelCatalog
    router: ModelRouter
    bus: EventBus
    relay: OutboxRelay
    emitter: BufferedEmitter
    metrics: Metrics
    profiles: ProfileCache
    memory: MemoryService
    documents: DocumentIngest
    document_worker: DocumentWorker
    tools: ToolRegistry
    agents: RunEngine
    mcp: McpAccess
    training: TrainingLocks
    constitutions: Constitutions  # each tenant's signed constitution, verified and cached
    policy: PolicyService  # every decision: input, tool calls, memory writes, streamed output
    rate_limits: RateLimits  # rpm/tpm/concurrency settings and their resolution for a caller
    rate_limiter: RateLimiter  # counts them (in-process or Redis)
    prices: PriceBook
    budgets: Budgets  # budget settings, reservations and the sweeper
    call_tool: ToolCaller  # a tool call through its gates (policy, approval), as agents make them
    approvals: ApprovalGate  # holds risky tool calls for a person; decides them
    billing: BillingComponent  # the ledger, its rollups, exports and invoices
    analytics: AnalyticsComponent  # rollups, the dashboard, anomalies
    notifications: NotificationsComponent  # queue, channels, preferences, live push
    http_clients: list[UpstreamClient] = field(default_factory=list)
    readiness: list[tuple[str, Callable[[], Awaitable[None]]]] = field(default_factory=list)
    started_at: int = 0

    async def catch_up(self) -> None:
        """Read-your-writes before a read: this process's buffered usage is committed and its pending
        events relayed, so a caller sees what it just did (the in-process bus applies them before this
        returns; a broker's consumers a moment later). Never fails for a broker that is down."""
        await self.emitter.flush()
        await self.relay.catch_up()
