"""The code sandbox behind the built-in `python` tool: bubblewrap namespaces plus rlimits.

Owns: `SandboxLimits`, `SandboxResult`, `run_python`, `ensure_sandbox`, `SandboxUnavailable`.
May import: core. Never: db, models, api — a run is a pure function of (code, limits).

Each run is a fresh `bwrap` sandbox around Debian's `/usr/bin/python3 -I -S -u -`, fed the code on
stdin. Isolation comes from the kernel, not from Python: new user, pid, net, ipc, uts and cgroup
namespaces (no network interface but a private loopback), a root filesystem that holds only
read-only `/usr` (+ the `/lib*` links and `/etc/ld.so.cache`), a private `/proc` and minimal `/dev`,
and a size-capped tmpfs at `/scratch` (also `/tmp`, `$HOME`, the working directory) that vanishes
with the mount namespace. Inside, `prlimit` sets RLIMIT_AS/CPU/NPROC/FSIZE/NOFILE/CORE and `nice`
lowers priority before Python starts; the wall-clock limit and the output caps are enforced here,
by killing `bwrap` (whose `--die-with-parent` takes the whole pid namespace down with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from somaagent.core.errors import InvalidRequest, SomaError

MB = 1024 * 1024

SYSTEM_PYTHON = "/usr/bin/python3"
_PRLIMIT = "/usr/bin/prlimit"
_NICE = "/usr/bin/nice"
_SETPRIV = "/usr/bin/setpriv"

# Root drops to `nobody` before starting bwrap. RLIMIT_NPROC is not enforced at all for processes
# whose real uid is host root (the kernel exempts INIT_USER), so a fork bomb running as root inside
# a user namespace would be unbounded. Unprivileged, the count is kept per (user namespace, uid):
# every sandbox gets its own 64 processes and the server's own processes never count.
_NOBODY = 65534

# Scratch is the only writable place; also the working directory, $HOME and /tmp.
SCRATCH = "/scratch"
# A path inside the sandbox's own mount namespace (a link to scratch), never the host's /tmp.
_SANDBOX_TMP = "/tmp"  # noqa: S108

# What bwrap itself runs with: nothing from the server's environment (API keys, database URLs)
# reaches bwrap, its pid-1 reaper (readable at /proc/1/environ inside), or the code.
_OUTER_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
_INNER_ENV = {
    "PATH": "/usr/bin:/bin",
    "HOME": SCRATCH,
    "TMPDIR": SCRATCH,
    "LANG": "C.UTF-8",
    "PYTHONIOENCODING": "utf-8",
}

_READ_CHUNK = 64 * 1024
# How long a killed sandbox may take to close its pipes and be reaped.
_REAP_S = 5.0
# bwrap reports a child killed by signal N as exit status 128 + N.
_SIGNAL_EXIT_BASE = 128
_INSTALL_BWRAP = "install it with `apt-get install -y bubblewrap` (Debian/Ubuntu)"

LimitName = Literal["wall_clock", "cpu", "memory", "processes", "output", "scratch"]


class SandboxUnavailable(SomaError):
    """This machine cannot run sandboxed code; the message names what is missing and the fix."""

    code = "sandbox_unavailable"


@dataclass(frozen=True, slots=True)
class SandboxLimits:
    """Resource ceilings of one sandboxed run; defaults suit an agent's scratch computation."""

    wall_s: float = 10.0
    cpu_s: int = 5
    # RLIMIT_AS, per process: address space, so it bounds what a process can map, not just touch.
    memory_bytes: int = 512 * MB
    # RLIMIT_NPROC inside the sandbox's own user namespace; threads count as processes.
    processes: int = 64
    # Per stream (stdout, stderr); past it the run is killed and the stream marked truncated.
    output_bytes: int = 1 * MB
    # tmpfs size of /scratch; also RLIMIT_FSIZE, the largest single file.
    scratch_bytes: int = 64 * MB
    open_files: int = 64
    max_code_bytes: int = 1 * MB

    def __post_init__(self) -> None:
        for name in ("wall_s", "cpu_s", "memory_bytes", "processes", "output_bytes", "scratch_bytes"):
            if getattr(self, name) <= 0:
                raise InvalidRequest(f"sandbox limit {name}={getattr(self, name)!r} must be > 0", param=name)
        # Python itself needs a few descriptors and a few MB of address space just to start.
        if self.open_files < 16:
            raise InvalidRequest(
                f"open_files={self.open_files} is too low: use at least 16", param="open_files"
            )
        if self.memory_bytes < 64 * MB:
            raise InvalidRequest(
                f"memory_bytes={self.memory_bytes} is too low for Python to start: use at least {64 * MB}",
                param="memory_bytes",
            )


