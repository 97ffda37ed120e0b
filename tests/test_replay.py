"""``crmscore replay`` against the real (tansu) broker from the session fixture.

Everything published is consumed back and compared byte for byte; the end of the
topic is known from partition-EOF events, never from watermarks.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import jsonschema_rs
import orjson
import pytest
from confluent_kafka import Consumer, KafkaError, TopicPartition

import schemas
from crmscore import cli
from crmscore.embedded import Server
from crmscore.generator import GeneratorConfig, generate, write
from crmscore.replay import TokenBucket, customer_key, publish_lines
from crmscore.settings import Settings

PARTITIONS = 3
VALIDATOR = jsonschema_rs.validator_for(schemas.load("transaction.v1"), validate_formats=True)


def settings_for(broker: Server, topic: str) -> Settings:
    return Settings(kafka_bootstrap=broker.address, transactions_topic=topic,
                    topic_partitions=PARTITIONS)  # fmt: skip


def consume_all(settings: Settings, timeout: float = 15.0) -> list[tuple[bytes | None, bytes]]:
    """(key, value) of every message, partition by partition in offset order."""
    consumer = Consumer({
        "bootstrap.servers": settings.kafka_bootstrap,
        "group.id": f"test-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "fetch.wait.max.ms": "10",
        "session.timeout.ms": "6000",
    })  # fmt: skip
    topic = settings.transactions_topic
    consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    by_partition: dict[int, list[tuple[bytes | None, bytes]]] = defaultdict(list)
    at_end: set[int] = set()
    deadline = time.monotonic() + timeout
    try:
        while len(at_end) < PARTITIONS:
            assert time.monotonic() < deadline, f"partitions at end: {sorted(at_end)}"
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            if msg.error():
                assert msg.error().code() == KafkaError._PARTITION_EOF, msg.error()
                at_end.add(msg.partition())
                continue
            by_partition[msg.partition()].append((msg.key(), msg.value()))
    finally:
        consumer.close()
    return [kv for p in sorted(by_partition) for kv in by_partition[p]]


def test_jsonl_arrives_byte_for_byte_with_keys(broker: Server, unique: str, tmp_path: Path) -> None:
    gen = generate(GeneratorConfig(customers=30, days=60, seed=5, malformed_rate=0.1))
    path = tmp_path / "events.jsonl"
    write(gen, path, tmp_path / "events.truth.jsonl")
    lines = path.read_bytes().split(b"\n")[:-1]
    kinds = {r["malformed"]["variant"] for r in gen.truth() if "malformed" in r}
    assert {"binary", "garbage", "truncated", "array"} <= kinds

    topic = f"tx-{unique}"
    argv = ["replay", str(path), "--quiet", "--kafka-bootstrap", broker.address,
            "--transactions-topic", topic, "--topic-partitions", str(PARTITIONS)]  # fmt: skip
    assert cli.main(argv) == 0

    received = consume_all(settings_for(broker, topic))
    assert Counter(received) == Counter((customer_key(line), line) for line in lines)
    # Each customer's lines arrive in file order (one key, one partition).
    for key in {k for k, _ in received if k is not None}:
        in_file = [line for line in lines if customer_key(line) == key]
        assert [v for k, v in received if k == key] == in_file
    keys = {k for k, _ in received}
    assert None in keys and b"c-000000" in keys


def test_csv_with_mapping_becomes_valid_events(broker: Server, unique: str, tmp_path: Path) -> None:
    path = tmp_path / "retail.csv"
    path.write_text(
        "InvoiceNo,StockCode,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"
        "536365,85123A,6,12/1/2010 8:26,2.55,17850,United Kingdom\n"
        "536366,22633,2,12/1/2010 8:28,1.85,17850,United Kingdom\n"
        "C536379,D,-1,12/1/2010 9:41,27.5,14527,United Kingdom\n"
        "536380,22961,abc,12/1/2010 9:41,1.45,14527,United Kingdom\n"
        "536381,22961,3,12/1/2010 9:45,1.45,,United Kingdom\n"
    )
    topic = f"csv-{unique}"
    argv = ["replay", str(path), "--quiet", "--kafka-bootstrap", broker.address,
            "--transactions-topic", topic, "--topic-partitions", str(PARTITIONS),
            "--map", "customer_id=CustomerID,occurred_at=InvoiceDate,order_id=InvoiceNo",
            "--map", "amount=Quantity*UnitPrice", "--time-format", "%m/%d/%Y %H:%M",
            "--currency", "GBP"]  # fmt: skip
    assert cli.main(argv) == 0

    received = {orjson.loads(v)["event_id"]: (k, orjson.loads(v)) for k, v in consume_all(
        settings_for(broker, topic))}  # fmt: skip
    assert sorted(received) == [f"retail:{n}" for n in range(1, 6)]
    key, first = received["retail:1"]
    assert key == b"17850"
    assert first == {  # one row: amount = Quantity * UnitPrice
        "event_id": "retail:1", "customer_id": "17850", "type": "purchase", "amount": 15.3,
        "occurred_at": "2010-12-01T08:26:00.000000Z", "currency": "GBP", "order_id": "536365",
    }  # fmt: skip
    _, refund = received["retail:3"]
    assert (refund["type"], refund["amount"]) == ("refund", 27.5)
    for event_id in ("retail:1", "retail:2", "retail:3"):
        assert VALIDATOR.is_valid(received[event_id][1])
    # Rows that cannot be mapped still go out, for the dead-letter topic to explain.
    assert received["retail:4"][1]["amount"] == "abc*1.45"
    assert not VALIDATOR.is_valid(received["retail:4"][1])
    assert received["retail:5"][0] is None
    assert "customer_id" not in received["retail:5"][1]


def test_rate_limit_is_accurate(broker: Server, unique: str) -> None:
    settings = settings_for(broker, f"rate-{unique}")
    publish_lines(settings, [b"warm-up"])  # topic creation is not part of the measure
    lines = [orjson.dumps({"customer_id": f"c-{i % 7}", "n": i}) for i in range(3000)]
    began = time.perf_counter()
    assert publish_lines(settings, lines, rate=3000) == 3000
    assert 0.9 <= time.perf_counter() - began <= 1.5
    assert len(consume_all(settings)) == 3001


def test_limit_publishes_only_the_first_lines(broker: Server, unique: str) -> None:
    settings = settings_for(broker, f"limit-{unique}")
    lines = [b'{"customer_id": "c-1", "n": %d}' % i for i in range(50)]
    assert publish_lines(settings, iter(lines), limit=20) == 20
    assert [v for _, v in consume_all(settings)] == lines[:20]


@pytest.mark.slow
def test_unreachable_broker_fails_with_a_clear_message(tmp_path: Path, capsys) -> None:
    path = tmp_path / "one.jsonl"
    path.write_bytes(b'{"customer_id": "c-1"}\n')
    argv = ["replay", str(path), "--quiet", "--kafka-bootstrap", "127.0.0.1:1"]
    started = time.monotonic()
    assert cli.main(argv) == 1
    assert "127.0.0.1:1" in capsys.readouterr().err
    assert time.monotonic() - started < 20


def test_token_bucket_keeps_the_average_rate() -> None:
    bucket = TokenBucket(5000)
    began = time.perf_counter()
    for _ in range(2500):
        bucket.take()
    assert time.perf_counter() - began == pytest.approx(0.5, rel=0.15)
