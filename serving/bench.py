"""Benchmark of the scoring API beside a trivial echo service on the same grpc stack.

    python -m serving.bench [--seconds 5] [--rate 1000] [--batch-rate 100] [--concurrency 64]
    python -m serving.bench --soak 300 [--soak-share 0.7]

Starts a private Redis seeded with score documents, then, each in its own child process
(so the client never shares a GIL with the server), a trivial echo server and the real
scoring server (auth on, same thread pool and options), twice: as configured by default,
with its score cache (serving/cache.py), and with the cache off, every call read from
Redis. The seeded customers fit the cache: after its first read of a customer, the
cached server answers it from memory, as it does a web shop session's repeated asks.
Clients in this process measure, for each: latency p50/p99 at a fixed request rate
(8 blocking clients in threads, each call timed from the moment it was due), and peak
QPS with ``--concurrency`` calls in flight (a grpc.aio client); for the cached server,
the share of lookups its cache answered in each phase (from its /metrics). It prints
numbers and asserts nothing.
Targets (2-core box, client and server on it): GetScore p99 <= 2 ms at 1,000 QPS;
peak GetScore QPS >= 60% of the echo service's.

``--soak SECONDS`` runs only the scoring server: it measures peak GetScore QPS as above,
then calls GetScore at ``--soak-share`` of that peak for SECONDS and prints, per 30 s
window, the achieved QPS, p50/p99, errors by status and the server process's RSS (from
/proc), then the totals and the RSS growth. It exits 1 when any soak call failed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent import futures
from typing import Any, cast

import grpc
import orjson
import redis
from prometheus_client.parser import text_string_to_metric_families

from crmscore.embedded import free_port, port_open, start_redis
from crmscore.layout import RedisLayout
from crmscore.settings import Settings
from crmscore.v1 import scoring_pb2, scoring_pb2_grpc
from serving.auth import entry, new_key

ECHO_METHOD = "/bench.Echo/Echo"
PREFIX = "bench:"
SOAK_WINDOW_S = 30.0

Call = Callable[[int], Awaitable[object]]
SyncCall = Callable[[int], object]
FIXED_RATE_THREADS = 8
NO_CACHE = "scoring, no cache"


# -- servers (child processes) -------------------------------------------------------------


def serve_echo(port: int, settings: Settings) -> None:
    limit = settings.grpc_max_message_bytes
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.grpc_workers),
        options=[("grpc.max_receive_message_length", limit),
                 ("grpc.max_send_message_length", limit), ("grpc.so_reuseport", 0)],
    )
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.Echo", {"Echo": handler}),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    _wait_for_signal()
    server.stop(0)


def serve_scoring(port: int, settings: Settings) -> None:
    from serving.metrics import serve_metrics
    from serving.server import create_server

    server, _ = create_server(settings, f"127.0.0.1:{port}")
    serve_metrics(settings.metrics_port, "127.0.0.1")
    server.start()
    _wait_for_signal()
    server.stop(0)


def _wait_for_signal() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()


def spawn(kind: str, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.bench", "--serve", kind, "--port", str(port)],
        env={**os.environ, **env},
    )
    deadline = time.monotonic() + 20
    while not port_open("127.0.0.1", port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the {kind} server did not start on port {port}")
        time.sleep(0.05)
    return proc


# -- load (this process) -------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    name: str
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    rate: float = 0.0
    peak_qps: float = 0.0
    errors: int = 0


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def fixed_rate(call: SyncCall, rate: float, seconds: float,
               threads: int = FIXED_RATE_THREADS) -> tuple[list[float], int]:
    """``call`` at ``rate`` per second for ``seconds``, from ``threads`` blocking clients
    on interleaved schedules. A call's latency runs from the moment it was due, so a
    call started late by a slow predecessor counts its wait (no coordinated omission).
    Blocking clients, not asyncio: the event loop added ~1 ms to echo's own p99 here."""
    latencies: list[float] = []  # list.append is atomic: the threads share it
    failed: list[int] = []
    per_thread = rate / threads
    start = time.perf_counter() + 0.05

    def client(k: int) -> None:
        for n in range(int(per_thread * seconds)):
            due = start + (n + k / threads) / per_thread
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            try:
                call(n * threads + k)
            except grpc.RpcError:
                failed.append(n)
                continue
            latencies.append(time.perf_counter() - due)

    workers = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sorted(latencies), len(failed)


