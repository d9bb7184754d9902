"""Turning a document's sections into chunks that fit the embedding model's window.

The rule (all-MiniLM-L6-v2 reads 256 tokens, [CLS] and [SEP] included, and silently drops the rest):
- A chunk never crosses a section: a markdown heading (`#`..`######`, outside fenced code) or a PDF
  page starts a new one. Each chunk of a markdown section starts with the section's heading line, so a
  chunk deep in "## Refunds" still says what it is about.
- Inside a section, whole paragraphs (blank-line separated) are packed greedily up to `budget` tokens
  (default 200, at most 254 so the special tokens fit: nothing is ever truncated by the model). A
  paragraph over the budget is split into lines, then sentences, then words, then characters, and
  those pieces are packed the same way.
- Each chunk of a section after its first starts with the trailing whole sentences of the chunk
  before that fit in `overlap` tokens (default 40), so text near a chunk edge is seen with its
  context. A whole previous chunk is never repeated.
Tokens are counted with the embedding model's own tokenizer (without special tokens). BERT splits on
whitespace and punctuation before WordPiece, so the tokens of pieces joined by whitespace add up exactly.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from somaagent.memory.extraction import Section

# Tokens per text, special tokens excluded.
TokenCounter = Callable[[list[str]], list[int]]

_PARAGRAPH = re.compile(r"\n[ \t]*\n+")
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")
# A heading longer than this share of the budget is not repeated on every chunk.
_MAX_HEADING_SHARE = 4


@dataclass(frozen=True, slots=True)
class Chunk:
    """One piece of a document, embedded as one memory."""

    index: int
    text: str
    tokens: int
    section: str | None
    page: int | None


@dataclass(frozen=True, slots=True)
class _Piece:
    text: str
    tokens: int
    joiner: str  # what separates it from the piece before it in the same chunk


def chunk_sections(sections: list[Section], budget: int, overlap: int, count: TokenCounter) -> list[Chunk]:
    """The chunks of `sections`, in order, each at most `budget` tokens (see the module docstring)."""
    if budget < 8 or not 0 <= overlap < budget:
        raise ValueError(f"need budget >= 8 and 0 <= overlap < budget, got {budget}, {overlap}")
    texts: list[tuple[str, Section]] = []
    headings = count([s.heading for s in sections])
    for section, heading_tokens in zip(sections, headings, strict=True):
        prefix = section.heading if 0 < heading_tokens <= budget // _MAX_HEADING_SHARE else ""
        room = budget - (heading_tokens if prefix else 0)
        pieces = _pieces(section.text, room, count)
        for body in _pack(pieces, room, overlap, count):
            texts.append((f"{prefix}\n\n{body}" if prefix else body, section))
    tokens = count([text for text, _ in texts])
    return [
        Chunk(index, text, n, section.title, section.page)
        for index, ((text, section), n) in enumerate(zip(texts, tokens, strict=True))
    ]


def _pieces(text: str, room: int, count: TokenCounter) -> list[_Piece]:
    """Paragraphs that fit `room`, the oversized ones split finer (lines, sentences, words, chars)."""
    paragraphs = [p.strip() for p in _PARAGRAPH.split(text) if p.strip()]
    return _split(paragraphs, "\n\n", room, count, level=0)


def _split(parts: list[str], joiner: str, room: int, count: TokenCounter, level: int) -> list[_Piece]:
    out: list[_Piece] = []
    for part, tokens in zip(parts, count(parts), strict=True):
        if tokens <= room or level > 3:
            out.append(_Piece(part, tokens, joiner))
            continue
        if level == 0:
            finer, inner = [line for line in part.split("\n") if line.strip()], "\n"
        elif level == 1:
            finer, inner = [s for s in _SENTENCE_END.split(part) if s], " "
        elif level == 2:
            finer, inner = part.split(), " "
        else:
            # One "word" longer than the budget (a hash, a blob): every token is at least one char.
            finer, inner = [part[i : i + room] for i in range(0, len(part), room)], ""
        if len(finer) <= 1 and level < 3:
            split = _split([part], joiner, room, count, level + 1)
        else:
            split = _split(finer, inner, room, count, level + 1)
        if split:  # the first piece is separated from what came before as the whole part was
            out.append(_Piece(split[0].text, split[0].tokens, joiner))
            out.extend(split[1:])
    return out


def _pack(pieces: list[_Piece], room: int, overlap: int, count: TokenCounter) -> list[str]:
    """Greedy packing; each chunk after the first starts with the previous one's trailing sentences."""
    chunks: list[str] = []
    current: list[_Piece] = []
    used = 0
    for piece in pieces:
        if current and used + piece.tokens > room:
            chunks.append(_join(current))
            current = _overlap(current, min(overlap, room - piece.tokens), count)
            used = sum(p.tokens for p in current)
        current.append(piece)
        used += piece.tokens
    if current:
        chunks.append(_join(current))
    return chunks


def _overlap(chunk: list[_Piece], limit: int, count: TokenCounter) -> list[_Piece]:
    """The longest run of whole sentences ending `chunk` within `limit` tokens, never all of it."""
    sentences = [s for p in chunk for s in _SENTENCE_END.split(p.text) if s.strip()]
    if limit <= 0 or len(sentences) < 2:
        return []
    tail: list[str] = []
    used = 0
    for sentence, tokens in zip(reversed(sentences[1:]), reversed(count(sentences[1:])), strict=True):
        if used + tokens > limit:
            break
        tail.insert(0, sentence)
        used += tokens
    return [_Piece(" ".join(tail), used, "")] if tail else []


def _join(pieces: list[_Piece]) -> str:
    return pieces[0].text + "".join(p.joiner + p.text for p in pieces[1:])


def wordpiece_counter(model_dir: Callable[[], Path]) -> TokenCounter:
    """A counter using the tokenizer shipped with the embedding model (found and loaded on first use)."""
    loaded: list[object] = []

    def count(texts: list[str]) -> list[int]:
        if not texts:
            return []
        if not loaded:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
            tokenizer.no_truncation()
            tokenizer.no_padding()
            loaded.append(tokenizer)
        encodings = loaded[0].encode_batch(texts, add_special_tokens=False)  # type: ignore[attr-defined]
        return [len(e.ids) for e in encodings]

    return count


def approximate_counter(texts: list[str]) -> list[int]:
    """For embedding models whose tokenizer we do not have: ~4 characters a token in English,
    counted as 3 to stay under the window."""
    return [(len(text) + 2) // 3 for text in texts]


__all__ = ["Chunk", "TokenCounter", "approximate_counter", "chunk_sections", "wordpiece_counter"]
