"""One kept-open MCP session, owned by one long-lived task.

Owns: `McpConnection`. May import: core, tools.mcp_endpoints, the `mcp` SDK. Never: db, api.

The owner task enters the SDK's context managers, serves every request in its own task group and
exits them again: anyio cancel scopes must be entered and left by the same task, so callers never
touch the SDK session directly — they hand a job to the owner and await its future. A connection
whose server exited is noticed (end of its stdout) and replaced by the pool on the next call; a call
in flight when it died fails with a clear error, since it may have run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, Literal, TypeVar

import anyio
import httpx2
import mcp_types as types
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from somaagent.tools.mcp_endpoints import (
    McpEndpoint,
    McpError,
    McpNotSent,
    McpTimeout,
    McpUnavailable,
    redact_secrets,
)

log = logging.getLogger(__name__)

Transport = Literal["stdio", "http"]
T = TypeVar("T")

_STDERR_TAIL = 600
_STDERR_MAX_BYTES = 1024 * 1024
_CONNECTION_CLOSED = types.CONNECTION_CLOSED
# The SDK's stand-ins for an HTTP-level refusal (404 for a known session, or another non-2xx without a
# JSON-RPC body): the request was not processed.
_SESSION_REJECTED = frozenset({"Session terminated", "Server returned an error response"})


# --- one connection ---------------------------------------------------------------------------------


class _Job:
    """One request handed to a connection's owner task."""

    __slots__ = ("future", "op", "scope", "started", "timeout_s", "what")

    def __init__(self, op: Callable[[Client], Awaitable[Any]], timeout_s: float, what: str) -> None:
        self.op = op
        self.timeout_s = timeout_s
        self.what = what
        self.future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # A caller that gave up never reads the outcome; mark it read so asyncio does not log it as lost.
        self.future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.scope: anyio.CancelScope | None = None
        self.started = False

    def cancel(self) -> None:
        if self.scope is not None:
            self.scope.cancel()