@dataclass(frozen=True, slots=True)
class SandboxResult:
    """What one run produced. `exit_code` < 0 means the runner killed it (see `limit`)."""

    exit_code: int
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    duration_s: float
    # Which limit ended or broke the run, if one did, and a sentence saying so for the model.
    limit: LimitName | None
    error: str | None

    @property
    def ok(self) -> bool:
        """The code ran to completion with exit status 0 and hit no limit."""
        return self.exit_code == 0 and self.limit is None

    @property
    def truncated(self) -> bool:
        """Either stream was cut at the output cap."""
        return self.stdout_truncated or self.stderr_truncated


def sandbox_command(limits: SandboxLimits, bwrap: str = "bwrap") -> list[str]:
    """The exact argv of one sandboxed run (Python reads the code from stdin)."""
    argv = [
        bwrap,
        "--unshare-all",
        "--unshare-user",  # explicit: --unshare-all only *tries* a user namespace
        "--disable-userns",  # no nested user namespaces: less kernel surface for an escape
        "--die-with-parent",
        "--new-session",  # no TIOCSTI into the server's terminal
        "--hostname",
        "sandbox",
        "--uid",
        str(_NOBODY),
        "--gid",
        str(_NOBODY),
        "--ro-bind",
        "/usr",
        "/usr",
    ]
    argv += _root_links()
    argv += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    argv += ["--size", str(limits.scratch_bytes), "--tmpfs", SCRATCH, "--symlink", SCRATCH, _SANDBOX_TMP]
    # Last mount step: the synthetic root (mount points, links) becomes read-only too.
    argv += ["--remount-ro", "/", "--chdir", SCRATCH, "--clearenv"]
    for key, value in _INNER_ENV.items():
        argv += ["--setenv", key, value]
    cpu = max(1, int(limits.cpu_s))
    argv += [
        "--",
        _NICE,
        "-n",
        "10",  # the server's event loop wins any contest for the CPU
        _PRLIMIT,
        f"--as={limits.memory_bytes}",
        f"--cpu={cpu}:{cpu + 1}",  # SIGXCPU at the soft limit, SIGKILL a second later
        f"--nproc={limits.processes}",
        f"--fsize={limits.scratch_bytes}",
        f"--nofile={limits.open_files}",
        "--core=0",
        "--",
        SYSTEM_PYTHON,
        "-I",  # isolated: no user site, no PYTHON* variables, no script dir on sys.path
        "-S",  # no site module: faster start, nothing from /usr/local
        "-u",  # unbuffered, so output written before a kill is not lost
        "-",
    ]
    return argv


def _root_links() -> list[str]:
    """Mirror the host's /bin, /lib* as links into /usr (merged-usr) or read-only binds."""
    args: list[str] = []
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/", name)
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
    return args


def _privilege_drop() -> list[str]:
    """The argv prefix that starts bwrap as `nobody` when we are root.

    A `setpriv` exec rather than subprocess's `user=`/`group=`: uvloop (the server's event loop)
    refuses those arguments, and an exec'd wrapper drops privileges identically under any loop."""
    if os.geteuid() != 0:
        return []
    return [_SETPRIV, f"--reuid={_NOBODY}", f"--regid={_NOBODY}", "--clear-groups", "--"]


def _find_bwrap() -> str:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable(f"bubblewrap (`bwrap`) is not on PATH: {_INSTALL_BWRAP}")
    return bwrap


_verified: set[str] = set()


async def ensure_sandbox() -> None:
    """Check once per process that a sandbox can start here; raise `SandboxUnavailable` if not."""
    bwrap = _find_bwrap()
    if bwrap in _verified:
        return
    for binary, package in (
        (SYSTEM_PYTHON, "python3"),
        (_PRLIMIT, "util-linux"),
        (_SETPRIV, "util-linux"),
        (_NICE, "coreutils"),
    ):
        if not os.access(binary, os.X_OK):
            raise SandboxUnavailable(f"{binary} is missing: install it with `apt-get install -y {package}`")
    result = await _run(bwrap, b"", SandboxLimits(wall_s=10.0))
    if result.exit_code != 0:
        raise SandboxUnavailable(
            f"bubblewrap could not start a sandbox (exit {result.exit_code}): {result.stderr.strip()!r}. "
            "It needs unprivileged user namespaces: `sysctl user.max_user_namespaces` must be > 0 "
            "(Debian kernels: `sysctl -w kernel.unprivileged_userns_clone=1`; Ubuntu 24.04+: "
            "`sysctl -w kernel.apparmor_restrict_unprivileged_userns=0` or an AppArmor profile for bwrap)."
        )
    _verified.add(bwrap)


