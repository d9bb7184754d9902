"""Gateway overhead and throughput: what `soma serve` adds in front of an upstream.

Setup (all on 127.0.0.1, fresh temp SOMA_DATA_DIR, every process stopped at exit or Ctrl-C):
- `bench/static_upstream.py`, a benchmark-only upstream that answers instantly with fixed bytes;
- `soma serve` with it as the extra chat model `static` (auth, routing, metrics and `model.usage`
  events all on, as in production; access log off, the default).

Measured, with a pure-asyncio keep-alive HTTP/1.1 client (one connection per concurrent caller,
no pipelining, on uvloop) running on the same 2 cores as the servers:
1. concurrency 1, in alternating rounds so machine noise hits each the same:
   `POST /v1/chat/completions` sent directly to the static upstream, and through the gateway
   (model `static`, Bearer admin key), plus `GET /v1/models` through the gateway.
   Added latency = gateway - direct, at p50 and p99.
2. gateway CPU seconds per request: utime+stime from /proc/<pid>/stat (the process and its
   children) before and after each run, divided by the requests served. Background work
   (outbox flushes, usage consumer) done in the run window is included.
3. requests/s and p50/p99 at concurrency 32 and 64, with `soma serve` (1 worker) and
   `soma serve --workers 2`.
With 2 cores the load generator and the upstream take CPU from the gateway; their CPU per request
is reported too, so the figures can be read as "gateway throughput when it gets what is left".
If `wrk` is on PATH it is run as a second, cheaper client for the throughput figures.

Run: `.venv/bin/python bench/gateway_rps.py [--quick]`; writes bench/results/gateway_rps.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    HOST,
    Connection,
    ProcessGroup,
    Server,
    build_request,
    cpu_seconds,
    machine,
    markdown_table,
    percentile,
    run,
    run_load,
    write_results,
)

CHAT_BODY = json.dumps({"model": "static", "messages": [{"role": "user", "content": "Say hello."}]}).encode()
GOALS = {"added_p50_ms": 1.0, "added_p99_ms": 5.0, "rps": 2000.0}


class Target:
    """The raw requests for one server, and the process whose CPU we count."""

    def __init__(self, server: Server, key: str) -> None:
        auth = {"authorization": f"Bearer {key}"}
        self.server = server
        self.chat = build_request("POST", "/v1/chat/completions", CHAT_BODY, auth)
        self.models = build_request("GET", "/v1/models", headers=auth)


async def _check(port: int, raw: bytes) -> None:
    conn = await Connection.open(port)
    try:
        status, body = await conn.request(raw)
    finally:
        conn.close()
    if status != 200:
        raise RuntimeError(f"port {port} answered {status}: {body[:500]!r}")


async def measured(
    server: Server,
    raw: bytes,
    concurrency: int,
    requests: int,
    seconds: float,
    warmup: int = 20,
    others: list[Server] | None = None,
) -> dict[str, Any]:
    """One load run, with the CPU seconds each process spent on it."""
    pids = {server.name: server.proc.pid, **{o.name: o.proc.pid for o in others or []}}
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    client_before = time.process_time()
    result = await run_load(server.port, raw, concurrency, requests, seconds, warmup=warmup)
    await asyncio.sleep(0.15)  # let the outbox flush (every 50 ms) land inside the window
    client_cpu = time.process_time() - client_before
    served = len(result.latencies) + result.errors + warmup * concurrency
    summary = result.summary()
    summary["concurrency"] = concurrency
    for name, pid in pids.items():
        summary[f"cpu_ms_per_req[{name}]"] = round((cpu_seconds(pid) - before[name]) * 1000 / served, 3)
    summary["cpu_ms_per_req[client]"] = round(client_cpu * 1000 / served, 3)
    summary["latencies_ms"] = [round(x * 1000, 4) for x in result.latencies]
    return summary


def wrk_run(url: str, key: str, body: bytes | None, connections: int, seconds: int) -> dict[str, Any] | None:
    """Requests/s and latency percentiles from `wrk`, if installed."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    fd, name = tempfile.mkstemp(prefix="soma-bench-", suffix=".lua")
    os.close(fd)
    script = Path(name)
    lines = [f'wrk.headers["authorization"] = "Bearer {key}"']
    if body is not None:
        lua_body = body.decode().replace("\\", "\\\\").replace('"', '\\"')
        lines += [
            'wrk.method = "POST"',
            f'wrk.body = "{lua_body}"',
            'wrk.headers["content-type"] = "application/json"',
        ]
    script.write_text("\n".join(lines) + "\n")
    try:
        argv = [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30).stdout
    finally:
        script.unlink(missing_ok=True)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)

    def ms(match: re.Match[str] | None) -> float | None:
        if match is None:
            return None
        return float(match.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]

    return {
        "rps": float(rps.group(1)) if rps else None,
        "p50_ms": ms(p50),
        "p99_ms": ms(p99),
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "connections": connections,
    }


