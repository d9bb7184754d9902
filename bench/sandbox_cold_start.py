"""Sandbox cold start: `print(1)` in a fresh bubblewrap sandbox vs a bare `python3 -c 'print(1)'`.

Every run is a cold sandbox (new namespaces, new tmpfs, new interpreter); only the page cache is warm,
as on a server that has run code before. Four variants, interleaved round by round so machine noise
hits all of them, after one warm-up round:
  sandbox, first output  spawn `sandbox_command()` exactly as `run_python` does (as `nobody` when
                         root), write `print(1)` to stdin, stop the clock at the first stdout byte;
  sandbox, run_python    the public call end to end: spawn, first output, exit, pid-namespace
                         teardown, result built (what a tool call costs);
  bare, first output     `/usr/bin/python3 -c 'print(1)'`, same spawning, first stdout byte;
  bare -I -S, first out  `/usr/bin/python3 -I -S -c 'print(1)'`, the flags the sandbox uses.
Reported: p50/p95 (ms) and the ratio of each p50 to the bare python3 p50.

Run: `.venv/bin/python bench/sandbox_cold_start.py [--runs 30]`; writes bench/results/sandbox_cold_start.json.
Needs bubblewrap (`apt-get install -y bubblewrap`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, markdown_table, percentile, write_results
from somaagent.tools.sandbox import SYSTEM_PYTHON, SandboxLimits, ensure_sandbox, run_python, sandbox_command

GOAL_MS = 150.0


async def first_output(argv: list[str], stdin: bytes | None, **spawn: Any) -> float:
    """Seconds from spawn to the first stdout byte; the process is then drained and reaped."""
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        **spawn,
    )
    assert proc.stdout is not None
    if stdin is not None:
        assert proc.stdin is not None
        proc.stdin.write(stdin)
        await proc.stdin.drain()
        proc.stdin.close()
    first = await proc.stdout.read(1)
    elapsed = time.perf_counter() - started
    rest = await proc.stdout.read()
    if (first + rest) != b"1\n" or await proc.wait() != 0:
        raise RuntimeError(f"{argv[0]} printed {first + rest!r}, exit {proc.returncode}")
    return elapsed


async def sandbox_first_output() -> float:
    # run_python starts bwrap as `nobody` when the server is root; do the same so the timing matches.
    drop = {"user": 65534, "group": 65534, "extra_groups": []} if os.geteuid() == 0 else {}
    return await first_output(sandbox_command(SandboxLimits()), b"print(1)", start_new_session=True, **drop)


async def sandbox_run_python() -> float:
    started = time.perf_counter()
    result = await run_python("print(1)")
    elapsed = time.perf_counter() - started
    if not result.ok or result.stdout != "1\n":
        raise RuntimeError(f"run_python failed: {result}")
    return elapsed


async def bare() -> float:
    return await first_output([SYSTEM_PYTHON, "-c", "print(1)"], None)


async def bare_isolated() -> float:
    return await first_output([SYSTEM_PYTHON, "-I", "-S", "-c", "print(1)"], None)


VARIANTS: dict[str, Callable[[], Awaitable[float]]] = {
    "sandbox, first output": sandbox_first_output,
    "sandbox, run_python end to end": sandbox_run_python,
    "bare python3 -c, first output": bare,
    "bare python3 -I -S -c, first output": bare_isolated,
}


async def main(runs: int) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    probe_started = time.perf_counter()
    await ensure_sandbox()  # once per process: checks bwrap, python3 and user namespaces
    probe_ms = (time.perf_counter() - probe_started) * 1000
    for variant in VARIANTS.values():  # warm-up: page cache, not counted
        await variant()
    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(runs):
        for name, variant in VARIANTS.items():
            samples[name].append((await variant()) * 1000)
    bare_p50 = percentile(samples["bare python3 -c, first output"], 50)
    rows, figures = [], {}
    for name, values in samples.items():
        p50, p95 = percentile(values, 50), percentile(values, 95)
        figures[name] = {
            "p50_ms": p50,
            "p95_ms": p95,
            "max_ms": max(values),
            "ratio_to_bare_p50": p50 / bare_p50,
        }
        rows.append([name, f"{p50:.1f}", f"{p95:.1f}", f"{max(values):.1f}", f"{p50 / bare_p50:.2f}x"])
    print(markdown_table(["variant", "p50 ms", "p95 ms", "max ms", "p50 / bare"], rows))
    goal_p95 = figures["sandbox, first output"]["p95_ms"]
    print(f"\nensure_sandbox() probe, once per process: {probe_ms:.1f} ms")
    print(
        f"goal: cold start to first output ≤ {GOAL_MS:.0f} ms — p95 {goal_p95:.1f} ms: "
        f"{'met' if goal_p95 <= GOAL_MS else 'NOT met'}"
    )
    return {
        "runs": runs,
        "goal_ms": GOAL_MS,
        "goal_met": goal_p95 <= GOAL_MS,
        "probe_ms": probe_ms,
        "variants": figures,
        "samples_ms": samples,
        "machine": machine() | {"loadavg_1_at_start": load_before},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    path = write_results("sandbox_cold_start", asyncio.run(main(args.runs)))
    print(f"wrote {path}")
