"""The `python` tool's sandbox, attacked for real: host files, network, fork bomb, memory, CPU, output.

Every test runs real bubblewrap around real Debian python3; nothing is mocked. Limits are tightened
per test (1-3 s) so the file stays fast and the 2-core machine stays healthy, and the tests that
could starve the server also measure the calling event loop's heartbeat while the sandbox misbehaves.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from somaagent.core.errors import InvalidRequest
from somaagent.tools.sandbox import (
    SandboxLimits,
    SandboxResult,
    SandboxUnavailable,
    ensure_sandbox,
    run_python,
)

REPO = Path(__file__).resolve().parents[2]
# The whole sandbox root: read-only /usr and its /lib* links, ld.so.cache, private /proc and /dev, scratch.
ROOT_LINKS = {"bin", "sbin", "lib", "lib32", "lib64", "libx32"}
SANDBOX_ROOT = {"usr", "etc", "proc", "dev", "scratch", "tmp"} | ROOT_LINKS
T = TypeVar("T")


@pytest.fixture(autouse=True, scope="module")
async def sandbox_available() -> None:
    try:
        await ensure_sandbox()
    except SandboxUnavailable as exc:
        pytest.fail(f"the sandbox cannot run on this machine: {exc.message}", pytrace=False)


async def with_heartbeat(awaitable: Awaitable[T]) -> tuple[T, float]:
    """Await `awaitable` while a 10 ms ticker runs on the same loop; return its result and the worst gap."""
    stop = asyncio.Event()
    gaps: list[float] = []

    async def beat() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(beat())
    try:
        result = await awaitable
    finally:
        stop.set()
        await ticker
    return result, max(gaps, default=0.0)


def live_sandbox_processes() -> list[str]:
    """Host-side view of sandbox processes still alive (zombies awaiting the host's init don't count)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            state = next(ln for ln in (entry / "status").read_text().splitlines() if ln.startswith("State:"))
        except (OSError, StopIteration):
            continue
        sandboxed = cmdline[:4] == [b"/usr/bin/python3", b"-I", b"-S", b"-u"] or cmdline[0].endswith(b"bwrap")
        if sandboxed and "Z" not in state.split()[1]:
            alive.append(f"{entry.name}: {b' '.join(cmdline).decode(errors='replace')}")
    return alive


async def assert_sandbox_gone() -> None:
    deadline = time.monotonic() + 3
    while (left := live_sandbox_processes()) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not left, f"sandbox processes outlived their run: {left}"


async def assert_still_serving() -> None:
    result = await run_python("print(6 * 7)")
    assert result.ok and result.stdout == "42\n", result


def json_out(result: SandboxResult) -> dict[str, Any]:
    assert result.ok, result
    data: dict[str, Any] = json.loads(result.stdout)
    return data


# --- what a run returns ------------------------------------------------------------------------


async def test_print_returns_stdout_exit_code_and_duration() -> None:
    result = await run_python("print(1)")
    assert result.ok
    assert (result.exit_code, result.stdout, result.stderr) == (0, "1\n", "")
    assert not result.truncated and result.limit is None and result.error is None
    assert 0 < result.duration_s < 2


async def test_failure_keeps_stderr_and_exit_status() -> None:
    code = "import sys\nprint('partial')\nprint('boom', file=sys.stderr)\nsys.exit(3)"
    result = await run_python(code)
    assert (result.exit_code, result.stdout, result.stderr) == (3, "partial\n", "boom\n")
    assert not result.ok and result.limit is None
    assert result.error == "exit status 3: boom"

    result = await run_python("1 / 0")
    assert result.exit_code == 1 and 'File "<stdin>", line 1' in result.stderr
    assert result.error == "exit status 1: ZeroDivisionError: division by zero"


async def test_concurrent_runs_do_not_interfere() -> None:
    results = await asyncio.gather(*(run_python(f"print({i} * 2)") for i in range(6)))
    assert [r.stdout for r in results] == [f"{i * 2}\n" for i in range(6)]