async def run_python(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code` with Debian's python3 in a fresh sandbox; never raises for what the code does."""
    limits = limits or SandboxLimits()
    source = code.encode("utf-8", errors="surrogatepass")
    if len(source) > limits.max_code_bytes:
        raise InvalidRequest(
            f"code is {len(source)} bytes, over the sandbox limit of {limits.max_code_bytes}", param="code"
        )
    await ensure_sandbox()
    return await _run(_find_bwrap(), source, limits)


async def _run(bwrap: str, source: bytes, limits: SandboxLimits) -> SandboxResult:
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *_privilege_drop(),
        *sandbox_command(limits, bwrap),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_OUTER_ENV,
        cwd="/",
        start_new_session=True,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    killed_for: list[tuple[LimitName, str]] = []

    def kill(limit: LimitName, why: str) -> None:
        if not killed_for:
            killed_for.append((limit, why))
        with contextlib.suppress(ProcessLookupError):
            proc.kill()

    async def feed(stdin: asyncio.StreamWriter) -> None:
        # The code may exit (or be killed) before reading all of its source: not our error.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            stdin.write(source)
            await stdin.drain()
        stdin.close()

    async def drain(reader: asyncio.StreamReader, name: str) -> tuple[bytes, bool]:
        # Read in chunks and stop at the cap: a 100 MB print never sits in our memory.
        buf = bytearray()
        while chunk := await reader.read(_READ_CHUNK):
            room = limits.output_bytes - len(buf)
            if len(chunk) > room:
                buf += chunk[:room]
                kill("output", f"{name} exceeded the output limit of {limits.output_bytes} bytes")
                # Discard what is still in flight (at most a pipe buffer: the writer is dead) so the
                # pipe reaches EOF and the transport closes instead of lingering paused.
                while await reader.read(_READ_CHUNK):
                    pass
                return bytes(buf), True
            buf += chunk
        return bytes(buf), False

    work = asyncio.gather(feed(proc.stdin), drain(proc.stdout, "stdout"), drain(proc.stderr, "stderr"))
    try:
        done, _ = await asyncio.wait({work}, timeout=limits.wall_s)
        if not done:
            kill("wall_clock", f"wall-clock limit of {limits.wall_s:g} s exceeded")
        # Killed or exited, every writer of the pipes is gone, so EOF is near; bounded all the same.
        _, (out, out_cut), (err, err_cut) = await asyncio.wait_for(work, timeout=_REAP_S)
        exit_code = await proc.wait()
    except BaseException:
        # Cancelled by the caller (a cancelled run, a closing server): the sandbox must not outlive it.
        kill("wall_clock", "the run was cancelled")
        # Reap it and let its pipes reach EOF (quick: it is dead) so no transport outlives the loop.
        _, pending = await asyncio.wait({work}, timeout=_REAP_S)
        for task in pending:
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(proc.wait(), timeout=_REAP_S)
        raise
    duration = time.perf_counter() - started
    stderr = err.decode("utf-8", errors="replace")
    limit: LimitName | None
    if killed_for:
        limit, why = killed_for[0]
        error: str | None = why + ": the sandbox was killed"
    else:
        limit, error = _diagnose(exit_code, stderr, limits)
    return SandboxResult(
        exit_code=exit_code,
        stdout=out.decode("utf-8", errors="replace"),
        stderr=stderr,
        stdout_truncated=out_cut,
        stderr_truncated=err_cut,
        duration_s=duration,
        limit=limit,
        error=error,
    )


def _diagnose(exit_code: int, stderr: str, limits: SandboxLimits) -> tuple[LimitName | None, str | None]:
    """Name the limit a run tripped over, from its exit status or its final exception line.

    This labels the outcome for the model and the operator; it is not part of the enforcement.
    """
    if exit_code == 0:
        return None, None
    if exit_code > _SIGNAL_EXIT_BASE:
        signum = exit_code - _SIGNAL_EXIT_BASE
        if signum == signal.SIGXCPU:
            return "cpu", f"CPU limit of {limits.cpu_s} s exceeded: the sandbox was killed (SIGXCPU)"
        with contextlib.suppress(ValueError):
            return None, f"the code was killed by {signal.Signals(signum).name}"
    last = next((line for line in reversed(stderr.splitlines()) if line.strip()), "")
    if last.startswith("MemoryError"):
        return "memory", f"memory limit of {limits.memory_bytes // MB} MB reached ({last})"
    if "[Errno 11]" in last and last.startswith("BlockingIOError"):
        return "processes", f"process limit of {limits.processes} reached ({last})"
    if "[Errno 28]" in last or "[Errno 27]" in last:
        return "scratch", f"scratch limit of {limits.scratch_bytes // MB} MB reached ({last})"
    return None, f"exit status {exit_code}: {last}" if last else f"exit status {exit_code}"
