"""What authentication costs per request, and what logging in costs.

Setup: one `soma serve` (1 worker, fresh temp SOMA_DATA_DIR, SQLite, 127.0.0.1), a user and its
access token from `POST /v1/auth/token`, the bootstrap admin API key.

Measured, with the pure-asyncio keep-alive client of bench/common.py on the same 2 cores:
1. `GET /v1/models` at concurrency 1, in alternating rounds so noise hits each the same, with
   (a) the API key (HMAC + in-process cache) and (b) the access JWT (Ed25519 signature check +
   revocation list, no database read): p50/p99 and the JWT/key ratio.
2. the same at concurrency 32, three alternating rounds each: the median round's requests/s and the
   ratio.
3. logging in: `grant_type=password` (one argon2id verification, 64 MiB, t=3) and
   `grant_type=refresh_token` (rotation: one conditional UPDATE, one insert, one signature),
   sequentially: p50/p99.

Run: `.venv/bin/python bench/auth_overhead.py [--quick]`; writes bench/results/auth_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    ProcessGroup,
    build_request,
    machine,
    markdown_table,
    percentile,
    run,
    run_load,
    write_results,
)

PASSWORD = "correct horse battery staple"


def call(
    base: str,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    headers: dict[str, str],
    form: bool = False,
) -> Any:
    data = None
    if body is not None:
        data = urllib.parse.urlencode(body).encode() if form else json.dumps(body).encode()
        headers = {
            **headers,
            "content-type": "application/x-www-form-urlencoded" if form else "application/json",
        }
    request = urllib.request.Request(base + path, data=data, headers=headers, method=method)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def timed_grants(base: str, form: dict[str, str], count: int) -> list[float]:
    seconds = []
    for _ in range(count):
        started = time.perf_counter()
        granted = call(base, "POST", "/v1/auth/token", form, {}, form=True)
        seconds.append(time.perf_counter() - started)
        if form["grant_type"] == "refresh_token":
            form = {**form, "refresh_token": granted["refresh_token"]}
    return seconds


def ms_summary(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {"n": len(ms), "p50_ms": round(percentile(ms, 50), 2), "p99_ms": round(percentile(ms, 99), 2)}


async def alternating(
    port: int, requests: dict[str, bytes], rounds: int, per_round: int
) -> dict[str, list[float]]:
    latencies: dict[str, list[float]] = {name: [] for name in requests}
    for _ in range(rounds):
        for name, raw in requests.items():
            result = await run_load(port, raw, 1, per_round, 30, warmup=20)
            assert result.errors == 0, (name, result.statuses)
            latencies[name].extend(result.latencies)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds, per_round, load_n, logins = (3, 300, 3000, 10) if args.quick else (6, 1000, 20000, 30)
    with ProcessGroup() as procs:
        soma = procs.start_soma("auth")
        base = soma.base_url
        admin = {"authorization": f"Bearer {soma.info['admin_key']}"}
        call(base, "POST", "/v1/users", {"username": "bench", "password": PASSWORD, "role": "member"}, admin)
        form = {"grant_type": "password", "tenant": "default", "username": "bench", "password": PASSWORD}
        tokens = call(base, "POST", "/v1/auth/token", form, {}, form=True)
        requests = {
            "api_key": build_request("GET", "/v1/models", headers=admin),
            "access_jwt": build_request(
                "GET", "/v1/models", headers={"authorization": f"Bearer {tokens['access_token']}"}
            ),
        }
        latencies = run(alternating(soma.port, requests, rounds, per_round))
        serial = {
            name: {
                "p50_ms": round(percentile([x * 1000 for x in values], 50), 3),
                "p99_ms": round(percentile([x * 1000 for x in values], 99), 3),
            }
            for name, values in latencies.items()
        }
        # Alternating rounds here too: one loaded run alone swings ±25% on this machine.
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in requests}
        for _ in range(3):
            for name, raw in requests.items():
                runs[name].append(run(run_load(soma.port, raw, 32, load_n, 60, warmup=5)).summary())
        loaded = {name: sorted(found, key=lambda r: r["rps"])[1] for name, found in runs.items()}  # median
        password = ms_summary(timed_grants(base, form, logins))
        refresh_form = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}
        refresh = ms_summary(timed_grants(base, refresh_form, logins * 3))
    results = {
        "machine": machine(),
        "concurrency_1": serial,
        "concurrency_32": loaded,
        "ratio_p50_jwt_over_key": round(serial["access_jwt"]["p50_ms"] / serial["api_key"]["p50_ms"], 3),
        "ratio_rps_jwt_over_key": round(loaded["access_jwt"]["rps"] / loaded["api_key"]["rps"], 3),
        "password_grant": password,
        "refresh_grant": refresh,
    }
    write_results("auth_overhead", results)
    print(
        markdown_table(
            ["credential", "c=1 p50 ms", "c=1 p99 ms", "c=32 req/s", "c=32 p99 ms"],
            [
                [
                    name,
                    serial[name]["p50_ms"],
                    serial[name]["p99_ms"],
                    loaded[name]["rps"],
                    loaded[name]["p99_ms"],
                ]
                for name in requests
            ],
        )
    )
    print(f"JWT/key: p50 x{results['ratio_p50_jwt_over_key']}, req/s x{results['ratio_rps_jwt_over_key']}")
    print(
        markdown_table(
            ["grant", "n", "p50 ms", "p99 ms"],
            [
                ["password (argon2id)", password["n"], password["p50_ms"], password["p99_ms"]],
                ["refresh_token (rotation)", refresh["n"], refresh["p50_ms"], refresh["p99_ms"]],
            ],
        )
    )


if __name__ == "__main__":
    main()