# --- filesystem ---------------------------------------------------------------------------------

READ_PROBE = """
import json, os
out = {}
for path in PATHS:
    try:
        if os.path.isdir(path):
            out[path] = "LISTED " + ",".join(os.listdir(path))
        else:
            with open(path, "rb") as f:
                out[path] = f"READ {len(f.read())} bytes"
    except OSError as exc:
        out[path] = type(exc).__name__
out["/"] = sorted(os.listdir("/"))
print(json.dumps(out))
"""


async def test_host_files_outside_scratch_are_invisible() -> None:
    secrets_ = [
        *("/etc/shadow", "/etc/passwd", "/etc/hostname", "/root", "/root/.bash_history", "/home", "/work"),
        *(str(REPO), str(REPO / "pyproject.toml"), "/sys/class/net", "/var/log", "/proc/1/root/etc/shadow"),
    ]
    out = json_out(await run_python(READ_PROBE.replace("PATHS", repr(secrets_))))
    for path in secrets_:
        assert out[path] == "FileNotFoundError", f"{path} is visible in the sandbox: {out[path]}"
    assert set(out["/"]) <= SANDBOX_ROOT


async def test_filesystem_is_read_only_except_scratch() -> None:
    code = """
import json, os
out = {"cwd": os.getcwd(), "home": os.path.expanduser("~")}
for path in ["/usr/lib/evil", "/evil", "/etc/evil", "/proc/evil", "/scratch/ok", "/tmp/ok2", "ok3"]:
    try:
        with open(path, "w") as f:
            f.write("x")
        out[path] = "WROTE"
    except OSError as exc:
        out[path] = type(exc).__name__ + " " + str(exc.errno)
out["scratch"] = sorted(os.listdir("/scratch"))
print(json.dumps(out))
"""
    out = json_out(await run_python(code))
    assert out["cwd"] == "/scratch" and out["home"] == "/scratch"
    for path in ["/usr/lib/evil", "/evil", "/etc/evil", "/proc/evil"]:
        assert out[path].startswith(("OSError 30", "PermissionError", "FileNotFoundError")), (path, out[path])
    assert out["/scratch/ok"] == out["/tmp/ok2"] == out["ok3"] == "WROTE"
    assert out["scratch"] == ["ok", "ok2", "ok3"]


async def test_scratch_is_private_per_run_and_gone_afterwards() -> None:
    code = """
import os, time
open("/scratch/mine-%s", "w").write("x")
time.sleep(0.3)  # both runs are alive at once
print(sorted(os.listdir("/scratch")))
"""
    first, second = await asyncio.gather(run_python(code % "a"), run_python(code % "b"))
    assert first.stdout == "['mine-a']\n" and second.stdout == "['mine-b']\n"
    later = await run_python("import os; print(os.listdir('/scratch'), os.listdir('/tmp'))")
    assert later.stdout == "[] []\n"


async def test_scratch_size_is_capped() -> None:
    limits = SandboxLimits(wall_s=5, scratch_bytes=16 * 1024 * 1024)
    code = """
written = 0
try:
    for i in range(100):
        with open(f"/scratch/f{i}", "wb") as f:
            f.write(b"x" * (4 * 1024 * 1024))
        written += 4
finally:
    print(written)
"""
    result = await run_python(code, limits)
    assert result.limit == "scratch", result
    assert "No space left on device" in result.stderr
    assert int(result.stdout) <= 16
    assert "scratch limit of 16 MB" in (result.error or "")

    one_big_file = "open('/scratch/big', 'wb').write(b'x' * (32 * 1024 * 1024))"
    result = await run_python(one_big_file, limits)
    assert result.limit == "scratch" and "File too large" in result.stderr, result


# --- environment ---------------------------------------------------------------------------------


