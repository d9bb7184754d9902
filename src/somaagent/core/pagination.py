"""The list envelope every listing endpoint answers with: `{"object": "list", "data": [...]}`."""

from __future__ import annotations

from typing import Generic, Literal, TypeVar

from pydantic import BaseModel

T = TypeVar("T")


class ListOut(BaseModel, Generic[T]):
    """A list of API objects."""

    object: Literal["list"] = "list"
    data: list[T]
