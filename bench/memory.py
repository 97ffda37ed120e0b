"""Memory per customer, and the recovery snapshot's size and resume time, after a
``crmscore flow --until-end`` run (recovery on) over N customers.

- Redis: MEMORY USAGE of the score document keys (up to SAMPLE_KEYS of them), averaged;
  and the growth of INFO used_memory over the run divided by the customers, which also
  carries the flow's few fixed keys (status, models, alert report; their size is shown).
- Flow RSS: the process's peak VmHWM, and (that peak - an empty run's peak) / customers.
- Flow state: in bytewax's recovery sqlite (table ``snaps(step_id, state_key,
  snap_epoch, ser_change)``), the average length of ``ser_change`` of each key's newest
  snapshot, for the step whose id ends with "customers" (the per-customer state).
- Recovery: total bytes of the recovery directory, and the wall time of a second run on
  it with no new events (resume from the snapshot, find the topic's end, exit), beside
  an empty run's.
- Redis at 100k and 1M customers (:func:`redis_at_scale`): the flow cannot replay that
  many customers here in a session, so the run's own stored documents are cloned under
  new customer ids (re-encoded: each is a real document of its own) and written through
  the flow's sink, in a database of their own; then the same two Redis figures.
- Flow RSS at scale (:func:`flow_at_scale`): the flow's peak RSS over customers with
  short histories (``SCALE_PURCHASES`` purchases each, :func:`scale_events`) at two sizes
  up to 100k, where a generated year per customer would take hours to replay. The
  difference between the two sizes, per customer, is the marginal memory of a customer
  (what a larger population adds), free of the one-off memory that dominates small
  runs; 1M customers is extrapolated from it, and said to be. The recovery directory
  and a resume run are measured at each size too.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import orjson
import redis

from bench.processes import FlowRun, Pipeline, Stack, run_flow_to_end
from crmscore.doc_codec import encode, load
from crmscore.layout import RedisLayout
from crmscore.replay import publish_lines
from flows.recovery_scan import RecoveryScan, scan
from flows.redis_sink import RedisDocSink, VersionedDoc
from flows.store_marker import claim_store

SAMPLE_KEYS = 1000
TARGET_REDIS_BYTES = 1024
TARGET_STATE_BYTES = 2048
_NEWEST_STATES = """
    SELECT step_id, COUNT(*), SUM(LENGTH(ser_change)) FROM snaps AS s
    WHERE ser_change IS NOT NULL
      AND snap_epoch = (SELECT MAX(snap_epoch) FROM snaps
                        WHERE step_id = s.step_id AND state_key = s.state_key)
    GROUP BY step_id
