"""Embedded vector index candidates side by side in one run: latency, recall@10, build, RSS, save/load,
and whether each can share a process with llama.cpp.

    .venv/bin/python bench/vector_index.py              # ~8 min on 2 busy cores; bench/results/…json
    .venv/bin/python bench/vector_index.py --coexist    # ~1 min: each engine + llama.cpp in one process
    .venv/bin/python bench/vector_index.py --qdrant-url http://127.0.0.1:6333   # adds a Qdrant server

Candidates: int8 scan + exact re-rank (`Int8Index`, the server's default), exact numpy (`ExactIndex`,
the baseline), usearch (`UsearchIndex`), all through the port; hnswlib, voyager, Qdrant Edge
(`qdrant-edge-py`, in-process) and sqlite-vec (vec0 table, loaded into apsw's SQLite because this
Python's sqlite3 cannot load extensions); and `QdrantIndex` through qdrant-client: against a server
when `--qdrant-url` is given, else in qdrant-client's local mode at 10k only (a pure-Python scan, which
says nothing about a server's speed). Each is built at 10k and 100k 384-d unit vectors from a clustered
generator whose neighbour statistics are calibrated against real MiniLM embeddings (random Gaussian
vectors are pathological for ANN), then checked on 5k real all-MiniLM-L6-v2 embeddings of generated
sentences. Latency is one query at a time on one thread, k=10, query embedding excluded; numpy's BLAS
is pinned to one thread, as it is in `soma serve` once the embedder is loaded. A last section measures
the per-namespace layout (one index per tenant) against one shared index with the tenant filter
enforced inside the adapter.
"""

from __future__ import annotations

import argparse
import gc
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from common import machine, markdown_table, percentile, write_results
from somaagent.memory.index import ExactIndex, Int8Index, UsearchIndex
from somaagent.memory.qdrant_index import QdrantIndex, QdrantStore
from somaagent.models.providers.minilm import MiniLMEmbedder, set_blas_threads

F32 = npt.NDArray[np.float32]
DIM = 384
K = 10
BATCH = 10_000  # rows per insert call: a rebuild streams pages from the DB
M, EF_ADD, EF_SEARCH = 16, 128, 128  # the same graph parameters for every HNSW engine
SHIPPED = "int8"  # the server's default (`SOMA_MEMORY_INDEX`)


