"""The vector index port against the real engines, no mocks: the int8 scan (the server's default),
exact numpy, usearch HNSW and Qdrant through qdrant-client.

No Qdrant server binary can run on this machine (no PyPI package ships one, no container runtime),
so the Qdrant adapter runs against qdrant-client's local mode: the same client API and the same
requests, answered in-process by the client's own implementation instead of a server.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import numpy.typing as npt
import pytest
from sqlalchemy import update

from somaagent.core.errors import InvalidRequest, UpstreamError
from somaagent.db.engine import create_engine, session_factory
from somaagent.memory.index import (
    ExactIndex,
    Int8Index,
    UsearchIndex,
    VectorIndex,
    rebuild_index,
)
from somaagent.memory.indexes import IndexFactory, SyncedIndexes
from somaagent.memory.qdrant_index import QdrantIndex, QdrantStore
from somaagent.memory.tables import MemoryItem
from tests.support.processes import start_soma

DIM = 384
F32 = npt.NDArray[np.float32]
Make = Callable[[int], VectorIndex]

# Local mode warns once that payload indexes only matter on a server; that is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning")


def clustered(n: int, seed: int = 0, clusters: int = 40) -> F32:
    """Unit vectors from low-rank Gaussian clusters (the bench's generator, smaller)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, DIM)).astype(np.float32)
    bases = (rng.standard_normal((clusters, 16, DIM)) / 4).astype(np.float32)
    labels = rng.integers(0, clusters, n)
    z = rng.standard_normal((n, 16)).astype(np.float32)
    x = 0.5 * centres[0] + centres[labels] + np.einsum("nr,nrd->nd", z, bases[labels])
    x += 0.5 * rng.standard_normal(x.shape).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def qdrant_store() -> Iterator[QdrantStore]:
    store = QdrantStore(path=":memory:")
    yield store
    store.close()


@pytest.fixture(params=["int8", "exact", "usearch", "qdrant"])
def make(request: pytest.FixtureRequest, qdrant_store: QdrantStore) -> Make:
    """A fresh empty index of each engine; Qdrant ones get their own namespace in one shared store."""
    if request.param == "qdrant":
        return lambda dim: QdrantIndex(qdrant_store, "tenant-a", f"ns-{secrets.token_hex(4)}", dim)
    engine: dict[str, Make] = {"int8": Int8Index, "exact": ExactIndex, "usearch": UsearchIndex}
    return engine[request.param]


def recall_at_10(index: VectorIndex, base: F32, queries: F32) -> float:
    exact = ExactIndex(DIM)
    exact.upsert(range(len(base)), base)
    truth = [{h.id for h in exact.search(q, 10)} for q in queries]
    found = [{h.id for h in index.search(q, 10)} for q in queries]
    return float(np.mean([len(f & t) / 10 for f, t in zip(found, truth, strict=True)]))


def test_add_search_remove_upsert(make: Make) -> None:
    index = make(DIM)
    # 1,000 rows: above Int8Index's exact-scan cut-off, so its int8 path is the one tested.
    n = 1000
    vectors = clustered(n)
    index.upsert(range(n), vectors)
    assert index.count() == n
    hits = index.search(vectors[17], 3)
    assert hits[0].id == 17 and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)

    assert index.remove([17, 99_999]) == 1
    assert index.remove([17]) == 0
    assert index.count() == n - 1
    assert 17 not in {h.id for h in index.search(vectors[17], 10)}

    # Upsert replaces: key 5 now holds what key 6 held, and there is still one key 5.
    index.upsert([5], vectors[6:7] * 3.0)  # not unit length on purpose: the adapter normalizes
    assert index.count() == n - 1
    top = index.search(vectors[6], 2)
    assert {h.id for h in top} == {5, 6}
    assert all(h.score == pytest.approx(1.0, abs=1e-4) for h in top)
    # Its old vector is gone: against its own old vector key 5 now scores what vector 6 does.
    [old] = index.search(vectors[5], 1, allowed={5})
    assert old.score == pytest.approx(float(vectors[5] @ vectors[6]), abs=1e-4)

    # A removed key can come back, and duplicate keys in one batch: the last one wins.
    index.upsert([17, n + 300, n + 300], vectors[[17, 1, 2]])
    assert index.count() == n + 1
    assert index.search(vectors[17], 1)[0].id == 17
    assert index.search(vectors[2], 2)[0].id in {2, n + 300}
    assert index.search(vectors[2], 1, allowed={n + 300})[0].score == pytest.approx(1.0, abs=1e-4)