async def peak(call: Call, concurrency: int, seconds: float) -> tuple[float, int]:
    loop = asyncio.get_running_loop()
    done = errors = 0
    stop = loop.time() + seconds

    async def worker(w: int) -> None:
        nonlocal done, errors
        i = w
        while loop.time() < stop:
            try:
                await call(i)
                done += 1
            except grpc.RpcError:
                errors += 1
            i += concurrency

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return done / (time.perf_counter() - started), errors


def cache_lookups(metrics_port: int | None) -> dict[str, float]:
    """The score cache's lookups so far by result (hit, miss), from a server's /metrics."""
    lookups = {"hit": 0.0, "miss": 0.0}
    if metrics_port is None:
        return lookups
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as page:
        text = page.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "crmscore_score_cache_lookups":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    lookups[sample.labels["result"]] += sample.value
    return lookups


def hit_share(before: dict[str, float], after: dict[str, float]) -> str:
    hits, misses = after["hit"] - before["hit"], after["miss"] - before["miss"]
    return f"{hits / (hits + misses):.0%}" if hits + misses else "-"


def measure(name: str, address: str, calls: Callable[[Any], Call | SyncCall], rate: float,
            args: argparse.Namespace, metrics_port: int | None = None) -> Result:
    """Latency at a fixed rate from blocking clients, then peak QPS with
    ``args.concurrency`` calls in flight from a grpc.aio client. ``calls(channel)`` makes
    the call function for a channel of either kind. The two clients never share the
    process at once: an open asyncio channel alone added milliseconds to blocking calls'
    p99 here. With the server's ``metrics_port``, also the share of each phase's score
    lookups its cache answered."""
    with grpc.insecure_channel(address) as channel:
        sync_call = calls(channel)
        for i in range(200):  # warm-up: connections, caches, thread pool
            sync_call(i)
        at_start = cache_lookups(metrics_port)
        latencies, errors = fixed_rate(sync_call, rate, args.seconds)
    after_fixed_rate = cache_lookups(metrics_port)

    async def at_peak() -> tuple[float, int]:
        async with grpc.aio.insecure_channel(address) as aio_channel:
            call = cast(Call, calls(aio_channel))
            for i in range(200):
                await call(i)
            return await peak(call, args.concurrency, args.seconds)

    before_peak = cache_lookups(metrics_port)  # its 200 warm-up calls count in the peak
    qps, peak_errors = asyncio.run(at_peak())
    after_peak = cache_lookups(metrics_port)
    result = Result(name, percentile(latencies, 0.5) * 1e3, percentile(latencies, 0.99) * 1e3,
                    rate, qps, errors + peak_errors)
    print(f"  {name:<24} p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms "
          f"at {rate:g}/s   peak {qps:8.0f} QPS ({args.concurrency} in flight)"
          + (f"  errors {result.errors}" if result.errors else "")
          + (f"  cache hits {hit_share(at_start, after_fixed_rate)} / "
             f"{hit_share(before_peak, after_peak)}" if metrics_port else ""), flush=True)
    return result


def run_clients(args: argparse.Namespace, ports: dict[str, int], key: str,
                customers: int, metrics_port: int) -> list[Result]:
    ids = [f"bench-{n}" for n in range(customers)]
    rng = random.Random(7)
    metadata = (("authorization", f"Bearer {key}"),)
    payload = scoring_pb2.GetScoreRequest(customer_id="bench-1").SerializeToString()
    requests = [scoring_pb2.GetScoreRequest(customer_id=c) for c in ids]
    batches = [scoring_pb2.BatchGetScoresRequest(customer_ids=rng.sample(ids, 100))
               for _ in range(200)]

    def echo(channel: Any) -> Any:
        method = channel.unary_unary(ECHO_METHOD)
        return lambda i: method(payload, timeout=5)

    def get_score(channel: Any) -> Any:
        stub = scoring_pb2_grpc.ScoringStub(channel)
        return lambda i: stub.GetScore(requests[i % customers], timeout=5, metadata=metadata)

    def batch_get(channel: Any) -> Any:
        stub = scoring_pb2_grpc.ScoringStub(channel)
        return lambda i: stub.BatchGetScores(batches[i % len(batches)], timeout=5,
                                             metadata=metadata)

    address = {kind: f"127.0.0.1:{port}" for kind, port in ports.items()}
    return [
        measure("echo", address["echo"], echo, args.rate, args),
        measure("GetScore", address["scoring"], get_score, args.rate, args, metrics_port),
        measure("BatchGetScores(100)", address["scoring"], batch_get, args.batch_rate, args,
                metrics_port),
        measure("GetScore, no cache", address[NO_CACHE], get_score, args.rate, args),
        measure("BatchGetScores, no cache", address[NO_CACHE], batch_get, args.batch_rate,
                args),
    ]


