"""The background job that indexes documents: claim, chunk, embed in batches, commit with progress.

Every process runs one worker. A worker claims a document with a conditional UPDATE that only one of
several concurrent claimers can win (SQLite and PostgreSQL alike) and holds it by a lease its heartbeat
renews; a document whose worker died is claimable again once the lease expires, and is resumed, not
restarted. Each batch is one embedding call; its memories, chunk map rows and progress commit in one
transaction that first re-checks the lease, so nothing is written by a worker that lost it, and the
chunk map's primary key makes a chunk impossible to write twice in any case.

The claim looks across tenants (a system path); everything after it is scoped to the document's tenant
and embeds and meters as the uploader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import undefer

from somaagent.core.clock import utcnow
from somaagent.core.errors import Overloaded, SomaError
from somaagent.core.principal import OPERATOR, Principal
from somaagent.memory.chunking import Chunk, TokenCounter, chunk_sections
from somaagent.memory.documents import COMPLETED, FAILED, PROCESSING, QUEUED, DocumentSettings, remove_chunks
from somaagent.memory.extraction import sections_of
from somaagent.memory.service import Embed, MemoryService
from somaagent.memory.tables import MemoryDocument, MemoryDocumentChunk
from somaagent.models.messages import Embeddings

log = logging.getLogger("somaagent.memory.documents")

# (principal, request id, prompt tokens, seconds) for each embedding call the job makes.
UsageSink = Callable[[Principal, str, int, float], None]


class LeaseLost(Exception):
    """Another worker holds the document now, or it was deleted: stop working on it."""


class DocumentWorker:
    """Indexes queued documents, one at a time, in the background of one process."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        embed: Embed,
        memory: MemoryService,
        settings: DocumentSettings,
        count_tokens: TokenCounter,
        on_usage: UsageSink,
        owner: str | None = None,
    ) -> None:
        self._sessions = sessions
        self._embed = embed
        self._memory = memory
        self.settings = settings
        self._count = count_tokens
        # Public: the app factory sets it once the metering it needs exists.
        self._on_usage = on_usage
        self.owner = owner or f"{socket.gethostname()[:32]}:{os.getpid()}:{secrets.token_hex(4)}"
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Run the worker loop in the background (it first resumes what a dead process left)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="document-ingest")

    def wake(self) -> None:
        """A document was queued in this process: look for work now rather than at the next poll."""
        self._wake.set()

    async def close(self) -> None:
        """Stop the worker; a document it held is released for the next process to resume at once."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        try:
            async with self._sessions() as session, session.begin():
                await session.execute(
                    update(MemoryDocument)
                    .where(MemoryDocument.lease_owner == self.owner, MemoryDocument.status == PROCESSING)
                    .values(lease_expires_at=utcnow(), attempts=MemoryDocument.attempts - 1)
                    .execution_options(synchronize_session=False)
                )
        except Exception:  # shutting down: the lease expires by itself anyway
            log.warning("could not release document leases", exc_info=True)

    async def _run(self) -> None:
        while True:
            self._wake.clear()  # before looking: a wake-up while we look is not lost
            try:
                claimed = await self.claim_next()
                if claimed is not None:
                    await self.ingest(claimed)
                    continue
            except asyncio.CancelledError:
                raise
            except Exception:  # a database hiccup must not end the worker
                log.exception("document worker error; retrying in %.1fs", self.settings.poll_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_s)

    async def claim_next(self) -> MemoryDocument | None:
        """Take the oldest queued document, or one whose worker's lease expired; None if there is none."""
        now = utcnow()
        claimable = or_(
            MemoryDocument.status == QUEUED,
            and_(
                MemoryDocument.status == PROCESSING,
                or_(MemoryDocument.lease_expires_at.is_(None), MemoryDocument.lease_expires_at < now),
            ),
        )
        async with self._sessions() as session:
            candidates = (
                await session.scalars(
                    select(MemoryDocument.id).where(claimable).order_by(MemoryDocument.created_at).limit(8)
                )
            ).all()
            for document_id in candidates:
                # Conditional: of several workers that saw the same candidate, one UPDATE matches.
                claimed = await session.execute(
                    update(MemoryDocument)
                    .where(MemoryDocument.id == document_id, claimable)
                    .values(
                        status=PROCESSING,
                        lease_owner=self.owner,
                        lease_expires_at=now + timedelta(seconds=self.settings.lease_s),
                        attempts=MemoryDocument.attempts + 1,
                        updated_at=now,
                    )
                    .execution_options(synchronize_session=False)
                )
                await session.commit()
                if claimed.rowcount != 1:  # type: ignore[attr-defined]
                    continue
                document = await session.get(
                    MemoryDocument,
                    document_id,
                    populate_existing=True,
                    options=[undefer(MemoryDocument.text)],
                )
                if document is None:  # deleted in between
                    continue
                if document.attempts > self.settings.max_attempts:
                    await self._fail(
                        document,
                        f"gave up after {self.settings.max_attempts} attempts: the process indexing it "
                        "stopped each time (see the server log)",
                    )
                    continue
                return document
        return None

    async def ingest(self, document: MemoryDocument) -> None:
        """Index a claimed document to the end (or until its lease is lost), recording a failure."""
        heartbeat = asyncio.create_task(self._heartbeat(document.id))
        try:
            await self._ingest(document)
        except LeaseLost:
            log.info("document %s: lease lost (taken over or deleted); stopping", document.id)
        except SomaError as exc:
            await self._fail(document, exc.message)
        except Exception:
            log.exception("document %s: indexing failed", document.id)
            await self._fail(document, "internal error while indexing; the server log has the details")
        finally:
            heartbeat.cancel()

    async def _ingest(self, document: MemoryDocument) -> None:
        chunks = await asyncio.to_thread(
            chunk_sections,
            sections_of(document.text, document.media_type),
            document.chunk_tokens,
            document.overlap_tokens,
            self._count,
        )
        written = await self._written(document, len(chunks))
        todo = [chunk for chunk in chunks if chunk.index not in written]
        done = len(written)
        if not todo:
            await self._commit_batch(document, [], None, done, len(chunks))
            return
        for start in range(0, len(todo), self.settings.batch):
            batch = todo[start : start + self.settings.batch]
            done = await self._ingest_batch(document, batch, done, len(chunks))

    async def _ingest_batch(self, document: MemoryDocument, batch: list[Chunk], done: int, total: int) -> int:
        """Embed `batch` in one model call and commit its memories with the progress; returns the new
        count of chunks done. Raises LeaseLost if this worker no longer holds the document."""
        principal = _principal_of(document)
        started = time.perf_counter()
        embedded = None
        for wait in (0.5, 1.0, 2.0, 4.0, None):
            try:
                embedded = await self._embed(principal, [chunk.text for chunk in batch])
                break
            except Overloaded as exc:  # users' requests come first; this job can wait
                if wait is None:
                    raise
                await asyncio.sleep(max(wait, exc.retry_after))
        assert embedded is not None
        elapsed = time.perf_counter() - started
        await self._commit_batch(document, batch, embedded, done + len(batch), total)
        self._on_usage(principal, document.request_id, embedded.prompt_tokens, elapsed)
        return done + len(batch)

    async def _commit_batch(
        self,
        document: MemoryDocument,
        batch: list[Chunk],
        embedded: Embeddings | None,
        done: int,
        total: int,
    ) -> None:
        now = utcnow()
        values: dict[str, Any] = {
            "chunks_done": done,
            "chunks_total": total,
            "updated_at": now,
            "lease_expires_at": now + timedelta(seconds=self.settings.lease_s),
        }
        if done >= total:
            values.update(
                status=COMPLETED, completed_at=now, text="", lease_owner=None, lease_expires_at=None
            )
        try:
            async with self._sessions() as session, session.begin():
                # First statement: the lease check takes the document's row lock before the namespace's
                # (the order `delete` takes them in too), and nothing is written without the lease.
                await self._hold(session, document.id, values)
                if batch and embedded is not None:
                    items = await self._memory.add_embedded(
                        session,
                        _principal_of(document),
                        document.namespace,
                        [chunk.text for chunk in batch],
                        [_chunk_metadata(document, chunk) for chunk in batch],
                        embedded,
                    )
                    session.add_all(
                        MemoryDocumentChunk(
                            tenant_id=document.tenant_id,
                            document_id=document.id,
                            chunk=chunk.index,
                            memory_id=item.id,
                        )
                        for chunk, item in zip(batch, items, strict=True)
                    )
        except IntegrityError as exc:  # a chunk already written: someone else is on this document
            raise LeaseLost from exc
        document.chunks_done, document.chunks_total = done, total
        if done >= total:
            document.status, document.text = COMPLETED, ""

    async def _hold(self, session: AsyncSession, document_id: str, values: dict[str, Any]) -> None:
        held = await session.execute(
            update(MemoryDocument)
            .where(
                MemoryDocument.id == document_id,
                MemoryDocument.lease_owner == self.owner,
                MemoryDocument.status == PROCESSING,
            )
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if held.rowcount != 1:  # type: ignore[attr-defined]
            raise LeaseLost(document_id)

    async def _written(self, document: MemoryDocument, total: int) -> set[int]:
        """Chunk indexes already stored. If the chunking no longer gives the count it gave at upload
        (the code changed while the document waited), the old chunks are dropped and it starts over."""
        async with self._sessions() as session, session.begin():
            await self._hold(session, document.id, {"updated_at": utcnow()})
            written = set(
                (
                    await session.scalars(
                        select(MemoryDocumentChunk.chunk).where(
                            MemoryDocumentChunk.tenant_id == document.tenant_id,
                            MemoryDocumentChunk.document_id == document.id,
                        )
                    )
                ).all()
            )
            if written and (total != document.chunks_total or max(written) >= total):
                log.warning("document %s: chunking changed since upload; re-indexing it whole", document.id)
                await remove_chunks(session, document)
                written = set()
            await self._hold(session, document.id, {"chunks_done": len(written), "chunks_total": total})
        return written

    async def _heartbeat(self, document_id: str) -> None:
        while True:
            await asyncio.sleep(self.settings.lease_s / 3)
            try:
                async with self._sessions() as session, session.begin():
                    expires = utcnow() + timedelta(seconds=self.settings.lease_s)
                    await self._hold(session, document_id, {"lease_expires_at": expires})
            except LeaseLost:
                return  # the next batch commit notices and stops the job
            except Exception:
                log.warning("document %s: heartbeat failed", document_id, exc_info=True)

    async def _fail(self, document: MemoryDocument, message: str) -> None:
        log.warning("document %s failed: %s", document.id, message)
        async with self._sessions() as session, session.begin():
            await session.execute(
                update(MemoryDocument)
                .where(MemoryDocument.id == document.id, MemoryDocument.lease_owner == self.owner)
                .values(
                    status=FAILED,
                    error=message[:2000],
                    lease_owner=None,
                    lease_expires_at=None,
                    updated_at=utcnow(),
                )
                .execution_options(synchronize_session=False)
            )


def _principal_of(document: MemoryDocument) -> Principal:
    # The worker only embeds and meters on the uploader's behalf; whether they were an operator decides
    # which models they may use, and that is all of their capabilities the job needs.
    capabilities = frozenset({OPERATOR}) if document.is_admin else frozenset[str]()
    return Principal(
        document.tenant_id, document.tenant_name, document.subject, document.key_id, capabilities
    )


def _chunk_metadata(document: MemoryDocument, chunk: Chunk) -> dict[str, Any]:
    meta: dict[str, Any] = {
        **document.meta,
        "document_id": document.id,
        "document_name": document.name,
        "chunk": chunk.index,
    }
    if chunk.section is not None:
        meta["section"] = chunk.section
    if chunk.page is not None:
        meta["page"] = chunk.page
    return meta


__all__ = ["DocumentWorker", "LeaseLost", "UsageSink"]