def test_allowed_filter_is_enforced(make: Make) -> None:
    index = make(DIM)
    vectors = clustered(2000, seed=3)
    index.upsert(range(2000), vectors)
    for allowed in ({1, 2, 3}, set(range(0, 2000, 2)), set()):
        hits = index.search(vectors[1], 10, allowed=allowed)
        assert {h.id for h in hits} <= allowed
        assert len(hits) == min(10, len(allowed))


def test_recall_at_10_vs_exact(make: Make) -> None:
    # Queries are fresh draws from the same mixture (same seed => same clusters), not copies of base rows.
    # Few queries: qdrant-client's local mode checks the payload filter in Python for every point.
    data = clustered(3050, seed=1)
    base, queries = data[:3000], data[3000:]
    index = rebuild_index(make(DIM), ((range(s, s + 1000), base[s : s + 1000]) for s in range(0, 3000, 1000)))
    assert recall_at_10(index, base, queries) >= 0.95


def test_int8_scores_are_the_exact_ones_and_recall_survives_churn() -> None:
    data = clustered(10100, seed=5)
    base, moved, queries = data[:8000], data[8000:10000], data[10000:]
    index, exact = Int8Index(DIM), ExactIndex(DIM)
    for ix in (index, exact):
        ix.upsert(range(8000), base)
        # Churn: delete a quarter, move another quarter to new vectors, as the sync would apply it.
        ix.remove(range(0, 8000, 4))
        ix.upsert(range(1, 8000, 4), moved)
    for q in queries:
        got, want = index.search(q, 10), exact.search(q, 10)
        assert [h.id for h in got] == [h.id for h in want]
        assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-6)


@pytest.mark.parametrize("kind", [Int8Index, ExactIndex, UsearchIndex])
def test_persistence_round_trip(kind: type[Int8Index | ExactIndex | UsearchIndex], tmp_path: Path) -> None:
    vectors = clustered(500, seed=4)
    index = kind(DIM)
    index.upsert(np.arange(500) * 7, vectors)
    path = tmp_path / "idx.bin"
    index.save(path)
    loaded = kind.load(path, DIM)
    assert loaded.count() == 500
    for q in vectors[:20]:
        assert [h.id for h in loaded.search(q, 5)] == [h.id for h in index.search(q, 5)]
    with pytest.raises(InvalidRequest, match="384"):
        kind.load(path, 768)


def test_usearch_load_of_garbage_says_how_to_fix(tmp_path: Path) -> None:
    path = tmp_path / "bad.usearch"
    path.write_bytes(b"not an index" * 100)
    with pytest.raises(InvalidRequest, match="reindex"):
        UsearchIndex.load(path, DIM)
    with pytest.raises(InvalidRequest, match="reindex"):
        UsearchIndex.load(tmp_path / "missing.usearch", DIM)


def test_dimension_mismatch_is_a_clear_error(make: Make) -> None:
    index = make(DIM)
    with pytest.raises(InvalidRequest, match=r"768 dimensions but this index holds 384"):
        index.upsert([1], np.ones((1, 768), dtype=np.float32))
    index.upsert([1], np.ones((1, DIM), dtype=np.float32))
    with pytest.raises(InvalidRequest, match=r"128 dimensions but this index holds 384"):
        index.search(np.ones(128, dtype=np.float32), 5)
    with pytest.raises(InvalidRequest, match="2 keys but 1 vectors"):
        index.upsert([1, 2], np.ones((1, DIM), dtype=np.float32))
    with pytest.raises(InvalidRequest, match="non-zero"):
        index.upsert([3], np.zeros((1, DIM), dtype=np.float32))
    with pytest.raises(InvalidRequest, match="2\\*\\*63"):
        index.upsert([-1], np.ones((1, DIM), dtype=np.float32))


