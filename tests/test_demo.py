"""``crmscore demo``: everything starts from wheels, a score can be queried, Ctrl-C stops it."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis

from crmscore.demo import read_customers, status_line
from crmscore.embedded import port_open
from crmscore.layout import RedisLayout

ROOT = Path(__file__).resolve().parent.parent


def test_read_customers_skips_malformed_lines(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    events = [
        {"customer_id": "c-1", "currency": "EUR"},
        {"customer_id": "c-1", "currency": "EUR"},
        {"customer_id": "c-2", "currency": "USD"},
    ]
    path.write_bytes(
        b"\n".join([*(json.dumps(e).encode() for e in events), b"\xff\xfe", b"[1]", b"{"]) + b"\n"
    )
    customers, lines = read_customers(path)
    assert lines == 6
    assert {c: (v.currency, v.events) for c, v in customers.items()} == {
        "c-1": ("EUR", 2), "c-2": ("USD", 1)
    }


def test_status_line_reads_the_status_document(redis_conn: redis.Redis, unique: str) -> None:
    layout = RedisLayout(f"test-{unique}:")
    assert "consumed 0" in status_line(redis_conn, layout, None)
    doc = {"events_consumed": 1200, "events_applied": 1100, "events_rejected": 60,
           "events_duplicate": 40, "stream_clock": "2026-01-02T03:04:05.000000Z"}
    redis_conn.hset(layout.status(), mapping={"v": 1, "doc": json.dumps(doc)})
    line = status_line(redis_conn, layout, None)
    assert "consumed 1,200, applied 1,100, rejected 60, duplicate 40" in line
    assert "2026-01-02T03:04:05.000000Z" in line and "lag" not in line
    redis_conn.hset(layout.status(), mapping={"v": 2, "doc": json.dumps(
        {**doc, "input_lag_seconds": 1.5})})
    assert "input lag 1.50 s" in status_line(redis_conn, layout, None)


class Output:
    """Collects a child's output lines in a thread, so reads can time out."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
            match = re.search(pattern, line)
            if match:
                return match
        pytest.fail(f"no line matching {pattern!r}; output:\n{self.text()}", pytrace=False)

    def drain(self) -> None:
        while (line := self._queue.get(timeout=30)) is not None:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)[-6000:]


@pytest.mark.e2e
@pytest.mark.slow
def test_demo_starts_everything_serves_a_score_and_stops_on_ctrl_c() -> None:
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        # Nothing answers here: the demo must start its own Redis, as on a fresh machine.
        "CRMSCORE_REDIS_URL": "redis://127.0.0.1:1/0",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "crmscore.cli", "demo", "--customers", "100", "--rate", "2000",
         "--status-interval", "2", "--duration", "300"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
        start_new_session=True,
    )
    out = Output(proc)
    try:
        query = out.wait_for(r"score (\S+) --grpc-address (\S+)", timeout=240)
        customer_id, address = query.group(1), query.group(2)
        result = subprocess.run(
            [sys.executable, "-m", "crmscore.cli", "score", customer_id,
             "--grpc-address", address],
            env={**os.environ, "CRMSCORE_AUTH": "off"}, capture_output=True, text=True,
            timeout=60, check=False,
        )
        assert result.returncode == 0, result.stderr
        assert customer_id in result.stdout
        applied = out.wait_for(r"\[status\] .*applied ([\d,]+)", timeout=60)
        assert int(applied.group(1).replace(",", "")) > 0

        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, out.text()
        out.drain()
        assert out.lines[-1].strip() == "stopped", out.text()
        host, _, port = address.rpartition(":")
        assert not port_open(host, int(port)), "the gRPC server still listens after Ctrl-C"
    finally:
        if proc.poll() is None:  # a failed assertion: still stop every child the demo started
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