def throughput(
    procs: ProcessGroup,
    upstream: Server,
    name: str,
    workers: int,
    concurrencies: list[int],
    requests: int,
    seconds: float,
    use_wrk: bool,
) -> dict[str, Any]:
    """Requests/s of /v1/models and chat at each concurrency for one `soma serve` configuration."""
    gateway = procs.start_soma(name, [_static_spec(upstream)], workers=workers)
    target = Target(gateway, gateway.info["admin_key"])
    run(_check(gateway.port, target.chat))
    out: dict[str, Any] = {"workers": workers, "runs": {}}
    try:
        for c in concurrencies:
            for label, raw in (("models", target.models), ("chat", target.chat)):
                summary = run(measured(gateway, raw, c, requests, seconds, warmup=5, others=[upstream]))
                summary.pop("latencies_ms")
                out["runs"][f"{label}@{c}"] = summary
                print(
                    f"  workers={workers} {label}@{c}: {summary['rps']} req/s p50 {summary['p50_ms']} ms "
                    f"p99 {summary['p99_ms']} ms",
                    flush=True,
                )
        if use_wrk:
            wrk_cases = (("models", None, "/v1/models"), ("chat", CHAT_BODY, "/v1/chat/completions"))
            for label, body, path in wrk_cases:
                result = wrk_run(
                    f"http://{HOST}:{gateway.port}{path}",
                    gateway.info["admin_key"],
                    body,
                    max(concurrencies),
                    max(2, int(seconds)),
                )
                if result is not None:
                    out["runs"][f"wrk:{label}@{max(concurrencies)}"] = result
                    print(f"  workers={workers} wrk {label}: {result}", flush=True)
    finally:
        gateway.stop()
    return out


def _static_spec(upstream: Server) -> dict[str, Any]:
    return {"id": "static", "provider": "openai", "base_url": f"{upstream.base_url}/v1", "api_key": "unused"}


