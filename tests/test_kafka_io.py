"""The flow's own Kafka input and output (flows/kafka_source.py, flows/kafka_sink.py),
against the real broker: the sink hands messages over without waiting and answers for
them at the end of the epoch; the source reads everything without waiting on an empty
partition."""

from __future__ import annotations

import dataclasses

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, run_main

from crmscore.clients import CONSUMER_DEFAULTS, ensure_topics, producer
from crmscore.embedded import Server
from crmscore.settings import Settings
from flows.kafka_sink import KafkaTopicSink
from flows.kafka_source import NoWaitKafkaSource, PartitionEnd, kafka_input
from tests.pipeline import read_topic


def settings_for(broker: Server, **changes: str) -> Settings:
    return dataclasses.replace(Settings.from_env({}), kafka_bootstrap=broker.address, **changes)


def test_sink_writes_without_waiting_and_answers_for_it_at_the_epoch(broker, unique):
    settings = settings_for(broker, topic_partitions=1)
    topic = f"{unique}-sink"
    ensure_topics(settings, [topic])
    part = KafkaTopicSink(settings, topic).build_part("out", "0", None)
    part.write_batch([(b"c-1", b"one"), (None, b"two")])
    part.snapshot()  # the end of the epoch: both acknowledged
    assert [(k, v) for _, _, k, v in read_topic(broker.address, topic, 1)] == [
        (b"c-1", b"one"), (None, b"two")]
    part.close()


def test_sink_failure_stops_the_epoch_not_the_write(unique):
    # No broker on that port: deliveries time out after a second.
    settings = dataclasses.replace(Settings.from_env({}), kafka_bootstrap="127.0.0.1:1",
                                   kafka_config="message.timeout.ms=1000")
    part = KafkaTopicSink(settings, f"{unique}-nowhere").build_part("out", "0", None)
    part.write_batch([(b"c-1", b"lost?")])  # returns at once: nothing is waited for here
    with pytest.raises(RuntimeError, match=r"nowhere.*1 failed"):
        part.snapshot()  # ... but the epoch cannot be committed with it undelivered


def test_source_reads_every_partition_to_the_end(broker, unique):
    settings = settings_for(broker, topic_partitions=3)
    topics = [f"{unique}-a", f"{unique}-b"]  # the second stays empty, like idle wake-ups
    ensure_topics(settings, topics)
    kafka = producer(settings)
    for n in range(30):
        kafka.produce(topics[0], value=str(n).encode(), partition=n % 3)
    assert kafka.flush(10) == 0

    flow = Dataflow("source_test")
    inp = kafka_input("kafka_in", flow, brokers=[broker.address], topics=topics, tail=False,
                      add_config={}, consumer_config=dict(CONSUMER_DEFAULTS),
                      topic_config={topics[1]: {"fetch.wait.max.ms": "100"}})
    got: list[bytes] = []
    ends: list[PartitionEnd] = []
    op.output("out", op.map("value", inp.oks, lambda m: m.value), TestingSink(got))
    op.output("ends", inp.ends, TestingSink(ends))
    errors: list[object] = []
    op.output("errs", inp.errs, TestingSink(errors))
    run_main(flow)
    assert sorted(int(v) for v in got) == list(range(30))
    # Each partition's end, once read: the offset after its last message (ten each), or
    # 0 for the empty topic's, which had nothing to read. Ends are not errors.
    assert sorted(ends) == sorted(
        [PartitionEnd(topics[0], p, 10, False) for p in range(3)]
        + [PartitionEnd(topics[1], p, 0, True) for p in range(3)])
    assert errors == []


def test_source_gives_a_topics_partitions_their_own_settings():
    source = NoWaitKafkaSource(["127.0.0.1:9"], ["tx", "tx-timers"], True,
                               add_config={"security.protocol": "SSL"},
                               consumer_config={"fetch.wait.max.ms": "10", "a": "1"},
                               topic_config={"tx-timers": {"fetch.wait.max.ms": "100"}})
    eof = {"enable.partition.eof": "true"}  # ends of partitions are always reported
    assert source.config_for("3-tx") == {
        "fetch.wait.max.ms": "10", "a": "1", "security.protocol": "SSL", **eof}
    assert source.config_for("0-tx-timers") == {
        "fetch.wait.max.ms": "100", "a": "1", "security.protocol": "SSL", **eof}
    # The user's own settings (CRMSCORE_KAFKA_CONFIG) win.
    mine = NoWaitKafkaSource(["127.0.0.1:9"], ["tx"], True, add_config={"a": "2"},
                             consumer_config={"a": "1"}, topic_config={"tx": {"a": "3"}})
    assert mine.config_for("0-tx") == {"a": "2", **eof}


class BufferedConsumer:
    """What librdkafka has buffered, handed out once (the part of a Consumer the source
    calls)."""

    def __init__(self, messages: list[object]) -> None:
        self.messages = messages

    def consume(self, num_messages: int, timeout: float) -> list[object]:
        out, self.messages = self.messages, []
        return out


def test_source_refuses_a_record_it_cannot_read_and_drops_an_error_of_the_client(caplog):
    """A record's error has an offset: passed on (the flow dead-letters and counts it). The
    client's own (all brokers down) has none: logged and dropped, librdkafka retries it;
    a fatal one stops the flow."""
    from confluent_kafka import KafkaError, KafkaException, Message

    from flows.kafka_source import _NoWaitConsumer

    record = Message(topic="tx", partition=0, offset=7, value=b"{}")
    corrupt = Message(topic="tx", partition=0, offset=8,
                      error=KafkaError(KafkaError._BAD_MSG, "bad CRC"))
    down = Message(topic=None, partition=-1, offset=-1001,
                   error=KafkaError(KafkaError._ALL_BROKERS_DOWN, "all brokers down"))
    consumer = _NoWaitConsumer(BufferedConsumer([record, down, corrupt]), tail=True)  # type: ignore[arg-type]
    assert consumer.consume(10, 0) == [record, corrupt]
    assert "all brokers down" in caplog.text

    fenced = Message(topic=None, partition=-1, offset=-1001,
                     error=KafkaError(KafkaError._FENCED, "fenced", fatal=True))
    consumer = _NoWaitConsumer(BufferedConsumer([fenced]), tail=True)  # type: ignore[arg-type]
    with pytest.raises(KafkaException, match="fenced"):
        consumer.consume(10, 0)
