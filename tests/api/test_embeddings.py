"""`/v1/embeddings` on the real all-MiniLM-L6-v2 model: shapes, encodings, `dimensions`, errors, meaning."""

from __future__ import annotations

import base64
import math
import struct
from typing import Any

import openai
import pytest

from tests.conftest import TenantCtx
from tests.support.contract import error_of, validate

EMBED = "all-minilm-l6-v2"
CHAT = "smollm2-135m-instruct"
DIMS = 384
TEXTS = [
    "The cat sits on the mat.",
    "Quarterly revenue grew by ten percent.",
    "A kitten is resting on a rug.",
]


def embed(tenant: TenantCtx, **body: Any) -> dict[str, Any]:
    response = tenant.http.post("/v1/embeddings", json={"model": EMBED, **body})
    assert response.status_code == 200, response.text
    payload: dict[str, Any] = response.json()
    if body.get("encoding_format") == "base64":
        # The contract describes the float form only: check the rest of the body with the vectors decoded.
        decoded = [{**item, "embedding": list(decode(item["embedding"]))} for item in payload["data"]]
        validate({**payload, "data": decoded}, "CreateEmbeddingResponse")
    else:
        validate(payload, "CreateEmbeddingResponse")
    return payload


def decode(encoded: str) -> tuple[float, ...]:
    """A base64 embedding: little-endian float32, as OpenAI sends it."""
    raw = base64.b64decode(encoded)
    assert len(raw) % 4 == 0
    return struct.unpack(f"<{len(raw) // 4}f", raw)


def vectors(payload: dict[str, Any]) -> list[list[float]]:
    assert [item["index"] for item in payload["data"]] == list(range(len(payload["data"])))
    return [item["embedding"] for item in payload["data"]]


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / (norm(a) * norm(b))


def test_string_input_gives_one_normalized_vector(tenant: TenantCtx) -> None:
    payload = embed(tenant, input=TEXTS[0])
    assert payload["object"] == "list"
    assert payload["model"] == EMBED
    [vector] = vectors(payload)
    assert len(vector) == DIMS
    assert abs(norm(vector) - 1) < 1e-4
    assert payload["usage"]["prompt_tokens"] > 0
    assert payload["usage"]["total_tokens"] == payload["usage"]["prompt_tokens"]


def test_list_input_keeps_order_and_matches_single_embeddings(tenant: TenantCtx) -> None:
    batch = vectors(embed(tenant, input=TEXTS))
    assert len(batch) == len(TEXTS)
    for text, from_batch in zip(TEXTS, batch, strict=True):
        [single] = vectors(embed(tenant, input=text))
        assert max(abs(x - y) for x, y in zip(single, from_batch, strict=True)) < 1e-5, text


def test_usage_counts_every_input(tenant: TenantCtx) -> None:
    singles = [embed(tenant, input=text)["usage"]["prompt_tokens"] for text in TEXTS]
    assert all(tokens > 0 for tokens in singles)
    assert embed(tenant, input=TEXTS)["usage"]["prompt_tokens"] == sum(singles)


def test_base64_decodes_to_the_float_vector(tenant: TenantCtx) -> None:
    [as_float] = vectors(embed(tenant, input=TEXTS[1]))
    encoded = embed(tenant, input=TEXTS[1], encoding_format="base64")["data"][0]["embedding"]
    assert isinstance(encoded, str)
    decoded = decode(encoded)
    assert len(decoded) == DIMS
    assert max(abs(x - y) for x, y in zip(decoded, as_float, strict=True)) < 1e-6


def test_sdk_round_trip(tenant: TenantCtx) -> None:
    # The SDK asks for base64 by default and decodes it itself.
    result = tenant.oai.embeddings.create(model=EMBED, input=TEXTS)
    assert result.model == EMBED
    assert [len(d.embedding) for d in result.data] == [DIMS] * len(TEXTS)
    [as_float] = vectors(embed(tenant, input=TEXTS[2]))
    assert max(abs(x - y) for x, y in zip(result.data[2].embedding, as_float, strict=True)) < 1e-5
    assert result.usage.prompt_tokens > 0


