"""Memory retrieval quality and latency through the HTTP API, on the real embedding model.

60 hand-written facts about a fictional company are remembered in one tenant; 25 questions, each
written for exactly one fact and phrased differently from it, are asked through `/v1/memory/recall`.
Reports recall@1 and recall@5 (the share of questions whose fact is in the top 1 / top 5) and the
latency of remember and recall (p50/p95, embedding included), next to a direct in-process exact search
over the same vectors for the same questions (the ceiling the API should match).

Run: `.venv/bin/python bench/memory_recall.py` (~30 s; writes bench/results/memory_recall.json).
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import numpy as np

from common import ProcessGroup, machine, markdown_table, percentile, write_results

FACTS = [
    "Acme's headquarters are in Lisbon, on the fourth floor of the Alcântara building.",
    "The engineering team holds its stand-up every weekday at 9:30.",
    "Maria Costa is the head of finance.",
    "Expense reports must be filed within 30 days of the purchase.",
    "The VPN client to install is WireGuard.",
    "Production deploys are frozen from December 20 to January 3.",
    "The on-call rotation changes every Monday at noon.",
    "Our main database is PostgreSQL 15 with two streaming replicas.",
    "Laptops are replaced every three years.",
    "The company retreat this year is in the Azores.",
    "New employees get 25 days of paid vacation.",
    "The design system is called Tessera.",
    "Customer support is reachable by chat from 8:00 to 20:00 CET.",
    "Invoices are paid on the 15th of each month.",
    "The security team runs a phishing drill every quarter.",
    "Pedro manages the mobile app team.",
    "The staging environment is rebuilt every night at 2 am.",
    "Meeting room Atlântico seats twelve people and has a projector.",
    "The office closes at 19:00 on Fridays.",
    "Parental leave is 20 weeks for every parent.",
    "Code reviews need approval from two engineers.",
    "The public API is rate limited to 100 requests per second per key.",
    "Backups are kept for 35 days in a second region.",
    "The bike storage is in the basement, next to the showers.",
    "Lunch is subsidised at the canteen on the ground floor.",
    "Our biggest customer is the logistics firm Portwise.",
    "The mobile app is written in Kotlin and Swift.",
    "Incidents are tracked in the #incidents channel.",
    "The quarterly all-hands happens on the last Thursday of the quarter.",
    "Ana is the data protection officer.",
    "Passwords must be at least 14 characters long.",
    "The marketing budget for next year is 2 million euros.",
    "Visitors must sign in at the reception desk.",
    "The company was founded in 2014 by three university friends.",
    "The coffee machine on the third floor only takes oat milk.",
    "Software licences are requested through the IT portal.",
    "Travel must be booked through the agency Viajar.",
    "Performance reviews happen twice a year, in March and September.",
    "Our uptime target for the API is 99.95 percent.",
    "The data warehouse runs on ClickHouse.",
    "Remote work is allowed up to three days a week.",
    "The fire assembly point is the square in front of the building.",
    "Interns are paid and mentored by a senior engineer.",
    "The Android app has 400 thousand monthly active users.",
    "Hardware keys are required for production access.",
    "The holiday party is on December 12 at the riverside restaurant.",
    "The legal team reviews every contract above 50 thousand euros.",
    "Logs are shipped to Loki and kept for 14 days.",
    "The parking garage entrance is on Rua das Flores.",
    "Job candidates do a take-home exercise of at most four hours.",
    "The board meets every second month.",
    "The help desk ticket queue is triaged every morning.",
    "Desks can be booked through the Deskly app.",
    "The first aid kit is in the kitchen cabinet above the sink.",
    "The Slack workspace is called acme-hq.",
    "Our carbon footprint report is published every April.",
    "The CFO signs off on hires above the approved headcount.",
    "The test suite must pass before merging to main.",
    "Company shares vest over four years with a one-year cliff.",
    "The printer on the second floor needs a badge to release jobs.",
]

QUESTIONS = [  # (question, index of the fact it is about)
    ("Where is the company's main office?", 0),
    ("What time is the daily engineering meeting?", 1),
    ("Who runs finance?", 2),
    ("How long do I have to submit my expenses?", 3),
    ("Which VPN software do we use?", 4),
    ("When can't we release to production over the holidays?", 5),
    ("Which database powers production?", 7),
    ("How many vacation days do newcomers get?", 10),
    ("What is our design system's name?", 11),
    ("How many approvals does a pull request need?", 20),
    ("What is the API rate limit?", 21),
    ("How long are backups retained?", 22),
    ("Where can I park my bicycle?", 23),
    ("Who is our largest client?", 25),
    ("Who is responsible for data protection?", 29),
    ("What is the minimum password length?", 30),
    ("When was Acme founded?", 33),
    ("How do I get a software licence?", 35),
    ("How often are performance reviews?", 37),
    ("What analytics database do we use?", 39),
    ("How many days can I work from home?", 40),
    ("Where do we gather during a fire alarm?", 41),
    ("How long are logs kept?", 47),
    ("When is the Christmas party?", 45),
    ("How do stock options vest?", 58),
]


def main() -> None:
    with ProcessGroup() as procs:
        server = procs.start_soma("memory-bench")
        admin = {"authorization": f"Bearer {server.info['admin_key']}"}
        base = f"http://127.0.0.1:{server.port}"
        with httpx.Client(base_url=base, headers=admin, timeout=60) as http:
            http.post("/v1/memory/recall", json={"query": "warm-up"}).raise_for_status()
            remember_ms: list[float] = []
            ids: list[str] = []
            for fact in FACTS:
                started = time.perf_counter()
                made = http.post("/v1/memory/remember", json={"text": fact, "namespace": "bench"})
                remember_ms.append((time.perf_counter() - started) * 1000)
                made.raise_for_status()
                assert not made.json()["merged"], fact
                ids.append(made.json()["id"])
            recall_ms: list[float] = []
            ranks: list[int | None] = []
            for question, target in QUESTIONS:
                started = time.perf_counter()
                found = http.post(
                    "/v1/memory/recall", json={"query": question, "namespace": "bench", "top_k": 5}
                )
                recall_ms.append((time.perf_counter() - started) * 1000)
                found.raise_for_status()
                got = [m["id"] for m in found.json()["data"]]
                ranks.append(got.index(ids[target]) + 1 if ids[target] in got else None)
            vectors = http.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": FACTS}).json()
            asked = http.post(
                "/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": [q for q, _ in QUESTIONS]}
            ).json()
    facts = np.array([d["embedding"] for d in vectors["data"]], dtype=np.float32)
    queries = np.array([d["embedding"] for d in asked["data"]], dtype=np.float32)
    exact_top5 = np.argsort(-(queries @ facts.T), axis=1)[:, :5]
    exact_ranks = [
        (list(row).index(target) + 1 if target in row else None)
        for row, (_, target) in zip(exact_top5, QUESTIONS, strict=True)
    ]

    def recall_at(values: list[int | None], k: int) -> float:
        return sum(1 for r in values if r is not None and r <= k) / len(values)

    results: dict[str, Any] = {
        "machine": machine(),
        "facts": len(FACTS),
        "questions": len(QUESTIONS),
        "api": {"recall@1": recall_at(ranks, 1), "recall@5": recall_at(ranks, 5), "ranks": ranks},
        "exact_cosine": {"recall@1": recall_at(exact_ranks, 1), "recall@5": recall_at(exact_ranks, 5)},
        "latency_ms": {
            "remember_p50": round(percentile(remember_ms, 50), 2),
            "remember_p95": round(percentile(remember_ms, 95), 2),
            "recall_p50": round(percentile(recall_ms, 50), 2),
            "recall_p95": round(percentile(recall_ms, 95), 2),
        },
    }
    print(
        markdown_table(
            ["path", "recall@1", "recall@5"],
            [
                [
                    "API (/v1/memory/recall, ranked)",
                    f"{results['api']['recall@1']:.2f}",
                    f"{results['api']['recall@5']:.2f}",
                ],
                [
                    "exact cosine, in-process",
                    f"{results['exact_cosine']['recall@1']:.2f}",
                    f"{results['exact_cosine']['recall@5']:.2f}",
                ],
            ],
        )
    )
    print(
        markdown_table(
            ["operation", "p50 ms", "p95 ms"],
            [
                [
                    "remember (embed + dedupe search + insert)",
                    results["latency_ms"]["remember_p50"],
                    results["latency_ms"]["remember_p95"],
                ],
                [
                    "recall (embed + search + rank)",
                    results["latency_ms"]["recall_p50"],
                    results["latency_ms"]["recall_p95"],
                ],
            ],
        )
    )
    missed = [QUESTIONS[i][0] for i, r in enumerate(ranks) if r is None]
    if missed:
        print("not in the top 5:", missed)
    print("wrote", write_results("memory_recall", results))


if __name__ == "__main__":
    main()
