"""``crmscore replay``: publish a JSONL or CSV file to the transactions topic.

A JSONL line is published as it is, byte for byte, even when it is not JSON: the
flow's dead-letter topic is where bad lines belong, and tests need them there.
The key is the line's ``customer_id`` when the line is a JSON object with a string
``customer_id``, else no key. A CSV row becomes a JSON event through a column
mapping (see ``--help``); a cell that cannot be converted is published as its raw
string, so the flow rejects the event with a reason that names the field.

>>> customer_key(b'{"customer_id": "c-1", "amount": 3}'), customer_key(b"[1]")
(b'c-1', None)
"""

from __future__ import annotations

import argparse
import csv
import itertools
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from tqdm import tqdm

from crmscore.clients import ensure_topics, producer
from crmscore.settings import Settings

POLL_EVERY = 1000  # serve delivery reports (and update the progress bar) this often
FLUSH_TIMEOUT = 60.0
EVENT_FIELDS = (
    "event_id", "customer_id", "occurred_at", "type", "amount", "currency",
    "order_id", "channel", "session_id",
)  # fmt: skip
REFUND_VALUES = "refund,return,returned,cancel,cancelled,canceled,cancellation"
PURCHASE_VALUES = "purchase,sale,order,buy"


class ReplayError(RuntimeError):
    """Events could not be read or were not all delivered."""


def customer_key(value: bytes) -> bytes | None:
    """The Kafka key of a line: its string ``customer_id``, or None."""
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    customer = obj.get("customer_id") if isinstance(obj, dict) else None
    return customer.encode() if isinstance(customer, str) else None


class TokenBucket:
    """Allows ``rate`` events a second on average, in bursts of at most ``burst``.

    Sleeps only when the bucket is empty; time overslept refills it, so the long-run
    rate stays exact even though ``time.sleep`` overshoots by tens of microseconds.
    """

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if not rate > 0:
            raise ValueError(f"rate: expected events per second > 0, got {rate}")
        self.rate = rate
        self.capacity = burst if burst is not None else max(1.0, rate / 100)  # 10 ms
        self.tokens = 1.0
        self.last = time.monotonic()

    def take(self) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
            self.last = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return
            time.sleep((1.0 - self.tokens) / self.rate)


@dataclass
class DeliveryReport:
    """Counts delivery reports; keeps the first error to explain a failure."""

    delivered: int = 0
    failed: int = 0
    first_error: KafkaError | None = None

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self.delivered += 1
            return
        self.failed += 1
        if self.first_error is None:
            self.first_error = err


def publish_lines(
    settings: Settings,
    lines: Iterable[bytes],
    rate: float | None = None,
    limit: int | None = None,
    progress: bool = False,
    total: int | None = None,
    kafka: Producer | None = None,
) -> int:
    """Publish each line as one message keyed by :func:`customer_key`; returns how many
    were delivered. Raises :class:`ReplayError` unless every message was delivered.

    ``kafka`` is a producer to reuse: a new one spends its first ~second connecting and
    getting its idempotent producer id, with the first messages waiting in its queue."""
    topic = settings.transactions_topic
    try:
        ensure_topics(settings, [topic], timeout=10.0)
    except (KafkaException, RuntimeError) as exc:
        raise ReplayError(
            f"could not find or create topic {topic!r} at {settings.kafka_bootstrap}: {exc}"
        ) from exc
    kafka = kafka or producer(settings)
    report = DeliveryReport()
    bucket = TokenBucket(rate) if rate else None
    sent = 0
    with tqdm(total=total, disable=not progress, unit="ev", unit_scale=True) as bar:
        for value in itertools.islice(lines, limit):
            if bucket is not None:
                bucket.take()
            _produce(kafka, topic, customer_key(value), value, report)
            sent += 1
            if sent % POLL_EVERY == 0:
                kafka.poll(0)
                bar.update(POLL_EVERY)
                if report.failed:
                    break
        bar.update(sent % POLL_EVERY)
        undelivered = kafka.flush(FLUSH_TIMEOUT)
    if report.failed:
        raise ReplayError(
            f"{report.failed} of {sent} events were not delivered to topic {topic!r} "
            f"at {settings.kafka_bootstrap}; first error: {report.first_error}"
        )
    if undelivered:
        raise ReplayError(
            f"{undelivered} of {sent} events were still undelivered to topic {topic!r} "
            f"after a {FLUSH_TIMEOUT:g} s flush"
        )
    return report.delivered


def _produce(
    kafka: Producer, topic: str, key: bytes | None, value: bytes, report: DeliveryReport
) -> None:
    """Produce one message, waiting for room while the local queue is full."""
    while True:
        try:
            kafka.produce(topic, value, key, on_delivery=report)
            return
        except BufferError:
            kafka.poll(0.05)
        except KafkaException as exc:  # e.g. an event over the producer's message size
            raise ReplayError(f"cannot publish an event of {len(value):,} bytes "
                              f"(key {key!r:.60}): {exc}") from exc