def rss_mb() -> float:
    """Resident set size of this process in MB (from /proc, current not peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def clustered(n: int, queries: int, seed: int = 0, clusters: int = 300) -> tuple[F32, F32]:
    """Unit vectors from a mixture of low-rank Gaussian clusters with Zipf-like sizes plus a shared offset.

    Real sentence embeddings are anisotropic (positive mean cosine) and have low intrinsic dimension;
    a=1.0, b=0.5, g=0.5 gives top-1/10th-neighbour/median cosines of ~0.74/0.64/0.10 at 20k, close to
    MiniLM on varied text. Queries are fresh draws from the same mixture, not copies of base rows.
    """
    rng = np.random.default_rng(seed)
    rank, a, b, g = 16, 1.0, 0.5, 0.5
    offset = rng.standard_normal(DIM).astype(np.float32)
    centres = rng.standard_normal((clusters, DIM)).astype(np.float32)
    bases = (rng.standard_normal((clusters, rank, DIM)) / np.sqrt(rank)).astype(np.float32)
    weights = 1 / np.arange(1, clusters + 1) ** 0.7
    weights /= weights.sum()
    total = n + queries
    labels = rng.choice(clusters, total, p=weights)
    out = np.empty((total, DIM), dtype=np.float32)
    for s in range(0, total, 20_000):  # chunks keep the (rows, rank, DIM) gather small
        lab = labels[s : s + 20_000]
        z = rng.standard_normal((len(lab), rank)).astype(np.float32)
        x = g * offset + centres[lab] + a * np.einsum("nr,nrd->nd", z, bases[lab])
        x += b * rng.standard_normal(x.shape).astype(np.float32)
        out[s : s + len(lab)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out[queries:], out[:queries]


def sentences(n: int, seed: int = 0) -> list[str]:
    """`n` distinct memory-like sentences from a small grammar (people, actions, topics, times)."""
    rnd = random.Random(seed)
    people = [
        "Alice",
        "Bob",
        "the customer",
        "our CTO",
        "Maria",
        "the support team",
        "my manager",
        "the new intern",
        "Ken",
        "the landlord",
        "Dr. Patel",
        "the finance team",
        "grandma",
        "Sam",
    ]
    verbs = [
        "prefers",
        "asked about",
        "complained about",
        "wants to schedule",
        "forgot",
        "is allergic to",
        "recommended",
        "needs a report on",
        "booked",
        "cancelled",
        "approved",
        "is worried about",
        "loves",
        "reviewed",
        "wrote a note about",
        "hates",
    ]
    topics = [
        "a vegetarian lunch",
        "the quarterly budget",
        "the Kubernetes upgrade",
        "flights to Lisbon",
        "the dentist appointment",
        "green tea",
        "the invoice from Acme",
        "a standing desk",
        "the Python 3.12 migration",
        "the marketing plan",
        "jazz concerts",
        "the password reset",
        "a refund for order 1142",
        "the rent increase",
        "the Q3 sales numbers",
        "hiking in the Alps",
        "the API rate limits",
        "the birthday party",
        "cat food",
        "the security audit",
        "a new laptop",
        "the contract renewal",
        "Italian restaurants",
        "the database backup",
        "the team offsite",
        "the printer on floor 3",
        "peanuts",
        "the quarterly OKRs",
        "a trip to Kyoto",
        "the SSL cert",
    ]
    when = [
        "on Monday",
        "next week",
        "yesterday",
        "every morning",
        "before the deadline",
        "last month",
        "in December",
        "after lunch",
        "",
        "",
        "",
    ]
    why = [
        "because it is urgent",
        "and wants an update",
        "again",
        "for the third time",
        "as soon as possible",
        "",
        "",
        "",
    ]
    out: set[str] = set()
    while len(out) < n:
        words = [rnd.choice(people), rnd.choice(verbs), rnd.choice(topics), rnd.choice(when), rnd.choice(why)]
        out.add(" ".join(w for w in words if w) + ".")
    ordered = sorted(out)
    rnd.shuffle(ordered)
    return ordered


class Candidate(Protocol):
    """What the bench drives; the port's adapters plus thin wrappers around the other engines."""

    def insert(self, keys: npt.NDArray[np.uint64], vectors: F32) -> None: ...
    def finish(self) -> None: ...
    def query(self, q: F32) -> list[int]: ...
    def save_load(self, workdir: Path) -> tuple[float, float]: ...
    def close(self) -> None: ...


PORT_ADAPTERS: dict[str, type[Int8Index | ExactIndex | UsearchIndex]] = {
    "int8": Int8Index,
    "exact": ExactIndex,
    "usearch": UsearchIndex,
}


class PortCandidate:
    """Int8Index, ExactIndex or UsearchIndex through the `VectorIndex` port (the code that ships)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.index = PORT_ADAPTERS[kind](DIM)

    def insert(self, keys: npt.NDArray[np.uint64], vectors: F32) -> None:
        self.index.upsert(keys, vectors)

    def finish(self) -> None:
        pass

    def query(self, q: F32) -> list[int]:
        return [h.id for h in self.index.search(q, K)]

    def save_load(self, workdir: Path) -> tuple[float, float]:
        path = workdir / f"{self.kind}.idx"
        t0 = time.perf_counter()
        self.index.save(path)
        t1 = time.perf_counter()
        self.index = PORT_ADAPTERS[self.kind].load(path, DIM)
        return t1 - t0, time.perf_counter() - t1

    def close(self) -> None:
        del self.index


class QdrantCandidate:
    """`QdrantIndex` through the port: a server at `url`, or qdrant-client's local mode in `workdir`."""

    def __init__(self, workdir: Path, url: str | None) -> None:
        self.url, self.path = url, str(workdir / "qdrant-local")
        # A fresh collection per run, so repeated runs against one server never see old points.
        self.prefix = f"soma_bench_{time.time_ns()}"
        self.store = QdrantStore(url=url, path=None if url else self.path, collection_prefix=self.prefix)
        self.index = QdrantIndex(self.store, "bench", "bench", DIM)

    def insert(self, keys: npt.NDArray[np.uint64], vectors: F32) -> None:
        self.index.upsert(keys, vectors)

    def finish(self) -> None:
        pass

    def query(self, q: F32) -> list[int]:
        return [h.id for h in self.index.search(q, K)]

    def save_load(self, workdir: Path) -> tuple[float, float]:
        # The server (or the local store) persists every write; "load" is a new client's first query.
        t0 = time.perf_counter()
        self.store.close()
        t1 = time.perf_counter()
        self.store = QdrantStore(
            url=self.url, path=None if self.url else self.path, collection_prefix=self.prefix
        )
        self.index = QdrantIndex(self.store, "bench", "bench", DIM)
        self.query(np.full(DIM, 1 / np.sqrt(DIM), dtype=np.float32))
        return t1 - t0, time.perf_counter() - t1

    def close(self) -> None:
        with self.store.client() as client:
            client.delete_collection(f"{self.prefix}_{DIM}")
        self.store.close()


