"""Shared pieces of the gateway benchmarks: starting and stopping loopback servers, a cheap
keep-alive HTTP/1.1 client on raw asyncio streams, percentiles, CPU time from /proc, and result files.

Everything binds or connects to 127.0.0.1 only. Servers are started in their own process group so
that `stop()` reaches `soma serve --workers N` children too, and `ProcessGroup` stops whatever it
started on normal exit, on an exception and on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
BIN = Path(sys.executable).parent
SOMA = str(BIN / "soma")
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
T = TypeVar("T")


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (pct in 0..100) of `values`; nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_1_5_15": os.getloadavg(),
    }


def write_results(name: str, data: dict[str, Any]) -> Path:
    """Write `bench/results/<name>.json` and return its path."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


# --- processes -------------------------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        for child in children.get(current, []):
            found.append(child)
            todo.append(child)
    return found


def cpu_seconds(pid: int, include_children: bool = True) -> float:
    """utime + stime of `pid` (and its live descendants), in seconds, from /proc/<pid>/stat."""
    total = 0
    for p in [pid, *(_descendants(pid) if include_children else [])]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / CLK_TCK


@dataclass
class Server:
    """A server subprocess in its own process group."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    info: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def stop(self) -> None:
        """SIGINT the group (graceful), then SIGKILL what is left."""
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)


class ProcessGroup:
    """Owns every server a benchmark starts; `with ProcessGroup() as procs:` stops them all at exit,
    including on Ctrl-C and SIGTERM."""

    def __init__(self) -> None:
        self.servers: list[Server] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="soma-bench-"))

    def __enter__(self) -> ProcessGroup:
        # Our own handler for both (asyncio.Runner's SIGINT handler only cancels the running task,
        # which the load loops can absorb): raise at once, so __exit__ stops the servers.
        signal.signal(signal.SIGTERM, _raise_interrupt)
        signal.signal(signal.SIGINT, _raise_interrupt)
        return self

    def __exit__(self, *exc: object) -> None:
        for server in reversed(self.servers):
            server.stop()

    def spawn(
        self, name: str, argv: list[str], env: dict[str, str], port: int, cwd: Path | None = None
    ) -> Server:
        log_path = self.tmp / f"{name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True
            )
        server = Server(name, proc, port, log_path)
        self.servers.append(server)
        return server

    def start_static_upstream(self) -> Server:
        """The benchmark-only static upstream (`bench/static_upstream.py`)."""
        port = free_port()
        server = self.spawn(
            "static-upstream",
            [sys.executable, str(BENCH / "static_upstream.py"), "--port", str(port)],
            dict(os.environ),
            port,
        )
        wait_ready(server, "/v1/models", timeout=20)
        return server

    def start_soma(
        self,
        name: str,
        extra_models: list[dict[str, Any]] | None = None,
        workers: int = 1,
        env_overrides: dict[str, str] | None = None,
    ) -> Server:
        """`soma serve` on a free loopback port with a fresh data dir; `info['admin_key']` is its key."""
        data_dir = self.tmp / name
        data_dir.mkdir()
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SOMA_")}
        env.update(
            {
                "SOMA_DATA_DIR": str(data_dir),
                "SOMA_HOST": HOST,
                "SOMA_PORT": str(port),
                "SOMA_LOG_LEVEL": "WARNING",
            }
        )
        if extra_models:
            env["SOMA_EXTRA_MODELS"] = json.dumps(extra_models)
        env.update(env_overrides or {})
        argv = [SOMA, "serve"] + (["--workers", str(workers)] if workers > 1 else [])
        server = self.spawn(name, argv, env, port, cwd=data_dir)
        wait_ready(server, "/healthz", timeout=90)
        match = re.search(r"(sk-soma-[A-Za-z0-9_-]+)", server.log_path.read_text(errors="replace"))
        if match is None:
            raise RuntimeError(f"{name}: no admin key printed on first start:\n{server.log_tail()}")
        server.info["admin_key"] = match.group(1)
        server.info["data_dir"] = str(data_dir)
        return server


def _raise_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def wait_ready(server: Server, path: str, timeout: float) -> None:
    """Poll `path` until it answers below 500, the process dies, or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}:\n{server.log_tail()}")
        with contextlib.suppress(OSError, EOFError, ValueError):
            status, _ = asyncio.run(_get_once(server.port, path))
            if status < 500:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{server.name} did not answer {path} within {timeout}s:\n{server.log_tail()}")