"""


@dataclass(frozen=True)
class Memory:
    customers: int  # score documents in Redis
    events: int
    score_key_bytes: float  # average MEMORY USAGE
    score_keys_sampled: int
    used_memory_growth: int
    fixed_keys: int  # the flow's keys other than score documents
    fixed_keys_bytes: int
    state_keys: int
    state_bytes: float  # average per customer
    other_state_bytes: int  # every other step's newest snapshots (models, clock, ...)
    snapshot_interval: float
    run: FlowRun
    empty: FlowRun
    recovery_bytes: int
    resume: FlowRun

    def summary(self) -> list[str]:
        return [
            f"| Redis bytes per customer (score document key) "
            f"| **{self.score_key_bytes:,.0f} B** | ≤ {TARGET_REDIS_BYTES:,} B "
            f"| {_met(self.score_key_bytes, TARGET_REDIS_BYTES)} |",
            f"| flow state bytes per customer (snapshot) | **{self.state_bytes:,.0f} B** "
            f"| ≤ {TARGET_STATE_BYTES:,} B | {_met(self.state_bytes, TARGET_STATE_BYTES)} |",
        ]

    def markdown(self) -> list[str]:
        n = self.customers
        rss = self.run.peak_rss_bytes[0]
        empty_rss = self.empty.peak_rss_bytes[0]

        return [
            f"One `crmscore flow --until-end` run (recovery on, snapshot every "
            f"{self.snapshot_interval:g} s) over "
            f"{self.events:,} events of {n:,} customers "
            f"({self.run.seconds:.1f} s), then measured.",
            "",
            "| figure | value | target |",
            "|---|---|---|",
            f"| Redis: score document key, MEMORY USAGE, average of {self.score_keys_sampled:,}"
            f" | **{self.score_key_bytes:,.0f} B** per customer "
            f"| {verdict(self.score_key_bytes, TARGET_REDIS_BYTES)} |",
            f"| Redis: INFO used_memory growth over the run / customers "
            f"| {self.used_memory_growth / n:,.0f} B (includes {self.fixed_keys} fixed keys "
            f"of {self.fixed_keys_bytes / 1024:,.1f} KiB) | |",
            f"| flow state: newest snapshot per customer, average length "
            f"({self.state_keys:,} keys) | **{self.state_bytes:,.0f} B** per customer "
            f"| {verdict(self.state_bytes, TARGET_STATE_BYTES)} |",
            f"| flow state of the other steps (models, clock, timers, offsets) "
            f"| {self.other_state_bytes / 1024:,.1f} KiB in all | |",
            f"| flow peak RSS (VmHWM) | {rss / 2**20:,.1f} MiB (empty run "
            f"{empty_rss / 2**20:,.1f} MiB) | |",
            f"| flow RSS per customer: (peak - empty run's peak) / customers "
            f"| {(rss - empty_rss) / n:,.0f} B (at small N mostly one-off: models, "
            f"caches) | |",
            f"| recovery directory (snapshots) | {self.recovery_bytes / 2**20:,.2f} MiB, "
            f"{self.recovery_bytes / n:,.0f} B per customer | |",
            f"| resume: second run on the recovery dir, no new events, start to exit "
            f"| {self.resume.seconds:.1f} s (empty run {self.empty.seconds:.1f} s; "
            f"peak RSS {self.resume.peak_rss_bytes[0] / 2**20:,.1f} MiB) | |",
            "",
            "These customers have a generated year each (~12 events); a year of 100k or "
            "1M of them cannot be replayed on this machine in a session (~2k events/s). "
            "The flow at 100k customers with short histories, and Redis at 100k and 1M, "
            "are measured below.",
        ]


@dataclass(frozen=True)
class RedisAtScale:
    customers: int
    key_bytes: float  # average MEMORY USAGE of SAMPLE_KEYS score keys
    used_memory_growth: int
    write_seconds: float  # through the flow's sink, batches of SCALE_BATCH

    def summary(self) -> list[str]:
        return [f"| Redis bytes per customer at {self.customers:,} customers "
                f"| **{self.key_bytes:,.0f} B** | ≤ {TARGET_REDIS_BYTES:,} B "
                f"| {_met(self.key_bytes, TARGET_REDIS_BYTES)} |"]

    def row(self) -> str:
        return (f"| {self.customers:,} | **{self.key_bytes:,.0f} B** "
                f"| {self.used_memory_growth / self.customers:,.0f} B "
                f"| {self.used_memory_growth / 2**20:,.0f} MiB "
                f"| {self.customers / self.write_seconds:,.0f} docs/s "
                f"| {verdict(self.key_bytes, TARGET_REDIS_BYTES)} |")


SCALES = (100_000, 1_000_000)
SCALE_BATCH = 5000
SCALE_DB = 1  # the private Redis's database for the clones, flushed after each size


def redis_at_scale(pipeline: Pipeline, customers: int) -> RedisAtScale:
    """``customers`` score documents cloned from ``pipeline``'s, written by the sink."""
    layout = pipeline.layout
    with contextlib.closing(pipeline.stack.redis()) as conn:
        keys = list(conn.scan_iter(match=layout.score_pattern(), count=1000))[:SAMPLE_KEYS]
        templates = [load(cast(bytes, conn.hget(k, "doc"))) for k in keys]
    url = pipeline.stack.redis_url.rsplit("/", 1)[0] + f"/{SCALE_DB}"
    settings = replace(pipeline.settings(), redis_url=url, redis_prefix="scale:")
    scale_layout = RedisLayout(settings.redis_prefix)
    sink = RedisDocSink(settings).build_part("scale", "0", None)
    with contextlib.closing(redis.Redis.from_url(url)) as conn:
        conn.flushdb()
        claim_store(conn, scale_layout)
        before = int(conn.info("memory")["used_memory"])
        seconds = 0.0
        for start in range(0, customers, SCALE_BATCH):
            batch = []
            for n in range(start, min(start + SCALE_BATCH, customers)):
                doc = templates[n % len(templates)]
                cid = f"s-{n:07d}"
                stored = encode(orjson.dumps({**doc, "customer_id": cid}))
                batch.append(VersionedDoc(scale_layout.score(cid), int(doc["version"]), stored,
                                          scale_layout.updates(cid)))
            started = time.monotonic()
            sink.write_batch(batch)
            seconds += time.monotonic() - started
        started = time.monotonic()
        sink.snapshot()  # the last batch confirmed, as at the end of an epoch
        seconds += time.monotonic() - started
        growth = int(conn.info("memory")["used_memory"]) - before
        sampled = [scale_layout.score(f"s-{n:07d}")
                   for n in range(0, customers, max(customers // SAMPLE_KEYS, 1))]
        key_bytes = sum(int(conn.memory_usage(k, samples=0) or 0) for k in sampled)
        conn.flushdb()
    sink.close()
    return RedisAtScale(customers, key_bytes / len(sampled), growth, seconds)


FLOW_SCALES = (20_000, 100_000)
SCALE_PURCHASES = 2
SCALE_DAYS = 60  # the purchases are spread over this many days, ending at SCALE_END
SCALE_END = datetime(2026, 1, 1, tzinfo=UTC)


def scale_events(customers: int, purchases: int = SCALE_PURCHASES,
                 end: datetime = SCALE_END) -> Iterator[bytes]:
    """``purchases`` purchases of each of ``customers`` customers, in time order: the
    customers take turns, one purchase each per round, over the ``SCALE_DAYS`` days
    before ``end``."""
    total = customers * purchases
    start = end - timedelta(days=SCALE_DAYS)
    for k in range(total):
        n = k % customers
        at = start + timedelta(days=SCALE_DAYS) * k / total
        yield orjson.dumps({
            "event_id": f"m{customers}-{k}", "customer_id": f"m-{n:07d}", "type": "purchase",
            "occurred_at": at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "amount": round(5 + (n * 7919 + k) % 200 + 0.99, 2), "currency": "EUR",
        })


@dataclass(frozen=True)
class FlowAtScale:
    customers: int
    events: int
    run: FlowRun
    state_bytes: float  # newest snapshot per customer, average
    recovery_bytes: int
    scan: RecoveryScan  # bytewax's end-of-epoch scan over the state keys held
    resume: FlowRun


def flow_at_scale(stack: Stack, customers: int) -> FlowAtScale:
    """A ``crmscore flow --until-end`` run over :func:`scale_events` of ``customers``, then a
    resume run on its recovery directory."""
    pipeline = Pipeline(stack, f"scale{customers}")
    lines = list(scale_events(customers))
    publish_lines(pipeline.settings(), lines)
    run = run_flow_to_end(pipeline)
    by_step = newest_state_bytes(pipeline.recovery_dir)
    keys, size = next((v for step, v in by_step.items() if step.endswith("customers")), (0, 0))
    recovery_bytes = directory_bytes(pipeline.recovery_dir)
    return FlowAtScale(customers, len(lines), run, size / max(keys, 1), recovery_bytes,
                       scan(pipeline.recovery_dir), run_flow_to_end(pipeline))


def marginal_rss_bytes(results: list[FlowAtScale]) -> float | None:
    """Peak RSS added per customer between the smallest and the largest run."""
    if len(results) < 2:
        return None
    low, high = results[0], results[-1]
    return ((high.run.peak_rss_bytes[0] - low.run.peak_rss_bytes[0])
            / (high.customers - low.customers))


def flow_scale_summary(results: list[FlowAtScale]) -> list[str]:
    marginal = marginal_rss_bytes(results)
    rows = [f"| flow peak RSS at {r.customers:,} customers ({SCALE_PURCHASES} purchases each) "
            f"| **{r.run.peak_rss_bytes[0] / 2**20:,.0f} MiB** | | |" for r in results]
    if marginal is not None:
        rows.append(f"| flow RSS per added customer (marginal, {results[0].customers:,} -> "
                    f"{results[-1].customers:,}) | **{marginal:,.0f} B** | | |")
    return rows


def flow_scale_markdown(results: list[FlowAtScale], empty: FlowRun) -> list[str]:
    """The table of :func:`flow_at_scale` runs, the marginal RSS per customer between the
    smallest and largest, and 1M customers extrapolated from it (when not measured)."""
    empty_rss = empty.peak_rss_bytes[0]
    lines = [
        f"Flow at scale: customers with {SCALE_PURCHASES} purchases each over "
        f"{SCALE_DAYS} days (short histories: a generated year per customer would take "
        f"hours to replay at this scale), one `crmscore flow --until-end` run each "
        f"(recovery on), then a second run on its recovery directory. The second run reads "
        f"no new transactions but is not only a resume: it also reads the wake-ups the "
        f"first wrote after its last read of the timers topic, and re-registers (and "
        f"snapshots) those customers, as a restart after a crash does.",
        "",
        "| customers | events | events/s | peak RSS | (peak - empty run) / customers "
        "| state per customer (snapshot) | recovery directory "
        "| end-of-epoch scan (state keys) | second run (no new transactions) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rss = r.run.peak_rss_bytes[0]
        lines.append(
            f"| {r.customers:,} | {r.events:,} | {r.events / r.run.seconds:,.0f} "
            f"| {rss / 2**20:,.0f} MiB | {(rss - empty_rss) / r.customers:,.0f} B "
            f"| {r.state_bytes:,.0f} B | {r.recovery_bytes / 2**20:,.1f} MiB "
            f"| {r.scan.seconds * 1000:,.0f} ms ({r.scan.keys:,}) "
            f"| {r.resume.seconds:.1f} s, peak RSS {r.resume.peak_rss_bytes[0] / 2**20:,.0f} MiB |")
    measured_1m = results[-1].customers >= 1_000_000  # else extrapolated to it
    marginal = marginal_rss_bytes(results)
    if marginal is not None:
        low, high = results[0], results[-1]
        at_1m = empty_rss + marginal * 1_000_000
        lines += [
            "",
            f"Marginal flow RSS per customer, ({high.customers:,} - {low.customers:,} "
            f"customers' peaks) / {high.customers - low.customers:,}: **{marginal:,.0f} B**.",
        ]
        if not measured_1m:
            lines[-1] += (
                f" At 1,000,000 such customers one process would need about "
                f"**{at_1m / 2**30:,.1f} GiB** (extrapolated: empty run "
                f"{empty_rss / 2**20:,.0f} MiB + 1M x the marginal, not measured; "
                f"`--flow-scales 100000 1000000` measures it). An overestimate once "
                f"the customers outnumber `CRMSCORE_LIVE_CUSTOMERS` (50,000 by "
                f"default): the others rest as their pickled snapshots "
                f"(flows/live_customers.py).")
        lines[-1] += (" Customers with longer histories hold more events each (the "
                      "15k-customer run above).")
    biggest = results[-1].scan
    if biggest.keys and not measured_1m:
        per_key_s = biggest.seconds / biggest.keys
        lines += [
            "",
            f"End-of-epoch scan: when bytewax commits an epoch it scans every state key its "
            f"recovery store holds, touched or not (flows/recovery_scan.py), while new events "
            f"wait. Timed read-only on each run's store: "
            f"{per_key_s * 1e6:.2f} µs per key at {biggest.keys:,} keys, so ~"
            f"{per_key_s * 1_000_000 * 1000:,.0f} ms every snapshot interval at 1,000,000 "
            f"customers (extrapolated), against the default interval of 250 ms.",
        ]
    return lines


def scale_markdown(results: list[RedisAtScale]) -> list[str]:
    return [
        "Redis at scale: the run's stored documents cloned under new customer ids "
        "(re-encoded, so each is a document of its own) and written through the flow's "
        "sink (`RedisDocSink`, compare-and-set script and publish included) into a "
        "database of their own.",
        "",
        "| customers | MEMORY USAGE per score key | INFO used_memory growth per customer "
        "| in all | sink write rate | target |",
        "|---|---|---|---|---|---|",
        *(r.row() for r in results),
    ]


def verdict(value: float, target: int) -> str:
    return f"≤ {target:,} B: {_met(value, target)}"


def _met(value: float, target: int) -> str:
    return "met" if value <= target else "**not met**"


def used_memory(stack: Stack) -> int:
    with contextlib.closing(stack.redis()) as conn:
        return int(conn.info("memory")["used_memory"])


def measure(pipeline: Pipeline, run: FlowRun, empty: FlowRun, used_before: int,
            events: int) -> Memory:
    """Figures of ``pipeline`` after ``run``, its flow run; then times a resume run."""
    growth = used_memory(pipeline.stack) - used_before
    layout = pipeline.layout
    with contextlib.closing(pipeline.stack.redis()) as conn:
        score_keys = list(conn.scan_iter(match=layout.score_pattern(), count=1000))
        sampled = score_keys[:SAMPLE_KEYS]
        score_bytes = sum(int(conn.memory_usage(k, samples=0) or 0) for k in sampled)
        fixed = [k for k in conn.scan_iter(match=f"{layout.prefix}*", count=1000)
                 if not k.startswith(f"{layout.prefix}score:".encode())]
        fixed_bytes = sum(int(conn.memory_usage(k, samples=0) or 0) for k in fixed)
    by_step = newest_state_bytes(pipeline.recovery_dir)
    customers_step = next((step for step in by_step if step.endswith("customers")), "")
    state_keys, state_bytes = by_step.pop(customers_step, (0, 0))
    recovery_bytes = directory_bytes(pipeline.recovery_dir)
    resume = run_flow_to_end(pipeline)
    return Memory(
        len(score_keys), events, score_bytes / max(len(sampled), 1), len(sampled), growth,
        len(fixed), fixed_bytes, state_keys, state_bytes / max(state_keys, 1),
        sum(size for _, size in by_step.values()), pipeline.settings().snapshot_interval,
        run, empty, recovery_bytes, resume,
    )


def newest_state_bytes(recovery_dir: Path) -> dict[str, tuple[int, int]]:
    """Per step: the keys with state in the newest snapshots and their total bytes."""
    by_step: dict[str, tuple[int, int]] = {}
    for db in sorted(recovery_dir.glob("*.sqlite3")):
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            for step, keys, size in conn.execute(_NEWEST_STATES):
                old_keys, old_size = by_step.get(step, (0, 0))
                by_step[step] = (old_keys + keys, old_size + size)
    return by_step


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
