"""Reading a document: its media type, its text (UTF-8, or a PDF's text layer via pypdf), and the
sections no chunk crosses (markdown headings, PDF pages).

Bad input raises `InvalidRequest` naming the field it came in, so an upload is refused before anything
is stored.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
from dataclasses import dataclass

from somaagent.core.errors import InvalidRequest

MEDIA_TYPES = ("text/plain", "text/markdown", "application/pdf")
_ALIASES = {"text/x-markdown": "text/markdown", "application/x-pdf": "application/pdf"}
_EXTENSIONS = {
    ".txt": "text/plain",
    ".md": "text/markdown",
    ".markdown": "text/markdown",
    ".pdf": "application/pdf",
}
_PAGE_BREAK = "\f"  # between PDF pages in the stored text, as pdftotext writes them
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


@dataclass(frozen=True, slots=True)
class Section:
    """A run of text no chunk crosses: a markdown section or a PDF page."""

    text: str
    heading: str = ""  # the heading line as written ("## Refunds"), repeated atop each chunk
    title: str | None = None  # the heading trail ("Guide / Refunds"), stored as chunk metadata
    page: int | None = None  # 1-based PDF page


def media_type_of(value: str | None, filename: str | None = None) -> str:
    """The supported media type `value` names (parameters ignored), else one guessed from `filename`."""
    if value:
        kind = value.split(";", 1)[0].strip().lower()
        kind = _ALIASES.get(kind, kind)
        if kind in MEDIA_TYPES:
            return kind
        if filename is None or kind not in ("application/octet-stream", ""):
            raise InvalidRequest(
                f"unsupported media_type {value!r}; send one of {', '.join(MEDIA_TYPES)}", param="media_type"
            )
    suffix = os.path.splitext(filename or "")[1].lower()
    if suffix in _EXTENSIONS:
        return _EXTENSIONS[suffix]
    raise InvalidRequest(
        f"cannot tell the media type of {filename!r}; set media_type to one of {', '.join(MEDIA_TYPES)}",
        param="media_type",
    )


def decode_base64(value: str) -> bytes:
    """Standard base64 (whitespace allowed), or InvalidRequest naming `content_base64`."""
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest(f"content_base64 is not valid base64: {exc}", param="content_base64") from exc


def extract_text(content: bytes, media_type: str, source: str) -> str:
    """The document's text (PDF pages separated by form feeds); InvalidRequest if it cannot be read."""
    if media_type == "application/pdf":
        return _PAGE_BREAK.join(
            clean_text(page).replace(_PAGE_BREAK, "\n") for page in _pdf_pages(content, source)
        )
    try:
        return clean_text(content.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            f"the {media_type} document is not UTF-8 text (byte {exc.start} is invalid); "
            "convert it to UTF-8 and upload it again",
            param=source,
        ) from exc


def _pdf_pages(content: bytes, source: str) -> list[str]:
    from pypdf import PdfReader

    if not content.lstrip()[:5] == b"%PDF-":
        raise InvalidRequest("the document is not a PDF (it does not start with %PDF-)", param=source)
    try:
        reader = PdfReader(io.BytesIO(content))
        if reader.is_encrypted and not reader.decrypt(""):
            raise InvalidRequest("the PDF is encrypted; upload it without a password", param=source)
        return [page.extract_text() or "" for page in reader.pages]
    except InvalidRequest:
        raise
    # Broad on purpose: a damaged PDF makes pypdf raise its own errors but also KeyError, ValueError,
    # TypeError... from deep in its parser, and each one means the same to the caller.
    except Exception as exc:
        raise InvalidRequest(f"the PDF could not be read: {exc or type(exc).__name__}", param=source) from exc


def sections_of(text: str, media_type: str) -> list[Section]:
    """How the stored text is split before chunking: headings for markdown, pages for PDF."""
    if media_type == "text/markdown":
        return markdown_sections(text)
    if media_type == "application/pdf":
        return [Section(page, page=n) for n, page in enumerate(text.split(_PAGE_BREAK), 1) if page.strip()]
    return plain_sections(text)


def clean_text(text: str) -> str:
    """Newlines normalized, NULs (PostgreSQL cannot store them) and a byte-order mark removed."""
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "").lstrip("\ufeff")


def plain_sections(text: str) -> list[Section]:
    """Plain text is one section."""
    return [Section(text)] if text.strip() else []


def markdown_sections(text: str) -> list[Section]:
    """One section per ATX heading (text before the first heading is a section of its own)."""
    sections: list[Section] = []
    trail: list[tuple[int, str]] = []
    heading = ""
    body: list[str] = []
    fence: str | None = None

    def close() -> None:
        if "\n".join(body).strip():
            title = " / ".join(name for _, name in trail) or None
            sections.append(Section("\n".join(body), heading=heading, title=title))

    for line in text.split("\n"):
        opened = _FENCE.match(line)
        if opened is not None:
            marker = opened.group(1)
            if fence is None:
                fence = marker[0] * 3
            elif marker.startswith(fence):
                fence = None
        match = _HEADING.match(line) if fence is None and opened is None else None
        if match is None:
            body.append(line)
            continue
        close()
        level, name = len(match.group(1)), match.group(2).strip()
        trail = [(lvl, n) for lvl, n in trail if lvl < level] + [(level, name)]
        heading = line.strip()
        body = []
    close()
    return sections


__all__ = [
    "MEDIA_TYPES",
    "Section",
    "clean_text",
    "decode_base64",
    "extract_text",
    "markdown_sections",
    "media_type_of",
    "plain_sections",
    "sections_of",
]