async def _get_once(port: int, path: str) -> tuple[int, bytes]:
    conn = await Connection.open(port)
    try:
        return await conn.request(build_request("GET", path))
    finally:
        conn.close()


# --- a cheap HTTP/1.1 client ----------------------------------------------------------------------------


def build_request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    """The raw bytes of one keep-alive HTTP/1.1 request (built once, sent many times)."""
    lines = [f"{method} {path} HTTP/1.1", f"host: {HOST}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method == "POST":
        lines += ["content-type: application/json", f"content-length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Connection:
    """One keep-alive HTTP/1.1 connection; requests are sent one at a time (no pipelining)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(HOST, port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    def close(self) -> None:
        self.writer.close()

    async def _head(self) -> tuple[int, dict[bytes, bytes]]:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
        return status, headers

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send `raw`, return (status, body)."""
        self.writer.write(raw)
        status, headers = await self._head()
        if headers.get(b"transfer-encoding") == b"chunked":
            parts = [piece async for piece in self._chunks()]
            return status, b"".join(parts)
        length = int(headers.get(b"content-length", b"0"))
        body = await self.reader.readexactly(length) if length else b""
        return status, body

    async def stream(self, raw: bytes) -> tuple[int, Any]:
        """Send `raw`; return (status, async iterator of body pieces as they arrive)."""
        self.writer.write(raw)
        status, headers = await self._head()
        if headers.get(b"transfer-encoding") == b"chunked":
            return status, self._chunks()
        length = int(headers.get(b"content-length", b"0"))

        async def whole() -> Any:
            yield await self.reader.readexactly(length)

        return status, whole()

    async def _chunks(self) -> Any:
        while True:
            size = int((await self.reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return
            data = await self.reader.readexactly(size + 2)
            yield data[:-2]


def sse_events(buffer: bytearray, piece: bytes) -> Iterator[bytes]:
    """Feed `piece` into `buffer`; yield the payload of each complete `data:` event."""
    buffer.extend(piece)
    while True:
        end = buffer.find(b"\n\n")
        if end < 0:
            return
        event = bytes(buffer[:end])
        del buffer[: end + 2]
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                yield line[5:].strip()


# --- load generation ------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    """Latencies (seconds) of successful requests in one load run, and its wall time."""

    latencies: list[float]
    errors: int
    wall_s: float
    statuses: dict[int, int]

    def summary(self) -> dict[str, float]:
        ms = [x * 1000 for x in self.latencies]
        return {
            "requests": len(ms),
            "errors": self.errors,
            "wall_s": round(self.wall_s, 3),
            "rps": round(len(ms) / self.wall_s, 1) if self.wall_s else 0.0,
            "p50_ms": round(percentile(ms, 50), 3),
            "p90_ms": round(percentile(ms, 90), 3),
            "p99_ms": round(percentile(ms, 99), 3),
            "mean_ms": round(sum(ms) / len(ms), 3) if ms else float("nan"),
        }


async def run_load(
    port: int, raw: bytes, concurrency: int, requests: int, max_seconds: float, warmup: int = 0
) -> LoadResult:
    """`concurrency` connections, each sending `raw` back to back, until `requests` in total have
    completed or `max_seconds` pass. The first `warmup` requests per connection are not counted."""
    conns = [await Connection.open(port) for _ in range(concurrency)]
    try:
        for conn in conns:
            for _ in range(warmup):
                await conn.request(raw)
        latencies: list[float] = []
        statuses: dict[int, int] = {}
        errors = 0
        budget = requests
        started = time.perf_counter()
        deadline = started + max_seconds

        async def worker(conn: Connection) -> None:
            nonlocal budget, errors
            clock = time.perf_counter
            while budget > 0 and clock() < deadline:
                budget -= 1
                t0 = clock()
                status, _ = await conn.request(raw)
                elapsed = clock() - t0
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies.append(elapsed)
                else:
                    errors += 1

        await asyncio.gather(*(worker(c) for c in conns))
        wall = time.perf_counter() - started
        return LoadResult(latencies, errors, wall, statuses)
    finally:
        for conn in conns:
            conn.close()


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run` on uvloop when present: the client shares the 2 cores with the servers."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)
