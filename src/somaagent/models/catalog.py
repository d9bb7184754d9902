"""The model catalog: which models exist, which tenants may use them, and their providers."""

from __future__ import annotations

from dataclasses import dataclass

from somaagent.config import ModelSpec
from somaagent.core.errors import InvalidRequest, NotFound
from somaagent.core.principal import Principal
from somaagent.models.ports import ChatModel, Embedder

PROFILE_PREFIX = "profile:"


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """A model and the provider object that serves it (one of the two is set)."""

    spec: ModelSpec
    chat: ChatModel | None = None
    embedder: Embedder | None = None


class ModelCatalog:
    """Lookup of models by id, filtered by what the calling tenant may use."""

    def __init__(self, entries: list[CatalogEntry]) -> None:
        self._entries = {e.spec.id: e for e in entries}

    def entries(self) -> list[CatalogEntry]:
        """Every model, in declaration order."""
        return list(self._entries.values())

    def visible(self, principal: Principal) -> list[CatalogEntry]:
        """The models `principal`'s tenant may use (admins see all)."""
        return [e for e in self._entries.values() if _allowed(e.spec, principal)]

    def get(self, principal: Principal, model_id: str) -> CatalogEntry:
        """A model the caller may use, or `NotFound` listing the ones it may."""
        entry = self._entries.get(model_id)
        if entry is None or not _allowed(entry.spec, principal):
            available = ", ".join(e.spec.id for e in self.visible(principal))
            raise NotFound(
                f"The model {model_id!r} does not exist or you do not have access to it. "
                f"Available models: {available}",
                param="model",
                code="model_not_found",
            )
        return entry

    def chat(self, principal: Principal, model_id: str) -> ChatModel:
        """The chat provider for `model_id`."""
        entry = self.get(principal, model_id)
        if entry.chat is None:
            raise self._wrong_kind(
                principal, model_id, "an embedding model; use it with /v1/embeddings", "chat"
            )
        return entry.chat

    def embedder(self, principal: Principal, model_id: str) -> Embedder:
        """The embedding provider for `model_id`."""
        entry = self.get(principal, model_id)
        if entry.embedder is None:
            raise self._wrong_kind(principal, model_id, "a chat model", "embedding")
        return entry.embedder

    def _wrong_kind(self, principal: Principal, model_id: str, what: str, wanted: str) -> InvalidRequest:
        fitting = [
            e.spec.id
            for e in self.visible(principal)
            if (e.chat if wanted == "chat" else e.embedder) is not None
        ]
        return InvalidRequest(f"{model_id!r} is {what}; {wanted} models: {', '.join(fitting)}", param="model")

    async def close(self) -> None:
        """Release every provider."""
        for entry in self._entries.values():
            if entry.chat is not None:
                await entry.chat.close()
            if entry.embedder is not None:
                await entry.embedder.close()


def _allowed(spec: ModelSpec, principal: Principal) -> bool:
    return not spec.tenants or principal.is_admin or principal.tenant_name in spec.tenants