@pytest.mark.parametrize("dimensions", [1, 64, 128, DIMS])
def test_dimensions_shortens_and_renormalizes(tenant: TenantCtx, dimensions: int) -> None:
    [full] = vectors(embed(tenant, input=TEXTS[0]))
    [short] = vectors(embed(tenant, input=TEXTS[0], dimensions=dimensions))
    assert len(short) == dimensions
    assert abs(norm(short) - 1) < 1e-4
    head = full[:dimensions]
    scaled = [x / norm(head) for x in head]
    assert max(abs(x - y) for x, y in zip(short, scaled, strict=True)) < 1e-5


def test_dimensions_beyond_the_model_is_400(tenant: TenantCtx) -> None:
    body = {"model": EMBED, "input": "x", "dimensions": DIMS + 1}
    error = error_of(tenant.http.post("/v1/embeddings", json=body), 400)
    assert error["param"] == "dimensions"
    assert str(DIMS) in error["message"]


@pytest.mark.parametrize(
    ("given", "param", "fragment"),
    [
        pytest.param("", "input", "empty string", id="empty-string"),
        pytest.param([], "input", "empty list", id="empty-list"),
        pytest.param(["ok", ""], "input", "empty strings", id="empty-item"),
        pytest.param([1, 2, 3], "input", "token-id input", id="token-ids"),
        pytest.param([[1, 2], [3]], "input", "token-id input", id="token-id-lists"),
        pytest.param(5, "input", "input", id="number"),
    ],
)
def test_bad_input_is_400(tenant: TenantCtx, given: object, param: str, fragment: str) -> None:
    error = error_of(tenant.http.post("/v1/embeddings", json={"model": EMBED, "input": given}), 400)
    assert error["param"] == param, error
    assert fragment in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_bad_encoding_and_dimensions_are_400(tenant: TenantCtx) -> None:
    bad_format = {"model": EMBED, "input": "x", "encoding_format": "int8"}
    assert error_of(tenant.http.post("/v1/embeddings", json=bad_format), 400)["param"] == "encoding_format"
    zero = {"model": EMBED, "input": "x", "dimensions": 0}
    assert error_of(tenant.http.post("/v1/embeddings", json=zero), 400)["param"] == "dimensions"
    extra = {"model": EMBED, "input": "x", "foo": 1}
    assert error_of(tenant.http.post("/v1/embeddings", json=extra), 400)["message"] == (
        "Unrecognized request argument supplied: foo"
    )


def test_chat_model_for_embeddings_is_400(tenant: TenantCtx) -> None:
    error = error_of(tenant.http.post("/v1/embeddings", json={"model": CHAT, "input": "hello"}), 400)
    assert error["param"] == "model"
    assert "chat model" in error["message"] and EMBED in error["message"]
    with pytest.raises(openai.BadRequestError):
        tenant.oai.embeddings.create(model=CHAT, input="hello")


def test_embedding_model_for_chat_is_400(tenant: TenantCtx) -> None:
    body = {"model": EMBED, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    error = error_of(tenant.http.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == "model"
    assert "embedding model" in error["message"] and CHAT in error["message"]


def test_unknown_model_is_404(tenant: TenantCtx) -> None:
    body = {"model": "text-embedding-9", "input": "x"}
    error = error_of(tenant.http.post("/v1/embeddings", json=body), 404)
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert EMBED in error["message"]


def test_paraphrases_are_closer_than_unrelated_texts(tenant: TenantCtx) -> None:
    cat, revenue, kitten = vectors(embed(tenant, input=TEXTS))
    assert cosine(cat, kitten) > cosine(cat, revenue) + 0.2
    assert cosine(cat, kitten) > cosine(kitten, revenue) + 0.2
