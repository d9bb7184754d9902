"""What a policy decision costs: `CompiledPolicy.evaluate` and the stream guard, in process.

Setup: a realistic 50-rule tenant policy (15 regex, 12 keywords lists of 8-40 words, 3 PII rules over
all four detectors, 6 deny lists, 2 allow lists, 4 capability, 4 side-effect and 4 model-allowlist
rules) under a 5-rule constitution, compiled once; a 2 KB chat message of ordinary prose about a
support case, which holds an e-mail address, a phone number and a listed word (`with matches`), and
the same text with those three replaced (`benign`). Context: the caller's capabilities, the model.

Measured, one `evaluate` call at a time on one thread after a warm-up, each timed with
`time.perf_counter_ns`:
1. `evaluate` of the 2 KB message, with matches and benign: p50 / p99 / mean in ms (goal: p99 <= 2 ms);
2. the stream guard: the benign 2 KB fed in 8-character chunks plus `finish` (the denial path stops
   early, so the benign text is what a full stream costs): ms per 2 KB streamed, p50 / p99 / mean.

3. the counters of one governed call (`bench/policy_counters.py`): rate-limit acquire + release and
   budget reserve + settle, in process and on Redis (goal: <= 1 ms p50 with Redis).

Run: `.venv/bin/python bench/policy.py [--calls 5000]`; writes bench/results/policy.json.
Each benchmark is a function returning `dict[str, float]`; `main` lists them and runs them all.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, markdown_table, percentile, write_results
from policy_counters import bench_counters
from somaagent.policy.document import parse_policy, parse_rules
from somaagent.policy.evaluator import CompiledPolicy, EvalRequest
from somaagent.policy.stream_guard import StreamGuard

GOAL_P99_MS = 2.0
CALLS = 5000
WARMUP = 500
STREAM_RUNS = 200
CHUNK = 8

CONSTITUTION: list[dict[str, Any]] = [
    {
        "id": "no-weapons",
        "kind": "keywords",
        "words": ["nerve agent", "pipe bomb", "bioweapon", "dirty bomb"],
    },
    {
        "id": "no-csam",
        "kind": "keywords",
        "words": ["csam", "child sexual abuse material"],
        "severity": "critical",
    },
    {"id": "self-harm", "kind": "regex", "pattern": r"\b(?:how to|ways to) (?:kill|hurt) myself\b"},
    {"id": "no-secrets-out", "kind": "pii", "detectors": ["secret"], "actions": ["model.output"]},
    {"id": "tools-need-cap", "kind": "capability", "requires": "tools:use", "actions": ["tool.call"]},
]

_TOPICS = {
    "malware": "malware ransomware keylogger rootkit trojan botnet spyware worm backdoor dropper",
    "fraud": "phishing kit, carding, money mule, fake invoice, wire fraud, chargeback fraud, bank drop",
    "weapons": "ghost gun, auto sear, bump stock, silencer build, 3d printed gun, untraceable firearm",
    "drugs": "fentanyl synthesis, meth cook, pill press, darknet market, cocaine purity, lsd blotter",
    "hate": "ethnic cleansing, racial holy war, great replacement, white genocide, subhuman",
    "extremism": "lone wolf attack, martyrdom operation, accelerationism, manifesto drop, recruit cell",
    "harassment": "doxx, swatting, revenge porn, stalkerware, home address leak, kill yourself",
    "cheating": "exam leak, answer key dump, essay mill, proctor bypass, contract cheating",
    "competitors": "acme cloud, globex ai, initech llm, umbrella analytics, hooli assistant",
    "internal": "project nightingale, codename bluebird, q3 layoffs, merger talks, board deck",
    "profanity": " ".join(f"swear{i}" for i in range(40)),
    "jailbreak": "dan mode, developer mode enabled, jailbroken, no restrictions, evil confidant",
}

_REGEXES = [
    r"\bignore (?:all )?(?:previous|prior|above) instructions\b",
    r"\bdisregard (?:your|the) (?:rules|guidelines|system prompt)\b",
    r"\byou are now (?:DAN|an unrestricted|a jailbroken)\b",
    r"(?:union\s+select|;\s*drop\s+table|or\s+1\s*=\s*1)",
    r"\b\d{3}-\d{2}-\d{4}\b",
    r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){3,7}\b",
    r"(?:api[_-]?key|secret|password)\s*[:=]\s*\S{8,}",
    r"https?://[^\s/:@]+:[^\s/@]+@",
    r"\b(?:[a-z0-9-]+\.)+internal\.example\.com\b",
    r"\b10\.\d{1,3}\.\d{1,3}\.\d{1,3}\b",
    r"\bBEGIN (?:RSA|EC|OPENSSH) PRIVATE KEY\b",
    r"\brm -rf /(?:\s|$)",
    r"\b(?:base64|eval|exec)\(",
    r"<script\b[^>]{0,200}>",
    r"\bsystem prompt\b.{0,40}\b(?:reveal|print|show)\b",
]


def policy_document() -> dict[str, Any]:
    """The 50-rule policy (as the JSON an admin would PUT)."""
    rules: list[dict[str, Any]] = []
    for i, pattern in enumerate(_REGEXES):
        rules.append(
            {"id": f"rx-{i}", "kind": "regex", "pattern": pattern, "weight": 0.6, "severity": "high"}
        )
    for name, words in _TOPICS.items():
        listed = [w.strip() for w in words.split(",")] if "," in words else words.split()
        rules.append({"id": f"kw-{name}", "kind": "keywords", "words": listed, "weight": 0.4})
    rules += [
        {
            "id": "pii-contact",
            "kind": "pii",
            "detectors": ["email", "phone"],
            "weight": 0.2,
            "severity": "low",
        },
        {"id": "pii-card", "kind": "pii", "detectors": ["card"], "severity": "high"},
        {"id": "pii-secret", "kind": "pii", "detectors": ["secret"], "severity": "critical"},
        {
            "id": "banned-users",
            "kind": "deny_list",
            "field": "subject",
            "values": ["mallory", "eve", "bot-*"],
        },
        {"id": "banned-resources", "kind": "deny_list", "field": "resource", "values": ["secrets/*", "hr/*"]},
        {"id": "banned-tools", "kind": "deny_list", "field": "tool", "values": ["shell", "ssh*"]},
        {"id": "banned-models", "kind": "deny_list", "field": "model", "values": ["uncensored-*"]},
        {"id": "banned-actions", "kind": "deny_list", "field": "action", "values": ["memory.export"]},
        {"id": "banned-tenants-tools", "kind": "deny_list", "field": "tool", "values": ["crypto_*", "mint*"]},
        {"id": "trusted-ops", "kind": "allow_list", "field": "subject", "values": ["ops-*", "sre-oncall"]},
        {"id": "trusted-tools", "kind": "allow_list", "field": "tool", "values": ["calculator"]},
        {"id": "cap-chat", "kind": "capability", "requires": "chat:use"},
        {"id": "cap-memory", "kind": "capability", "requires": "memory:write", "actions": ["memory.write"]},
        {"id": "cap-tools", "kind": "capability", "requires": "tools:use", "actions": ["tool.call"]},
        {"id": "cap-runs", "kind": "capability", "requires": "agents:run", "actions": ["run.input"]},
        {"id": "no-external", "kind": "side_effect", "classes": ["external"], "weight": 0.5},
        {"id": "no-write-chat", "kind": "side_effect", "classes": ["write"], "actions": ["chat.input"]},
        {"id": "no-write-memory", "kind": "side_effect", "classes": ["write"], "actions": ["memory.write"]},
        {"id": "no-any-run", "kind": "side_effect", "classes": ["read", "write"], "actions": ["run.input"]},
        {"id": "models-chat", "kind": "model_allowlist", "models": ["smollm2*", "gpt-4o*", "llama-3*"]},
        {"id": "models-runs", "kind": "model_allowlist", "models": ["smollm2*"], "actions": ["run.input"]},
        {"id": "models-tools", "kind": "model_allowlist", "models": ["gpt-4o"], "actions": ["tool.call"]},
        {"id": "models-output", "kind": "model_allowlist", "models": ["*"], "actions": ["model.output"]},
    ]
    return {"rules": rules, "threshold": 0.5}


_PROSE = (
    "Hi team, following up on the support case from last week. The customer reported that their "
    "nightly export job stopped producing files after the upgrade to version 4.2, and the logs show a "
    "timeout while the worker waits for the storage bucket to respond. We reproduced it on a staging "
    "tenant with the same configuration: the job starts, reads about two thousand rows, and then hangs "
    "for exactly ninety seconds before it gives up. Our current theory is that the new connection pool "
    "keeps idle sockets open longer than the load balancer allows, so the first request after a quiet "
    "period lands on a closed connection. {contact} If that is right, lowering the idle timeout to "
    "thirty seconds should fix it without any change on their side. I also checked whether the retry "
    "policy could hide the problem; it retries three times with a short backoff, which explains why "
    "some nights the export still succeeds. The customer mentioned they saw a {word} warning from "
    "their endpoint scanner around the same time, but that turned out to be a false positive on an "
    "unrelated installer. Next steps: ship the configuration change to staging today, watch two "
    "nightly runs, then roll it out to production on Thursday if both runs finish in under ten "
    "minutes. Please reach me at {email} or on {phone} if anything looks off before then. "
)


def message(with_matches: bool) -> str:
    """The ~2 KB chat message, with or without its three matches."""
    if with_matches:
        text = _PROSE.format(
            contact="(Their admin asked us to keep this internal.)",
            word="ransomware",
            email="dana.kim@example.com",
            phone="+1 415 555 2671",
        )
    else:
        text = _PROSE.format(
            contact="(Their admin asked us to keep this internal.)",
            word="suspicious",
            email="the usual channel",
            phone="the team call",
        )
    while len(text) < 2048:
        text += " Thanks again for the quick turnaround on this one."
    return text[:2048]


def compiled_policy() -> CompiledPolicy:
    """The constitution and the 50-rule policy, validated and compiled as the service does."""
    document = parse_policy(policy_document())
    assert len(document.rules) == 50
    return CompiledPolicy.compile(parse_rules(CONSTITUTION), document, "0" * 64, 1)


CONTEXT = {"capabilities": ["chat:use", "memory:write"], "model": "smollm2-135m-instruct"}


def _timed(call: Callable[[], object], runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(runs):
        started = time.perf_counter_ns()
        call()
        samples.append((time.perf_counter_ns() - started) / 1e6)
    return samples


def _summary(prefix: str, samples: list[float]) -> dict[str, float]:
    return {
        f"{prefix}_p50_ms": round(percentile(samples, 50), 4),
        f"{prefix}_p99_ms": round(percentile(samples, 99), 4),
        f"{prefix}_mean_ms": round(statistics.fmean(samples), 4),
    }


def bench_evaluation(calls: int = CALLS) -> dict[str, float]:
    """`evaluate` of a 2 KB message against the 50-rule policy: p50/p99/mean ms, with and without matches."""
    policy = compiled_policy()
    results: dict[str, float] = {"rules": 50.0, "constitution_rules": float(len(CONSTITUTION))}
    for label, with_matches in (("eval_matches", True), ("eval_benign", False)):
        request = EvalRequest("chat.input", "dana", content=message(with_matches), context=CONTEXT)
        decision = policy.evaluate(request)
        # The figures are only meaningful if the policy really matched what the text holds.
        assert decision.allowed is not with_matches, decision
        results[f"{label}_reasons"] = float(len(decision.reasons))
        results.update(_summary(label, _timed(partial(policy.evaluate, request), calls, WARMUP)))
    return results


def bench_stream_guard(runs: int = STREAM_RUNS) -> dict[str, float]:
    """The benign 2 KB message through a `StreamGuard` in 8-character chunks: ms per 2 KB streamed."""
    policy = compiled_policy()
    text = message(False)

    def stream() -> None:
        guard = StreamGuard(policy, "dana", CONTEXT)
        released = [guard.feed(text[i : i + CHUNK]).release for i in range(0, len(text), CHUNK)]
        released.append(guard.finish().release)
        assert "".join(released) == text

    samples = _timed(stream, runs, warmup=20)
    return {"stream_chunk_chars": float(CHUNK), **_summary("stream_2kb", samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=CALLS, help="evaluate calls per variant (>= 5000)")
    args = parser.parse_args()
    # One entry per benchmark; each returns flat figures, stored under its name.
    benchmarks: list[tuple[str, Callable[[], dict[str, float]]]] = [
        ("evaluation", lambda: bench_evaluation(args.calls)),
        ("stream_guard", bench_stream_guard),
        ("counters", bench_counters),
    ]
    results: dict[str, Any] = {"machine": machine()}
    for name, bench in benchmarks:
        results[name] = bench()
    evaluation, stream = results["evaluation"], results["stream_guard"]
    rows = [
        [f"evaluate, 2 KB, {label}", *(evaluation[f"{key}_{stat}_ms"] for stat in ("p50", "p99", "mean"))]
        for key, label in (("eval_matches", "3 matches"), ("eval_benign", "benign"))
    ]
    rows.append(
        [
            "stream guard, 2 KB in 8-char chunks",
            *(stream[f"stream_2kb_{stat}_ms"] for stat in ("p50", "p99", "mean")),
        ]
    )
    print(markdown_table(["50-rule policy + 5-rule constitution", "p50 ms", "p99 ms", "mean ms"], rows))
    counters = results["counters"]
    print(
        markdown_table(
            ["per governed call (a pair)", "p50 ms", "p99 ms"],
            [
                [name, counters[f"{name}_p50_ms"], counters[f"{name}_p99_ms"]]
                for name in ("ratelimit_local", "ratelimit_redis", "budget_sqlite", "budget_redis")
            ],
        )
    )
    redis_p50 = counters["ratelimit_redis_p50_ms"] + counters["budget_redis_p50_ms"]
    verdict = "met" if redis_p50 <= 1 else "NOT met"
    print(f"goal: rate limit + budget with Redis <= 1 ms p50: {redis_p50:.3f} ms, {verdict}")
    met = max(evaluation["eval_matches_p99_ms"], evaluation["eval_benign_p99_ms"]) <= GOAL_P99_MS
    print(f"goal: evaluate p99 <= {GOAL_P99_MS} ms: {'met' if met else 'NOT met'}")
    path = write_results("policy", results)
    print(json.dumps({name: results[name] for name, _ in benchmarks}, sort_keys=True))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
