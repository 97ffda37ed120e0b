"""Freshness: from an event's publication to its score being visible through gRPC.

On the private broker and Redis, ``crmscore flow`` (tail mode, recovery on, as
deployed) and ``crmscore serve`` (auth off) run as child processes. The flow first
replays a year of the customers' history, ending a day before now (``crmscore
generate``): the customers' state, the fitted BG/NBD population and the churn models are
those of a running service, not of customers a few seconds old (on such a population
the BG/NBD fit degenerates and its expectations cost ten times more). WatchCustomer
streams then open on a sample of customers, and purchases (occurred_at = now, in each
customer's currency) go to customers drawn at random, at a fixed rate for a fixed time.
A watched customer's k-th purchase from then on is timed from just before it is handed
to the producer until its watch yields a score document with k more purchases.

With ``held`` (``python -m bench.freshness --held 100000``), that many more customers'
state is in the flow too: two purchases each over the 60 days before the history ends
(bench/memory.py ``scale_events``), published after it, with a minute to settle. They
buy nothing while measured; they are the population a real flow holds.

Samples still unseen when the run ends (the flow fell behind) count as slower than
the wait, so they raise the percentiles instead of vanishing from them. The consumer
lag (events published minus the status document's events_consumed) is reported at
the end of publishing and after the wait; when every sample was seen, the status gets
up to ``STATUS_GRACE_S`` more to count the events around the last one.
"""

from __future__ import annotations

import argparse
import math
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import orjson

from bench.memory import scale_events
from bench.processes import Pipeline, Stack, cpu_seconds, private_stack, wait_until
from crmscore.clients import producer
from crmscore.embedded import free_port, port_open
from crmscore.replay import TokenBucket, publish_lines
from serving.bench import percentile
from serving.client import ScoringClient, stream

TARGET_P99_MS = 50.0
TARGET_RATE = 1000.0  # the rate the p99 target is set at


class Samples:
    """Produce times of the watched customers' purchases, matched to their watches."""

    def __init__(self, watched: list[str]) -> None:
        self._lock = threading.Lock()
        self._sent: dict[str, dict[int, float]] = {c: {} for c in watched}
        self.latencies_s: list[float] = []
        self.first_doc = {c: threading.Event() for c in watched}
        self.first_count: dict[str, int] = {}  # purchase_count of each watch's first doc
        self.watch_errors: Counter[str] = Counter()

    def sent(self, customer_id: str, purchase_count: int, at: float) -> None:
        with self._lock:
            self._sent[customer_id][purchase_count] = at

    def seen(self, customer_id: str, purchase_count: int, at: float) -> None:
        with self._lock:
            sent = self._sent[customer_id]
            for k in [k for k in sent if k <= purchase_count]:
                self.latencies_s.append(at - sent.pop(k))
            self.first_count.setdefault(customer_id, purchase_count)
        self.first_doc[customer_id].set()

    def unseen(self) -> int:
        with self._lock:
            return sum(len(s) for s in self._sent.values())

    def watch_failed(self, code: str) -> None:
        with self._lock:
            self.watch_errors[code] += 1

    def result(self) -> tuple[list[float], int]:
        """The latencies so far, sorted, and how many samples are still unseen."""
        with self._lock:
            return sorted(self.latencies_s), sum(len(s) for s in self._sent.values())


def purchase(event_id: str, customer_id: str, currency: str = "EUR") -> bytes:
    return orjson.dumps({
        "event_id": event_id, "customer_id": customer_id,
        "occurred_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "type": "purchase", "amount": 25.0, "currency": currency, "channel": "web",
    })


HISTORY_DAYS = 365
SETTLE_S = 10.0  # after the clock jump: its burst of wake-ups, and several epochs
HELD_SETTLE_S = 60.0  # with customers held: their wake-ups, and the snapshot of them all
STATUS_GRACE_S = 2.0  # the most the status's count may trail the documents by, read as lag


