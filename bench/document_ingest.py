"""Document ingest throughput through the HTTP API, on the real embedding model.

A ~200 KB markdown document (the repository's own markdown files, repeated with numbered headings
until it is big enough: real prose, reproducible from the commit) is uploaded to
`POST /v1/memory/documents` and polled until it completes. Reports the upload latency (extraction and
chunk counting happen in the request), the time to completion, chunks/s and KB/s, and — as the
ceiling — the same chunk texts embedded through `/v1/embeddings` in batches of the same size, so the
cost of the job itself (database writes, progress commits) shows as the difference.

Run: `.venv/bin/python bench/document_ingest.py [--kb 200] [--database-url URL]`
(~1-2 min on 2 cores; writes bench/results/document_ingest[_postgresql].json).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import httpx

from common import BENCH, ProcessGroup, machine, markdown_table, write_results

ROOT = BENCH.parent
BATCH = 32  # SOMA_MEMORY_DOCUMENT_BATCH's default


def corpus(kb: int) -> str:
    """At least `kb` KB of markdown from the repository's own documents."""
    sources = [ROOT / "README.md", *sorted(BENCH.glob("*.md"))]
    texts = [p.read_text() for p in sources if p.is_file()]
    parts: list[str] = []
    size = 0
    cycle = 0
    while size < kb * 1024:
        cycle += 1
        for text in texts:
            if size >= kb * 1024:
                break
            part = f"# Copy {cycle}\n\n{text}"
            parts.append(part)
            size += len(part.encode())
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kb", type=int, default=200)
    parser.add_argument(
        "--database-url", default=None, help="e.g. postgresql+asyncpg://postgres@127.0.0.1/db"
    )
    args = parser.parse_args()
    text = corpus(args.kb)
    size = len(text.encode())
    env = {"SOMA_DATABASE_URL": args.database_url} if args.database_url else {}
    with ProcessGroup() as procs:
        server = procs.start_soma("document-bench", env_overrides=env)
        admin = {"authorization": f"Bearer {server.info['admin_key']}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", headers=admin, timeout=120) as http:
            http.post("/v1/memory/recall", json={"query": "warm-up"}).raise_for_status()
            started = time.perf_counter()
            created = http.post(
                "/v1/memory/documents",
                json={"name": "corpus.md", "text": text, "media_type": "text/markdown", "namespace": "bench"},
            )
            upload_s = time.perf_counter() - started
            created.raise_for_status()
            document: dict[str, Any] = created.json()
            progress: list[tuple[float, int]] = []
            while document["status"] not in ("completed", "failed"):
                time.sleep(0.05)
                document = http.get(f"/v1/memory/documents/{document['id']}").json()
                progress.append((time.perf_counter() - started, document["chunks_done"]))
            total_s = time.perf_counter() - started
            if document["status"] != "completed":
                raise SystemExit(f"ingest failed: {document['error']}")
            chunks = _chunk_texts(http, "bench")
            started = time.perf_counter()
            for i in range(0, len(chunks), BATCH):
                http.post(
                    "/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": chunks[i : i + BATCH]}
                ).raise_for_status()
            embed_only_s = time.perf_counter() - started
    n = document["chunks_total"]
    assert len(chunks) == n, (len(chunks), n)
    results: dict[str, Any] = {
        "machine": machine(),
        "database": "postgresql" if args.database_url else "sqlite",
        "document_bytes": size,
        "chunks": n,
        "mean_chunk_chars": round(sum(len(c) for c in chunks) / n),
        "upload_s": round(upload_s, 3),
        "ingest_s": round(total_s, 2),
        "chunks_per_s": round(n / total_s, 1),
        "kb_per_s": round(size / 1024 / total_s, 2),
        "embeddings_only_s": round(embed_only_s, 2),
        "embeddings_only_chunks_per_s": round(n / embed_only_s, 1),
        "progress_polls_seen": len({done for _, done in progress}),
    }
    print(
        markdown_table(
            [
                "document",
                "chunks",
                "upload (extract + count) s",
                "to completed s",
                "chunks/s",
                "KB/s",
                "/v1/embeddings only, chunks/s",
            ],
            [
                [
                    f"{size / 1024:.0f} KB markdown",
                    n,
                    results["upload_s"],
                    results["ingest_s"],
                    results["chunks_per_s"],
                    results["kb_per_s"],
                    results["embeddings_only_chunks_per_s"],
                ]
            ],
        )
    )
    name = "document_ingest" + ("_postgresql" if args.database_url else "")
    print("wrote", write_results(name, results))


def _chunk_texts(http: httpx.Client, namespace: str) -> list[str]:
    out: list[str] = []
    after: str | None = None
    while True:
        params: dict[str, Any] = {"namespace": namespace, "limit": 1000}
        if after:
            params["after"] = after
        page = http.get("/v1/memory", params=params).json()
        out += [m["text"] for m in page["data"]]
        if not page["has_more"]:
            return out
        after = page["data"][-1]["id"]


if __name__ == "__main__":
    Path(BENCH / "results").mkdir(exist_ok=True)
    main()
