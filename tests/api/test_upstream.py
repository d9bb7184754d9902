"""An OpenAI-compatible upstream (a real `python -m llama_cpp.server`) behind the gateway, and
fallback across real failures: a refused connection and a real timeout."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest

from tests.support.contract import validate
from tests.support.postgres import create_database, drop_database
from tests.support.processes import SomaServer, Upstream, free_port, start_llama_server, start_soma

LOCAL = "smollm2-135m-instruct"
UP = "smol-up"
SLOW = "smol-up-impatient"
DEAD = "nobody-home"


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    server = start_llama_server("smol-upstream")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(upstream: Upstream, backend: str) -> Iterator[SomaServer]:
    models = [
        {
            "id": UP,
            "provider": "openai",
            "base_url": upstream.base_url,
            "upstream_model": "smol-upstream",
            "api_key": "upstream-secret-not-logged",
        },
        # The same real upstream with a timeout no generation can meet: a real timeout.
        {
            "id": SLOW,
            "provider": "openai",
            "base_url": upstream.base_url,
            "upstream_model": "smol-upstream",
            "timeout_s": 0.05,
        },
        {"id": DEAD, "provider": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1", "timeout_s": 2},
    ]
    database = url = None
    if backend == "postgres":
        database, url = create_database()
    soma = start_soma(url, {"SOMA_EXTRA_MODELS": json.dumps(models)})
    yield soma
    soma.stop()
    if database:
        drop_database(database)


@pytest.fixture(scope="module")
def client(gateway: SomaServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.v1, api_key=gateway.admin_key, max_retries=0, timeout=120)


def test_upstream_completion_is_relayed_with_its_usage(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=UP, messages=[{"role": "user", "content": "Say hi."}], max_tokens=8, temperature=0
    )
    validate(completion.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    assert completion.model == UP
    assert completion.choices[0].message.content
    assert completion.usage is not None and 0 < completion.usage.completion_tokens <= 8


def test_upstream_stream_is_relayed_with_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=UP,
            messages=[{"role": "user", "content": "Say hi."}],
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    for chunk in chunks:
        validate(chunk.model_dump(exclude_unset=True), "CreateChatCompletionStreamResponse")
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_upstream_json_mode_is_forwarded(client: openai.OpenAI) -> None:
    # llama.cpp's server knows `json_object` (not `json_schema`); the gateway forwards it as is.
    completion = client.chat.completions.create(
        model=UP,
        messages=[{"role": "user", "content": "Give me a JSON object with a cat's name and age."}],
        max_tokens=300,  # room to close the object: the grammar allows valid JSON only, of any length
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(completion.choices[0].message.content or ""), dict)


def _profile(gateway: SomaServer, models: list[str]) -> None:
    import httpx

    response = httpx.put(
        f"{gateway.v1}/model-profiles/chat",
        json={"models": models},
        headers={"authorization": f"Bearer {gateway.admin_key}"},
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("stream", [False, True])
def test_refused_connection_and_timeout_fall_through_to_the_next_model(
    gateway: SomaServer, client: openai.OpenAI, stream: bool
) -> None:
    # A read timeout applies between chunks, so a streamed answer outruns the impatient model's
    # 50 ms; the timeout case is the non-streamed one.
    _profile(gateway, [DEAD, UP] if stream else [DEAD, SLOW, UP])
    params = dict(model="profile:chat", messages=[{"role": "user", "content": "Say hi."}], max_tokens=40)
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **params))
        assert {c.model for c in chunks} == {UP}
    else:
        completion = client.chat.completions.create(**params)
        assert completion.model == UP  # the response says which model answered


def test_when_every_model_fails_the_error_names_each_failure(
    gateway: SomaServer, client: openai.OpenAI
) -> None:
    _profile(gateway, [DEAD, SLOW])
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(
            model="profile:chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=40
        )
    assert caught.value.status_code == 502
    message = caught.value.body["message"]  # type: ignore[index]
    assert DEAD in message and SLOW in message


def test_upstream_secret_is_never_logged(gateway: SomaServer, client: openai.OpenAI) -> None:
    client.chat.completions.create(model=UP, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert "upstream-secret-not-logged" not in gateway.logs()
    assert gateway.admin_key not in gateway.logs()
