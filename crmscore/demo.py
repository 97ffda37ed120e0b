"""``crmscore demo``: the whole pipeline on one machine, without Docker.

Starts a Kafka-protocol broker and, unless ``CRMSCORE_REDIS_URL`` answers, a private
Redis (both from wheels, see :mod:`crmscore.embedded`), creates the topics, runs
``crmscore flow`` and ``crmscore serve`` as child processes, replays generated
traffic into the transactions topic and keeps a trickle of fresh purchases going.
Once the first scores are in Redis it prints how to query one, then pipeline
status numbers every few seconds. Ctrl-C or SIGTERM stops every child and exits 0.

The demo shares nothing with an earlier run: the broker keeps topics in memory, the
flow gets a fresh recovery directory, and an existing Redis gets a per-run key
prefix (removed again at exit), so stale score versions never block new writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import redis

from crmscore.clients import RedisClient, ensure_topics, redis_client
from crmscore.embedded import EmbeddedError, Server, free_port, port_open, start_broker, start_redis
from crmscore.layout import RedisLayout
from crmscore.settings import Settings

log = logging.getLogger(__name__)

BROKER_PORT = 9092
REDIS_PORT = 6379
FIRST_SCORE_TIMEOUT = 180.0
CHILD_READY_TIMEOUT = 60.0
FEATURED_SHARE = 0.2  # of live purchases go to the customer the banner shows
PLAINTEXT = ("TLS_CERT", "TLS_KEY", "TLS_CLIENT_CA", "TLS_CA", "TLS_CLIENT_CERT", "TLS_CLIENT_KEY")


class DemoError(RuntimeError):
    """The demo could not start; the message says which part and why."""


def configure(parser: argparse.ArgumentParser) -> None:
    from crmscore.cli import add_setting_flags

    parser.epilog = (
        "Kafka: an in-memory tansu broker on 127.0.0.1:9092 (a free port when that is taken). "
        "Redis: the one at --redis-url when it answers PING (keys under a per-run prefix, "
        "removed at exit), else a private server on 127.0.0.1:6379 or a free port. "
        "The API runs with CRMSCORE_AUTH=off: this is a demo, not a deployment."
    )
    parser.add_argument(
        "--rate", type=float, default=500.0,
        help="events per second when replaying the generated traffic (default: 500)",
    )
    parser.add_argument(
        "--customers", type=int, default=500,
        help="customers in the generated traffic, a year of it (default: 500)",
    )
    parser.add_argument(
        "--seed", type=int, default=7, help="seed of the generated traffic (default: 7)"
    )
    parser.add_argument(
        "--trickle-rate", type=float, default=5.0,
        help="fresh purchases per second after the replay, so scores keep moving (default: 5)",
    )
    parser.add_argument(
        "--status-interval", type=float, default=10.0,
        help="seconds between pipeline status lines (default: 10)",
    )
    stop = parser.add_mutually_exclusive_group()
    stop.add_argument(
        "--duration", type=float, default=None, metavar="SECONDS",
        help="stop by itself this many seconds after the pipeline is up (for tests)",
    )
    stop.add_argument(
        "--keep-running", action="store_true",
        help="run until Ctrl-C or SIGTERM (the default)",
    )
    add_setting_flags(parser, "redis_url", "redis_cluster", "grpc_address", "topic_partitions")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if not args.verbose:  # the demo says what they do in its own words
        for name in ("crmscore.embedded", "crmscore.clients"):
            logging.getLogger(name).setLevel(logging.WARNING)
    demo = Demo(args, settings)
    stop = threading.Event()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        return demo.run(stop)
    except (DemoError, EmbeddedError) as exc:
        print(f"\ncrmscore demo: {exc}", file=sys.stderr, flush=True)
        demo.keep_workdir = True
        return 1
    finally:
        stop.set()
        demo.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Demo:
    """Owns every child process and temporary file of one demo run."""

    def __init__(self, args: argparse.Namespace, settings: Settings) -> None:
        self.args = args
        self.settings = settings
        self.workdir = Path(tempfile.mkdtemp(prefix="crmscore-demo-"))
        self.keep_workdir = False
        self.servers: list[Server] = []  # started in order, stopped in reverse
        self.children: dict[str, Server] = {}
        self.external_redis = False
        self.feeder: Feeder | None = None

    # -- start ---------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> int:
        say(f"crmscore demo: working directory {self.workdir}")
        broker = self._start(start_broker, "broker", BROKER_PORT)
        redis_url, prefix = self._redis()
        self.settings = dataclasses.replace(
            self.settings,
            kafka_bootstrap=broker.address,
            kafka_config="",
            redis_url=redis_url,
            redis_prefix=prefix,
            redis_cluster=self.settings.redis_cluster and self.external_redis,
            grpc_address=self._grpc_address(),
            recovery_dir=str(self.workdir / "recovery"),
            metrics_port=self._free_or(self.settings.metrics_port),
            flow_metrics_port=self._free_or(self.settings.flow_metrics_port),
            auth="off",  # demo only: the API answers without a key
        )
        s = self.settings
        try:
            ensure_topics(s, [s.transactions_topic, s.dlq_topic, s.alerts_topic, s.timers_topic])
        except RuntimeError as exc:
            raise DemoError(f"could not create the topics on {broker.address}: {exc}") from exc
        say(f"topics ready on {broker.address}: {s.transactions_topic}, {s.dlq_topic}")

        data = self._generate()
        customers, lines = read_customers(data)
        self.feeder = Feeder(
            s, data, customers, lines, self.args.rate, self.args.trickle_rate, stop
        )
        self._spawn("flow", ["flow"])
        self._spawn("serve", ["serve"])
        self._wait_for_port("serve", s.grpc_address, stop)
        self.feeder.start()

        store = redis_client(s)
        layout = RedisLayout(s.redis_prefix)
        customer_id = self._wait_for_scores(store, layout, customers, stop)
        if customer_id is None:
            return 0  # stopped during start-up
        self.feeder.featured = customer_id
        print_banner(s, customer_id, self.feeder, self.workdir, self.external_redis)
        self._show_example(customer_id)
        return self._watch(store, layout, stop)

    def _start(self, starter: Callable[[int, Path], Server], name: str, preferred: int) -> Server:
        port = preferred if not port_open("127.0.0.1", preferred) else free_port()
        server = starter(port, self.workdir / name)
        self.servers.append(server)
        return server

    def _redis(self) -> tuple[str, str]:
        """Use the configured Redis when it answers, else start a private one."""
        url = self.settings.redis_url
        if redis_answers(url):
            self.external_redis = True
            prefix = f"{self.settings.redis_prefix}demo-{uuid.uuid4().hex[:8]}:"
            say(f"using the Redis at {self.settings.redacted()['redis_url']} "
                f"(keys under {prefix!r}, removed at exit)")
            return url, prefix
        server = self._start(start_redis, "redis", REDIS_PORT)
        say(f"no Redis answered at {self.settings.redacted()['redis_url']}: "
            f"started a private one on {server.address}")
        return f"redis://{server.address}/0", self.settings.redis_prefix

    def _grpc_address(self) -> str:
        host, _, port = self.settings.grpc_address.rpartition(":")
        host = host or "127.0.0.1"
        if port.isdigit() and not port_open(host, int(port)):
            return f"{host}:{port}"
        return f"{host}:{free_port()}"

    @staticmethod
    def _free_or(port: int) -> int:
        """``port``, or a free one when it is taken (0 stays off)."""
        return port if port == 0 or not port_open("127.0.0.1", port) else free_port()

    def _generate(self) -> Path:
        """A year of traffic ending now, so live purchases continue it seamlessly."""
        from crmscore.generator import GeneratorConfig, generate

        days = 365.0
        start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=days)
        say(f"generating a year of traffic for {self.args.customers:,} customers ...")
        config = GeneratorConfig(
            customers=self.args.customers, days=days, start=start, seed=self.args.seed
        )
        path = self.workdir / "transactions.jsonl"
        with open(path, "wb") as out:
            for line in generate(config).lines():
                out.write(line + b"\n")
        return path

    def _spawn(self, name: str, argv: list[str]) -> Server:
        env = dict(os.environ)
        env.update(child_env(self.settings))
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "crmscore.cli", *argv],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, cwd=self.workdir, start_new_session=True,
            )
        child = Server(name, "", proc, self.workdir, log_path)
        self.children[name] = child
        return child

    def _wait_for_port(self, name: str, address: str, stop: threading.Event) -> None:
        host, _, port = address.rpartition(":")
        deadline = time.monotonic() + CHILD_READY_TIMEOUT
        while not port_open(host, int(port)):
            self._check_children()
            if stop.wait(0.1):
                return
            if time.monotonic() > deadline:
                raise DemoError(f"`crmscore {name}` did not listen on {address}:\n"
                                f"{tail(self.children[name].log_path)}")

    def _wait_for_scores(
        self, store: RedisClient, layout: RedisLayout, customers: dict[str, Customer],
        stop: threading.Event,
    ) -> str | None:
        """Wait for the first score documents; return a busy customer that has one."""
        say("waiting for the first scores ...")
        deadline = time.monotonic() + FIRST_SCORE_TIMEOUT
        busiest = sorted(customers, key=lambda c: -customers[c].events)[:50]
        while not stop.wait(0.5):
            self._check_children()
            with_score = [c for c in busiest if store.exists(layout.score(c))]
            if with_score:
                return with_score[0]
            if time.monotonic() > deadline:
                raise DemoError(
                    f"no score reached Redis within {FIRST_SCORE_TIMEOUT:.0f} s; "
                    f"flow log:\n{tail(self.children['flow'].log_path)}"
                )
        return None

    def _show_example(self, customer_id: str) -> None:
        """Run the query the banner suggests, so the user sees it working."""
        try:
            result = subprocess.run(
                [sys.executable, "-m", "crmscore.cli", "score", customer_id,
                 "--grpc-address", self.settings.grpc_address],
                env={**os.environ, **child_env(self.settings)},
                capture_output=True, text=True, timeout=30, check=False,
            )
        except subprocess.TimeoutExpired:
            say(f"(`crmscore score {customer_id}` did not answer within 30 s)\n")
            return
        if result.returncode == 0:
            say(f"$ {crmscore_command()} score {customer_id}\n{result.stdout.rstrip()}\n")
        else:
            say(f"(`crmscore score {customer_id}` failed with exit code {result.returncode}: "
                f"{(result.stderr or result.stdout).strip()[-800:]})\n")

    # -- run -----------------------------------------------------------------------------

    def _watch(self, store: RedisClient, layout: RedisLayout, stop: threading.Event) -> int:
        duration = self.args.duration
        deadline = None if duration is None else time.monotonic() + duration
        next_status = time.monotonic()
        while not stop.wait(0.25):
            self._check_children()
            now = time.monotonic()
            if now >= next_status:
                say(status_line(store, layout, self.feeder))
                next_status = now + self.args.status_interval
            if deadline is not None and now >= deadline:
                say(f"--duration {duration:g} s reached")
                break
        say(status_line(store, layout, self.feeder))
        return 0

    def _check_children(self) -> None:
        for name in ("flow", "serve"):
            child = self.children.get(name)
            if child is not None and child.process.poll() is not None:
                raise DemoError(f"`crmscore {name}` exited with code {child.process.returncode}:"
                                f"\n{tail(child.log_path)}")
        if self.feeder is not None and self.feeder.error is not None:
            raise DemoError(f"publishing demo traffic failed: {self.feeder.error}")

    # -- stop ----------------------------------------------------------------------------

    def shutdown(self) -> None:
        say("stopping ...")
        if self.feeder is not None and self.feeder.is_alive():
            self.feeder.join(10)
        for child in reversed(list(self.children.values())):
            child.stop()
        if self.external_redis:
            drop_keys(self.settings)
        for server in reversed(self.servers):
            server.stop()
        if self.keep_workdir:
            say(f"logs kept in {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)
        say("stopped")


@dataclasses.dataclass
class Customer:
    currency: str
    events: int = 0


class Feeder(threading.Thread):
    """Replays the generated file once at ``rate``, then trickles fresh purchases.

    Both go through :func:`crmscore.replay.publish_lines`, fed by generators that end
    when ``stop`` is set, so the thread finishes (flushing its producer) on shutdown.
    """

    def __init__(
        self, settings: Settings, path: Path, customers: dict[str, Customer], lines: int,
        rate: float, trickle_rate: float, stop: threading.Event,
    ) -> None:
        super().__init__(name="demo-feeder", daemon=True)
        self.settings, self.path, self.customers = settings, path, customers
        self.rate, self.trickle_rate, self.stop = rate, trickle_rate, stop
        self.replayed = 0
        self.trickled = 0
        self.total = lines
        self.featured: str | None = None  # gets a share of the live purchases, to watch
        self.error: BaseException | None = None

    def run(self) -> None:
        from crmscore.replay import publish_lines

        try:
            publish_lines(self.settings, self._replay_lines(), rate=self.rate)
            if self.trickle_rate > 0:
                publish_lines(self.settings, self._live_lines(), rate=self.trickle_rate)
        except Exception as exc:  # reported by the main thread, which stops the demo
            self.error = exc
            log.exception("demo traffic failed")

    def _replay_lines(self) -> Iterator[bytes]:
        """The generated file's lines as bytes (some malformed ones are not UTF-8)."""
        with open(self.path, "rb") as file:
            for line in file:
                if self.stop.is_set():
                    return
                self.replayed += 1
                yield line.rstrip(b"\n")

    def _live_lines(self) -> Iterator[bytes]:
        """Fresh purchases (and a few refunds) of known customers, stamped now."""
        rng = random.Random(self.total)
        ids = sorted(self.customers)
        while not self.stop.is_set():
            featured = self.featured is not None and rng.random() < FEATURED_SHARE
            customer_id = self.featured if featured and self.featured else rng.choice(ids)
            event = {
                "event_id": f"demo-{uuid.uuid4().hex}",
                "customer_id": customer_id,
                "occurred_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                "type": "refund" if rng.random() < 0.05 else "purchase",
                "amount": round(rng.lognormvariate(3.5, 0.6), 2),
                "currency": self.customers[customer_id].currency,
                "channel": rng.choice(["web", "app", "store"]),
            }
            self.trickled += 1
            yield json.dumps(event).encode()


