"""BENCHMARK-ONLY static OpenAI-compatible upstream. Not a model, not a test double for the product:
it exists so that `bench/gateway_rps.py` can measure what the *gateway* costs per request, with an
upstream whose own cost is close to zero.

It answers, on 127.0.0.1 only and without looking at the request beyond its path:
- `GET /v1/models` with a one-model list (`static`);
- `POST /v1/chat/completions` with one fixed, valid completion (`usage` included), or, when the
  body asks for `"stream": true`, with a fixed SSE stream (role, one content delta, finish, usage,
  `[DONE]`) sent as one buffer;
- anything else with 404.

It is a raw `asyncio.Protocol` (on uvloop when installed) with HTTP/1.1 keep-alive and pipelining,
no framework, with every response pre-built as bytes, so that it costs a few microseconds of CPU
per request and does not dominate the 2-core machine the gateway is measured on.

Run: `.venv/bin/python bench/static_upstream.py --port 9000`
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

import orjson

MODEL = "static"
CONTENT = "This is a fixed answer from the benchmark-only static upstream."
MAX_HEAD = 64 * 1024


def _response(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 "
        + status.encode()
        + b"\r\ncontent-type: "
        + content_type
        + b"\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\nconnection: keep-alive\r\n\r\n"
        + body
    )


_MODELS = _response(
    "200 OK",
    orjson.dumps(
        {
            "object": "list",
            "data": [{"id": MODEL, "object": "model", "created": 1700000000, "owned_by": "bench"}],
        }
    ),
)
_COMPLETION = _response(
    "200 OK",
    orjson.dumps(
        {
            "id": "chatcmpl-static",
            "object": "chat.completion",
            "created": 1700000000,
            "model": MODEL,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": CONTENT}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 12, "completion_tokens": 13, "total_tokens": 25},
        }
    ),
)


def _sse() -> bytes:
    base = {"id": "chatcmpl-static", "object": "chat.completion.chunk", "created": 1700000000, "model": MODEL}
    chunks = [
        {
            **base,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
        },
        {**base, "choices": [{"index": 0, "delta": {"content": CONTENT}, "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {**base, "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 13, "total_tokens": 25}},
    ]
    body = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    return _response("200 OK", body, b"text/event-stream")


_STREAM = _sse()
_NOT_FOUND = _response("404 Not Found", b'{"error":{"message":"not found","type":"invalid_request_error"}}')
_TOO_LARGE = _response("431 Request Header Fields Too Large", b"{}")


class StaticHTTP(asyncio.Protocol):
    """One connection: parse just enough HTTP/1.1 (request line, content-length) to answer."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.buffer.extend(data)
        out = []
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    out.append(_TOO_LARGE)
                    self.buffer.clear()
                break
            head = bytes(self.buffer[:end]).lower()
            length = 0
            at = head.find(b"content-length:")
            if at >= 0:
                stop = head.find(b"\r\n", at)
                length = int(head[at + 15 : stop if stop >= 0 else None])
            total = end + 4 + length
            if len(self.buffer) < total:
                break
            body = bytes(self.buffer[end + 4 : total])
            del self.buffer[:total]
            line = head[: head.find(b"\r\n")]
            if line.startswith(b"post") and b"/chat/completions" in line:
                streaming = b'"stream":true' in body.replace(b" ", b"")
                out.append(_STREAM if streaming else _COMPLETION)
            elif line.startswith(b"get") and line.split(b" ")[1].rstrip(b"/").endswith(b"/models"):
                out.append(_MODELS)
            else:
                out.append(_NOT_FOUND)
        if out and self.transport is not None:
            self.transport.write(b"".join(out))


async def serve(port: int) -> None:
    """Serve on 127.0.0.1:`port` until SIGINT/SIGTERM."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(StaticHTTP, "127.0.0.1", port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.port))
        return
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.port))


if __name__ == "__main__":
    main()