def test_qdrant_namespaces_share_a_collection_but_never_each_others_points(qdrant_store: QdrantStore) -> None:
    vectors = clustered(300, seed=6)
    a = QdrantIndex(qdrant_store, "tenant-a", "notes", DIM)
    b = QdrantIndex(qdrant_store, "tenant-b", "notes", DIM)
    a_other = QdrantIndex(qdrant_store, "tenant-a", "other", DIM)
    a.upsert(range(0, 100), vectors[:100])
    b.upsert(range(100, 200), vectors[:100])  # the same vectors under b's own keys
    a_other.upsert(range(200, 300), vectors[100:200])
    assert (a.count(), b.count(), a_other.count()) == (100, 100, 100)
    with qdrant_store.client() as client:
        assert client.get_collections().collections[0].name == "soma_memory_384"
    assert {h.id for h in a.search(vectors[3], 50)} <= set(range(100))
    assert {h.id for h in b.search(vectors[3], 50)} <= set(range(100, 200))
    assert b.search(vectors[3], 1, allowed={3, 103})[0].id == 103  # `allowed` cannot reach a's key 3
    assert b.remove([3, 4]) == 0  # a's keys: not b's to delete
    assert a.count() == 100
    assert a.remove([3, 103]) == 1
    assert (a.count(), b.count()) == (99, 100)


def test_qdrant_collection_of_another_size_is_a_clear_error(qdrant_store: QdrantStore) -> None:
    from qdrant_client.http import models

    with qdrant_store.client() as client:
        client.create_collection(
            "soma_memory_384", vectors_config=models.VectorParams(size=8, distance=models.Distance.DOT)
        )
    with pytest.raises(UpstreamError, match=r"holds 8-d vectors, not 384.*SOMA_QDRANT_COLLECTION_PREFIX"):
        QdrantIndex(qdrant_store, "t", "n", DIM).count()


def test_qdrant_local_store_persists_across_clients(tmp_path: Path) -> None:
    vectors = clustered(50, seed=7)
    store = QdrantStore(path=str(tmp_path / "qdrant"))
    QdrantIndex(store, "t", "n", DIM).upsert(range(50), vectors)
    store.close()
    again = QdrantStore(path=str(tmp_path / "qdrant"))
    try:
        index = QdrantIndex(again, "t", "n", DIM)
        assert index.count() == 50
        assert index.search(vectors[9], 1)[0].id == 9
    finally:
        again.close()


FACTORIES: dict[str, Callable[[QdrantStore], IndexFactory]] = {
    "int8": lambda _: lambda _t, _n, dim: Int8Index(dim),
    "exact": lambda _: lambda _t, _n, dim: ExactIndex(dim),
    "qdrant": lambda store: lambda t, n, dim: QdrantIndex(store, t, n, dim),
}


@pytest.mark.parametrize("kind", list(FACTORIES))
async def test_sync_applies_inserts_updates_and_deletes_in_order(
    kind: str, qdrant_store: QdrantStore, tmp_path: Path
) -> None:
    """`SyncedIndexes` over a real SQLite table: what is committed is what a search sees."""
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'memories.db'}")
    async with engine.begin() as conn:
        await conn.run_sync(MemoryItem.metadata.create_all)
    sessions = session_factory(engine)
    indexes = SyncedIndexes(FACTORIES[kind](qdrant_store))
    vectors = clustered(600, seed=8)
    now = datetime.now(UTC)
    version = 0

    async def search(tenant: str, q: F32, k: int = 5) -> list[int]:
        async with sessions() as session:
            return [h.id for h in await indexes.search(session, tenant, "ns", q, k)]

    async with sessions.begin() as session:
        for i in range(500):  # above the int8 cut-off again
            version += 1
            session.add(
                MemoryItem(
                    id=f"m{i}",
                    tenant_id="t1" if i < 400 else "t2",
                    key=1000 + i,
                    namespace="ns",
                    text=f"memory {i}",
                    meta={},
                    embedding=vectors[i].astype("<f4").tobytes(),
                    model="test",
                    version=version,
                    created_at=now,
                    updated_at=now,
                )
            )
    assert (await search("t1", vectors[10]))[0] == 1010
    assert 1410 not in await search("t1", vectors[410], 20)  # t2's memory, t1's search
    assert (await search("t2", vectors[410]))[0] == 1410

    # An update (key 1010 now holds vector 550) and a soft delete (key 1020), each with a new version.
    async with sessions.begin() as session:
        version += 1
        await session.execute(
            update(MemoryItem)
            .where(MemoryItem.key == 1010)
            .values(embedding=vectors[550].astype("<f4").tobytes(), version=version)
        )
        version += 1
        await session.execute(
            update(MemoryItem).where(MemoryItem.key == 1020).values(deleted_at=now, version=version)
        )
    assert (await search("t1", vectors[550]))[0] == 1010
    assert 1010 not in await search("t1", vectors[10], 3)
    assert 1020 not in await search("t1", vectors[20], 20)
    await engine.dispose()