def read_customers(path: Path) -> tuple[dict[str, Customer], int]:
    """Customers of the generated file (currency, event count) and its line count."""
    currencies: dict[str, str] = {}
    counts: Counter[str] = Counter()
    lines = 0
    with open(path, encoding="utf-8", errors="replace") as file:
        for line in file:
            lines += 1
            try:
                event = json.loads(line)
            except ValueError:
                continue  # the generator's deliberately malformed events
            if not isinstance(event, dict):
                continue
            cid, currency = event.get("customer_id"), event.get("currency")
            if isinstance(cid, str) and cid and isinstance(currency, str) and len(currency) == 3:
                currencies.setdefault(cid, currency)
                counts[cid] += 1
    if not currencies:
        raise DemoError(f"no valid events in the generated file {path}")
    return {cid: Customer(currencies[cid], counts[cid]) for cid in currencies}, lines


def child_env(settings: Settings) -> dict[str, str]:
    return {
        "CRMSCORE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "CRMSCORE_KAFKA_CONFIG": settings.kafka_config,
        "CRMSCORE_REDIS_URL": settings.redis_url,
        "CRMSCORE_REDIS_PREFIX": settings.redis_prefix,
        "CRMSCORE_REDIS_CLUSTER": "on" if settings.redis_cluster else "off",
        "CRMSCORE_GRPC_ADDRESS": settings.grpc_address,
        "CRMSCORE_RECOVERY_DIR": settings.recovery_dir,
        "CRMSCORE_TOPIC_PARTITIONS": str(settings.topic_partitions),
        "CRMSCORE_METRICS_PORT": str(settings.metrics_port),
        "CRMSCORE_FLOW_METRICS_PORT": str(settings.flow_metrics_port),
        "CRMSCORE_AUTH": settings.auth,
        # Plaintext on localhost, whatever the user's shell has configured.
        **{f"CRMSCORE_{name}": "" for name in PLAINTEXT},
        "PYTHONUNBUFFERED": "1",
    }