async def test_child_sees_no_environment_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOMA_SECRET_KEY", "sk-very-secret-value")
    monkeypatch.setenv("DATABASE_URL", "postgresql://admin:hunter2@db/prod")
    code = """
import json, os
print(json.dumps({
    "env": dict(os.environ), "pid1": open("/proc/1/environ").read(),
    "self": open("/proc/self/environ").read(), "uid": os.getuid(), "hostname": os.uname().nodename,
}))
"""
    result = await run_python(code)
    assert "very-secret" not in result.stdout and "hunter2" not in result.stdout
    out = json.loads(result.stdout)
    assert set(out["env"]) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_CTYPE", "PYTHONIOENCODING", "PWD"}
    assert out["uid"] == 65534 and out["hostname"] == "sandbox"


# --- network --------------------------------------------------------------------------------------


async def test_no_network_loopback_or_public() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        code = """
import json, socket, time
out = {"interfaces": [name for _, name in socket.if_nameindex()]}
for host, port in [("127.0.0.1", PORT), ("1.1.1.1", 443), ("8.8.8.8", 53)]:
    s = socket.socket()
    s.settimeout(3)
    started = time.monotonic()
    try:
        s.connect((host, port))
        out[host] = "CONNECTED"
    except OSError as exc:
        out[host] = [type(exc).__name__, exc.errno, round(time.monotonic() - started, 3)]
try:
    socket.getaddrinfo("example.com", 443)
    out["dns"] = "RESOLVED"
except OSError as exc:
    out["dns"] = type(exc).__name__
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.sendto(b"x", ("1.1.1.1", 53))
    out["udp"] = "SENT"
except OSError as exc:
    out["udp"] = exc.errno
print(json.dumps(out))
""".replace("PORT", str(port))
        out = json_out(await run_python(code))
        # The server's 127.0.0.1 is not the sandbox's: a private loopback with nothing listening.
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert out["interfaces"] == ["lo"]
    assert out["127.0.0.1"][0] == "ConnectionRefusedError"
    for public in ("1.1.1.1", "8.8.8.8"):
        kind, errno_, seconds = out[public]
        # ENETUNREACH at once: no route exists, so no packet is ever sent (not a firewall timeout).
        assert (kind, errno_) == ("OSError", 101) and seconds < 0.5, out[public]
    assert out["dns"] == "gaierror"
    assert out["udp"] == 101


# --- resource attacks ------------------------------------------------------------------------------


async def test_fork_bomb_is_contained() -> None:
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result, worst_gap = await with_heartbeat(run_python(bomb, SandboxLimits(wall_s=2, cpu_s=1)))
    assert result.limit in ("wall_clock", "cpu", "processes"), result
    assert result.duration_s < 3.5
    assert result.error and "the sandbox was killed" in result.error
    assert worst_gap < 0.5, f"the event loop stalled {worst_gap:.3f} s during the fork bomb"
    await assert_sandbox_gone()
    await assert_still_serving()


PROCESS_COUNT = """
import os, time
children = 0
try:
    while children < 500:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        children += 1
except OSError as exc:
    print(children, type(exc).__name__)
"""


async def test_process_limit_holds_per_sandbox() -> None:
    # Two sandboxes at once each get their own 64: the count is per user namespace, not per host uid.
    limits = SandboxLimits(wall_s=5, processes=64)
    results = await asyncio.gather(run_python(PROCESS_COUNT, limits), run_python(PROCESS_COUNT, limits))
    for result in results:
        children, error = result.stdout.split()
        assert error == "BlockingIOError", result
        # 64 = bwrap's pid-1 reaper + this interpreter + its children.
        assert 50 <= int(children) <= 62, result
    # The interpreter exited with its children still sleeping: the pid namespace took them down.
    await assert_sandbox_gone()