class HnswlibCandidate:
    """hnswlib with the same M / ef parameters."""

    def __init__(self, capacity: int) -> None:
        import hnswlib

        self.index = hnswlib.Index(space="ip", dim=DIM)
        self.index.init_index(max_elements=capacity, M=M, ef_construction=EF_ADD)

    def insert(self, keys: npt.NDArray[np.uint64], vectors: F32) -> None:
        self.index.add_items(vectors, keys.astype(np.int64))

    def finish(self) -> None:
        self.index.set_ef(EF_SEARCH)
        self.index.set_num_threads(1)

    def query(self, q: F32) -> list[int]:
        labels, _ = self.index.knn_query(q, K)
        return [int(x) for x in labels[0]]

    def save_load(self, workdir: Path) -> tuple[float, float]:
        import hnswlib

        path = str(workdir / "hnswlib.bin")
        t0 = time.perf_counter()
        self.index.save_index(path)
        t1 = time.perf_counter()
        self.index = hnswlib.Index(space="ip", dim=DIM)
        self.index.load_index(path)
        self.finish()
        return t1 - t0, time.perf_counter() - t1

    def close(self) -> None:
        del self.index


class VoyagerCandidate:
    """Spotify's voyager (hnswlib's algorithm, manylinux wheels, resizes itself) with the same M / ef."""

    def __init__(self) -> None:
        from voyager import Index, Space

        self.index = Index(Space.InnerProduct, num_dimensions=DIM, M=M, ef_construction=EF_ADD)

    def insert(self, keys: npt.NDArray[np.uint64], vectors: F32) -> None:
        self.index.add_items(vectors, keys.tolist())

    def finish(self) -> None:
        pass

    def query(self, q: F32) -> list[int]:
        ids, _ = self.index.query(q, K, query_ef=EF_SEARCH)
        return [int(x) for x in ids]

    def save_load(self, workdir: Path) -> tuple[float, float]:
        from voyager import Index

        path = str(workdir / "voyager.bin")
        t0 = time.perf_counter()
        self.index.save(path)
        t1 = time.perf_counter()
        self.index = Index.load(path)
        return t1 - t0, time.perf_counter() - t1

    def close(self) -> None:
        del self.index


class QdrantEdgeCandidate:
    """Qdrant Edge shard in-process; `optimize()` builds the HNSW segments after the inserts."""

    def __init__(self, workdir: Path) -> None:
        import qdrant_edge as qe

        self.qe = qe
        self.path = str(workdir / "qdrant-edge")
        self.config = qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(size=DIM, distance=qe.Distance.Dot),
            hnsw_config=qe.HnswIndexConfig(m=M, ef_construct=EF_ADD, full_scan_threshold=10_000),
        )
        self.shard = qe.EdgeShard.create(self.path, self.config)
        self.params = qe.SearchParams(hnsw_ef=EF_SEARCH)

    def insert(self, keys: npt.NDArray[np.uint64], vectors: F32) -> None:
        qe = self.qe
        points = [qe.Point(int(k), v) for k, v in zip(keys.tolist(), vectors.tolist(), strict=True)]
        self.shard.update(qe.UpdateOperation.upsert_points(points))

    def finish(self) -> None:
        self.shard.optimize()

    def query(self, q: F32) -> list[int]:
        req = self.qe.QueryRequest(limit=K, query=self.qe.Query.Nearest(q.tolist()), params=self.params)
        return [int(p.id) for p in self.shard.query(req)]

    def save_load(self, workdir: Path) -> tuple[float, float]:
        t0 = time.perf_counter()
        self.shard.flush()
        self.shard.close()
        t1 = time.perf_counter()
        self.shard = self.qe.EdgeShard.load(self.path)
        return t1 - t0, time.perf_counter() - t1

    def close(self) -> None:
        self.shard.close()


