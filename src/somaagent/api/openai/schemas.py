"""OpenAI-compatible request bodies, validated strictly, and their translation into `models.messages`.

Unknown fields are refused (`Unrecognized request argument supplied: x`) and known OpenAI
parameters we do not implement are refused when set to anything but their no-op value, so a
client never gets a silently different behaviour from the one it asked for.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from somaagent.models.messages import (
    ChatRequest,
    Message,
    ResponseFormat,
    ToolCall,
    ToolChoice,
    ToolSpec,
)


class UnsupportedParameter(ValueError):
    """A known OpenAI parameter set to a value SomaAgent does not implement."""

    code = "unsupported_parameter"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        # The first quoted name in the message is the parameter, unless given.
        found = re.search(r"'([a-z_]+)'", message)
        self.param = param or (found.group(1) if found else None)


class InvalidParameter(ValueError):
    """A value that breaks a rule spanning several fields; `param` names the one to fix."""

    code = "invalid_value"

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _json_schema(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """A JSON schema the grammar builder and validators can use, or a ValueError saying why not."""
    if value is not None:
        try:
            jsonschema.Draft202012Validator.check_schema(value)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"not a valid JSON schema: {exc.message}") from exc
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCallSpec(_Strict):
    name: str
    arguments: str


class ToolCallIn(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallSpec


class ChatMessageIn(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, max_length=64)
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None

    @model_validator(mode="after")
    def _role_rules(self) -> ChatMessageIn:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message with role 'tool' needs 'tool_call_id'")
        if self.role in ("system", "developer", "user", "tool") and self.content is None:
            raise ValueError(f"a message with role {self.role!r} needs 'content'")
        if self.role == "assistant" and self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs 'content' or 'tool_calls'")
        return self

    def text(self) -> str | None:
        """The content as plain text (text parts concatenated)."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content


class FunctionSpec(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str = ""
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return _json_schema(value)


class ToolIn(_Strict):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaSpec(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("schema_")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return _json_schema(value)


class ResponseFormatIn(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormatIn:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type 'json_schema' needs 'json_schema'")
        return self


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None


Stop = str | Annotated[list[str], Field(max_length=4)] | None


class ChatCompletionRequest(_Strict):
    """`POST /v1/chat/completions`."""

    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = None
    stop: Stop = None
    user: str | None = Field(default=None, max_length=256)
    safety_identifier: str | None = Field(default=None, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[ToolIn] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormatIn | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    prompt_cache_key: str | None = None
    # Known OpenAI parameters accepted only with their no-op value (see `_unsupported`).
    n: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None

    @model_validator(mode="after")
    def _unsupported(self) -> ChatCompletionRequest:
        if self.n not in (None, 1):
            raise UnsupportedParameter(
                f"'n' = {self.n} is not supported: this server returns one choice (n=1)"
            )
        if self.logprobs:
            raise UnsupportedParameter("'logprobs' is not supported by this server")
        if self.top_logprobs is not None:
            raise UnsupportedParameter("'top_logprobs' is not supported by this server")
        if self.logit_bias:
            raise UnsupportedParameter("'logit_bias' is not supported by this server")
        if self.store:
            raise UnsupportedParameter(
                "'store' is not supported: completions are not stored for later retrieval"
            )
        if self.metadata:
            raise UnsupportedParameter("'metadata' is not supported (it only applies to stored completions)")
        if self.service_tier not in (None, "auto", "default"):
            raise UnsupportedParameter(f"'service_tier' = {self.service_tier!r} is not supported; use 'auto'")
        if self.modalities not in (None, ["text"]):
            raise UnsupportedParameter("'modalities' other than ['text'] are not supported")
        for name in ("audio", "prediction", "reasoning_effort", "verbosity", "web_search_options"):
            if getattr(self, name) is not None:
                raise UnsupportedParameter(f"'{name}' is not supported by this server")
        if self.functions is not None or self.function_call is not None:
            raise UnsupportedParameter(
                "'functions'/'function_call' are deprecated; use 'tools' and 'tool_choice'"
            )
        if self.max_tokens and self.max_completion_tokens and self.max_tokens != self.max_completion_tokens:
            raise InvalidParameter(
                "'max_tokens' and 'max_completion_tokens' disagree; send only 'max_completion_tokens'",
                param="max_tokens",
            )
        if self.stream_options is not None and not self.stream:
            raise InvalidParameter(
                "'stream_options' is only allowed when 'stream' is true", param="stream_options"
            )
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {t.function.name for t in self.tools or ()}
            if self.tool_choice.function.name not in names:
                raise InvalidParameter(
                    f"tool_choice names function {self.tool_choice.function.name!r}, which is not in 'tools'",
                    param="tool_choice",
                )
        elif self.tool_choice == "required" and not self.tools:
            raise InvalidParameter(
                "tool_choice 'required' needs at least one tool in 'tools'", param="tool_choice"
            )
        return self

    def to_chat_request(self) -> ChatRequest:
        """The normalized request the router and providers understand."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return ChatRequest(
            model=self.model,
            messages=tuple(_message(m) for m in self.messages),
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=stop,
            tools=tuple(
                ToolSpec(
                    name=t.function.name,
                    description=t.function.description,
                    parameters=t.function.parameters or {"type": "object", "properties": {}},
                )
                for t in self.tools or ()
            ),
            tool_choice=_tool_choice(self.tool_choice, bool(self.tools)),
            response_format=_response_format(self.response_format),
            user=self.user or self.safety_identifier,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )


def _message(message: ChatMessageIn) -> Message:
    role = "system" if message.role == "developer" else message.role
    calls = tuple(
        ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments)
        for c in message.tool_calls or ()
    )
    return Message(
        role=role,
        content=message.text(),
        tool_calls=calls,
        tool_call_id=message.tool_call_id,
        name=message.name,
    )


def _tool_choice(choice: str | NamedToolChoice | None, has_tools: bool) -> ToolChoice:
    if isinstance(choice, NamedToolChoice):
        return ToolChoice(mode="function", function=choice.function.name)
    if choice is None:
        return ToolChoice(mode="auto" if has_tools else "none")
    return ToolChoice(mode=choice)  # type: ignore[arg-type]


def _response_format(fmt: ResponseFormatIn | None) -> ResponseFormat:
    if fmt is None or fmt.type == "text":
        return ResponseFormat()
    if fmt.type == "json_object":
        return ResponseFormat(type="json_object")
    assert fmt.json_schema is not None
    return ResponseFormat(type="json_schema", schema=fmt.json_schema.schema_ or {}, name=fmt.json_schema.name)


class EmbeddingRequest(_Strict):
    """`POST /v1/embeddings`."""

    model: str = Field(min_length=1, max_length=256)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = Field(default=None, max_length=256)

    @field_validator("input")
    @classmethod
    def _texts_only(cls, value: str | list[str] | list[int] | list[list[int]]) -> str | list[str]:
        if isinstance(value, str):
            if not value:
                raise ValueError("'input' cannot be an empty string")
            return value
        if not value:
            raise ValueError("'input' cannot be an empty list")
        if not all(isinstance(item, str) for item in value):
            raise UnsupportedParameter("token-id input is not supported; send the text")
        if len(value) > 2048:
            raise ValueError("'input' may hold at most 2048 items")
        if any(not item for item in value):
            raise ValueError("'input' items cannot be empty strings")
        return value  # type: ignore[return-value]

    def texts(self) -> list[str]:
        """The inputs as a list of strings."""
        return [self.input] if isinstance(self.input, str) else list(self.input)  # type: ignore[arg-type]
