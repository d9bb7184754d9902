"""The objects one process shares between requests, built once by the app factory."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from somaagent.agents.runs import RunEngine
from somaagent.config import Settings
from somaagent.events.bus import InProcessBus
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
from somaagent.tools.mcp_servers import McpAccess
from somaagent.tools.registry import ToolRegistry


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
    bus: InProcessBus
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
    http_clients: list[UpstreamClient] = field(default_factory=list)
    readiness: list[tuple[str, Callable[[], Awaitable[None]]]] = field(default_factory=list)
    started_at: int = 0