def history(directory: Path, customers: int, held: int = 0
            ) -> tuple[list[bytes], dict[str, str]]:
    """A year of clean generated history ending a day before now, then ``held`` more
    customers' purchases, and the history customers' currency (a purchase in another one
    would be refused)."""
    out = directory / "history.jsonl"
    end = datetime.now(UTC) - timedelta(days=1)
    start = end - timedelta(days=HISTORY_DAYS)
    subprocess.run(
        [sys.executable, "-m", "crmscore.cli", "generate", "--customers", str(customers),
         "--days", str(HISTORY_DAYS), "--start", start.strftime("%Y-%m-%dT%H:%M:%SZ"),
         "--seed", "11", "--duplicate-rate", "0", "--malformed-rate", "0", "--out", str(out)],
        check=True, stdout=subprocess.DEVNULL,
    )
    lines = out.read_bytes().splitlines()
    currency: dict[str, str] = {}
    for line in lines:
        event = orjson.loads(line)
        currency.setdefault(event["customer_id"], event["currency"])
    return lines + list(scale_events(held, end=end)), currency


@dataclass(frozen=True)
class Freshness:
    rate: float
    seconds: float
    customers: int
    watched: int
    published: int  # the measured purchases, warm-up not included
    achieved_rate: float
    expected: int  # purchases of watched customers
    latencies_s: list[float]  # sorted; unseen ones excluded
    waited_s: float  # after publishing, for the last samples
    lag_at_end: int  # events published but not consumed when publishing ended
    lag_after_wait: int
    consumed_rate: float  # events/s the flow consumed while publishing
    watch_errors: dict[str, int]
    in_redis_s: list[float]  # every customer: occurred_at -> document published (sorted)
    held: int = 0  # more customers in the flow's state, not buying
    restarted: bool = False  # the flow was restarted on its store before measuring
    epoch_s: float | None = None  # the snapshot interval it ran at, as its log said
    # The flow process's CPU seconds per second while publishing: near 1.0 its one
    # thread had no time to spare, and the latencies are its backlog.
    flow_cpu: float | None = None

    @property
    def unseen(self) -> int:
        return self.expected - len(self.latencies_s)

    def percentile_ms(self, q: float) -> float:
        """Percentile over every expected sample, unseen ones as infinitely late."""
        with_unseen = self.latencies_s + [math.inf] * self.unseen
        return percentile(with_unseen, q) * 1e3

    @property
    def kept_up(self) -> bool:
        return self.lag_at_end <= self.rate  # less than a second of input behind

    def ms(self, q: float) -> str:
        value = self.percentile_ms(q)
        return f"> {self.waited_s * 1e3:,.0f} (unseen)" if math.isinf(value) else f"{value:,.1f}"

    @property
    def target(self) -> tuple[str, str]:
        """The p99 target and whether it is met, for the rate it is set at."""
        if self.rate != TARGET_RATE:
            return "", ""
        met = self.percentile_ms(0.99) <= TARGET_P99_MS
        return f"≤ {TARGET_P99_MS:g} ms", "met" if met else "**not met**"

    def summary(self) -> list[str]:
        target, met = self.target
        return [f"| freshness p99 at {self.rate:,.0f} events/s "
                f"({'kept up' if self.kept_up else 'the flow fell behind'}) "
                f"| **{self.ms(0.99)}** ms | {target} | {met} |"]

    def row(self) -> str:
        target, met = self.target
        in_redis = (f"{percentile(self.in_redis_s, 0.5) * 1e3:,.1f} / "
                    f"{percentile(self.in_redis_s, 0.99) * 1e3:,.1f} "
                    f"({len(self.in_redis_s):,} documents)")
        return (f"| {self.rate:,.0f} | {self.achieved_rate:,.0f} | {self.consumed_rate:,.0f} | "
                f"{len(self.latencies_s):,} of {self.expected:,} | {self.ms(0.5)} | "
                f"{self.ms(0.99)} | {in_redis} | {self.lag_at_end:,} / {self.lag_after_wait:,} | "
                f"{target}{': ' + met if met else ''} |")

    def note(self) -> str:
        errors = (f"; watch errors: {dict(self.watch_errors)}" if self.watch_errors else "")
        if self.epoch_s is not None:
            errors += (f"; {'restarted on its store, ' if self.restarted else ''}"
                       f"it ran {self.epoch_s:g} s epochs")
        if self.flow_cpu is not None:
            errors += f"; the flow process used {self.flow_cpu:.0%} of a core while publishing"
        if self.kept_up:
            return f"- {self.rate:,.0f}/s: the flow kept up{errors}."
        behind = self.lag_at_end / max(self.consumed_rate, 1.0)
        return (f"- {self.rate:,.0f}/s: **the flow did not keep up**: it consumed "
                f"{self.consumed_rate:,.0f} events/s and was {self.lag_at_end:,} events "
                f"(~{behind:,.0f} s of its work) behind when publishing ended; "
                f"{self.unseen:,} samples were still unseen after waiting "
                f"{self.waited_s:.0f} s{errors}.")