# --- reading files -------------------------------------------------------------------


def jsonl_lines(path: Path) -> Iterator[bytes]:
    """The lines of a file without their ``\\n``, bytes unchanged; empty lines skipped."""
    with open(path, "rb") as f:
        for line in f:
            value = line[:-1] if line.endswith(b"\n") else line
            if value:
                yield value


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


@dataclass(frozen=True)
class CsvMapping:
    """How CSV columns become event fields.

    ``columns`` maps a field to a column, or to ``A*B``, the product of two columns
    (e.g. ``amount=Quantity*UnitPrice``). Without a type column, a negative amount is a
    refund of its absolute value. Naive times are taken as UTC.
    """

    columns: dict[str, str]
    type_column: str | None = None
    refund_values: frozenset[str] = frozenset(REFUND_VALUES.split(","))
    purchase_values: frozenset[str] = frozenset(PURCHASE_VALUES.split(","))
    currency: str = "EUR"
    time_format: str | None = None
    source: str = "csv"  # event ids default to "<source>:<row number>"

    def event(self, row: dict[str, str], row_no: int) -> dict[str, Any]:
        """The event for one row; fields that do not convert keep their raw text."""
        cell = self._cells(row)
        event: dict[str, Any] = {"event_id": cell("event_id") or f"{self.source}:{row_no}"}
        for name in ("customer_id", "occurred_at", "type", "amount", "currency"):
            event[name] = cell(name)
        event["occurred_at"] = self._time(event["occurred_at"])
        event["amount"] = self._amount(row)
        event["type"] = self._type(event["type"], event["amount"])
        if isinstance(event["amount"], float) and event["amount"] < 0:
            if event["type"] == "refund":
                event["amount"] = -event["amount"]
        event["currency"] = event["currency"] or self.currency
        for name in ("order_id", "channel", "session_id"):
            event[name] = cell(name)
        return {k: v for k, v in event.items() if v not in (None, "")}

    def _cells(self, row: dict[str, str]) -> Callable[[str], str | None]:
        def cell(name: str) -> str | None:
            column = self.type_column if name == "type" else self.columns.get(name)
            if column is None or "*" in column:
                return None
            value = row.get(column)
            return value.strip() if value is not None else None

        return cell

    def _amount(self, row: dict[str, str]) -> float | str | None:
        column = self.columns.get("amount")
        if column is None:
            return None
        raw = [(row.get(c) or "").strip() for c in column.split("*")]
        try:
            product = 1.0
            for text in raw:
                product *= float(text)
        except ValueError:
            return "*".join(raw)
        return round(product, 6)

    def _type(self, raw: str | None, amount: float | str | None) -> str | None:
        if raw is None:
            negative = isinstance(amount, float) and amount < 0
            return "refund" if negative else "purchase"
        word = raw.lower()
        if word in self.refund_values:
            return "refund"
        if word in self.purchase_values:
            return "purchase"
        return raw  # the flow rejects it, naming the value

    def _time(self, raw: str | None) -> str | None:
        if not raw:
            return raw
        try:
            t = (
                datetime.strptime(raw, self.time_format)
                if self.time_format
                else datetime.fromisoformat(raw)
            )
        except ValueError:
            return raw
        t = t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
        return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def csv_lines(path: Path, mapping: CsvMapping, encoding: str = "utf-8-sig") -> Iterator[bytes]:
    """One JSON event per CSV row (see :class:`CsvMapping`)."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, newline="", encoding=encoding, errors="replace") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        header = reader.fieldnames or []
        check_columns(mapping, header, path)
        for row_no, row in enumerate(reader, start=1):
            yield orjson.dumps(mapping.event(row, row_no))


def check_columns(mapping: CsvMapping, header: Sequence[str], path: Path) -> None:
    wanted = [c for col in mapping.columns.values() for c in col.split("*")]
    wanted += [mapping.type_column] if mapping.type_column else []
    missing = [c for c in wanted if c not in header]
    if missing:
        raise ReplayError(
            f"{path}: no column {', '.join(map(repr, missing))}; columns: {list(header)}"
        )
    if "customer_id" not in mapping.columns:
        raise ReplayError(f"{path}: no customer_id column; map one with --map customer_id=COL")


def parse_map(specs: list[str]) -> dict[str, str]:
    """``["event_id=InvoiceNo,amount=Quantity*UnitPrice"]`` -> field -> column."""
    columns: dict[str, str] = {}
    for spec in specs:
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, column = part.partition("=")
            if not sep or not column:
                raise ReplayError(f"--map: expected FIELD=COLUMN, got {part!r}")
            if name not in EVENT_FIELDS:
                fields = ", ".join(EVENT_FIELDS)
                raise ReplayError(f"--map: unknown field {name!r}; fields: {fields}")
            columns[name] = column
    return columns


def csv_header(path: Path, encoding: str) -> list[str]:
    with open(path, newline="", encoding=encoding, errors="replace") as f:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        return next(csv.reader(f, delimiter=delimiter), [])


# --- the command ---------------------------------------------------------------------

EPILOG = """\
CSV mapping: each row becomes one JSON event.
  --map FIELD=COLUMN[,FIELD=COLUMN...] (repeatable), fields:
    {fields}
  Columns named like a field are mapped without --map. amount may be the product of two
  columns (amount=Quantity*UnitPrice). The type comes from --type-column when given,
  else a negative amount is a refund of its absolute value. event_id defaults to
  FILESTEM:ROW. Times are ISO 8601 unless --time-format; times without an offset are UTC.
  Empty cells are left out; cells that do not convert are published as text, so the
  flow's dead-letter topic receives the event with a reason naming the field.

