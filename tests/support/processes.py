"""Starting real servers for tests: `soma serve`, `llama_cpp.server`. Loopback only, free ports."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
SOMA = str(Path(sys.executable).parent / "soma")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(
    url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            detail = log.read_text()[-4000:] if log else ""
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered:\n{detail}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


@dataclass
class SomaServer:
    """A running `soma serve` subprocess."""

    base_url: str
    admin_key: str
    data_dir: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    log_path: Path
    started_in_s: float = 0.0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def soma(
        self, *args: str, input_text: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run the `soma` CLI against this server's state."""
        return subprocess.run(
            [SOMA, *args], env=self.env, capture_output=True, text=True, input=input_text, timeout=timeout
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_soma(
    database_url: str | None,
    extra_env: dict[str, str] | None = None,
    data_dir: Path | None = None,
    expect_key: bool = True,
    args: tuple[str, ...] = (),
) -> SomaServer:
    """Start `soma serve` on a free loopback port and wait until it answers."""
    data_dir = data_dir or Path(tempfile.mkdtemp(prefix="soma-test-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOMA_")}
    env.update(
        {
            "SOMA_DATA_DIR": str(data_dir),
            "SOMA_HOST": "127.0.0.1",
            "SOMA_PORT": str(port),
            "SOMA_LOG_LEVEL": "INFO",
            "SOMA_ACCESS_LOG": "true",
        }
    )
    if database_url:
        env["SOMA_DATABASE_URL"] = database_url
    env.update(extra_env or {})
    log_path = data_dir / "server.log"
    out_path = data_dir / "stdout.txt"
    started = time.monotonic()
    with open(log_path, "wb") as err, open(out_path, "wb") as out:
        proc = subprocess.Popen(
            [SOMA, "serve", *args], env=env, stdout=out, stderr=err, cwd=data_dir, stdin=subprocess.DEVNULL
        )
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/healthz", 60, proc, log_path)
    elapsed = time.monotonic() - started
    match = re.search(r"(sk-soma-[A-Za-z0-9_-]+)", out_path.read_text())
    if match is None and not expect_key:
        return SomaServer(base, "", data_dir, env, proc, log_path, elapsed)
    if match is None:
        proc.kill()
        raise RuntimeError(
            f"no admin key printed on first start:\n{out_path.read_text()}\n{log_path.read_text()}"
        )
    return SomaServer(base, match.group(1), data_dir, env, proc, log_path, elapsed)


@dataclass
class Upstream:
    """A real OpenAI-compatible server: llama.cpp's own (`python -m llama_cpp.server`)."""

    base_url: str
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_llama_server(model_alias: str = "smol-upstream") -> Upstream:
    from somaagent.models.providers.llamacpp import default_gguf_path

    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="llama-upstream-")) / "server.log"
    with open(log, "wb") as handle:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(default_gguf_path()),
                "--model_alias",
                model_alias,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--n_threads",
                "1",
                "--n_ctx",
                "2048",
                "--verbose",
                "false",
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/v1/models", 60, proc, log)
    return Upstream(base + "/v1", proc)