def markdown(results: list[Freshness]) -> list[str]:
    first = results[0]
    return [
        f"`crmscore flow` (tail mode, recovery on) and `crmscore serve` (auth off) as child "
        f"processes; {first.customers:,} customers with a year of history replayed first"
        f"{f' ({first.held:,} more held: two purchases each)' if first.held else ''}, then "
        f"{first.seconds:g} s of purchases at each rate to random customers; "
        f"{first.watched} of them watched through WatchCustomer. \"in Redis\": every "
        f"customer's first document of each new event, from the event's occurred_at to "
        f"its publication on the update channel (bench/redis_probe.py; later documents of "
        f"the same event, rescores and due instants, are skipped): the flow's share, "
        f"without the serving path.",
        "",
        "| target rate (events/s) | published/s | flow consumed/s | samples seen | p50 ms "
        "| p99 ms | in Redis p50 / p99 ms | lag at end of publishing / after wait (events) "
        "| target p99 |",
        "|---|---|---|---|---|---|---|---|---|",
        *(r.row() for r in results),
        "",
        *(r.note() for r in results),
    ]


def measure(stack: Stack, rate: float, seconds: float, customers: int, watched: int,
            max_wait_s: float, held: int = 0, restart: bool = False) -> Freshness:
    pipeline = Pipeline(stack, f"fresh{rate:.0f}")
    settings = pipeline.settings()
    flow = pipeline.start("flow")
    port = free_port()
    server = pipeline.start(
        "serve", CRMSCORE_GRPC_ADDRESS=f"127.0.0.1:{port}", CRMSCORE_AUTH="off",
        CRMSCORE_METRICS_PORT="0", CRMSCORE_MAX_WATCHERS=str(watched),
    )
    lines, currency = history(pipeline.directory, customers, held)
    ids = sorted(currency)
    rng = random.Random(11)
    samples = Samples(rng.sample(ids, watched))
    calls: list[Any] = []
    try:
        # One producer for the history and the measured purchases: a new one holds its
        # first messages for up to a second while it connects (it made ~5% of 20 s at
        # 1,000/s look 0.1-1.1 s late, the whole p99).
        kafka = producer(settings)
        publish_lines(settings, lines, kafka=kafka)
        wait_until(lambda: pipeline.events_consumed() >= len(lines), 600,
                   "the flow consuming the customers' history", flow)
        # Move the stream clock from the history's end to now and let the flow settle:
        # that jump fires a day of wake-ups at once, and the epoch after the replay
        # snapshots every customer. Neither is the steady state being measured.
        publish_lines(settings, [purchase("clock", "clock")], kafka=kafka)
        wait_until(lambda: pipeline.events_consumed() > len(lines), 120,
                   "the flow consuming the clock's purchase", flow)
        time.sleep(HELD_SETTLE_S if held else SETTLE_S)
        if restart:
            # As a deployed flow restarts on the state it holds: it chooses its snapshot
            # interval then, from the scan of its store (flows/recovery_scan.py).
            flow.stop()
            restarted_at = time.time()
            flow = pipeline.start("flow")
            wait_until(lambda: _status_written_after(pipeline, restarted_at), 600,
                       "the restarted flow writing its status", flow)
            time.sleep(SETTLE_S)
        wait_until(lambda: port_open("127.0.0.1", port), 60, "crmscore serve listening", server)
        with ScoringClient(f"127.0.0.1:{port}") as client:
            for customer_id in samples.first_doc:
                calls.append(_watch(client, customer_id, samples))
            wait_until(lambda: all(e.is_set() for e in samples.first_doc.values()), 60,
                       "every watch's first score document", server)

            counts = dict(samples.first_count)  # the watched customers' purchases so far
            total = int(rate * seconds)
            consumed_before = pipeline.events_consumed()
            probe_out = pipeline.directory / "in_redis.json"
            probe = subprocess.Popen([sys.executable, "-m", "bench.redis_probe", stack.redis_url,
                                      pipeline.layout.prefix, str(probe_out), str(time.time())])
            time.sleep(0.5)  # subscribed before the first measured purchase
            cpu_before = cpu_seconds(flow.process.pid)
            started = time.monotonic()
            publish_lines(settings, _paced(ids, currency, counts, total, rate, rng, samples),
                          kafka=kafka)
            published_s = time.monotonic() - started
            cpu_after = cpu_seconds(flow.process.pid)
            consumed_at_end = pipeline.events_consumed()
            waited_from = time.monotonic()
            deadline = waited_from + max_wait_s
            while samples.unseen() and time.monotonic() < deadline:
                time.sleep(0.05)
            waited_s = time.monotonic() - waited_from
            published_all = len(lines) + 1 + total
            # The wait ends with the last sample's document, often before the status
            # counts the batches around it: give the count the moment it trails by.
            grace_ends = time.monotonic() + (0.0 if samples.unseen() else STATUS_GRACE_S)
            while (consumed_after := pipeline.events_consumed()) < published_all \
                    and time.monotonic() < grace_ends:
                time.sleep(0.05)
            latencies_s, unseen = samples.result()
            probe.terminate()
            probe.wait(30)
            in_redis_s = sorted(orjson.loads(probe_out.read_bytes()))
    finally:
        for call in calls:
            call.cancel()
        server.stop()
        flow.stop()
    return Freshness(
        rate, seconds, customers, watched, total, total / published_s,
        len(latencies_s) + unseen, latencies_s, waited_s,
        published_all - consumed_at_end, published_all - consumed_after,
        (consumed_at_end - consumed_before) / published_s, dict(samples.watch_errors),
        in_redis_s, held, restart, ran_epochs_s(flow.log_tail(chars=10**7)),
        None if cpu_before is None or cpu_after is None
        else (cpu_after - cpu_before) / published_s,
    )