class _EofWatchingStream:
    """The transport's read stream, setting `eof` when the server's side ends (its process exited)."""

    def __init__(self, inner: Any, eof: anyio.Event) -> None:
        self._inner = inner
        self._eof = eof

    async def receive(self) -> Any:
        try:
            return await self._inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._eof.set()
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()

    def __aiter__(self) -> _EofWatchingStream:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self._inner.__anext__()
        except (StopAsyncIteration, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._eof.set()
            raise

    async def __aenter__(self) -> _EofWatchingStream:
        await self._inner.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        result: bool | None = await self._inner.__aexit__(exc_type, exc, tb)
        return result

    def __getattr__(self, name: str) -> Any:
        # `last_context` and whatever else the dispatcher duck-types for.
        return getattr(self._inner, name)


class McpConnection:
    """A kept-open session to one server, owned by one task."""

    def __init__(self, server_id: str, endpoint: McpEndpoint, max_in_flight: int) -> None:
        self.server_id = server_id
        self.label = endpoint.label or server_id
        self.endpoint = endpoint
        self.last_used = time.monotonic()
        self.in_flight = 0
        self._slots = asyncio.Semaphore(max_in_flight)
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._eof = anyio.Event()
        self._stop = anyio.Event()
        self._dead = False
        self._failure: BaseException | None = None
        self._pending: set[_Job] = set()
        send, receive = anyio.create_memory_object_stream[_Job](max_buffer_size=max_in_flight * 4)
        self._jobs_in, self._jobs_out = send, receive
        # Append mode (shared with the child's descriptor), so trimming the file really shrinks it.
        self._stderr = (
            tempfile.TemporaryFile("a+")  # noqa: SIM115 - lives as long as the connection, closed by its owner
            if endpoint.transport == "stdio"
            else None
        )
        self._task = asyncio.create_task(self._own(), name=f"mcp:{server_id}")

    @property
    def alive(self) -> bool:
        """False once the server's side ended, the connection failed, or it was closed."""
        return not self._dead and not self._eof.is_set() and not self._task.done()

    async def wait_ready(self, timeout_s: float) -> None:
        """Wait for the handshake; raise McpUnavailable/McpTimeout if it fails or takes too long."""
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(self._ready)
        except TimeoutError:
            await self.close()
            raise McpTimeout(
                f"MCP server {self.label!r} ({self.endpoint.describe()}) did not finish its start-up "
                f"handshake within {timeout_s:g} s; check that it speaks MCP over {self.endpoint.transport}"
            ) from None

    async def request(self, what: str, op: Callable[[Client], Awaitable[T]], timeout_s: float) -> T:
        """Run `op` on the session (in the owner task) within `timeout_s`; the job may queue for a slot."""
        job = _Job(op, timeout_s, what)
        self.last_used = time.monotonic()
        self.in_flight += 1
        self._trim_stderr()
        try:
            async with asyncio.timeout(timeout_s + 1.0):  # the owner enforces timeout_s; this is a backstop
                async with self._slots:
                    if not self.alive:
                        raise self._lost(job)
                    self._pending.add(job)
                    try:
                        self._jobs_in.send_nowait(job)
                    except (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.WouldBlock):
                        self._pending.discard(job)
                        raise self._lost(job) from None
                    try:
                        result: T = await asyncio.shield(job.future)
                        return result
                    except asyncio.CancelledError:
                        job.cancel()
                        raise
        except TimeoutError:
            job.cancel()
            raise McpTimeout(self._timeout_message(job)) from None
        finally:
            self.in_flight -= 1
            self.last_used = time.monotonic()

    async def close(self) -> None:
        """Stop serving, cancel what is in flight, and shut the server down (a stdio process is ended)."""
        self._dead = True
        self._stop.set()
        if not self._ready.done():
            self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task

    # --- the owner task ------------------------------------------------------------------------------

    async def _own(self) -> None:
        try:
            async with self._client() as client:
                if not self._ready.done():
                    self._ready.set_result(None)
                async with anyio.create_task_group() as group:
                    group.start_soon(self._cancel_on, self._stop, group.cancel_scope)
                    group.start_soon(self._cancel_on, self._eof, group.cancel_scope)
                    async with self._jobs_out:
                        async for job in self._jobs_out:
                            group.start_soon(self._serve, client, job)
        except BaseException as exc:  # the owner must outlive every failure to fail its jobs cleanly
            self._failure = exc
            if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt | SystemExit):
                raise
        finally:
            self._dead = True
            self._jobs_in.close()
            if not self._ready.done():
                self._ready.set_exception(self._start_error())
                self._ready.exception()  # retrieved here, so an unawaited failure is not logged as lost
            for job in list(self._pending):
                if not job.future.done():
                    job.future.set_exception(self._lost(job))
            self._pending.clear()
            if self._stderr is not None:
                self._stderr.close()

    @contextlib.asynccontextmanager
    async def _client(self) -> AsyncIterator[Client]:
        endpoint = self.endpoint
        async with contextlib.AsyncExitStack() as stack:
            if endpoint.transport == "stdio":
                assert self._stderr is not None
                params = StdioServerParameters(
                    command=endpoint.command[0], args=list(endpoint.command[1:]), env=dict(endpoint.env)
                )
                transport: Any = stdio_client(params, errlog=self._stderr)
            else:
                http = httpx2.AsyncClient(
                    headers=dict(endpoint.headers),
                    timeout=httpx2.Timeout(30.0, read=300.0),
                    trust_env=False,  # an HTTP(S)_PROXY from the environment would bypass the address check
                )
                await stack.enter_async_context(http)
                transport = streamable_http_client(endpoint.url or "", http_client=http)
            watched = _WatchedTransport(transport, self._eof)
            client = await stack.enter_async_context(Client(watched, cache=None, client_info=_CLIENT_INFO))
            yield client

    @staticmethod
    async def _cancel_on(event: anyio.Event, scope: anyio.CancelScope) -> None:
        await event.wait()
        scope.cancel()

    async def _serve(self, client: Client, job: _Job) -> None:
        with anyio.CancelScope() as scope:
            job.scope = scope
            job.started = True
            try:
                with anyio.fail_after(job.timeout_s):
                    result = await job.op(client)
            except TimeoutError:
                self._settle(job, exception=McpTimeout(self._timeout_message(job)))
            except MCPError as exc:
                if exc.code == _CONNECTION_CLOSED:
                    self._eof.set()
                    self._settle(job, exception=self._lost(job))
                elif self.endpoint.transport == "http" and exc.error.message in _SESSION_REJECTED:
                    # The server answered at HTTP level without running the request — typically it
                    # restarted and no longer knows this session: the session is done, the request safe.
                    self._eof.set()
                    self._settle(job, exception=self._session_rejected(job, exc.error.message))
                else:
                    self._settle(job, exception=self._server_error(job, exc))
            except Exception as exc:
                self._settle(job, exception=self._server_error(job, exc))
            else:
                self._settle(job, result=result)
        # Cancelled because its caller gave up; a connection going down answers with the cause instead.
        going_down = self._stop.is_set() or self._eof.is_set()
        if scope.cancelled_caught and not job.future.done() and not going_down:
            self._settle(job, exception=McpTimeout(self._timeout_message(job)))

    def _settle(self, job: _Job, *, result: Any = None, exception: BaseException | None = None) -> None:
        self._pending.discard(job)
        if job.future.done():
            return
        if exception is not None:
            job.future.set_exception(exception)
        else:
            job.future.set_result(result)

    # --- messages ------------------------------------------------------------------------------------

    def _timeout_message(self, job: _Job) -> str:
        return (
            f"MCP server {self.label!r} did not answer {job.what} within {job.timeout_s:g} s; "
            "the call was cancelled — retry with a longer timeout or check the server"
        )

    def _root_failure(self) -> BaseException | None:
        failure = self._failure
        while isinstance(failure, BaseExceptionGroup) and failure.exceptions:
            failure = failure.exceptions[0]
        return failure

    def _cause(self) -> str:
        failure = self._root_failure()
        if failure is None or isinstance(failure, asyncio.CancelledError):
            detail = ""
        elif isinstance(failure, MCPError):
            detail = failure.error.message
        else:
            detail = f"{type(failure).__name__}: {failure}" if str(failure) else type(failure).__name__
        stderr = self._stderr_tail()
        if stderr:
            detail = "; ".join(p for p in (detail, f"its stderr ends with: {stderr}") if p)
        return redact_secrets(detail, self.endpoint.secrets())[:1000]

    def _start_error(self) -> McpError:
        cause = self._cause()
        where = self.endpoint.describe()
        if self.endpoint.transport == "stdio":
            fix = "check the command, its arguments and environment (run by hand, it must speak MCP on stdio)"
        else:
            fix = "check that the server is running, the URL (the MCP path, often /mcp) and the headers"
        return McpUnavailable(
            f"could not start a session with MCP server {self.label!r} ({where})"
            + (f": {cause}" if cause else "")
            + f"; {fix}"
        )

    def _lost(self, job: _Job) -> McpError:
        cause = self._cause()
        # A refused connection means the request never reached the server, whatever the job's state.
        if not job.started or isinstance(self._root_failure(), httpx2.ConnectError):
            return McpNotSent(
                f"the connection to MCP server {self.label!r} ended before {job.what} was sent"
                + (f" ({cause})" if cause else "")
                + "; it was not run — retry"
            )
        return McpUnavailable(
            f"MCP server {self.label!r} ({self.endpoint.describe()}) went away during {job.what}"
            + (f" ({cause})" if cause else "")
            + "; it may or may not have run. The next call reconnects (a stdio server is restarted)"
        )

    def _session_rejected(self, job: _Job, detail: str) -> McpError:
        return McpNotSent(
            f"MCP server {self.label!r} ({self.endpoint.describe()}) rejected the session for {job.what} "
            f"({detail}; it may have restarted); it was not run — the next attempt opens a new session"
        )

    def _server_error(self, job: _Job, exc: Exception) -> McpError:
        detail = exc.error.message if isinstance(exc, MCPError) else f"{type(exc).__name__}: {exc}"
        detail = redact_secrets(detail, self.endpoint.secrets())[:500]
        return McpError(f"MCP server {self.label!r} refused {job.what}: {detail}")

    def _trim_stderr(self) -> None:
        if self._stderr is None or self._stderr.closed:
            return
        with contextlib.suppress(OSError):
            if os.fstat(self._stderr.fileno()).st_size > _STDERR_MAX_BYTES:
                os.ftruncate(self._stderr.fileno(), 0)

    def _stderr_tail(self) -> str:
        if self._stderr is None or self._stderr.closed:
            return ""
        try:
            fd = self._stderr.fileno()
            size = os.fstat(fd).st_size
            raw = os.pread(fd, _STDERR_TAIL, max(0, size - _STDERR_TAIL))
        except OSError:
            return ""
        return " ".join(raw.decode("utf-8", errors="replace").split())


class _WatchedTransport:
    """Wraps an SDK transport so the connection learns when the server's side ends."""

    def __init__(self, inner: Any, eof: anyio.Event) -> None:
        self._inner = inner
        self._eof = eof

    async def __aenter__(self) -> tuple[Any, Any]:
        read_stream, write_stream = await self._inner.__aenter__()
        return _EofWatchingStream(read_stream, self._eof), write_stream

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        result: bool | None = await self._inner.__aexit__(exc_type, exc, tb)
        return result


_CLIENT_INFO = types.Implementation(name="somaagent", version="0.1.0")
