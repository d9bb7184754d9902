"""Turning recalled memories into a prompt-ready context with numbered citations."""

from __future__ import annotations

from dataclasses import dataclass

from somaagent.memory.service import Recalled

PREAMBLE = (
    "Answer using the numbered passages below when they are relevant, and cite them as [n]. "
    "If they do not contain the answer, say so."
)


@dataclass(frozen=True, slots=True)
class Passage:
    """A cited passage: its number in the context, the memory it came from, and its score."""

    n: int
    memory_id: str
    text: str
    score: float


def build_context(recalled: list[Recalled]) -> tuple[str, list[Passage]]:
    """The context block (preamble + `[n] text` lines) and the passages it cites, best first."""
    passages = [
        Passage(n, r.item.id, r.item.text, round(r.score, 6)) for n, r in enumerate(recalled, start=1)
    ]
    if not passages:
        return "", []
    lines = [PREAMBLE, ""] + [f"[{p.n}] {p.text}" for p in passages]
    return "\n".join(lines), passages
