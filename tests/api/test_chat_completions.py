"""`/v1/chat/completions` through the official `openai` SDK, on the real SmolLM2 model."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.conftest import TenantCtx
from tests.support.contract import validate

MODEL = "smollm2-135m-instruct"
HELLO = [{"role": "user", "content": "Say hello."}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


def test_non_streaming_completion_validates_against_the_openai_contract(tenant: TenantCtx) -> None:
    completion = tenant.oai.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12)
    body = completion.model_dump(exclude_unset=True)
    validate(body, "CreateChatCompletionResponse")
    assert completion.model == MODEL
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage is not None
    assert completion.usage.prompt_tokens > 0
    assert 0 < completion.usage.completion_tokens <= 12
    assert (
        completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


def test_max_tokens_caps_the_answer_exactly(tenant: TenantCtx) -> None:
    prompt = [{"role": "user", "content": "Write a long story about the sea."}]
    for params in ({"max_tokens": 5}, {"max_completion_tokens": 5}):
        completion = tenant.oai.chat.completions.create(
            model=MODEL, messages=prompt, temperature=0.9, seed=3, **params
        )
        assert completion.usage is not None
        assert completion.usage.completion_tokens == 5
        assert completion.choices[0].finish_reason == "length"


def test_same_seed_same_answer_and_temperature_zero_is_deterministic(tenant: TenantCtx) -> None:
    prompt = [{"role": "user", "content": "Name a colour."}]

    def ask(**params: object) -> str | None:
        completion = tenant.oai.chat.completions.create(model=MODEL, messages=prompt, max_tokens=16, **params)
        return completion.choices[0].message.content

    assert ask(temperature=1.0, top_p=0.9, seed=42) == ask(temperature=1.0, top_p=0.9, seed=42)
    assert ask(temperature=0, seed=1) == ask(temperature=0, seed=1)


def test_stop_sequence_ends_the_answer_before_it(tenant: TenantCtx) -> None:
    prompt = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    full = tenant.oai.chat.completions.create(model=MODEL, messages=prompt, max_tokens=40, temperature=0)
    text = full.choices[0].message.content or ""
    assert "3" in text, text
    cut = tenant.oai.chat.completions.create(
        model=MODEL, messages=prompt, max_tokens=40, temperature=0, stop=["3"]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index("3")]


def test_user_and_developer_role_are_accepted(tenant: TenantCtx) -> None:
    completion = tenant.oai.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "developer", "content": "Answer in one word."},
            {"role": "user", "content": "Sky colour?"},
        ],
        max_tokens=8,
        user="user-1234",
    )
    assert completion.choices[0].message.content


def test_streaming_sends_sse_chunks_then_usage_then_done(tenant: TenantCtx) -> None:
    stream = tenant.oai.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=10, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    for chunk in chunks:
        validate(chunk.model_dump(exclude_unset=True), "CreateChatCompletionStreamResponse")
    assert chunks[0].choices[0].delta.role == "assistant"
    ids = {c.id for c in chunks}
    assert len(ids) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_stream_ends_with_done_marker(tenant: TenantCtx) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 4, "stream": True}
    with tenant.http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert not any('"usage":{' in line for line in lines)  # no usage without include_usage


def test_named_tool_choice_yields_arguments_that_validate(tenant: TenantCtx) -> None:
    completion = tenant.oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Paris in celsius?"}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0.7,
    )
    validate(completion.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    assert calls[0].type == "function"
    assert calls[0].function.name == "get_weather"
    assert calls[0].id
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER_TOOL["function"]["parameters"])


def test_named_tool_choice_streams_argument_deltas(tenant: TenantCtx) -> None:
    stream = tenant.oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        stream=True,
    )
    chunks = list(stream)
    for chunk in chunks:
        validate(chunk.model_dump(exclude_unset=True), "CreateChatCompletionStreamResponse")
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function and deltas[0].function.name == "get_weather"
    arguments = "".join((d.function.arguments or "") for d in deltas if d.function)
    jsonschema.validate(json.loads(arguments), WEATHER_TOOL["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_required_tool_choice_picks_one_of_the_tools(tenant: TenantCtx) -> None:
    time_tool = {
        "type": "function",
        "function": {"name": "current_time", "parameters": {"type": "object", "properties": {}}},
    }
    completion = tenant.oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What's the weather in Rome?"}],
        tools=[WEATHER_TOOL, time_tool],
        tool_choice="required",
        temperature=0,
    )
    calls = completion.choices[0].message.tool_calls
    assert calls and calls[0].function.name in ("get_weather", "current_time")
    schema = (
        WEATHER_TOOL["function"]["parameters"]
        if calls[0].function.name == "get_weather"
        else {"type": "object"}
    )
    jsonschema.validate(json.loads(calls[0].function.arguments), schema)


def test_auto_tool_choice_answers_in_text_or_a_valid_call(tenant: TenantCtx) -> None:
    completion = tenant.oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi there!"}],
        tools=[WEATHER_TOOL],
        max_tokens=40,
        temperature=0,
    )
    validate(completion.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    message = completion.choices[0].message
    if message.tool_calls:
        jsonschema.validate(
            json.loads(message.tool_calls[0].function.arguments), WEATHER_TOOL["function"]["parameters"]
        )
    else:
        assert message.content


def test_tool_results_can_be_sent_back(tenant: TenantCtx) -> None:
    completion = tenant.oai.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
        ],
        tools=[WEATHER_TOOL],
        tool_choice="none",
        max_tokens=30,
    )
    assert completion.choices[0].message.content
    assert not completion.choices[0].message.tool_calls


def test_response_format_json_object_parses(tenant: TenantCtx) -> None:
    completion = tenant.oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give me a JSON object with a cat's name and age."}],
        response_format={"type": "json_object"},
        max_tokens=120,
        temperature=0,
    )
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(completion.choices[0].message.content or ""), dict)


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema_validates(tenant: TenantCtx, stream: bool) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0},
            "pets": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        },
        "required": ["name", "age", "pets"],
        "additionalProperties": False,
    }
    params = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Invent a person."}],
        max_tokens=150,
        temperature=0.5,
        seed=7,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema, "strict": True},
        },
    )
    if stream:
        text = "".join(
            c.choices[0].delta.content or ""
            for c in tenant.oai.chat.completions.create(stream=True, **params)
            if c.choices
        )
    else:
        text = tenant.oai.chat.completions.create(**params).choices[0].message.content or ""
    jsonschema.validate(json.loads(text), schema)


def test_a_schema_the_grammar_cannot_express_is_a_400_not_a_502(tenant: TenantCtx) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        tenant.oai.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            max_tokens=5,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}},
            },
        )
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == "response_format"
    assert "cannot be enforced" in error["message"]
    # the model is still serving
    assert tenant.oai.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).choices
