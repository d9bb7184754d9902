"""Document ingest over HTTP on the real server (SQLite and PostgreSQL, the real embedding model):
markdown, PDF and multipart uploads chunked into memories in the background with progress, recall of
a section, validation, deletion, tenant isolation; and, through the service functions on a real
database, the single-claim lease and resuming a document whose worker died."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from somaagent.core.clock import utcnow
from somaagent.core.principal import Principal
from somaagent.db.engine import create_engine, session_factory
from somaagent.identity.capabilities import TENANT_CAPABILITIES
from somaagent.memory.chunking import chunk_sections, wordpiece_counter
from somaagent.memory.document_worker import DocumentWorker
from somaagent.memory.documents import PROCESSING, DocumentIngest, DocumentSettings, Upload
from somaagent.memory.extraction import markdown_sections
from somaagent.memory.index import ExactIndex
from somaagent.memory.indexes import SyncedIndexes
from somaagent.memory.service import MemoryService, MemorySettings
from somaagent.memory.tables import MemoryDocument, MemoryDocumentChunk
from somaagent.models.messages import Embeddings
from somaagent.models.providers.minilm import MiniLMEmbedder, find_model_dir
from tests.conftest import TenantCtx
from tests.support.contract import error_of
from tests.support.processes import SomaServer

HANDBOOK = """# Employee handbook

Welcome to Northwind Robotics. This handbook explains how we work, what we expect from each other
and where to find help. Read it in your first week and come back to it whenever you are unsure.

## Vacation

Every new employee gets 27 paid vacation days per calendar year, plus the public holidays of the
office they work from. Unused days carry over until the end of March of the following year.

Book vacation in the HR portal at least two weeks ahead for anything longer than three days, and
tell your team in the planning meeting. During the December freeze only half of a team may be away.

## Expenses

Travel and equipment expenses are reimbursed within ten working days. Submit receipts in the finance
tool; anything above 500 euros needs the written approval of your manager before you spend it.

Meals during business travel are covered up to 60 euros per day. Alcohol is never reimbursed.

## Security

Lock your screen whenever you leave your desk. Laptops use full-disk encryption, and a lost device
must be reported to the security desk within one hour, day or night, on the emergency line.

Passwords are managed in the company password vault; never reuse a password between services, and
turn on hardware security keys for email, source control and the cloud console.

## On-call

Engineers join the on-call rotation after their third month. A shift lasts one week, from Monday
10:00 to the next Monday 10:00, and pays a flat allowance of 350 euros plus time off after night pages.

Acknowledge a page within 15 minutes. If you cannot, escalate to the secondary on-call engineer.

## Offices