def redis_answers(url: str) -> bool:
    try:
        conn = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)
        with conn:
            return bool(conn.ping())
    except (redis.RedisError, OSError, ValueError):
        return False


def drop_keys(settings: Settings) -> None:
    """Delete this run's keys from a Redis the demo did not start."""
    try:
        with redis_client(settings) as conn:
            keys = list(conn.scan_iter(match=settings.redis_prefix + "*", count=1000))
            for start in range(0, len(keys), 1000):
                conn.delete(*keys[start : start + 1000])
    except (redis.RedisError, redis.RedisClusterException) as exc:
        say(f"could not remove the demo's keys under {settings.redis_prefix!r}: {exc}")


def status_line(store: RedisClient, layout: RedisLayout, feeder: Feeder | None) -> str:
    try:
        raw = store.hget(layout.status(), "doc")
    except (redis.RedisError, redis.RedisClusterException) as exc:
        return f"[status] Redis error: {exc}"
    status = json.loads(raw) if raw else {}
    sent = "" if feeder is None else (
        f"sent {feeder.replayed:,}/{feeder.total:,}"
        + (f" +{feeder.trickled:,} live" if feeder.trickled else "")
        + " | "
    )
    counts = ", ".join(
        f"{name} {int(status.get('events_' + name, 0)):,}"
        for name in ("consumed", "applied", "rejected", "duplicate")
    )
    lag = status.get("input_lag_seconds")
    behind = "" if lag is None else f" | input lag {lag:.2f} s"
    return (f"[status] {sent}{counts} | stream clock {status.get('stream_clock') or '-'}"
            f"{behind}")