def latency_at_1(procs: ProcessGroup, upstream: Server, rounds: int, per_round: int) -> dict[str, Any]:
    """Direct vs gateway at concurrency 1, alternating rounds; returns pooled latencies and CPU."""
    gateway = procs.start_soma("latency", [_static_spec(upstream)])
    target = Target(gateway, gateway.info["admin_key"])
    direct = build_request("POST", "/v1/chat/completions", CHAT_BODY, {"authorization": "Bearer unused"})
    run(_check(gateway.port, target.chat))
    run(_check(upstream.port, direct))
    pooled: dict[str, list[float]] = {"direct chat": [], "gateway chat": [], "gateway models": []}
    cpu: dict[str, list[float]] = {k: [] for k in pooled}
    try:
        # Warm-up: key cache, upstream connection pool, code paths.
        run(run_load(gateway.port, target.chat, 1, 500, 5))
        run(run_load(gateway.port, target.models, 1, 500, 5))
        for _ in range(rounds):
            cases = (
                ("direct chat", upstream, direct),
                ("gateway chat", gateway, target.chat),
                ("gateway models", gateway, target.models),
            )
            for label, server, raw in cases:
                summary = run(
                    measured(
                        server,
                        raw,
                        1,
                        per_round,
                        10,
                        warmup=5,
                        others=[upstream] if server is gateway else [],
                    )
                )
                pooled[label] += summary["latencies_ms"]
                cpu[label].append(summary[f"cpu_ms_per_req[{server.name}]"])
                if label == "gateway chat":
                    cpu.setdefault("upstream during gateway chat", []).append(
                        summary["cpu_ms_per_req[static-upstream]"]
                    )
                cpu.setdefault(f"client during {label}", []).append(summary["cpu_ms_per_req[client]"])
    finally:
        gateway.stop()
    stats = {
        label: {
            "requests": len(values),
            "p50_ms": round(percentile(values, 50), 3),
            "p90_ms": round(percentile(values, 90), 3),
            "p99_ms": round(percentile(values, 99), 3),
            "mean_ms": round(sum(values) / len(values), 3),
        }
        for label, values in pooled.items()
    }
    cpu_ms = {label: round(sorted(v)[len(v) // 2], 3) for label, v in cpu.items()}
    added = {
        "p50_ms": round(stats["gateway chat"]["p50_ms"] - stats["direct chat"]["p50_ms"], 3),
        "p99_ms": round(stats["gateway chat"]["p99_ms"] - stats["direct chat"]["p99_ms"], 3),
    }
    return {"stats": stats, "cpu_ms_per_request": cpu_ms, "added": added}


def main() -> None:
    parser = argparse.ArgumentParser(description="Gateway overhead and throughput against a static upstream.")
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run, ~1 minute)")
    parser.add_argument("--no-wrk", action="store_true", help="do not use wrk even if it is installed")
    args = parser.parse_args()
    rounds, per_round = (2, 300) if args.quick else (5, 1000)
    requests, seconds = (2000, 3.0) if args.quick else (20000, 6.0)
    concurrencies = [32, 64]
    use_wrk = not args.no_wrk and shutil.which("wrk") is not None
    started = time.time()
    with ProcessGroup() as procs:
        upstream = procs.start_static_upstream()
        print("concurrency 1: direct vs gateway, alternating rounds …", flush=True)
        latency = latency_at_1(procs, upstream, rounds, per_round)
        print("throughput, 1 worker …", flush=True)
        one = throughput(procs, upstream, "rps-1w", 1, concurrencies, requests, seconds, use_wrk)
        print("throughput, --workers 2 …", flush=True)
        two = throughput(procs, upstream, "rps-2w", 2, concurrencies, requests, seconds, use_wrk)

    stats, cpu, added = latency["stats"], latency["cpu_ms_per_request"], latency["added"]
    best_rps = max(
        r["rps"]
        for cfg in (one, two)
        for k, r in cfg["runs"].items()
        if k.startswith("chat@") and r["errors"] == 0
    )
    goals = {
        "added_p50_ms<=1": added["p50_ms"] <= GOALS["added_p50_ms"],
        "added_p99_ms<=5": added["p99_ms"] <= GOALS["added_p99_ms"],
        "chat_rps>=2000": best_rps >= GOALS["rps"],
    }
    print()
    print("### Concurrency 1 (pooled over rounds)\n")
    print(
        markdown_table(
            ["request", "n", "p50 ms", "p90 ms", "p99 ms", "server CPU ms/req"],
            [
                [label, s["requests"], s["p50_ms"], s["p90_ms"], s["p99_ms"], cpu[label]]
                for label, s in stats.items()
            ],
        )
    )
    print(
        f"\nAdded by the gateway (chat, c=1): p50 {added['p50_ms']} ms, p99 {added['p99_ms']} ms. "
        f"Client CPU/req during gateway chat: {cpu['client during gateway chat']} ms; "
        f"upstream CPU/req: {cpu['upstream during gateway chat']} ms.\n"
    )
    print("### Throughput\n")
    rows = []
    for cfg in (one, two):
        for key, r in cfg["runs"].items():
            if key.startswith("wrk:"):
                rows.append(
                    [
                        cfg["workers"],
                        key,
                        r.get("connections"),
                        r["rps"],
                        r["p50_ms"],
                        r["p99_ms"],
                        "",
                        "",
                        r["non_2xx"],
                    ]
                )
            else:
                gw = next(v for k, v in r.items() if k.startswith("cpu_ms_per_req[rps"))
                rows.append(
                    [
                        cfg["workers"],
                        key,
                        r["concurrency"],
                        r["rps"],
                        r["p50_ms"],
                        r["p99_ms"],
                        gw,
                        r["cpu_ms_per_req[client]"],
                        r["errors"],
                    ]
                )
    print(
        markdown_table(
            [
                "workers",
                "run",
                "conns",
                "req/s",
                "p50 ms",
                "p99 ms",
                "gateway CPU ms/req",
                "client CPU ms/req",
                "errors",
            ],
            rows,
        )
    )
    print(f"\nGoals: {goals}")
    path = write_results(
        "gateway_rps",
        {
            "machine": machine(),
            "started": started,
            "duration_s": round(time.time() - started, 1),
            "args": vars(args),
            "goals": GOALS,
            "goals_met": goals,
            "concurrency_1": {"stats": stats, "cpu_ms_per_request": cpu, "added": added},
            "throughput": {"workers_1": one, "workers_2": two},
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