class SqliteVecCandidate:
    """sqlite-vec `vec0` virtual table (exact scan) in an on-disk SQLite file, via apsw."""

    def __init__(self, workdir: Path) -> None:
        self.path = str(workdir / "vec.db")
        self.db = self._open()
        self.db.execute(f"CREATE VIRTUAL TABLE v USING vec0(embedding float[{DIM}] distance_metric=cosine)")

    def _open(self) -> Any:
        import apsw
        import sqlite_vec

        db = apsw.Connection(self.path)
        db.enable_load_extension(True)
        db.load_extension(sqlite_vec.loadable_path())
        return db

    def insert(self, keys: npt.NDArray[np.uint64], vectors: F32) -> None:
        with self.db:
            self.db.executemany(
                "INSERT INTO v(rowid, embedding) VALUES (?, ?)",
                ((int(k), v.tobytes()) for k, v in zip(keys.tolist(), vectors, strict=True)),
            )

    def finish(self) -> None:
        pass

    def query(self, q: F32) -> list[int]:
        sql = "SELECT rowid FROM v WHERE embedding MATCH ? AND k = ? ORDER BY distance"
        return [int(r[0]) for r in self.db.execute(sql, (q.tobytes(), K))]

    def save_load(self, workdir: Path) -> tuple[float, float]:
        # Rows are committed by insert; "load" is reopening the file and answering a first query.
        t0 = time.perf_counter()
        self.db.close()
        t1 = time.perf_counter()
        self.db = self._open()
        self.query(np.full(DIM, 1 / np.sqrt(DIM), dtype=np.float32))
        return t1 - t0, time.perf_counter() - t1

    def close(self) -> None:
        self.db.close()


@dataclass
class Row:
    """One candidate at one size."""

    dataset: str
    n: int
    engine: str
    build_s: float
    rss_mb: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    recall10: float
    save_s: float
    load_s: float
    recall10_after_load: float


def recall(found: list[list[int]], truth: npt.NDArray[np.intp]) -> float:
    """Mean share of the exact top-10 found in each answer."""
    return float(np.mean([len(set(f) & set(t.tolist())) / K for f, t in zip(found, truth, strict=True)]))


def measure(
    name: str,
    make: Callable[[Path], Candidate],
    base: F32,
    queries: F32,
    truth: npt.NDArray[np.intp],
    dataset: str,
) -> Row:
    """Build, query (one at a time), save, reload and re-check one candidate; free it afterwards."""
    gc.collect()
    workdir = Path(tempfile.mkdtemp(prefix="vbench-"))
    rss0 = rss_mb()
    t0 = time.perf_counter()
    cand = make(workdir)
    keys = np.arange(len(base), dtype=np.uint64)
    for s in range(0, len(base), BATCH):
        cand.insert(keys[s : s + BATCH], base[s : s + BATCH])
    cand.finish()
    build = time.perf_counter() - t0
    rss = rss_mb() - rss0
    for q in queries[:20]:  # warm caches and lazy allocations
        cand.query(q)
    lat, found = [], []
    for q in queries:
        t = time.perf_counter()
        found.append(cand.query(q))
        lat.append((time.perf_counter() - t) * 1000)
    save_s, load_s = cand.save_load(workdir)
    after = recall([cand.query(q) for q in queries], truth)
    cand.close()
    del cand
    shutil.rmtree(workdir, ignore_errors=True)
    row = Row(
        dataset,
        len(base),
        name,
        build,
        rss,
        percentile(lat, 50),
        percentile(lat, 95),
        percentile(lat, 99),
        recall(found, truth),
        save_s,
        load_s,
        after,
    )
    print(
        f"  {dataset:>9} {len(base):>7} {name:<12} build {build:6.2f}s p95 {row.p95_ms:7.3f}ms "
        f"recall {row.recall10:.4f}",
        flush=True,
    )
    return row


def exact_truth(base: F32, queries: F32) -> npt.NDArray[np.intp]:
    """Exact top-10 row ids per query (float64 accumulation so ties do not depend on BLAS order)."""
    scores = queries.astype(np.float64) @ base.astype(np.float64).T
    return np.argsort(-scores, axis=1, kind="stable")[:, :K]