def test_server_recalls_and_forgets_through_qdrant(tmp_path: Path) -> None:
    """`soma serve` with SOMA_MEMORY_INDEX=qdrant (local mode): remember, recall, delete, recall."""
    (tmp_path / "data").mkdir()
    soma = start_soma(
        None, {"SOMA_MEMORY_INDEX": "qdrant", "SOMA_QDRANT_PATH": str(tmp_path / "qdrant")}, tmp_path / "data"
    )
    try:
        with httpx.Client(
            base_url=soma.base_url, headers={"authorization": f"Bearer {soma.admin_key}"}, timeout=120
        ) as admin:
            assert admin.post("/v1/tenants", json={"name": "q"}).status_code in (200, 201)
            key = admin.post("/v1/keys", json={"tenant": "q", "name": "test"}).json()["key"]
        with httpx.Client(
            base_url=soma.base_url, headers={"authorization": f"Bearer {key}"}, timeout=120
        ) as http:
            facts = ["The office wifi password is on the fridge.", "Maria is allergic to peanuts."]
            made = [http.post("/v1/memory/remember", json={"text": f}).json() for f in facts]
            found = http.post("/v1/memory/recall", json={"query": "food allergy", "top_k": 1}).json()["data"]
            assert found[0]["id"] == made[1]["id"]
            assert http.delete(f"/v1/memory/{made[1]['id']}").status_code in (200, 204)
            found = http.post("/v1/memory/recall", json={"query": "food allergy", "top_k": 2}).json()["data"]
            assert [m["id"] for m in found] == [made[0]["id"]]
    finally:
        soma.stop()


def test_qdrant_without_a_location_is_refused_with_the_fix(tmp_path: Path) -> None:
    from somaagent.api.app import create_app
    from somaagent.config import Settings

    with pytest.raises(ValueError, match="SOMA_QDRANT_URL"):
        create_app(Settings(data_dir=tmp_path, memory_index="qdrant"))


def test_the_server_never_imports_usearch_and_refuses_it_beside_llama_cpp(tmp_path: Path) -> None:
    from somaagent.api.app import create_app
    from somaagent.config import Settings

    probe = (
        "import sys, somaagent.api.app, somaagent.memory.indexes; "
        "print('usearch' in sys.modules, 'qdrant_client' in sys.modules)"
    )
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert imported.stdout.split() == ["False", "False"]
    assert Settings().memory_index == "int8"
    with pytest.raises(ValueError, match=r"cannot run beside the local llama\.cpp model"):
        create_app(Settings(data_dir=tmp_path, memory_index="usearch"))


COEXIST = textwrap.dedent(
    """
    import sys
    import numpy as np

    def index_works():
        from somaagent.memory.index import Int8Index
        rng = np.random.default_rng(0)
        x = rng.standard_normal((2000, 384)).astype(np.float32)
        index = Int8Index(384)
        index.upsert(range(2000), x)
        assert index.search(x[7], 3)[0].id == 7

    def model_works():
        from llama_cpp import Llama
        from somaagent.models.providers.llamacpp import default_gguf_path
        llm = Llama(model_path=str(default_gguf_path()), n_ctx=256, n_threads=1, verbose=False)
        out = llm("The capital of France is", max_tokens=4, temperature=0)
        assert out["usage"]["completion_tokens"] > 0
        del llm

    if sys.argv[1] == "index-first":
        index_works(); model_works()
    else:
        model_works(); index_works(); model_works()
    print("ok")
    """
)


@pytest.mark.parametrize("order", ["index-first", "model-first"])
def test_default_index_and_llama_cpp_share_a_process(order: str) -> None:
    # usearch broke exactly this (a model load after its import); a fresh interpreter per order.
    done = subprocess.run([sys.executable, "-c", COEXIST, order], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