# -- soak (this process) -------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    """Resident set size of process ``pid`` in MiB (VmRSS in /proc), NaN where unknown."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return float("nan")


@dataclasses.dataclass
class Window:
    """Calls completed in one soak window: latencies of the OK ones, errors by status."""

    latencies: list[float] = dataclasses.field(default_factory=list)
    errors: Counter[str] = dataclasses.field(default_factory=Counter)

    @property
    def calls(self) -> int:
        return len(self.latencies) + sum(self.errors.values())


def describe_errors(errors: Counter[str]) -> str:
    total = sum(errors.values())
    if not total:
        return "errors 0"
    return f"errors {total} ({', '.join(f'{c} {n}' for c, n in errors.most_common())})"


async def soak_rate(call: Call, rate: float, seconds: float, pid: int) -> int:
    """Calls at ``rate`` for ``seconds`` (open loop: a slow reply delays no later call),
    printing each window; returns the number of failed calls."""
    loop = asyncio.get_running_loop()
    window = Window()
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    pending: set[asyncio.Task[None]] = set()

    async def one(i: int) -> None:
        started = time.perf_counter()
        try:
            await call(i)
        except grpc.RpcError as exc:
            code = exc.code()
            window.errors[code.name if code is not None else "UNKNOWN"] += 1
            return
        window.latencies.append(time.perf_counter() - started)

    def flush(elapsed: float, length: float) -> None:
        nonlocal window
        done, window = window, Window()
        done.latencies.sort()
        latencies.extend(done.latencies)
        errors.update(done.errors)
        print(f"  [{elapsed:5.0f} s] {done.calls / length:7.0f} QPS  "
              f"p50 {percentile(done.latencies, 0.5) * 1e3:7.2f} ms  "
              f"p99 {percentile(done.latencies, 0.99) * 1e3:7.2f} ms  "
              f"{describe_errors(done.errors)}  in flight {len(pending)}  "
              f"server RSS {rss_mib(pid):6.1f} MiB", flush=True)

    rss_start = rss_mib(pid)
    total = int(rate * seconds)
    start = loop.time() + 0.05
    boundary, last = start + SOAK_WINDOW_S, start
    rss_first: float | None = None  # after the first window: past the warm-up
    for i in range(total):
        due = start + i / rate
        if due >= boundary:
            flush(boundary - start, boundary - last)
            if rss_first is None:
                rss_first = rss_mib(pid)
            last, boundary = boundary, boundary + SOAK_WINDOW_S
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(i))
        pending.add(task)
        task.add_done_callback(pending.discard)
    await asyncio.gather(*pending)
    end = loop.time()
    flush(end - start, end - last)
    rss_end = rss_mib(pid)
    latencies.sort()
    failed = sum(errors.values())
    print(f"  soak: {total:,} calls in {end - start:.0f} s ({total / (end - start):.0f} QPS, "
          f"target {rate:.0f}), {describe_errors(errors)} (must be 0), "
          f"p50 {percentile(latencies, 0.5) * 1e3:.2f} ms, "
          f"p99 {percentile(latencies, 0.99) * 1e3:.2f} ms", flush=True)
    print(f"  server RSS: start {rss_start:.1f} MiB, end {rss_end:.1f} MiB, growth "
          f"{rss_end - rss_start:+.1f} MiB ({(rss_end - rss_start) / rss_start:+.1%})"
          + ("" if rss_first is None else
             f"; since the end of the first window {rss_end - rss_first:+.1f} MiB"), flush=True)
    return failed


