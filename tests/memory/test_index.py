"""The vector index port against the real engines: usearch HNSW and exact numpy, no mocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from somaagent.core.errors import InvalidRequest
from somaagent.memory.index import (
    ExactIndex,
    UsearchIndex,
    VectorIndex,
    rebuild_index,
)

DIM = 384
F32 = npt.NDArray[np.float32]


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


ENGINES = [pytest.param(UsearchIndex, id="usearch"), pytest.param(ExactIndex, id="exact")]


@pytest.mark.parametrize("make", ENGINES)
def test_add_search_remove_upsert(make: type[UsearchIndex] | type[ExactIndex]) -> None:
    index: VectorIndex = make(DIM)
    vectors = clustered(200)
    index.upsert(range(200), vectors)
    assert index.count() == 200
    hits = index.search(vectors[17], 3)
    assert hits[0].id == 17 and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)

    assert index.remove([17, 99_999]) == 1
    assert index.count() == 199
    assert 17 not in {h.id for h in index.search(vectors[17], 10)}

    # Upsert replaces: key 5 now holds what key 6 held, and there is still one key 5.
    index.upsert([5], vectors[6:7] * 3.0)  # not unit length on purpose: the adapter normalizes
    assert index.count() == 199
    top = index.search(vectors[6], 2)
    assert {h.id for h in top} == {5, 6}
    assert all(h.score == pytest.approx(1.0, abs=1e-4) for h in top)

    # Duplicate keys in one batch: the last one wins.
    index.upsert([300, 300], vectors[[1, 2]])
    assert index.count() == 200
    assert index.search(vectors[2], 2)[0].id in {2, 300}
    assert index.search(vectors[2], 1, allowed={300})[0].score == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("make", ENGINES)
def test_allowed_filter_is_enforced(make: type[UsearchIndex] | type[ExactIndex]) -> None:
    index: VectorIndex = make(DIM)
    vectors = clustered(2000, seed=3)
    index.upsert(range(2000), vectors)
    for allowed in ({1, 2, 3}, set(range(0, 2000, 2)), set()):
        hits = index.search(vectors[1], 10, allowed=allowed)
        assert {h.id for h in hits} <= allowed
        assert len(hits) == min(10, len(allowed))


def test_usearch_recall_at_10_vs_exact() -> None:
    # Queries are fresh draws from the same mixture (same seed => same clusters), not copies of base rows.
    data = clustered(5100, seed=1)
    base, queries = data[:5000], data[5000:]
    ann, exact = UsearchIndex(DIM), ExactIndex(DIM)
    rebuild_index(ann, ((range(s, s + 1000), base[s : s + 1000]) for s in range(0, 5000, 1000)))
    rebuild_index(exact, [(range(5000), base)])
    truth = [{h.id for h in exact.search(q, 10)} for q in queries]
    found = [{h.id for h in ann.search(q, 10)} for q in queries]
    recall = np.mean([len(f & t) / 10 for f, t in zip(found, truth, strict=True)])
    assert recall >= 0.95


@pytest.mark.parametrize("make", ENGINES)
def test_persistence_round_trip(make: type[UsearchIndex] | type[ExactIndex], tmp_path: Path) -> None:
    vectors = clustered(500, seed=4)
    index = make(DIM)
    index.upsert(np.arange(500) * 7, vectors)
    path = tmp_path / "idx.bin"
    index.save(path)
    loaded = make.load(path, DIM)
    assert loaded.count() == 500
    for q in vectors[:20]:
        assert [h.id for h in loaded.search(q, 5)] == [h.id for h in index.search(q, 5)]
    with pytest.raises(InvalidRequest, match="384"):
        make.load(path, 768)


def test_usearch_load_of_garbage_says_how_to_fix(tmp_path: Path) -> None:
    path = tmp_path / "bad.usearch"
    path.write_bytes(b"not an index" * 100)
    with pytest.raises(InvalidRequest, match="reindex"):
        UsearchIndex.load(path, DIM)
    with pytest.raises(InvalidRequest, match="reindex"):
        UsearchIndex.load(tmp_path / "missing.usearch", DIM)


@pytest.mark.parametrize("make", ENGINES)
def test_dimension_mismatch_is_a_clear_error(make: type[UsearchIndex] | type[ExactIndex]) -> None:
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


def test_the_server_never_imports_usearch_and_refuses_it_beside_llama_cpp(tmp_path: Path) -> None:
    import subprocess
    import sys

    from somaagent.api.app import create_app
    from somaagent.config import Settings

    probe = "import sys, somaagent.api.app, somaagent.memory.indexes; print('usearch' in sys.modules)"
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "False"
    with pytest.raises(ValueError, match=r"cannot run beside the local llama\.cpp model"):
        create_app(Settings(data_dir=tmp_path, memory_index="usearch"))
