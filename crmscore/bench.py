"""``crmscore bench``: the scoring flow's throughput beside a trivial bytewax flow.

Same broker, same Redis, same events, same run: first the trivial keyed
count/sum flow (flows/baseline.py), then the full scoring flow without and with
recovery snapshots. Each flow reads the topic to its end in this process; the
figure is events / wall seconds and the ratio to the baseline. Also prints the
per-event cost of parsing and validating an event (µs).

Starts a private broker and Redis (crmscore.embedded) unless ``--external``; with
``--redis-cluster on`` the private Redis is a 3-node Redis Cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import orjson
from bytewax.dataflow import Dataflow
from bytewax.run import cli_main

from crmscore import embedded
from crmscore.clients import ensure_topics, producer
from crmscore.settings import Settings
from flows.baseline import build_baseline_flow
from flows.main import recovery_config, tune_gc
from flows.scoring import build_flow
from models.transaction import parse_transaction


def configure(parser: argparse.ArgumentParser) -> None:
    from crmscore.cli import add_setting_flags

    add_setting_flags(parser, "kafka_bootstrap", "redis_url", "redis_cluster", "topic_partitions")
    parser.add_argument("--customers", type=int, default=20_000,
                        help="customers in the generated stream (~10 events each per year)")
    parser.add_argument("--days", type=float, default=365)
    parser.add_argument("--input", type=Path, help="replay this JSONL file instead of generating")
    parser.add_argument("--external", action="store_true",
                        help="use the configured Kafka and Redis instead of private ones")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each flow (best is kept)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    with tempfile.TemporaryDirectory(prefix="crmscore-bench-") as tmp:
        work = Path(tmp)
        if args.external:
            return _bench(args, settings, work)
        with embedded.running(embedded.start_broker()) as broker, \
                _private_redis(settings.redis_cluster) as redis_url:
            local = dataclasses.replace(
                settings, kafka_bootstrap=broker.address, redis_url=redis_url)
            return _bench(args, local, work)


@contextlib.contextmanager
def _private_redis(cluster: bool) -> Iterator[str]:
    """The URL of a private Redis, or with ``cluster`` of a 3-node Redis Cluster."""
    if cluster:
        nodes = embedded.start_redis_cluster()
        try:
            yield nodes.url
        finally:
            nodes.stop()
        return
    with embedded.running(embedded.start_redis()) as server:
        yield f"redis://{server.address}/0"


def _bench(args: argparse.Namespace, settings: Settings, work: Path) -> int:
    path = args.input or _generate(args, work / "events.jsonl")
    lines = path.read_bytes().splitlines()
    token = uuid.uuid4().hex[:8]
    settings = dataclasses.replace(
        settings, transactions_topic=f"bench-{token}", dlq_topic=f"bench-{token}-dlq",
        timers_topic=f"bench-{token}-timers",
    )
    ensure_topics(settings, [settings.transactions_topic, settings.dlq_topic,
                             settings.timers_topic])
    _publish(settings, lines)
    print(f"{len(lines):,} events on {settings.topic_partitions} partitions "
          f"({settings.transactions_topic})")
    print(f"parse + validate: {_validation_cost_us(lines):.1f} µs/event")
    tune_gc()  # as `crmscore flow` does; applies to every flow below alike

    def full(recovery: bool) -> Callable[[int], float]:
        def one(run_no: int) -> float:
            s = dataclasses.replace(
                settings, redis_prefix=f"bench{token}{'r' if recovery else 'n'}{run_no}:",
                recovery_dir=str(work / f"recovery-{run_no}"),
            )
            config = recovery_config(s) if recovery else None
            return _timed(build_flow(s, tail=False), s, config)
        return one

    def baseline(run_no: int) -> float:
        flow = build_baseline_flow(settings, settings.transactions_topic, f"base{token}{run_no}:")
        return _timed(flow, settings, None)

    results = {
        "trivial keyed count/sum": _best(baseline, args.repeat),
        "scoring flow, no recovery": _best(full(False), args.repeat),
        f"scoring flow, recovery (snapshot every {settings.snapshot_interval:g} s)":
            _best(full(True), args.repeat),
    }
    base = len(lines) / results["trivial keyed count/sum"]
    print(f"{'flow':<48} {'seconds':>8} {'events/s':>10} {'ratio':>6}")
    for name, seconds in results.items():
        rate = len(lines) / seconds
        print(f"{name:<48} {seconds:>8.2f} {rate:>10,.0f} {rate / base:>6.2f}")
    return 0


def _generate(args: argparse.Namespace, out: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "crmscore.cli", "generate", "--customers", str(args.customers),
         "--days", str(args.days), "--seed", "7", "--out", str(out)],
        check=True, stdout=subprocess.DEVNULL,
    )
    return out


def _publish(settings: Settings, lines: list[bytes]) -> None:
    p = producer(settings, **{"linger.ms": "20", "batch.num.messages": "10000"})
    for line in lines:
        try:
            key = orjson.loads(line).get("customer_id")
            key = key.encode() if isinstance(key, str) else None
        except (orjson.JSONDecodeError, AttributeError):
            key = None
        while True:
            try:
                p.produce(settings.transactions_topic, value=line, key=key)
                break
            except BufferError:
                p.poll(0.05)
    if p.flush(60):
        raise RuntimeError("could not publish the benchmark events")


def _validation_cost_us(lines: list[bytes]) -> float:
    now = time.time_ns() // 1000
    start = time.perf_counter()
    for line in lines:
        parse_transaction(line, now)
    return (time.perf_counter() - start) / len(lines) * 1e6


def _timed(flow: Dataflow, settings: Settings, recovery: object) -> float:
    start = time.perf_counter()
    cli_main(flow, epoch_interval=timedelta(seconds=settings.snapshot_interval),
             recovery_config=recovery)
    return time.perf_counter() - start


def _best(run_one: Callable[[int], float], repeat: int) -> float:
    return min(run_one(i) for i in range(repeat))