def namespaces(base: F32, queries: F32, tenants: int) -> dict[str, Any]:
    """Per-tenant indexes vs one shared index filtered inside the adapter (the shipped Int8Index)."""
    per = len(base) // tenants
    owner = np.arange(len(base)) % tenants  # tenant t owns keys t, t+tenants, ...
    keys = np.arange(len(base), dtype=np.uint64)
    gc.collect()
    rss0 = rss_mb()
    t0 = time.perf_counter()
    own = [Int8Index(DIM) for _ in range(tenants)]
    for t in range(tenants):
        own[t].upsert(keys[owner == t], base[owner == t])
    build_own = time.perf_counter() - t0
    rss_own = rss_mb() - rss0
    t0 = time.perf_counter()
    shared = Int8Index(DIM)
    for s in range(0, len(base), BATCH):
        shared.upsert(keys[s : s + BATCH], base[s : s + BATCH])
    build_shared = time.perf_counter() - t0
    allowed = [set(keys[owner == t].tolist()) for t in range(tenants)]
    lat_own, lat_shared, leaks, rec = [], [], 0, []
    for i, q in enumerate(queries):
        t = i % tenants
        mask = owner == t
        truth = set(keys[mask][np.argsort(-(base[mask] @ q), kind="stable")[:K]].tolist())
        s = time.perf_counter()
        hits = own[t].search(q, K)
        lat_own.append((time.perf_counter() - s) * 1000)
        s = time.perf_counter()
        shits = shared.search(q, K, allowed=allowed[t])
        lat_shared.append((time.perf_counter() - s) * 1000)
        leaks += sum(1 for h in [*hits, *shits] if owner[h.id] != t)
        rec.append(len(truth & {h.id for h in hits}) / K)
    # Fixed cost of a namespace: 1,000 indexes of 10 vectors each.
    gc.collect()
    r0 = rss_mb()
    small = [Int8Index(DIM) for _ in range(1000)]
    for ix in small:
        ix.upsert(np.arange(10), base[:10])
    per_namespace_kb = (rss_mb() - r0) * 1024 / 1000
    del small, own, shared
    return {
        "tenants": tenants,
        "vectors_per_tenant": per,
        "per_tenant_build_s": build_own,
        "per_tenant_rss_mb": rss_own,
        "shared_build_s": build_shared,
        "per_tenant_p50_ms": percentile(lat_own, 50),
        "per_tenant_p95_ms": percentile(lat_own, 95),
        "shared_filtered_p50_ms": percentile(lat_shared, 50),
        "shared_filtered_p95_ms": percentile(lat_shared, 95),
        "per_tenant_recall10": float(np.mean(rec)),
        "cross_tenant_hits": leaks,
        "small_namespace_overhead_kb": per_namespace_kb,
    }


# One engine, then llama.cpp loading SmolLM2 and generating, in a fresh interpreter; "model-first"
# loads the model before the engine and again after it (usearch broke the load that follows it).
COEXIST_PROBE = textwrap.dedent(
    """
    import sys, tempfile
    import numpy as np

    def engine(name):
        x = np.random.default_rng(0).standard_normal((2000, 384)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        if name in ("int8", "exact", "usearch"):
            from somaagent.memory import index
            kinds = {"int8": index.Int8Index, "exact": index.ExactIndex, "usearch": index.UsearchIndex}
            ix = kinds[name](384)
            ix.upsert(range(2000), x)
            return ix.search(x[7], 3)[0].id
        if name == "hnswlib":
            import hnswlib
            ix = hnswlib.Index(space="ip", dim=384)
            ix.init_index(max_elements=2000, M=16, ef_construction=128)
            ix.add_items(x, np.arange(2000))
            return int(ix.knn_query(x[7], 3)[0][0][0])
        if name == "voyager":
            from voyager import Index, Space
            ix = Index(Space.InnerProduct, num_dimensions=384)
            ix.add_items(x, list(range(2000)))
            return int(ix.query(x[7], 3)[0][0])
        if name == "qdrant-edge":
            import qdrant_edge as qe
            shard = qe.EdgeShard.create(
                tempfile.mkdtemp(),
                qe.EdgeConfig(vectors=qe.EdgeVectorParams(size=384, distance=qe.Distance.Dot)),
            )
            shard.update(qe.UpdateOperation.upsert_points([qe.Point(i, v) for i, v in enumerate(x.tolist())]))
            shard.optimize()
            return int(shard.query(qe.QueryRequest(limit=3, query=qe.Query.Nearest(x[7].tolist())))[0].id)
        if name == "qdrant-client":
            from somaagent.memory.qdrant_index import QdrantIndex, QdrantStore
            ix = QdrantIndex(QdrantStore(path=":memory:"), "t", "n", 384)
            ix.upsert(range(2000), x)
            return ix.search(x[7], 3)[0].id
        if name == "sqlite-vec":
            import apsw, sqlite_vec
            db = apsw.Connection(":memory:")
            db.enable_load_extension(True)
            db.load_extension(sqlite_vec.loadable_path())
            db.execute("CREATE VIRTUAL TABLE v USING vec0(e float[384])")
            rows = ((i, r.tobytes()) for i, r in enumerate(x))
            db.executemany("INSERT INTO v(rowid, e) VALUES (?, ?)", rows)
            sql = "SELECT rowid FROM v WHERE e MATCH ? AND k = 3 ORDER BY distance"
            return next(iter(db.execute(sql, (x[7].tobytes(),))))[0]
        raise SystemExit(f"unknown engine {name}")

    def model():
        from llama_cpp import Llama
        from somaagent.models.providers.llamacpp import default_gguf_path
        llm = Llama(model_path=str(default_gguf_path()), n_ctx=256, n_threads=1, verbose=False)
        return llm("The capital of France is", max_tokens=4, temperature=0)["choices"][0]["text"]

    name, order = sys.argv[1], sys.argv[2]
    if order == "model-first":
        model()
    assert engine(name) == 7
    print(repr(model()))
    """
)
COEXIST_ENGINES = [
    "int8",
    "exact",
    "usearch",
    "hnswlib",
    "voyager",
    "qdrant-edge",
    "qdrant-client",
    "sqlite-vec",
]


