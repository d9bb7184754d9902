"""The `VectorIndex` port on a Qdrant server (the distributed profile), through qdrant-client.

Owns: `QdrantStore` (one client and one collection per vector size) and `QdrantIndex` (one
(tenant, namespace) view of it). May import qdrant-client, numpy, memory.index, core.errors.
Never touches the DB: like every index it is a cache that `memory/indexes.py` fills from the database.

Layout: one collection per embedding size (`soma_memory_384`), every point carrying `tenant_id` and
`namespace` in its payload, both keyword-indexed (`tenant_id` as Qdrant's tenant key), and every
request of a `QdrantIndex` filtered by its own pair. This is the layout Qdrant recommends for many
tenants: a collection per (tenant, namespace) would mean thousands of collections, each with its own
segments, WAL and optimizer, created on the request path. Point ids are the memory keys, unique across
the whole database (`memories.key`), so tenants cannot overwrite each other's points; the filter still
guards every read and delete, so a query can never return another tenant's key.

Several replicas share the server, and each one's `SyncedIndexes` replays committed rows in version
order; upserts and deletes are idempotent, so replays converge on the database's state.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING

from somaagent.core.errors import UpstreamError
from somaagent.memory.index import F32, Hit, Keys, as_keys, as_unit_rows, last_wins

if TYPE_CHECKING:
    from qdrant_client import QdrantClient
    from qdrant_client.http import models

# Points per upsert request: a rebuild streams 10k-row pages; smaller requests keep each one well
# under the server's default 32 MB body limit (1,000 x 384 floats as JSON is ~4 MB).
_UPSERT_BATCH = 1000


class QdrantStore:
    """One qdrant-client for the process and the collections it has made sure exist."""

    def __init__(
        self,
        *,
        url: str | None = None,
        api_key: str | None = None,
        path: str | None = None,
        collection_prefix: str = "soma_memory",
        timeout_s: int = 10,
    ) -> None:
        """A store for a server at `url`, or qdrant-client's local mode in `path` (":memory:" too).

        Nothing is contacted here: the client is made on first use, in the worker thread that needs it
        (the app factory runs on the event loop, and the client checks the server version when built).
        """
        if (url is None) == (path is None):
            raise ValueError("QdrantStore needs exactly one of url (a server) or path (local mode).")
        self._url, self._api_key, self._path, self._timeout = url, api_key, path, timeout_s
        self.collection_prefix = collection_prefix
        self._client: QdrantClient | None = None
        self._ready: set[int] = set()
        self._setup = threading.Lock()
        # Local mode is one in-process object (sqlite-backed with a path) and is not thread-safe; a server
        # client is, and many namespaces search it from several worker threads at once.
        self._local_lock = threading.Lock() if path is not None else None

    @property
    def target(self) -> str:
        """Where the points live, for error messages."""
        return self._url or f"local qdrant at {self._path}"

    @contextmanager
    def client(self) -> Iterator[QdrantClient]:
        """The client, made on first use; serialized when it is local mode."""
        if self._client is None:
            with self._setup:
                if self._client is None:
                    self._client = self._connect()
        from qdrant_client.http.exceptions import ApiException

        with self._local_lock or nullcontext():
            try:
                yield self._client
            except ApiException as exc:  # HTTP errors, and connection failures wrapped by the client
                raise UpstreamError(
                    f"Qdrant at {self.target} failed: {exc}. Check SOMA_QDRANT_URL (and SOMA_QDRANT_API_KEY) "
                    "and that the server is up."
                ) from exc

    def _connect(self) -> QdrantClient:
        from qdrant_client import QdrantClient  # a heavy import (grpc, protobuf), only when selected

        if self._path == ":memory:":
            return QdrantClient(location=":memory:")
        if self._path is not None:
            # asyncio.to_thread runs calls on several threads; `client()` serializes them.
            return QdrantClient(path=self._path, force_disable_check_same_thread=True)
        return QdrantClient(url=self._url, api_key=self._api_key, timeout=self._timeout)

    def collection(self, dimensions: int) -> str:
        """The name of the collection for `dimensions`-long vectors, created with its indexes if missing."""
        name = f"{self.collection_prefix}_{dimensions}"
        if dimensions not in self._ready:
            with self._setup:
                if dimensions not in self._ready:
                    self._ensure(name, dimensions)
                    self._ready.add(dimensions)
        return name

    def _ensure(self, name: str, dimensions: int) -> None:
        from qdrant_client.http import models
        from qdrant_client.http.exceptions import UnexpectedResponse

        if self._client is None:
            self._client = self._connect()
        with self.client() as client:
            if client.collection_exists(name):
                size = _vector_size(client.get_collection(name).config.params.vectors)
                if size != dimensions:
                    raise UpstreamError(
                        f"Qdrant collection {name} at {self.target} holds {size}-d vectors, not "
                        f"{dimensions}; drop it or set SOMA_QDRANT_COLLECTION_PREFIX to another name."
                    )
                return
            # Vectors arrive L2-normalized, so dot product is the cosine without Qdrant normalizing again.
            vectors = models.VectorParams(size=dimensions, distance=models.Distance.DOT)
            try:
                client.create_collection(name, vectors_config=vectors)
            except UnexpectedResponse:
                if not client.collection_exists(name):  # else another replica created it first
                    raise
            tenant = models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD, is_tenant=True)
            client.create_payload_index(name, "tenant_id", field_schema=tenant)
            client.create_payload_index(name, "namespace", field_schema=models.PayloadSchemaType.KEYWORD)

    def close(self) -> None:
        """Close the client (idempotent)."""
        if self._client is not None:
            self._client.close()
            self._client = None
            self._ready.clear()


def _vector_size(params: object) -> int | None:
    from qdrant_client.http import models

    return params.size if isinstance(params, models.VectorParams) else None


class QdrantIndex:
    """The points of one (tenant, namespace) in the shared collection; the `VectorIndex` port."""

    def __init__(self, store: QdrantStore, tenant_id: str, namespace: str, dimensions: int) -> None:
        """A view of `store` scoped to this tenant's namespace (no I/O until the first call)."""
        self._store = store
        self._tenant_id, self._namespace = tenant_id, namespace
        self._dimensions = dimensions

    @property
    def dimensions(self) -> int:
        """Length of every vector in this index."""
        return self._dimensions

    def _scope(self, keys: Collection[int] | None = None) -> models.Filter:
        """The filter every request carries: this tenant and namespace (and these keys when given)."""
        from qdrant_client.http import models

        must: list[models.Condition] = [
            models.FieldCondition(key="tenant_id", match=models.MatchValue(value=self._tenant_id)),
            models.FieldCondition(key="namespace", match=models.MatchValue(value=self._namespace)),
        ]
        if keys is not None:
            must.append(models.HasIdCondition(has_id=[int(k) for k in keys]))
        return models.Filter(must=must)

    def upsert(self, ids: Keys, vectors: F32) -> None:
        """Insert or replace the vectors under `ids` (rows are L2-normalized on the way in)."""
        from qdrant_client.http import models

        keys = as_keys(ids)
        keys, rows = last_wins(keys, as_unit_rows(vectors, self._dimensions, len(keys)))
        if len(keys) == 0:
            return
        name = self._store.collection(self._dimensions)
        payload = {"tenant_id": self._tenant_id, "namespace": self._namespace}
        with self._store.client() as client:
            for s in range(0, len(keys), _UPSERT_BATCH):
                part = keys[s : s + _UPSERT_BATCH].tolist()
                client.upsert(
                    name,
                    points=models.Batch(
                        ids=part,
                        vectors=rows[s : s + _UPSERT_BATCH].tolist(),
                        payloads=[payload] * len(part),
                    ),
                    wait=True,  # the next search must see it: SyncedIndexes searches right after
                )

    def remove(self, ids: Keys) -> int:
        """Remove these keys from this namespace (unknown keys are ignored); return how many were present."""
        from qdrant_client.http import models

        keys = as_keys(ids).tolist()
        if not keys:
            return 0
        name = self._store.collection(self._dimensions)
        scope = self._scope(keys)
        with self._store.client() as client:
            present = client.count(name, count_filter=scope, exact=True).count
            if present:
                client.delete(name, points_selector=models.FilterSelector(filter=scope), wait=True)
        return present

    def search(self, query: F32, k: int, allowed: Collection[int] | None = None) -> list[Hit]:
        """Top `k` keys by cosine similarity, best first; only keys in `allowed` when it is given."""
        q = as_unit_rows(query, self._dimensions)[0]
        if k <= 0 or (allowed is not None and len(allowed) == 0):
            return []
        name = self._store.collection(self._dimensions)
        with self._store.client() as client:
            points = client.query_points(
                name,
                query=q.tolist(),
                query_filter=self._scope(allowed),
                limit=k,
                with_payload=False,
            ).points
        return [Hit(int(p.id), float(p.score)) for p in points]

    def count(self) -> int:
        """Number of vectors in this namespace."""
        name = self._store.collection(self._dimensions)
        with self._store.client() as client:
            return int(client.count(name, count_filter=self._scope(), exact=True).count)
