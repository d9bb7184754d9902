"""Run overhead: an agent run that makes no tool call vs a bare chat completion of the same prompt.

One `soma serve` (fresh temp data dir, loopback, the real SmolLM2 model). Each round, in turn:
(a) bare: `POST /v1/chat/completions` with the persona's system prompt and the user's message;
(b) run: `POST /v1/sessions/{new session}/messages` (`stream: false`, waits for `run.completed`; the
    session is created before the clock starts) with
    a persona that has the same system prompt, no tools and memory off: so the model sees exactly
    the prompt of (a), and the run adds its bookkeeping (session claim, event log commits, history,
    run row, outbox events);
(c) run + memory: the same with recall before and remember after (two embeddings, index search);
(d) `model="agent:bench"` on the OpenAI endpoint (timed with the session it creates per call).
Same sampling everywhere (temperature 0, seed 1, `max_tokens` 64); the script checks that (a) and (b)
produced the same text. After one warm-up of each, rounds alternate so machine noise hits all of
them. Reported: p50 wall time per variant, its ratio to (a)'s p50, and the median of the per-round
ratios (variant / bare of the same round); goal (b)/(a) ≤ 1.2.

Run: `.venv/bin/python bench/run_overhead.py [--rounds 8] [--max-tokens 64]`;
writes bench/results/run_overhead.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ProcessGroup, machine, markdown_table, write_results

SYSTEM = "You are a helpful assistant. Answer briefly and truthfully."
PROMPT = "Explain in a few sentences why the sky is blue."
GOAL = 1.2


def persona(http: httpx.Client, name: str, memory: dict[str, Any]) -> None:
    body = {"name": name, "system_prompt": SYSTEM, "tools": [], "memory": memory}
    response = http.post("/v1/personas", json=body)
    response.raise_for_status()


def bare(http: httpx.Client, sampling: dict[str, Any]) -> tuple[str, float]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]
    started = time.perf_counter()
    response = http.post(
        "/v1/chat/completions", json={"model": "smollm2-135m-instruct", "messages": messages, **sampling}
    )
    response.raise_for_status()
    return str(response.json()["choices"][0]["message"]["content"]), time.perf_counter() - started


def agent_run(http: httpx.Client, name: str, sampling: dict[str, Any]) -> tuple[str, float]:
    session = http.post("/v1/sessions", json={"persona": name})  # not timed: a session outlives its runs
    session.raise_for_status()
    started = time.perf_counter()
    response = http.post(
        f"/v1/sessions/{session.json()['id']}/messages", json={"content": PROMPT, "stream": False, **sampling}
    )
    response.raise_for_status()
    body = response.json()
    seconds = time.perf_counter() - started
    if body["status"] != "completed":
        raise RuntimeError(f"run ended {body['status']}: {body['reason']}")
    return str(body["answer"]), seconds


def agent_chat(http: httpx.Client, sampling: dict[str, Any]) -> tuple[str, float]:
    started = time.perf_counter()  # includes creating the session it answers in
    response = http.post(
        "/v1/chat/completions",
        json={"model": "agent:bench", "messages": [{"role": "user", "content": PROMPT}], **sampling},
    )
    response.raise_for_status()
    return str(response.json()["choices"][0]["message"]["content"]), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    sampling = {"max_tokens": args.max_tokens, "temperature": 0, "seed": 1}
    with ProcessGroup() as procs:
        server = procs.start_soma("run-overhead")
        key = server.info["admin_key"]
        with httpx.Client(
            base_url=server.base_url, headers={"authorization": f"Bearer {key}"}, timeout=300
        ) as http:
            persona(http, "bench", {"recall": False, "remember": []})
            persona(http, "bench-memory", {"recall": True, "remember": ["user"]})
            variants = {
                "bare chat completion": lambda: bare(http, sampling),
                "agent run (no tools, memory off)": lambda: agent_run(http, "bench", sampling),
                "agent run + memory recall/remember": lambda: agent_run(http, "bench-memory", sampling),
                "agent:<persona> chat completion": lambda: agent_chat(http, sampling),
            }
            texts = {name: call()[0] for name, call in variants.items()}  # warm-up (model load, caches)
            if texts["bare chat completion"] != texts["agent run (no tools, memory off)"]:
                raise RuntimeError(f"the run saw another prompt than the bare call: {texts}")
            times: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, call in variants.items():
                    times[name].append(call()[1])
    base = statistics.median(times["bare chat completion"])
    rows = []
    summary: dict[str, Any] = {}
    bare_times = times["bare chat completion"]
    for name, values in times.items():
        p50 = statistics.median(values)
        ratio = p50 / base
        # Each round's variant over the same round's bare call: less sensitive to load drifting.
        paired = statistics.median(v / b for v, b in zip(values, bare_times, strict=True))
        summary[name] = {
            "p50_ms": round(p50 * 1000, 1),
            "ratio": round(ratio, 3),
            "paired_ratio": round(paired, 3),
            "runs_s": values,
        }
        rows.append(
            [
                name,
                f"{p50 * 1000:.0f}",
                f"{min(values) * 1000:.0f}",
                f"{max(values) * 1000:.0f}",
                f"{ratio:.3f}",
                f"{paired:.3f}",
            ]
        )
    print(markdown_table(["variant", "p50 ms", "min ms", "max ms", "p50 ratio", "paired ratio"], rows))
    run_ratio = summary["agent run (no tools, memory off)"]["ratio"]
    print(f"goal: run / bare <= {GOAL}: {'met' if run_ratio <= GOAL else 'MISSED'} ({run_ratio:.3f})")
    path = write_results(
        "run_overhead",
        {
            "machine": machine(),
            "rounds": args.rounds,
            "max_tokens": args.max_tokens,
            "results": summary,
            "goal": GOAL,
        },
    )
    print(f"written {path}")


if __name__ == "__main__":
    main()
