"""Vector index port and its embedded adapters: an int8 scan with exact re-ranking (the server's
default), exact numpy search, and usearch HNSW.

Owns: the `VectorIndex` protocol, `Int8Index`, `ExactIndex`, `UsearchIndex` and rebuilding an index
from its source rows (`memory/indexes.py` keeps one per (tenant, namespace) in step with the database;
the Qdrant server adapter lives in `memory/qdrant_index.py`).
May import numpy, numkong, usearch, core.errors. Never touches the DB or the embedder: callers pass keys
and vectors in, which is what lets `soma memory reindex` rebuild any index from the DB.

Why an int8 scan and not a graph (bench/README.md §5): usearch's extension links its own copy of
libstdc++ statically, and once it is loaded llama.cpp can no longer load a model in that process
(vocabulary loading fails with std::bad_cast), so usearch is imported only when a `UsearchIndex` is
made and the app factory refuses it next to a local llama.cpp model. Exact float32 search is memory
bound (19-23 ms p95 at 100k x 384 on one core). Scanning an int8 copy (4x fewer bytes, SIMD dot products
from numkong, a C library with no C++ runtime) and re-ranking the best candidates exactly in float32
answers in 4-5.5 ms p95 at 100k with the exact top-10, builds in 0.3 s and deletes for real. hnswlib,
voyager and Qdrant Edge also coexist with llama.cpp and answer in ~1 ms, but take 27-65 s to build a
100k graph (every process rebuilds its namespaces from the DB on first use), and hnswlib and voyager
only tombstone deletions. At 300k vectors in one namespace the scan takes 12.6 ms: beyond, use Qdrant.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol, Self, TypeAlias

import numkong
import numpy as np
import numpy.typing as npt

from somaagent.core.errors import InvalidRequest

F32: TypeAlias = npt.NDArray[np.float32]
U64: TypeAlias = npt.NDArray[np.uint64]
Keys: TypeAlias = Sequence[int] | npt.NDArray[np.integer]

# usearch keys are uint64; keeping keys below 2**63 lets them round-trip through SQL BIGINT columns.
_MAX_KEY = 2**63 - 1
# Above this share of the index, a filter is answered by searching the graph for more candidates and
# dropping the ones not allowed; below it, by exact search over the allowed vectors (cheap and exact).
_FILTER_GRAPH_SHARE = 0.2
# Int8Index re-ranks this many int8 candidates per requested hit exactly (at least _RERANK_MIN): with
# per-row scales the exact top-10 was always among the best 100 int8 scores in the bench (recall 1.0).
_RERANK_PER_HIT = 10
_RERANK_MIN = 100


class Hit(NamedTuple):
    """One search result: the caller's integer key and its cosine similarity to the query."""

    id: int
    score: float


class VectorIndex(Protocol):
    """An index of unit vectors under integer keys, searched by cosine similarity.

    Saving is not part of the port: the database is the source of truth and every index is rebuilt
    from it; the embedded adapters can still write a file (`save`/`load`), a Qdrant server persists
    its own collections.
    """

    @property
    def dimensions(self) -> int:
        """Length of every vector in this index."""
        ...

    def upsert(self, ids: Keys, vectors: F32) -> None:
        """Insert or replace the vectors under `ids` (rows are L2-normalized on the way in)."""
        ...

    def remove(self, ids: Keys) -> int:
        """Remove these keys (unknown keys are ignored); return how many were present."""
        ...

    def search(self, query: F32, k: int, allowed: Collection[int] | None = None) -> list[Hit]:
        """Top `k` keys by cosine similarity, best first; only keys in `allowed` when it is given."""
        ...

    def count(self) -> int:
        """Number of vectors in the index."""
        ...


