"""What the model sees in a run: the persona's system prompt with recalled memories, the history that
fits, and this run's turn. History that does not fit is trimmed — whole exchanges, oldest first, so
an assistant's tool calls never lose their results — and the run records that it did."""

from __future__ import annotations

from dataclasses import dataclass, field

from somaagent.models.messages import Message

MEMORY_PREAMBLE = "Things you remember from earlier conversations (use them if relevant):"


@dataclass
class Conversation:
    """The prompt of one run, rebuilt for every model call."""

    system_prompt: str
    history: list[Message]
    turn: list[Message]
    recalled: list[str] = field(default_factory=list)

    def prompt(self) -> list[Message]:
        """System message (with memories), history, then this run's messages."""
        system = self.system_prompt
        if self.recalled:
            system += "\n\n" + MEMORY_PREAMBLE + "\n" + "\n".join(f"- {text}" for text in self.recalled)
        return [Message("system", system), *self.history, *self.turn]

    def add(self, message: Message) -> None:
        """Append a message of this run (an assistant step or a tool result)."""
        self.turn.append(message)

    @property
    def size(self) -> int:
        """Messages of history and turn (without the system message)."""
        return len(self.history) + len(self.turn)

    def mentions(self, text: str) -> bool:
        """True if `text` is already in the prompt (a recalled memory that would only repeat it)."""
        needle = text.strip()
        return any(needle and m.content and needle in m.content for m in (*self.history, *self.turn))

    def fit(self, budget_chars: int) -> int:
        """Drop the oldest exchanges until the history fits `budget_chars`; how many messages went."""
        dropped = 0
        while self.history and _chars(self.history) > budget_chars:
            dropped += self._drop_first_exchange()
        return dropped

    def drop_oldest_half(self) -> int:
        """Drop the oldest half of the history's exchanges (at least one); how many messages went."""
        exchanges = len(_exchange_starts(self.history))
        dropped = 0
        for _ in range(max(1, exchanges // 2) if exchanges else 0):
            dropped += self._drop_first_exchange()
        return dropped

    def _drop_first_exchange(self) -> int:
        starts = _exchange_starts(self.history)
        end = starts[1] if len(starts) > 1 else len(self.history)
        del self.history[:end]
        return end


def _exchange_starts(messages: list[Message]) -> list[int]:
    """Indexes where an exchange begins: each user message (and the very first message)."""
    starts = [i for i, m in enumerate(messages) if m.role == "user"]
    if messages and (not starts or starts[0] != 0):
        starts.insert(0, 0)
    return starts


def _chars(messages: list[Message]) -> int:
    return sum(
        len(m.content or "") + sum(len(c.arguments) + len(c.name) for c in m.tool_calls) for m in messages
    )
