"""Child processes of the bench harness: a private broker and Redis, and ``crmscore flow``
and ``crmscore serve`` runs on them.

Each :class:`Pipeline` has its own topics, Redis prefix and recovery directory, named
after it, so runs on one broker and Redis never see each other's data; runs may share a
transactions topic to read the same events. A flow's peak resident memory is the
largest VmHWM in /proc/PID/status, sampled while it runs.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis

from crmscore import embedded
from crmscore.layout import RedisLayout
from crmscore.settings import Settings

RSS_SAMPLE_S = 0.05
PARTITIONS = 4  # of every topic the harness creates


class BenchError(RuntimeError):
    """A run of the harness failed (the message quotes the child's log)."""


def run_captured(argv: list[str], log: Path) -> subprocess.CompletedProcess[str]:
    """Run a benchmark command: its stdout captured, its stderr in ``log``."""
    with open(log, "wb") as stderr:
        return subprocess.run(argv, stdout=subprocess.PIPE, stderr=stderr, text=True)


def command_failed(name: str, done: subprocess.CompletedProcess[str], log: Path) -> BenchError:
    return BenchError(f"{name} exited with {done.returncode}:\n{done.stdout}\n"
                      f"{log.read_text(errors='replace')[-3000:]}")


@dataclass(frozen=True)
class Stack:
    """The private broker and Redis every run of the harness uses; ``workdir`` holds
    logs and recovery directories."""

    bootstrap: str
    redis_url: str
    workdir: Path

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)


@contextlib.contextmanager
def private_stack(workdir: Path) -> Iterator[Stack]:
    with embedded.running(embedded.start_broker()) as broker, \
            embedded.running(embedded.start_redis()) as redis_server:
        yield Stack(broker.address, f"redis://{redis_server.address}/0", workdir)


@dataclass
class Child:
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Pipeline:
    """One flow's topics, Redis prefix and recovery directory; ``topic`` (the
    transactions topic) defaults to one of its own."""

    stack: Stack
    name: str
    topic: str = ""
    _started: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        self.topic = self.topic or f"{self.name}-tx"
        self.directory.mkdir(parents=True, exist_ok=True)

    @property
    def directory(self) -> Path:
        return self.stack.workdir / self.name

    @property
    def recovery_dir(self) -> Path:
        return self.directory / "recovery"

    @property
    def layout(self) -> RedisLayout:
        return RedisLayout(f"{self.name}:")

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "CRMSCORE_KAFKA_BOOTSTRAP": self.stack.bootstrap,
            "CRMSCORE_REDIS_URL": self.stack.redis_url,
            "CRMSCORE_TRANSACTIONS_TOPIC": self.topic,
            "CRMSCORE_DLQ_TOPIC": f"{self.name}-dlq",
            "CRMSCORE_TIMERS_TOPIC": f"{self.name}-timers",
            "CRMSCORE_ALERTS_TOPIC": f"{self.name}-alerts",
            "CRMSCORE_REDIS_PREFIX": self.layout.prefix,
            "CRMSCORE_RECOVERY_DIR": str(self.recovery_dir),
            "CRMSCORE_TOPIC_PARTITIONS": str(PARTITIONS),
            **extra,
        }

    def settings(self) -> Settings:
        return Settings.from_env(self.env())

    def start(self, command: str, *args: str, **extra_env: str) -> Child:
        """``crmscore COMMAND ARGS`` as a child process, its output in a log file."""
        self._started += 1
        log_path = self.directory / f"{command}-{self._started}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "crmscore.cli", command, *args],
                env=self.env(**extra_env), stdout=log, stderr=subprocess.STDOUT,
            )
        return Child(process, log_path)

    def status(self) -> dict[str, Any] | None:
        """The flow's pipeline status document, or None before its first."""
        with contextlib.closing(self.stack.redis()) as conn:
            raw = conn.hget(self.layout.status(), "doc")
        return None if raw is None else orjson.loads(raw)

    def events_consumed(self) -> int:
        st = self.status()
        return 0 if st is None else int(st["events_consumed"])


@dataclass(frozen=True)
class FlowRun:
    """A flow run to the end of its topic: wall seconds from start to exit of every
    process, and each process's peak RSS."""

    seconds: float
    peak_rss_bytes: list[int]


def run_flow_to_end(pipeline: Pipeline, processes: int = 1, timeout: float = 3600) -> FlowRun:
    """``crmscore flow --until-end`` as one process or a bytewax cluster of ``processes``."""
    cluster: list[list[str]] = [[]]
    if processes > 1:
        addresses = ";".join(f"127.0.0.1:{embedded.free_port()}" for _ in range(processes))
        cluster = [["-i", str(i), "-a", addresses] for i in range(processes)]
    started = time.perf_counter()
    children = [pipeline.start("flow", "--until-end", *args) for args in cluster]
    try:
        peaks = wait_sampling_peak_rss(children, timeout)
    finally:
        for child in children:
            child.stop()
    seconds = time.perf_counter() - started
    for child in children:
        if child.process.returncode != 0:
            raise BenchError(f"flow {pipeline.name} exited with {child.process.returncode}:\n"
                             f"{child.log_tail()}")
    return FlowRun(seconds, peaks)


def wait_sampling_peak_rss(children: list[Child], timeout: float) -> list[int]:
    """Wait for every child to exit; the largest VmHWM seen of each, in bytes."""
    peaks = [0] * len(children)
    deadline = time.monotonic() + timeout
    while any(child.process.poll() is None for child in children):
        if time.monotonic() > deadline:
            raise BenchError(f"a flow did not finish within {timeout:g} s")
        for i, child in enumerate(children):
            peaks[i] = max(peaks[i], peak_rss_bytes(child.process.pid))
        time.sleep(RSS_SAMPLE_S)
    return peaks


def peak_rss_bytes(pid: int) -> int:
    """VmHWM of a running process, 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def cpu_seconds(pid: int) -> float | None:
    """User and system CPU time of a running process (all its threads), None once gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # after the command's ")": state is field 3, utime and stime fields 14 and 15
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until(condition: Callable[[], bool], timeout: float, what: str, child: Child | None = None,
               interval: float = 0.05) -> None:
    """Poll ``condition()`` until true; fail after ``timeout`` s or when ``child`` exits."""
    deadline = time.monotonic() + timeout
    while not condition():
        if child is not None and child.process.poll() is not None:
            raise BenchError(f"{what}: the child exited with {child.process.returncode}:\n"
                             f"{child.log_tail()}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)