def as_keys(ids: Keys) -> U64:
    """Validate keys (0 <= key < 2**63) and return them as a uint64 array."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise InvalidRequest("Vector keys must be a flat sequence of integers.", param="ids")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > _MAX_KEY):
        raise InvalidRequest("Vector keys must be in 0 .. 2**63-1.", param="ids")
    return arr.astype(np.uint64)


def as_unit_rows(vectors: F32, dimensions: int, count: int | None = None) -> F32:
    """Check shape and finiteness, then L2-normalize rows so that dot product == cosine."""
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dimensions:
        raise InvalidRequest(
            f"Vectors have {arr.shape[-1] if arr.ndim else 0} dimensions but this index holds {dimensions}; "
            "embed with the model the index was built for, or rebuild it with `soma memory reindex`.",
            param="vectors",
        )
    if count is not None and arr.shape[0] != count:
        raise InvalidRequest(f"Got {count} keys but {arr.shape[0]} vectors.", param="vectors")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise InvalidRequest("Vectors must be finite and non-zero.", param="vectors")
    return np.ascontiguousarray(arr / norms, dtype=np.float32)


def last_wins(keys: U64, rows: F32) -> tuple[U64, F32]:
    """Drop earlier duplicates of a key within one batch, so an upsert batch behaves like a loop."""
    if len(np.unique(keys)) == len(keys):
        return keys, rows
    _, first_in_reversed = np.unique(keys[::-1], return_index=True)
    keep = np.sort(len(keys) - 1 - first_in_reversed)
    return keys[keep], rows[keep]


def _top_k(scores: F32, k: int) -> npt.NDArray[np.intp]:
    """Row positions of the `k` highest scores, best first (argpartition: O(n), not a full sort)."""
    if k >= len(scores):
        return np.argsort(-scores, kind="stable")
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.argsort(-scores[part], kind="stable")]


class ExactIndex:
    """Exact search: a float32 matrix scanned with one matrix-vector product per query.

    The reference for recall, and fast enough for small namespaces (~1 ms per 10k vectors on one core).
    """

    def __init__(self, dimensions: int) -> None:
        """An empty index for `dimensions`-long vectors."""
        self._dimensions = dimensions
        self._vectors = np.empty((0, dimensions), dtype=np.float32)
        self._keys = np.empty(0, dtype=np.uint64)
        self._size = 0
        self._row_of: dict[int, int] = {}

    @property
    def dimensions(self) -> int:
        """Length of every vector in this index."""
        return self._dimensions

    def count(self) -> int:
        """Number of vectors in the index."""
        return self._size

    def upsert(self, ids: Keys, vectors: F32) -> None:
        """Insert or replace the vectors under `ids`."""
        keys = as_keys(ids)
        keys, rows = last_wins(keys, as_unit_rows(vectors, self._dimensions, len(keys)))
        self._reserve(self._size + len(keys))
        positions = np.empty(len(keys), dtype=np.intp)
        for i, key in enumerate(keys.tolist()):
            pos = self._row_of.get(key)
            if pos is None:
                pos = self._size
                self._size += 1
                self._row_of[key] = pos
            positions[i] = pos
        self._keys[positions] = keys
        self._store(positions, rows)

    def _store(self, positions: npt.NDArray[np.intp], rows: F32) -> None:
        """Write unit rows at these matrix positions (subclasses keep derived copies in step)."""
        self._vectors[positions] = rows

    def _reserve(self, rows: int) -> None:
        """Grow capacity geometrically so a stream of small upserts stays amortized O(1) per row."""
        if rows <= len(self._vectors):
            return
        self._resize(max(rows, 2 * len(self._vectors), 64))

    def _resize(self, capacity: int) -> None:
        """Reallocate the matrices to `capacity` rows, keeping the first `_size`."""
        grown = np.empty((capacity, self._dimensions), dtype=np.float32)
        grown[: self._size] = self._vectors[: self._size]
        keys = np.empty(capacity, dtype=np.uint64)
        keys[: self._size] = self._keys[: self._size]
        self._vectors, self._keys = grown, keys

    def remove(self, ids: Keys) -> int:
        """Remove keys by moving the last row into the hole (no tombstones, the matrix stays dense)."""
        removed = 0
        for key in as_keys(ids).tolist():
            pos = self._row_of.pop(key, None)
            if pos is None:
                continue
            last = self._size - 1
            if pos != last:
                self._move(last, pos)
                self._keys[pos] = self._keys[last]
                self._row_of[int(self._keys[pos])] = pos
            self._size -= 1
            removed += 1
        return removed

    def _move(self, source: int, target: int) -> None:
        """Copy the row at `source` over the row at `target`."""
        self._vectors[target] = self._vectors[source]

    def search(self, query: F32, k: int, allowed: Collection[int] | None = None) -> list[Hit]:
        """Top `k` keys by cosine similarity, best first; only keys in `allowed` when it is given."""
        q = as_unit_rows(query, self._dimensions)[0]
        if k <= 0 or self._size == 0:
            return []
        rows: npt.NDArray[np.intp] | None = None
        if allowed is not None:
            rows = np.fromiter(
                (p for p in (self._row_of.get(int(a)) for a in allowed) if p is not None), dtype=np.intp
            )
            if rows.size == 0:
                return []
        positions, scores = self._rank(q, k, rows)
        keys = self._keys[positions]
        return [Hit(int(key), float(s)) for key, s in zip(keys.tolist(), scores.tolist(), strict=True)]

    def _rank(self, q: F32, k: int, rows: npt.NDArray[np.intp] | None) -> tuple[npt.NDArray[np.intp], F32]:
        """Matrix positions and exact scores of the best `k` rows (among `rows` when given), best first."""
        if rows is None:
            scores = self._vectors[: self._size] @ q
            best = _top_k(scores, k)
            return best, scores[best]
        scores = self._vectors[rows] @ q
        best = _top_k(scores, k)
        return rows[best], scores[best]

    def vectors_of(self, ids: Keys) -> tuple[U64, F32]:
        """The stored (keys, vectors) among `ids`, for exact re-scoring; unknown keys are skipped."""
        found = [(k, self._row_of[k]) for k in as_keys(ids).tolist() if k in self._row_of]
        keys = np.array([k for k, _ in found], dtype=np.uint64)
        return keys, self._vectors[[p for _, p in found]].reshape(-1, self._dimensions)

    def save(self, path: Path) -> None:
        """Write keys and vectors as an uncompressed .npz, atomically."""
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as fh:
            np.savez(fh, keys=self._keys[: self._size], vectors=self._vectors[: self._size])
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, dimensions: int) -> Self:
        """Read an index written by `save`; raise InvalidRequest if it holds other-sized vectors."""
        with np.load(path) as data:
            keys, vectors = data["keys"], data["vectors"]
        if vectors.shape[1] != dimensions:
            raise InvalidRequest(
                f"Index file {path} holds {vectors.shape[1]}-d vectors, expected {dimensions}; "
                "rebuild it with `soma memory reindex`."
            )
        index = cls(dimensions)
        index.upsert(keys, vectors)
        return index


def _int8_codes(rows: F32) -> tuple[npt.NDArray[np.int8], F32]:
    """Per-row symmetric int8 codes and the factor that turns a code dot product back into a cosine.

    A scale per row (its largest component maps to 127) keeps every row at full int8 resolution,
    whatever the embedding model's value range; the query's own scale is common to all rows, so
    ranking ignores it.
    """
    peak = np.max(np.abs(rows), axis=1)
    codes = np.rint(rows * (127.0 / peak)[:, None]).astype(np.int8)
    return codes, (peak / 127.0).astype(np.float32)


class Int8Index(ExactIndex):
    """Exact top-k from an int8 scan: score every row on int8 codes, re-rank the best few in float32.

    The float32 rows stay (they give the exact scores the caller sees and the re-ranking); the int8
    copy adds a quarter to the memory and cuts the bytes a query streams by four, which is what bounds
    brute force on one core. Deletes and updates are the exact index's: dense rows, no tombstones.
    """

    def __init__(self, dimensions: int) -> None:
        """An empty index for `dimensions`-long vectors."""
        super().__init__(dimensions)
        self._codes = np.empty((0, dimensions), dtype=np.int8)
        self._code_scale = np.empty(0, dtype=np.float32)

    def _store(self, positions: npt.NDArray[np.intp], rows: F32) -> None:
        super()._store(positions, rows)
        self._codes[positions], self._code_scale[positions] = _int8_codes(rows)

    def _resize(self, capacity: int) -> None:
        super()._resize(capacity)
        codes = np.empty((capacity, self._dimensions), dtype=np.int8)
        codes[: self._size] = self._codes[: self._size]
        scale = np.empty(capacity, dtype=np.float32)
        scale[: self._size] = self._code_scale[: self._size]
        self._codes, self._code_scale = codes, scale

    def _move(self, source: int, target: int) -> None:
        super()._move(source, target)
        self._codes[target] = self._codes[source]
        self._code_scale[target] = self._code_scale[source]

    def _rank(self, q: F32, k: int, rows: npt.NDArray[np.intp] | None) -> tuple[npt.NDArray[np.intp], F32]:
        pool = max(_RERANK_MIN, _RERANK_PER_HIT * k)
        n = self._size if rows is None else len(rows)
        if n <= 2 * pool:  # a scan this small costs less than the candidate bookkeeping
            return super()._rank(q, k, rows)
        codes = self._codes[: self._size] if rows is None else self._codes[rows]
        scale = self._code_scale[: self._size] if rows is None else self._code_scale[rows]
        q_codes, _ = _int8_codes(q[None, :])
        approx = np.empty((1, n), dtype=np.float32)
        # numkong dispatches to the best int8 kernel this CPU has (AVX-512 VNNI here, AVX2, or plain C).
        numkong.cdist(q_codes, codes, metric="dot", out=approx)
        scores = approx[0]
        scores *= scale  # in place: no temporaries on the hot path
        candidates = np.argpartition(scores, n - pool)[n - pool :]
        if rows is not None:
            candidates = rows[candidates]
        return super()._rank(q, k, candidates)


class UsearchIndex:
    """Approximate search on a usearch HNSW graph (inner product on unit vectors == cosine).

    Parameters are the ones measured in bench/VECTOR_INDEX.md: connectivity 16, expansion 128 when
    adding and 128 when searching (recall@10 >= 0.95 at 100k clustered vectors, p95 < 2 ms).
    """

    def __init__(
        self,
        dimensions: int,
        *,
        connectivity: int = 16,
        expansion_add: int = 128,
        expansion_search: int = 128,
        _index: Any = None,
    ) -> None:
        """An empty index for `dimensions`-long vectors (or a wrapper around a restored one)."""
        from usearch.index import Index  # lazily: see the module docstring

        self._dimensions = dimensions
        self._index = _index or Index(
            ndim=dimensions,
            metric="ip",
            dtype="f32",
            connectivity=connectivity,
            expansion_add=expansion_add,
            expansion_search=expansion_search,
        )
        # usearch does not promise that a search may race a remove of the same key, and upsert is
        # remove + add; one lock per namespace keeps both atomic. Searches take well under 1 ms, so
        # serializing them per namespace costs little, and different namespaces still run in parallel.
        self._lock = threading.Lock()

    @property
    def dimensions(self) -> int:
        """Length of every vector in this index."""
        return self._dimensions

    def count(self) -> int:
        """Number of vectors in the index."""
        return len(self._index)

    def upsert(self, ids: Keys, vectors: F32) -> None:
        """Insert or replace: usearch refuses duplicate keys, so present keys are removed first."""
        keys = as_keys(ids)
        keys, rows = last_wins(keys, as_unit_rows(vectors, self._dimensions, len(keys)))
        if len(keys) == 0:
            return
        with self._lock:
            present = keys[np.asarray(self._index.contains(keys), dtype=bool).reshape(-1)]
            if len(present):
                self._index.remove(present)
            # One thread: usearch's parallel batch insert left a node unreachable in ~4% of 200-row
            # builds (an exact duplicate query missed it); single-threaded it never did in 400.
            self._index.add(keys, rows, threads=1)

    def remove(self, ids: Keys) -> int:
        """Remove keys (unknown keys are ignored); return how many were present."""
        keys = as_keys(ids)
        if len(keys) == 0:
            return 0
        with self._lock:
            return int(np.sum(self._index.remove(keys)))

    def search(self, query: F32, k: int, allowed: Collection[int] | None = None) -> list[Hit]:
        """Top `k` keys by cosine similarity, best first; only keys in `allowed` when it is given."""
        q = as_unit_rows(query, self._dimensions)[0]
        with self._lock:
            size = len(self._index)
            if k <= 0 or size == 0 or (allowed is not None and len(allowed) == 0):
                return []
            if allowed is not None and len(allowed) < _FILTER_GRAPH_SHARE * size:
                return self._exact_among(q, k, allowed)
            # Over-fetch in proportion to how much of the index is filtered out; if the graph still
            # yields fewer than k allowed keys, exact search over `allowed` is always complete.
            want = k if allowed is None else min(size, int(k * size / max(1, len(allowed))) + k)
            matches = self._index.search(q, want, threads=1)
            hits = [
                Hit(int(key), 1.0 - float(d))
                for key, d in zip(matches.keys.tolist(), matches.distances.tolist(), strict=True)
                if allowed is None or int(key) in allowed
            ]
            if allowed is not None and len(hits) < min(k, len(allowed)):
                return self._exact_among(q, k, allowed)
            return hits[:k]

    def _exact_among(self, q: F32, k: int, allowed: Collection[int]) -> list[Hit]:
        """Exact top-k over the allowed keys' stored vectors."""
        keys = as_keys(list(allowed))
        keys = keys[np.asarray(self._index.contains(keys), dtype=bool).reshape(-1)]
        if len(keys) == 0:
            return []
        vectors = np.asarray(self._index.get(keys), dtype=np.float32).reshape(len(keys), self._dimensions)
        scores = vectors @ q
        best = _top_k(scores, k)
        return [Hit(int(keys[i]), float(scores[i])) for i in best.tolist()]

    def save(self, path: Path) -> None:
        """Write the graph and vectors to one file, atomically."""
        tmp = path.with_name(path.name + ".tmp")
        with self._lock:
            self._index.save(str(tmp))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, dimensions: int, *, expansion_search: int = 128) -> UsearchIndex:
        """Read an index written by `save`; raise InvalidRequest if it is unreadable or other-sized."""
        try:
            # expansion_search is a query-time knob that the file does not carry.
            from usearch.index import Index

            index = Index.restore(str(path), expansion_search=expansion_search)
        except (ValueError, RuntimeError) as exc:
            raise InvalidRequest(
                f"Index file {path} is not a usearch index ({exc}); rebuild it with `soma memory reindex`."
            ) from exc
        if index is None:
            raise InvalidRequest(
                f"Index file {path} is missing or unreadable; rebuild it with `soma memory reindex`."
            )
        if index.ndim != dimensions:
            raise InvalidRequest(
                f"Index file {path} holds {index.ndim}-d vectors, expected {dimensions}; "
                "rebuild it with `soma memory reindex`."
            )
        return cls(dimensions, _index=index)


def rebuild_index(index: VectorIndex, batches: Iterable[tuple[Keys, F32]]) -> VectorIndex:
    """Fill a fresh `index` from (keys, vectors) batches streamed from the source of truth (the DB)."""
    for ids, vectors in batches:
        index.upsert(ids, vectors)
    return index