async def run_soak(args: argparse.Namespace, port: int, pid: int, key: str,
                   customers: int) -> int:
    """Peak GetScore QPS, then a soak at ``args.soak_share`` of it; returns failed calls."""
    metadata = (("authorization", f"Bearer {key}"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = scoring_pb2_grpc.ScoringStub(channel)
        requests = [scoring_pb2.GetScoreRequest(customer_id=f"bench-{n}")
                    for n in range(customers)]

        def call(i: int) -> Awaitable[object]:
            return stub.GetScore(requests[i % customers], timeout=5, metadata=metadata)

        for i in range(200):  # warm-up: connections, caches, thread pool
            await call(i)
        qps, peak_errors = await peak(call, args.concurrency, args.seconds)
        rate = args.soak_share * qps
        print(f"  GetScore peak {qps:.0f} QPS ({args.concurrency} in flight"
              + (f", errors {peak_errors}" if peak_errors else "")
              + f"); soak at {args.soak_share:.0%} of it: {rate:.0f} QPS for {args.soak:g} s, "
              f"windows of {SOAK_WINDOW_S:g} s, server pid {pid}", flush=True)
        return await soak_rate(call, rate, args.soak, pid)


def seed(url: str, customers: int) -> None:
    conn = redis.Redis.from_url(url)
    layout = RedisLayout(PREFIX)
    pipe = conn.pipeline(transaction=False)
    for n in range(customers):
        cid = f"bench-{n}"
        doc = {
            "customer_id": cid, "version": 3, "as_of": "2026-01-02T03:04:05.000000Z",
            "currency": "EUR", "first_purchase_at": "2025-01-02T03:04:05.000000Z",
            "last_purchase_at": "2025-12-02T03:04:05.000000Z",
            "last_event_at": "2026-01-02T03:04:05.000000Z",
            "rfm": {"recency_days": 31.0, "frequency": 12, "monetary": 512.3, "r_score": 3,
                    "f_score": 4, "m_score": 4, "cell": "344", "segment": "loyal"},
            "purchase_count": 12, "gross_monetary": 530.0, "net_monetary": 512.3,
            "refund_count": 1, "refund_total": 17.7, "gap_mean_days": 30.1, "gap_std_days": 4.2,
            "windows": {w: {"purchases": 2, "spend": 80.0, "refunds": 0.0}
                        for w in ("30d", "90d", "365d")},
            "churn_risk": 0.2, "churn_horizon_days": 90, "p_alive": 0.83,
            "expected_purchases": 3.1, "clv_historic": 512.3, "clv_predicted": 401.0,
            "clv_horizon_days": 365, "lifecycle_stage": "active", "value_tier": "high",
            "strategy": {"name": "loyalty_reward", "reason": "frequent, high value"},
            "model_version": "bench-1",
        }
        pipe.hset(layout.score(cid), mapping={"v": 3, "doc": orjson.dumps(doc)})
        if n % 1000 == 999:
            pipe.execute()
    pipe.execute()
    conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--rate", type=float, default=1000.0, help="fixed rate, calls/s")
    parser.add_argument("--batch-rate", type=float, default=100.0,
                        help="fixed rate of BatchGetScores(100), calls/s")
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight at peak")
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--soak", type=float, metavar="SECONDS",
                        help="instead: GetScore at --soak-share of peak QPS for SECONDS")
    parser.add_argument("--soak-share", type=float, default=0.7,
                        help="share of the measured peak QPS the soak runs at (default 0.7)")
    parser.add_argument("--serve", choices=["echo", "scoring"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.serve:
        settings = Settings.from_env(os.environ)
        (serve_echo if args.serve == "echo" else serve_scoring)(args.port, settings)
        return 0

    redis_server = start_redis()
    children: list[subprocess.Popen[bytes]] = []
    try:
        url = f"redis://{redis_server.address}/0"
        seed(url, args.customers)
        key = new_key()
        env = {"CRMSCORE_REDIS_URL": url, "CRMSCORE_REDIS_PREFIX": PREFIX,
               "CRMSCORE_API_KEYS": entry("reader", key), "CRMSCORE_METRICS_PORT": "0"}
        kinds = ("scoring",) if args.soak else ("echo", "scoring", NO_CACHE)
        ports = {kind: free_port() for kind in kinds}
        metrics = free_port()
        for kind, port in ports.items():
            if kind == NO_CACHE:
                children.append(spawn("scoring", port, {**env, "CRMSCORE_SCORE_CACHE_SIZE": "0"}))
            elif kind == "scoring":
                children.append(spawn(kind, port, {**env, "CRMSCORE_METRICS_PORT": str(metrics)}))
            else:
                children.append(spawn(kind, port, env))
        print(f"serving benchmark: {os.cpu_count()} CPUs, grpcio {grpc.__version__}, "
              f"{args.customers:,} customers, sync grpc server with "
              f"{Settings.from_env(os.environ).grpc_workers} threads for unary calls, auth on; "
              f"fixed rate: {FIXED_RATE_THREADS} blocking clients; peak: grpc.aio client")
        if args.soak:
            scoring = children[-1]
            failed = asyncio.run(run_soak(args, ports["scoring"], scoring.pid, key,
                                          args.customers))
            return 1 if failed else 0
        results = run_clients(args, ports, key, args.customers, metrics)
        echo, get, *_ = results
        print(f"  GetScore p99 at {args.rate:g}/s: {get.p99_ms:.2f} ms (target <= 2 ms); "
              f"peak GetScore / echo: {get.peak_qps / echo.peak_qps:.0%} (target >= 60%)")
    finally:
        for child in children:
            child.terminate()
        for child in children:
            child.wait(10)
        redis_server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
