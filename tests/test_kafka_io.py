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
from confluent_kafka import TopicPartition

import flows.kafka_source
from crmscore.clients import CONSUMER_DEFAULTS, ensure_topics, producer
from crmscore.embedded import Server
from crmscore.settings import Settings
from flows.kafka_sink import KafkaTopicSink
from flows.kafka_source import PartitionEnd, SharedConsumer, SharedKafkaSource, kafka_input
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


def test_source_reads_every_partition_to_the_end_through_one_consumer(broker, unique,
                                                                      monkeypatch):
    made: list[dict[str, object]] = []

    class CountedConsumer(flows.kafka_source.Consumer):  # type: ignore[misc]
        def __init__(self, config: dict[str, object]) -> None:
            made.append(config)
            super().__init__(config)

    monkeypatch.setattr(flows.kafka_source, "Consumer", CountedConsumer)
    settings = settings_for(broker, topic_partitions=3)
    topics = [f"{unique}-a", f"{unique}-b"]  # the second stays empty, like idle wake-ups
    ensure_topics(settings, topics)
    kafka = producer(settings)
    for n in range(30):
        kafka.produce(topics[0], value=str(n).encode(), partition=n % 3)
    assert kafka.flush(10) == 0

    flow = Dataflow("source_test")
    inp = kafka_input("kafka_in", flow, brokers=[broker.address], topics=topics, tail=False,
                      add_config={}, consumer_config=dict(CONSUMER_DEFAULTS))
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
    # One consumer read all six partitions (bytewax's source makes one per partition,
    # each fetching from the broker on its own).
    assert len(made) == 1


def test_source_settings_put_the_users_last():
    source = SharedKafkaSource(["127.0.0.1:9"], ["tx", "tx-timers"], True,
                               add_config={"security.protocol": "SSL", "a": "2"},
                               consumer_config={"fetch.wait.max.ms": "10", "a": "1"})
    settings = source.consumer_settings({"fetch.wait.max.ms": "10", "a": "1"})
    # The user's own settings (CRMSCORE_KAFKA_CONFIG) win; ends of partitions are always
    # reported (the stream clock needs them).
    assert settings["a"] == "2" and settings["security.protocol"] == "SSL"
    assert settings["fetch.wait.max.ms"] == "10"
    assert settings["enable.partition.eof"] == "true"
    assert settings["bootstrap.servers"] == "127.0.0.1:9"


class BufferedConsumer:
    """What librdkafka has buffered, handed out once (the part of a Consumer the source
    calls)."""

    def __init__(self, messages: list[object]) -> None:
        self.messages = messages
        self.paused: list[int] = []  # partitions, in the order paused (negative: resumed)

    def incremental_assign(self, partitions: list[object]) -> None:
        pass

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused += [tp.partition for tp in partitions]

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.paused += [-tp.partition for tp in partitions]

    def consume(self, num_messages: int, timeout: float) -> list[object]:
        out, self.messages = self.messages, []
        return out


def test_source_refuses_a_record_it_cannot_read_and_drops_an_error_of_the_client(caplog):
    """A record's error has an offset: passed on (the flow dead-letters and counts it). The
    client's own (all brokers down) has none: logged and dropped, librdkafka retries it;
    a fatal one stops the flow."""
    from confluent_kafka import KafkaError, KafkaException, Message

    from flows.kafka_source import PartitionReader

    record = Message(topic="tx", partition=0, offset=7, value=b"{}")
    corrupt = Message(topic="tx", partition=0, offset=8,
                      error=KafkaError(KafkaError._BAD_MSG, "bad CRC"))
    down = Message(topic=None, partition=-1, offset=-1001,
                   error=KafkaError(KafkaError._ALL_BROKERS_DOWN, "all brokers down"))
    other = Message(topic="tx", partition=1, offset=3, value=b"{}")
    consumer = SharedConsumer({}, lambda _: BufferedConsumer([record, down, other, corrupt]))
    reader = PartitionReader(consumer, "tx", 0, 7, tail=True, batch_size=100)
    neighbour = PartitionReader(consumer, "tx", 1, 3, tail=True, batch_size=100)
    message, refused = reader.next_batch()
    assert message.offset == 7  # type: ignore[union-attr]
    assert refused.msg.offset == 8  # type: ignore[union-attr]
    assert refused.err.code() == KafkaError._BAD_MSG  # type: ignore[union-attr]
    assert reader.snapshot() == 9  # the next offset to read
    assert "all brokers down" in caplog.text
    # Fetched with the other partition's messages, kept for its own reader.
    assert [m.value for m in neighbour.next_batch()] == [b"{}"]  # type: ignore[union-attr]

    fenced = Message(topic=None, partition=-1, offset=-1001,
                     error=KafkaError(KafkaError._FENCED, "fenced", fatal=True))
    consumer = SharedConsumer({}, lambda _: BufferedConsumer([fenced]))
    reader = PartitionReader(consumer, "tx", 0, 0, tail=True, batch_size=100)
    with pytest.raises(KafkaException, match="fenced"):
        reader.next_batch()


def test_a_busy_partitions_queue_pauses_its_fetching_until_its_reader_catches_up():
    """An idle partition's reader fetches for every partition: the busy one's messages wait
    in its queue, which pauses its fetching when long and resumes it once half read."""
    from confluent_kafka import Message

    from flows.kafka_source import QUEUE_PAUSE, PartitionReader

    backlog = [Message(topic="tx", partition=1, offset=n, value=b"{}")
               for n in range(QUEUE_PAUSE + 1000)]
    fake = BufferedConsumer(backlog)
    consumer = SharedConsumer({}, lambda _: fake)
    idle = PartitionReader(consumer, "tx", 0, 0, tail=True, batch_size=1000)
    busy = PartitionReader(consumer, "tx", 1, 0, tail=True, batch_size=1000)
    assert idle.next_batch() == []
    assert fake.paused == [1]
    read = []
    while batch := busy.next_batch():
        read += [m.offset for m in batch]  # type: ignore[union-attr]
        if len(read) == 3000:  # 3,000 of 6,000 left: not yet half of the pause length
            assert fake.paused == [1]
    assert fake.paused == [1, -1]  # resumed once fewer than QUEUE_PAUSE / 2 waited
    assert read == list(range(QUEUE_PAUSE + 1000))
    assert busy.snapshot() == QUEUE_PAUSE + 1000