Example (UCI Online Retail):
  crmscore replay online_retail.csv --currency GBP --time-format '%m/%d/%Y %H:%M' \\
    --map customer_id=CustomerID,occurred_at=InvoiceDate,order_id=InvoiceNo \\
    --map amount=Quantity*UnitPrice
"""


def configure(parser: argparse.ArgumentParser) -> None:
    from crmscore.cli import add_setting_flags

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG.format(fields=", ".join(EVENT_FIELDS))
    parser.add_argument("file", type=Path, metavar="FILE", help="a .jsonl or .csv file")
    parser.add_argument(
        "--format", choices=("jsonl", "csv"), help="file format (default: from the extension)"
    )
    parser.add_argument(
        "--rate",
        type=_positive(float),
        metavar="EVENTS_PER_SEC",
        help="publish at most this many events a second (default: unlimited)",
    )
    parser.add_argument(
        "--limit", type=_positive(int), metavar="N", help="publish only the first N events"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    csv_flags = parser.add_argument_group("CSV mapping")
    csv_flags.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="FIELD=COLUMN,...",
        help="map event fields to CSV columns (see below)",
    )
    csv_flags.add_argument(
        "--type-column",
        metavar="COLUMN",
        help=f"column with the event type: {PURCHASE_VALUES} or a refund value (any case)",
    )
    csv_flags.add_argument(
        "--refund-values",
        default=REFUND_VALUES,
        metavar="V,V",
        help=f"type-column values meaning a refund (default {REFUND_VALUES})",
    )
    csv_flags.add_argument(
        "--currency",
        default="EUR",
        metavar="CODE",
        help="currency of rows without a currency column (default EUR)",
    )
    csv_flags.add_argument(
        "--time-format",
        metavar="STRPTIME",
        help="format of the time column, e.g. '%%d/%%m/%%Y %%H:%%M' "
        "(default: ISO 8601); times without an offset are UTC",
    )
    csv_flags.add_argument("--encoding", default="utf-8-sig", help="CSV encoding (default utf-8)")
    add_setting_flags(parser, "kafka_bootstrap", "transactions_topic", "topic_partitions")


def run(args: argparse.Namespace, settings: Settings) -> int:
    path: Path = args.file
    try:
        lines, total = _open(args, path)
        progress = not args.quiet and sys.stderr.isatty()
        began = time.perf_counter()
        published = publish_lines(settings, lines, args.rate, args.limit, progress, total)
    except (ReplayError, OSError) as exc:
        print(f"crmscore replay: {exc}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - began
    print(
        f"published {published} events from {path} to {settings.transactions_topic} in "
        f"{seconds:.1f} s ({published / max(seconds, 1e-9):.0f} events/s)"
    )
    return 0


def _open(args: argparse.Namespace, path: Path) -> tuple[Iterator[bytes], int | None]:
    """The file's messages and, when cheap to know, how many there will be."""
    if not path.is_file():
        raise ReplayError(f"{path}: no such file")
    fmt = args.format or {".csv": "csv", ".tsv": "csv"}.get(path.suffix.lower())
    fmt = fmt or ("jsonl" if path.suffix.lower() in (".jsonl", ".ndjson", ".json") else None)
    if fmt is None:
        raise ReplayError(f"{path}: cannot tell the format from {path.suffix!r}; use --format")
    if fmt == "jsonl":
        total = count_lines(path) if not args.quiet and sys.stderr.isatty() else None
        return jsonl_lines(path), min(total, args.limit or total) if total else None
    columns = {f: f for f in csv_header(path, args.encoding) if f in EVENT_FIELDS}
    columns.update(parse_map(args.map))
    type_column = args.type_column or columns.pop("type", None)
    mapping = CsvMapping(
        columns=columns,
        type_column=type_column,
        refund_values=frozenset(v.strip().lower() for v in args.refund_values.split(",")),
        currency=args.currency,
        time_format=args.time_format,
        source=path.stem,
    )
    return csv_lines(path, mapping, args.encoding), None


def _positive(kind: type[float] | type[int]) -> Callable[[str], float]:
    def convert(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
        return value

    return convert