def _status_written_after(pipeline: Pipeline, at: float) -> bool:
    status = pipeline.status()
    return status is not None and datetime.fromisoformat(status["updated_at"]).timestamp() > at


def ran_epochs_s(flow_log: str) -> float | None:
    """The snapshot interval a flow ran at, from its report of the recovery scan at start
    (None without one).

    >>> ran_epochs_s("... 9% of a 1.07 s snapshot interval, growing with the keys")
    1.07
    """
    said = re.search(r"of a ([0-9.]+) s snapshot interval", flow_log)
    return None if said is None else float(said.group(1))


def _paced(ids: list[str], currency: dict[str, str], counts: dict[str, int], total: int,
           rate: float, rng: random.Random, samples: Samples) -> Iterator[bytes]:
    """``total`` purchases at ``rate``, noting the produce time of the watched ones."""
    bucket = TokenBucket(rate)
    watched = samples.first_doc
    for n in range(total):
        customer_id = ids[rng.randrange(len(ids))]
        bucket.take()  # then stamp occurred_at: the wait for a token is not latency
        line = purchase(f"p-{n}", customer_id, currency[customer_id])
        if customer_id in watched:
            counts[customer_id] += 1
            samples.sent(customer_id, counts[customer_id], time.monotonic())
        yield line


def _watch(client: ScoringClient, customer_id: str, samples: Samples) -> Any:
    call = client.watch(customer_id)

    def follow() -> None:
        try:
            for score in stream(call):
                samples.seen(customer_id, score.purchase_count, time.monotonic())
        except grpc.RpcError as exc:
            samples.watch_failed(str(exc.code()))

    threading.Thread(target=follow, name=f"watch-{customer_id}", daemon=True).start()
    return call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.freshness", description=(
        "Freshness at one rate, on a private broker and Redis; the flow's settings come "
        "from the environment (e.g. CRMSCORE_SNAPSHOT_INTERVAL)."))
    parser.add_argument("--rate", type=float, default=TARGET_RATE)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--customers", type=int, default=2000)
    parser.add_argument("--watched", type=int, default=50)
    parser.add_argument("--held", type=int, default=0,
                        help="more customers in the flow's state (not buying)")
    parser.add_argument("--restart", action="store_true",
                        help="restart the flow on its store before measuring (it chooses "
                             "its snapshot interval at start)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, private_stack(Path(tmp)) as stack:
        result = measure(stack, args.rate, args.seconds, args.customers, args.watched,
                         max_wait_s=30.0, held=args.held, restart=args.restart)
    print("\n".join(markdown([result])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