def coexist_table() -> None:
    """Print, per engine and import order, whether llama.cpp still loads and runs SmolLM2 afterwards."""
    rows = []
    for name in COEXIST_ENGINES:
        row = [name]
        for order in ("engine-first", "model-first"):
            done = subprocess.run(
                [sys.executable, "-c", COEXIST_PROBE, name, order],
                capture_output=True,
                text=True,
                timeout=300,
            )
            last = (done.stderr.strip().splitlines() or [""])[-1]
            row.append(f"ok {done.stdout.strip()}" if done.returncode == 0 else f"FAILS: {last[:90]}")
        rows.append(row)
        print(f"  {row}", flush=True)
    print()
    print(markdown_table(["engine", "engine, then llama.cpp", "llama.cpp, engine, llama.cpp again"], rows))
    headers = ["engine", "engine-first", "model-first"]
    path = write_results(
        "vector_index_coexist",
        {"machine": machine(), "rows": [dict(zip(headers, r, strict=True)) for r in rows]},
    )
    print(f"wrote {path}")


def main() -> None:
    """Run every candidate at 10k and 100k clustered vectors, then on real MiniLM embeddings."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--real", type=int, default=5000, help="real sentences to embed (0 to skip)")
    parser.add_argument("--skip", default="", help="comma-separated engines to leave out")
    parser.add_argument("--qdrant-url", default=None, help="also measure QdrantIndex on this server")
    parser.add_argument("--coexist", action="store_true", help="only check each engine beside llama.cpp")
    args = parser.parse_args()
    if args.coexist:
        coexist_table()
        return
    started = time.perf_counter()
    set_blas_threads(1)  # as in `soma serve`, where loading the embedder pins OpenBLAS to one thread
    sizes = [int(s) for s in args.sizes.split(",")]
    skip = set(args.skip.split(",")) - {""}
    base_all, queries = clustered(max(sizes), args.queries)

    def engines(n: int) -> dict[str, Callable[[Path], Candidate]]:
        table: dict[str, Callable[[Path], Candidate]] = {
            "exact-numpy": lambda _: PortCandidate("exact"),
            "int8": lambda _: PortCandidate("int8"),
            "usearch": lambda _: PortCandidate("usearch"),
            "hnswlib": lambda _: HnswlibCandidate(n),
            "voyager": lambda _: VoyagerCandidate(),
            "qdrant-edge": QdrantEdgeCandidate,
            "sqlite-vec": SqliteVecCandidate,
        }
        if args.qdrant_url:
            table["qdrant-server"] = lambda w: QdrantCandidate(w, args.qdrant_url)
        elif n <= 10_000:  # local mode checks the payload filter in Python per point: minutes at 100k
            table["qdrant-local"] = lambda w: QdrantCandidate(w, None)
        return {k: v for k, v in table.items() if k not in skip}

    rows: list[Row] = []
    for n in sizes:
        base = np.ascontiguousarray(base_all[:n])
        truth = exact_truth(base, queries)
        for name, make in engines(n).items():
            rows.append(measure(name, make, base, queries, truth, "clustered"))
    real_stats: dict[str, float] = {}
    if args.real:
        embedder = MiniLMEmbedder()
        embedder.load()
        texts = sentences(args.real + args.queries)
        t = time.perf_counter()
        vectors, _ = embedder.embed_sync(texts)
        real_stats["embed_s"] = time.perf_counter() - t
        set_blas_threads(1)
        rq, rb = vectors[: args.queries], np.ascontiguousarray(vectors[args.queries :])
        sims = np.sort(rq @ rb.T, axis=1)
        real_stats |= {
            "top1_cos": float(sims[:, -1].mean()),
            "top10_cos": float(sims[:, -K].mean()),
            "median_cos": float(np.median(sims)),
        }
        truth = exact_truth(rb, rq)
        for name, make in engines(len(rb)).items():
            rows.append(measure(name, make, rb, rq, truth, "minilm"))
    ns = namespaces(np.ascontiguousarray(base_all[: max(sizes)]), queries, tenants=50)
    print(f"  namespaces: {ns}", flush=True)

    exact = {(r.dataset, r.n): r for r in rows if r.engine == "exact-numpy"}
    table = []
    for r in rows:
        ref = exact.get((r.dataset, r.n))
        ratio = f"{r.p95_ms / ref.p95_ms:.3f}x" if ref else "n/a"
        table.append(
            [
                r.dataset,
                f"{r.n:,}",
                f"**{r.engine}**" if r.engine == SHIPPED else r.engine,
                f"{r.build_s:.2f}",
                f"{r.rss_mb:.0f}",
                f"{r.p50_ms:.3f}",
                f"{r.p95_ms:.3f}",
                ratio,
                f"{r.recall10:.4f}",
                f"{r.save_s:.3f}",
                f"{r.load_s:.3f}",
                f"{r.recall10_after_load:.4f}",
            ]
        )
    print()
    print(
        markdown_table(
            [
                "data",
                "vectors",
                "engine",
                "build s",
                "RSS Δ MB",
                "p50 ms",
                "p95 ms",
                "p95 vs exact",
                "recall@10",
                "save s",
                "load s",
                "recall@10 after load",
            ],
            table,
        )
    )
    print()
    print(
        markdown_table(
            [
                f"layout ({ns['tenants']} tenants x {ns['vectors_per_tenant']:,})",
                "build s",
                "p50 ms",
                "p95 ms",
                "cross-tenant hits",
            ],
            [
                [
                    "one int8 index per tenant",
                    f"{ns['per_tenant_build_s']:.2f}",
                    f"{ns['per_tenant_p50_ms']:.3f}",
                    f"{ns['per_tenant_p95_ms']:.3f}",
                    ns["cross_tenant_hits"],
                ],
                [
                    "one shared index, filter in adapter",
                    f"{ns['shared_build_s']:.2f}",
                    f"{ns['shared_filtered_p50_ms']:.3f}",
                    f"{ns['shared_filtered_p95_ms']:.3f}",
                    "(counted above)",
                ],
            ],
        )
    )
    print(
        f"\nper-namespace fixed cost: {ns['small_namespace_overhead_kb']:.0f} KB RSS for a 10-vector index; "
        f"per-tenant recall@10 {ns['per_tenant_recall10']:.4f}"
    )
    if real_stats:
        print(
            f"MiniLM data: top-1 cos {real_stats['top1_cos']:.3f}, 10th {real_stats['top10_cos']:.3f}, "
            f"median {real_stats['median_cos']:.3f}; embedding {args.real + args.queries} took "
            f"{real_stats['embed_s']:.1f} s"
        )
    elapsed = time.perf_counter() - started
    path = write_results(
        "vector_index",
        {
            "machine": machine(),
            "elapsed_s": elapsed,
            "k": K,
            "dimensions": DIM,
            "queries": args.queries,
            "hnsw": {"m": M, "ef_construct": EF_ADD, "ef_search": EF_SEARCH},
            "blas_threads": 1,
            "rows": [r.__dict__ for r in rows],
            "namespaces": ns,
            "minilm_data": real_stats,
        },
    )
    print(f"\n{elapsed:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