We have offices in Lisbon, Tallinn and Montreal. The Lisbon office is on the fourth floor of the
river-side building and has a rooftop terrace; Tallinn shares a floor with a design studio.
"""


def wait_done(
    http: httpx.Client, document_id: str, timeout: float = 240
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Poll a document until it completes or fails; return it and every state seen on the way."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = http.get(f"/v1/memory/documents/{document_id}")
        assert response.status_code == 200, response.text
        document = response.json()
        seen.append(document)
        if document["status"] in ("completed", "failed"):
            return document, seen
        time.sleep(0.05)
    raise AssertionError(f"document {document_id} not done after {timeout}s: {seen[-1]}")


def upload(http: httpx.Client, **body: Any) -> dict[str, Any]:
    response = http.post("/v1/memory/documents", json=body)
    assert response.status_code == 202, response.text
    return dict(response.json())


def recall(http: httpx.Client, query: str, **extra: Any) -> list[dict[str, Any]]:
    response = http.post("/v1/memory/recall", json={"query": query, **extra})
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


def memories_of(http: httpx.Client, namespace: str) -> list[dict[str, Any]]:
    response = http.get("/v1/memory", params={"namespace": namespace, "limit": 1000})
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


def long_markdown(sections: int, paragraphs: int = 4, seed: str = "") -> str:
    """A generated markdown document (~1.4 KB a section with the defaults)."""
    nouns = ["turbine", "ledger", "gateway", "harvest", "compiler", "reservoir", "satellite", "bakery"]
    verbs = ["inspects", "rebuilds", "audits", "ships", "measures", "repairs", "schedules", "archives"]
    parts = [f"# Operations manual {seed}".strip()]
    for s in range(sections):
        parts.append(f"## Procedure {s}: the {nouns[s % 8]} {seed}")
        for p in range(paragraphs):
            sentences = [
                f"Step {s}.{p}.{k}: the {nouns[(s + k) % 8]} team {verbs[(p + k) % 8]} "
                f"unit {s * 100 + p * 10 + k} "
                f"every {2 + (s + p + k) % 9} days and records the result in binder {chr(65 + (s + k) % 26)}."
                for k in range(3)
            ]
            parts.append(" ".join(sentences))
    return "\n\n".join(parts) + "\n"


def make_pdf(pages: list[list[str]]) -> bytes:
    """A real PDF 1.4 file, one text object per page (Helvetica), with a correct xref table."""
    page_ids = [4 + 2 * i for i in range(len(pages))]
    objects: dict[int, bytes] = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: b"<< /Type /Pages /Kids ["
        + b" ".join(b"%d 0 R" % p for p in page_ids)
        + b"] /Count %d >>" % len(pages),
        3: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    }
    for page_id, lines in zip(page_ids, pages, strict=True):
        escaped = [line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") for line in lines]
        stream = "\n".join(
            ["BT", "/F1 11 Tf", "14 TL", "72 740 Td", *(f"({e}) Tj T*" for e in escaped), "ET"]
        )
        data = stream.encode("latin-1")
        objects[page_id] = (
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            b"/Resources << /Font << /F1 3 0 R >> >> /Contents %d 0 R >>" % (page_id + 1)
        )
        objects[page_id + 1] = b"<< /Length %d >>\nstream\n" % len(data) + data + b"\nendstream"
    out = bytearray(b"%PDF-1.4\n")
    offsets: dict[int, int] = {}
    for number in sorted(objects):
        offsets[number] = len(out)
        out += b"%d 0 obj\n" % number + objects[number] + b"\nendobj\n"
    xref = len(out)
    size = max(objects) + 1
    out += b"xref\n0 %d\n0000000000 65535 f \n" % size
    out += b"".join(b"%010d 00000 n \n" % offsets[n] for n in range(1, size))
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (size, xref)
    return bytes(out)


PDF_PAGES = [
    [
        "Quarterly maintenance report for the Harbor Street plant.",
        "All pumps were inspected in January and the filters were replaced.",
        "The backup generator passed its monthly load test without faults.",
    ],
    [
        "Incident summary: on 14 February the cooling loop in hall B leaked.",
        "The leak was traced to a cracked valve gasket, replaced within four hours.",
        "No product was lost and the hall resumed production the same evening.",
    ],
]


def test_markdown_document_is_chunked_indexed_and_recalled(tenant: TenantCtx) -> None:
    created = upload(
        tenant.http,
        name="handbook.md",
        text=HANDBOOK,
        media_type="text/markdown",
        namespace="handbook",
        metadata={"source": "hr", "year": 2026},
    )
    assert created["object"] == "memory.document"
    assert created["status"] in ("queued", "processing", "completed")
    assert created["chunks_total"] >= 5  # a chunk never crosses a heading: one per section at least
    assert created["size_bytes"] == len(HANDBOOK.encode())
    document, seen = wait_done(tenant.http, created["id"])
    assert document["status"] == "completed", document
    assert document["error"] is None and document["completed_at"] is not None
    assert document["chunks_done"] == document["chunks_total"] == created["chunks_total"]
    done = [state["chunks_done"] for state in seen]
    assert done == sorted(done) and all(0 <= d <= created["chunks_total"] for d in done)
    order = {"queued": 0, "processing": 1, "completed": 2}
    statuses = [order[state["status"]] for state in seen]
    assert statuses == sorted(statuses)

    found = recall(
        tenant.http, "How many paid vacation days do new employees get?", namespace="handbook", top_k=3
    )
    top = found[0]
    assert "27 paid vacation days" in top["text"]
    assert top["text"].startswith("## Vacation")
    assert top["metadata"] == {
        "source": "hr",
        "year": 2026,
        "document_id": created["id"],
        "document_name": "handbook.md",
        "chunk": top["metadata"]["chunk"],
        "section": "Employee handbook / Vacation",
    }
    pager = recall(tenant.http, "How fast must I acknowledge an on-call page?", namespace="handbook")[0]
    assert "15 minutes" in pager["text"] and pager["metadata"]["section"] == "Employee handbook / On-call"
    stored = memories_of(tenant.http, "handbook")
    assert sorted(m["metadata"]["chunk"] for m in stored) == list(range(created["chunks_total"]))
    # Embedding usage is metered like /v1/memory's: at least the chunk batch and the two recalls.
    deadline = time.monotonic() + 10
    while True:
        rows = [r for r in tenant.http.get("/v1/usage").json()["data"] if r["model"] == "all-minilm-l6-v2"]
        if (rows and rows[0]["requests"] >= 3) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert rows and rows[0]["requests"] >= 3 and rows[0]["prompt_tokens"] > len(HANDBOOK) // 8


def test_progress_is_committed_per_batch(tenant: TenantCtx) -> None:
    text = long_markdown(45)  # ~60 KB: several batches of 32 chunks
    created = upload(tenant.http, name="manual.md", text=text, media_type="text/markdown", namespace="manual")
    total = created["chunks_total"]
    assert total > 64
    document, seen = wait_done(tenant.http, created["id"])
    assert document["status"] == "completed" and document["chunks_done"] == total
    done = [state["chunks_done"] for state in seen]
    assert done == sorted(done)
    # Each commit is one batch of 32 chunks; the polls saw it move in between.
    assert all(d % 32 == 0 or d == total for d in done)
    assert any(0 < d < total for d in done), done
    listed = tenant.http.get("/v1/memory/documents", params={"namespace": "manual"}).json()
    assert [d["id"] for d in listed["data"]] == [created["id"]]
    assert len(memories_of(tenant.http, "manual")) == total


def test_pdf_document_is_extracted_per_page(tenant: TenantCtx) -> None:
    pdf = make_pdf(PDF_PAGES)
    from pypdf import PdfReader  # the file is a real PDF: pypdf itself reads its text back

    assert "cracked valve gasket" in PdfReader(__import__("io").BytesIO(pdf)).pages[1].extract_text()
    created = upload(
        tenant.http,
        name="report.pdf",
        content_base64=base64.b64encode(pdf).decode(),
        media_type="application/pdf",
        namespace="reports",
    )
    assert created["chunks_total"] == 2  # pages are sections: no chunk spans two
    document, _ = wait_done(tenant.http, created["id"])
    assert document["status"] == "completed"
    top = recall(tenant.http, "What caused the cooling leak in hall B?", namespace="reports")[0]
    assert "cracked valve gasket" in top["text"]
    assert top["metadata"]["page"] == 2 and top["metadata"]["document_name"] == "report.pdf"


def test_multipart_upload(tenant: TenantCtx) -> None:
    # curl -F file=@notes.md sends application/octet-stream: the type comes from the extension.
    response = tenant.http.post(
        "/v1/memory/documents",
        files={"file": ("notes.md", HANDBOOK.encode(), "application/octet-stream")},
        data={"namespace": "uploads", "metadata": json.dumps({"team": "people-ops"})},
    )
    assert response.status_code == 202, response.text
    created = response.json()
    assert created["name"] == "notes.md" and created["media_type"] == "text/markdown"
    assert created["metadata"] == {"team": "people-ops"}
    pdf = tenant.http.post(
        "/v1/memory/documents",
        files={"file": ("scan-free.pdf", make_pdf(PDF_PAGES), "application/pdf")},
        data={"namespace": "uploads", "name": "Plant report"},
    )
    assert pdf.status_code == 202, pdf.text
    assert pdf.json()["name"] == "Plant report" and pdf.json()["media_type"] == "application/pdf"
    for document_id in (created["id"], pdf.json()["id"]):
        assert wait_done(tenant.http, document_id)[0]["status"] == "completed"
    top = recall(tenant.http, "Which cities have offices?", namespace="uploads")[0]
    assert "Lisbon" in top["text"] and top["metadata"]["team"] == "people-ops"


def test_bad_documents_are_a_400_and_nothing_is_stored(tenant: TenantCtx) -> None:
    ns = "rejected"
    corrupt = b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog /Pages 9 0 R >>\nthis is not a pdf body\n"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"name": "a.png", "text": "hi", "media_type": "image/png"}, "media_type"),
        ({"name": "a", "text": "", "media_type": "text/plain"}, "text"),
        ({"name": "a", "text": "  \n\n \t ", "media_type": "text/markdown"}, "text"),
        ({"name": "a", "media_type": "text/plain"}, "text"),
        ({"name": "a", "text": "x", "content_base64": "eA==", "media_type": "text/plain"}, "text"),
        ({"name": "a", "text": "x", "media_type": "application/pdf"}, "text"),
        ({"name": "a", "content_base64": "not base64!", "media_type": "text/plain"}, "content_base64"),
        (
            {
                "name": "a",
                "content_base64": base64.b64encode(b"\xff\xfe\xfa").decode(),
                "media_type": "text/plain",
            },
            "content_base64",
        ),
        (
            {
                "name": "c.pdf",
                "content_base64": base64.b64encode(corrupt).decode(),
                "media_type": "application/pdf",
            },
            "content_base64",
        ),
        (
            {
                "name": "n.pdf",
                "content_base64": base64.b64encode(b"hello").decode(),
                "media_type": "application/pdf",
            },
            "content_base64",
        ),
        ({"name": "a", "text": "x", "media_type": "text/plain", "metadata": {"chunk": 3}}, "metadata"),
        ({"name": "a", "text": "x", "media_type": "text/plain", "namespace": "bad namespace!"}, "namespace"),
        ({"name": "", "text": "x", "media_type": "text/plain"}, "name"),
        ({"text": "x", "media_type": "text/plain"}, "name"),
    ]
    for body, param in cases:
        body.setdefault("namespace", ns)
        error = error_of(tenant.http.post("/v1/memory/documents", json=body), 400)
        assert error["param"] == param, (body, error)
    html = {"name": "a", "text": "x", "media_type": "text/html"}
    message = error_of(tenant.http.post("/v1/memory/documents", json=html), 400)["message"]
    assert all(
        kind in message for kind in ("'text/plain'", "'text/markdown'", "'application/pdf'", "text/html")
    )
    pdf_error = error_of(
        tenant.http.post(
            "/v1/memory/documents",
            json={
                "name": "c.pdf",
                "content_base64": base64.b64encode(corrupt).decode(),
                "media_type": "application/pdf",
            },
        ),
        400,
    )
    assert "PDF could not be read" in pdf_error["message"]
    multipart = [
        ({"file": ("a.png", b"\x89PNG", "image/png")}, {}, "media_type"),
        ({"file": ("blob", b"data", "application/octet-stream")}, {}, "media_type"),
        ({"file": ("a.txt", b"x", "text/plain")}, {"media_type": "image/png"}, "media_type"),
        ({"file": ("a.txt", b"", "text/plain")}, {}, "file"),
        ({"file": ("c.pdf", corrupt, "application/pdf")}, {}, "file"),
        ({"file": ("a.txt", b"x", "text/plain")}, {"metadata": "[1, 2]"}, "metadata"),
        ({}, {"name": "no file"}, "file"),
    ]
    for files, data, param in multipart:
        response = tenant.http.post(
            "/v1/memory/documents", files=files or {"other": ("x", b"x")}, data={"namespace": ns, **data}
        )
        assert error_of(response, 400)["param"] == param, (files, data, response.text)
    too_big = "x" * (2 * 1024 * 1024 + 1)
    error = error_of(
        tenant.http.post(
            "/v1/memory/documents",
            json={"name": "big", "text": too_big, "media_type": "text/plain", "namespace": ns},
        ),
        413,
    )
    assert "SOMA_MEMORY_DOCUMENT_MAX_BYTES" in error["message"]
    assert tenant.http.get("/v1/memory/documents", params={"namespace": ns}).json()["data"] == []
    assert memories_of(tenant.http, ns) == []
    # nothing accepted before the errors was lost: a good document still goes through
    good = upload(
        tenant.http, name="ok.txt", text="The good document arrived.", media_type="text/plain", namespace=ns
    )
    assert wait_done(tenant.http, good["id"])[0]["status"] == "completed"


def test_delete_removes_the_chunks_from_recall(tenant: TenantCtx) -> None:
    created = upload(
        tenant.http, name="handbook.md", text=HANDBOOK, media_type="text/markdown", namespace="gone"
    )
    wait_done(tenant.http, created["id"])
    assert "27 paid vacation days" in recall(tenant.http, "vacation days", namespace="gone")[0]["text"]
    deleted = tenant.http.delete(f"/v1/memory/documents/{created['id']}")
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["deleted"] is True and deleted.json()["chunks_deleted"] == created["chunks_total"]
    error_of(tenant.http.get(f"/v1/memory/documents/{created['id']}"), 404)
    error_of(tenant.http.delete(f"/v1/memory/documents/{created['id']}"), 404)
    assert recall(tenant.http, "vacation days", namespace="gone", top_k=10) == []
    assert memories_of(tenant.http, "gone") == []


def test_documents_are_tenant_scoped(new_tenant: Callable[..., TenantCtx]) -> None:
    a, b = new_tenant(), new_tenant()
    secret = upload(a.http, name="handbook.md", text=HANDBOOK, media_type="text/markdown")
    wait_done(a.http, secret["id"])
    error_of(b.http.get(f"/v1/memory/documents/{secret['id']}"), 404)
    error_of(b.http.delete(f"/v1/memory/documents/{secret['id']}"), 404)
    assert b.http.get("/v1/memory/documents").json()["data"] == []
    assert recall(b.http, "How many paid vacation days do new employees get?", top_k=10) == []
    # A still has all of it
    assert a.http.get(f"/v1/memory/documents/{secret['id']}").json()["status"] == "completed"
    assert "27 paid vacation days" in recall(a.http, "vacation days")[0]["text"]


def test_list_is_paged(tenant: TenantCtx) -> None:
    made = [
        upload(
            tenant.http,
            name=f"n{i}.txt",
            text=f"Note number {i}.",
            media_type="text/plain",
            namespace="paged",
        )
        for i in range(3)
    ]
    page = tenant.http.get("/v1/memory/documents", params={"namespace": "paged", "limit": 2}).json()
    assert [d["id"] for d in page["data"]] == [m["id"] for m in made[:2]] and page["has_more"] is True
    rest = tenant.http.get(
        "/v1/memory/documents", params={"namespace": "paged", "limit": 2, "after": page["data"][-1]["id"]}
    ).json()
    assert [d["id"] for d in rest["data"]] == [made[2]["id"]] and rest["has_more"] is False
    assert tenant.http.get("/v1/memory/documents").json()["data"] == []  # the default namespace


# -- the chunking rule, and the job's claim and resume on a real database ----------------------------

_embedder = MiniLMEmbedder("all-minilm-l6-v2")


def test_chunks_fit_the_model_window_never_cross_a_heading_and_overlap() -> None:
    fenced = "## Setup\n\n```bash\n# not a heading: a shell comment\nmake install\n```\n\nThen run it."
    text = long_markdown(4, paragraphs=12) + "\n" + fenced + "\n\n## Blob\n\n" + "x" * 3000
    count = wordpiece_counter(find_model_dir)
    chunks = chunk_sections(markdown_sections(text), 200, 40, count)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    # What the model sees, [CLS] and [SEP] included, fits its 256-token window: nothing is truncated.
    assert all(c.tokens <= 200 for c in chunks)
    assert max(_embedder.count_tokens([c.text]) for c in chunks) <= 202
    for chunk in chunks:
        if chunk.section and chunk.section.startswith("Operations manual / Procedure "):
            number = chunk.section.split("Procedure ")[1].split(":")[0]
            assert chunk.text.startswith(f"## Procedure {number}:")
            steps = {line.split(":")[0].split(".")[0] for line in chunk.text.split("Step ")[1:]}
            assert steps == {number}, chunk.text  # never a step of another section
    setup = [c for c in chunks if c.section == "Operations manual / Setup"]
    assert len(setup) == 1 and "# not a heading" in setup[0].text and "Then run it." in setup[0].text
    first, second = [c for c in chunks if c.section and "Procedure 0" in c.section][:2]
    last_sentence = first.text.rsplit(". ", 1)[1]
    assert second.text.split("\n\n", 1)[1].startswith(last_sentence[:-1])  # the next one overlaps it


async def embed(_principal: Principal, texts: list[str]) -> Embeddings:
    vectors, tokens = await asyncio.to_thread(_embedder.embed_sync, texts)
    return Embeddings(_embedder.id, vectors.tolist(), tokens)


def a_worker(url: str, owner: str, batch: int = 32) -> tuple[DocumentWorker, DocumentIngest, Any]:
    engine = create_engine(url)
    sessions = session_factory(engine)
    memory = MemoryService(embed, SyncedIndexes(lambda *scope: ExactIndex(scope[-1])), MemorySettings())
    count = wordpiece_counter(find_model_dir)
    settings = DocumentSettings(batch=batch, lease_s=60)
    worker = DocumentWorker(sessions, embed, memory, settings, count, on_usage=lambda *_: None, owner=owner)
    return worker, DocumentIngest(settings, count), engine


def server_database(server: SomaServer) -> str:
    return server.env.get("SOMA_DATABASE_URL") or f"sqlite+aiosqlite:///{server.data_dir / 'soma.db'}"


PRINCIPAL = Principal("ten_local", "local", "key:k1", "k1", TENANT_CAPABILITIES)


async def test_one_claim_wins_and_an_expired_lease_is_taken_over(migrated_database: str) -> None:
    first, ingest, e1 = a_worker(migrated_database, "worker-1")
    second, _, e2 = a_worker(migrated_database, "worker-2")
    try:
        await _claims_and_takeover(first, second, ingest)
    finally:
        await e1.dispose()
        await e2.dispose()


async def _claims_and_takeover(first: DocumentWorker, second: DocumentWorker, ingest: DocumentIngest) -> None:
    async with first._sessions() as session:
        submitted = await ingest.submit(
            session,
            PRINCIPAL,
            Upload("m.md", "text/markdown", HANDBOOK.encode(), "default", {}, "text"),
            "req_1",
        )
        await session.commit()
    claims = await asyncio.gather(
        first.claim_next(), second.claim_next(), first.claim_next(), second.claim_next()
    )
    won = [c for c in claims if c is not None]
    assert len(won) == 1 and won[0].id == submitted.id and won[0].attempts == 1
    winner, loser = (first, second) if claims[0] or claims[2] else (second, first)
    assert await loser.claim_next() is None  # the lease is live
    async with winner._sessions() as session:  # the winner's process "dies": its lease runs out
        await session.execute(update(MemoryDocument).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
        await session.commit()
    taken = await loser.claim_next()
    assert taken is not None and taken.id == submitted.id and taken.attempts == 2
    await winner.ingest(won[0])  # a zombie: it writes nothing, its lease is gone
    async with winner._sessions() as session:
        assert (await session.scalars(select(MemoryDocumentChunk))).all() == []
    await loser.ingest(taken)
    async with loser._sessions() as session:
        document = await session.get(MemoryDocument, submitted.id)
        assert document is not None and document.status == "completed"
        chunks = (await session.scalars(select(MemoryDocumentChunk.chunk))).all()
        assert sorted(chunks) == list(range(document.chunks_total))


async def test_a_crashed_document_is_resumed_without_duplicates(
    server: SomaServer, tenant: TenantCtx
) -> None:
    crashed, ingest, engine = a_worker(server_database(server), "crashed-worker", batch=4)
    try:
        await _crash_then_resume(crashed, ingest, tenant)
    finally:
        await engine.dispose()


async def _crash_then_resume(crashed: DocumentWorker, ingest: DocumentIngest, tenant: TenantCtx) -> None:
    principal = Principal(tenant.id, tenant.name, f"key:{tenant.key_id}", tenant.key_id, TENANT_CAPABILITIES)
    text = long_markdown(12, seed="resume")
    async with crashed._sessions() as session:
        document = await ingest.submit(
            session,
            principal,
            Upload("resume.md", "text/markdown", text.encode(), "resume", {}, "text"),
            "req_r",
        )
        # Claimed by the worker about to crash (straight away, so the server's worker cannot take it first).
        document.status, document.lease_owner, document.attempts = PROCESSING, crashed.owner, 1
        document.lease_expires_at = utcnow() + timedelta(seconds=60)
        await session.commit()
    total = document.chunks_total
    assert total > 20
    job = asyncio.create_task(crashed.ingest(document))
    while True:
        async with crashed._sessions() as session:
            done = await session.scalar(
                select(MemoryDocument.chunks_done).where(MemoryDocument.id == document.id)
            )
        if done is not None and done >= 8:
            break
        await asyncio.sleep(0.01)
    job.cancel()  # the process dies mid-document: no release, the lease stays until it expires
    with pytest.raises(asyncio.CancelledError):
        await job
    async with crashed._sessions() as session:
        rows = await session.execute(
            select(MemoryDocumentChunk.chunk, MemoryDocumentChunk.memory_id).where(
                MemoryDocumentChunk.document_id == document.id
            )
        )
        before = {chunk: memory_id for chunk, memory_id in rows}
        state = await session.get(MemoryDocument, document.id)
        assert (
            state is not None and state.status == PROCESSING and 8 <= state.chunks_done == len(before) < total
        )
        await session.execute(
            update(MemoryDocument)
            .where(MemoryDocument.id == document.id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
        await session.commit()
    # The server's worker notices the expired lease and finishes the job.
    final, _ = wait_done(tenant.http, document.id)
    assert final["status"] == "completed" and final["chunks_done"] == final["chunks_total"] == total
    stored = memories_of(tenant.http, "resume")
    by_chunk: dict[int, list[str]] = {}
    for memory in stored:
        by_chunk.setdefault(memory["metadata"]["chunk"], []).append(memory["id"])
    assert sorted(by_chunk) == list(range(total))
    assert all(len(ids) == 1 for ids in by_chunk.values())  # no chunk twice
    assert all(by_chunk[chunk] == [memory_id] for chunk, memory_id in before.items())  # kept, not redone
