"""A conversation held against the server's `/v1/chat/completions` stream (the API's own code path)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson


class ChatSession:
    """Keeps the history; `send` streams the assistant's answer piece by piece."""

    def __init__(self, base_url: str, key: str, model: str, system: str | None, max_tokens: int) -> None:
        self._client = httpx.Client(
            base_url=base_url.rstrip("/") + "/",
            headers={"authorization": f"Bearer {key}"},
            timeout=httpx.Timeout(300, connect=5),
        )
        self._model = model
        self._max_tokens = max_tokens
        self.history: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []

    def check(self) -> None:
        """Fail early, with the fix, if the server or the key is not right."""
        try:
            response = self._client.get(f"models/{self._model}")
        except httpx.HTTPError as exc:
            raise RuntimeError(
                f"cannot reach {self._client.base_url} ({exc}); start it with `soma serve`"
            ) from exc
        if response.status_code != 200:
            raise RuntimeError(_error_message(response.content))

    def send(self, text: str) -> Iterator[str]:
        """Add a user turn and yield the streamed answer's text."""
        self.history.append({"role": "user", "content": text})
        body = {
            "model": self._model,
            "messages": self.history,
            "stream": True,
            "max_tokens": self._max_tokens,
        }
        answer: list[str] = []
        with self._client.stream("POST", "chat/completions", json=body) as response:
            if response.status_code != 200:
                self.history.pop()
                raise RuntimeError(_error_message(response.read()))
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = orjson.loads(line[6:])
                if "error" in data:
                    raise RuntimeError(data["error"]["message"])
                for choice in data.get("choices", ()):
                    piece = choice.get("delta", {}).get("content")
                    if piece:
                        answer.append(piece)
                        yield piece
        self.history.append({"role": "assistant", "content": "".join(answer)})


def _error_message(content: bytes) -> str:
    try:
        return str(orjson.loads(content)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return content[:300].decode(errors="replace")