async def test_4gb_allocation_fails_with_memory_error() -> None:
    result = await run_python("x = bytearray(4 * 1024**3)\nprint('allocated')")
    assert result.limit == "memory" and result.stdout == "", result
    assert result.stderr.rstrip().endswith("MemoryError")
    assert result.error == "memory limit of 512 MB reached (MemoryError)"
    # Memory actually touched, chunk by chunk, stops at the cap too (a lower one: faulting in pages is CPU).
    grow = "chunks = []\nwhile True:\n    chunks.append(bytearray(8 * 1024**2))\n"
    result = await run_python(grow, SandboxLimits(wall_s=5, cpu_s=3, memory_bytes=128 * 1024 * 1024))
    assert result.limit == "memory" and result.error == "memory limit of 128 MB reached (MemoryError)", result
    await assert_still_serving()


async def test_infinite_loop_hits_the_cpu_limit() -> None:
    # A generous wall clock: the sandbox runs at nice 10, so on a busy machine 1 s of CPU takes longer.
    limits = SandboxLimits(wall_s=10, cpu_s=1)
    result, worst_gap = await with_heartbeat(run_python("while True:\n    pass\n", limits))
    assert result.limit == "cpu", result
    assert result.error == "CPU limit of 1 s exceeded: the sandbox was killed (SIGXCPU)"
    assert 0.9 < result.duration_s < 9.5
    assert worst_gap < 0.5, f"the event loop stalled {worst_gap:.3f} s during the loop"
    await assert_still_serving()


async def test_sleeping_code_hits_the_wall_clock_and_keeps_partial_output() -> None:
    code = "import time\nprint('started')\ntime.sleep(60)\nprint('never')"
    result = await run_python(code, SandboxLimits(wall_s=1))
    assert result.limit == "wall_clock" and result.exit_code < 0, result
    assert result.stdout == "started\n"
    assert result.error == "wall-clock limit of 1 s exceeded: the sandbox was killed"
    assert 1.0 <= result.duration_s < 2.0
    await assert_sandbox_gone()


async def test_100mb_print_is_cut_at_the_output_cap() -> None:
    result, worst_gap = await with_heartbeat(run_python("print('x' * 100_000_000)"))
    assert result.limit == "output" and result.stdout_truncated and not result.stderr_truncated, result.error
    assert len(result.stdout) == 1024 * 1024 and set(result.stdout) == {"x"}
    assert result.error == "stdout exceeded the output limit of 1048576 bytes: the sandbox was killed"
    assert result.duration_s < 3 and worst_gap < 0.5

    flood_stderr = "import sys\nwhile True:\n    sys.stderr.write('e' * 4096)\n"
    result = await run_python(flood_stderr, SandboxLimits(output_bytes=10_000))
    assert result.limit == "output" and result.stderr_truncated and len(result.stderr) == 10_000
    await assert_sandbox_gone()


async def test_nested_user_namespaces_are_refused() -> None:
    code = "import subprocess\nprint(subprocess.run(['/usr/bin/unshare', '-U', 'true']).returncode)"
    result = await run_python(code)
    assert result.exit_code == 0 and result.stdout.strip() != "0", result


async def test_cancelling_a_run_kills_its_sandbox() -> None:
    task = asyncio.create_task(run_python("import time\ntime.sleep(60)"))
    await asyncio.sleep(0.3)
    assert live_sandbox_processes()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_sandbox_gone()


# --- configuration errors ---------------------------------------------------------------------------


def test_limits_are_validated() -> None:
    with pytest.raises(InvalidRequest, match="wall_s=0"):
        SandboxLimits(wall_s=0)
    with pytest.raises(InvalidRequest, match="too low for Python to start"):
        SandboxLimits(memory_bytes=1024)


async def test_oversized_code_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="over the sandbox limit of 1000"):
        await run_python("#" * 2000, SandboxLimits(max_code_bytes=1000))


async def test_missing_bubblewrap_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailable, match=r"apt-get install -y bubblewrap"):
        await run_python("print(1)")