def print_banner(
    settings: Settings, customer_id: str, feeder: Feeder, workdir: Path, external_redis: bool
) -> None:
    cli = crmscore_command()
    grpc = settings.grpc_address
    request = shlex.quote(json.dumps({"customer_id": customer_id}))
    redis_note = "yours, keys under " + repr(settings.redis_prefix) if external_redis else "private"
    rule = "=" * 78
    metrics = ", flow ".join(f"http://127.0.0.1:{port}/metrics" if port else "off"
                             for port in (settings.metrics_port, settings.flow_metrics_port))
    say(f"""
{rule}
 crmscore demo is running
   Kafka broker  {settings.kafka_bootstrap}  (tansu, in memory)  topic {settings.transactions_topic}
   Redis         {settings.redacted()['redis_url']}  ({redis_note})
   gRPC API      {grpc}  (no API key needed: CRMSCORE_AUTH=off)
   metrics       server {metrics}
   traffic       {feeder.total:,} events of {len(feeder.customers):,} customers at \
{feeder.rate:g}/s, then {feeder.trickle_rate:g} live purchases/s
   logs          {workdir}

 Query a score:
   CRMSCORE_AUTH=off {cli} score {customer_id} --grpc-address {grpc}
   CRMSCORE_AUTH=off {cli} score {customer_id} --grpc-address {grpc} --watch
   grpcurl -plaintext -d {request} {grpc} crmscore.v1.Scoring/GetScore
   grpcurl -plaintext {grpc} crmscore.v1.Scoring/GetPipelineStatus

 Ctrl-C stops everything.
{rule}""")


def crmscore_command() -> str:
    """How the user's shell reaches this ``crmscore``: on PATH, or by its path."""
    script = Path(sys.executable).parent / "crmscore"
    on_path = shutil.which("crmscore")
    if on_path and Path(on_path).resolve() == script.resolve():
        return "crmscore"
    if not script.exists():
        return f"{sys.executable} -m crmscore.cli"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return f"(no log at {path})"


def say(message: str) -> None:
    print(message, flush=True)
