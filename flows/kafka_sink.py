"""A bytewax sink that writes ``(key, value)`` items to one Kafka topic, losing nothing.

Writes do not wait for Kafka: ``write_batch`` hands the messages to the producer and
returns. The wait is at the end of each epoch instead: bytewax snapshots every sink
partition written in the epoch before it commits the epoch, and the snapshot flushes the
producer. So an epoch is committed only once every message it wrote is acknowledged; if
Kafka refuses one, the flow stops and, on restart, replays from its last commit
(at-least-once: consumers see a crash's repeats and drop them by their ids). Waiting per
batch instead held the whole worker for a broker round trip in every batch that wrote.

The flow writes dead letters, alerts and its own event-time wake-ups with it, each process
through a partition of its own (flows/own_sink.py). The producer picks the Kafka partition
by the message key; a customer's alerts all come from the process that holds the customer.
"""

from __future__ import annotations

from bytewax.outputs import StatefulSinkPartition
from confluent_kafka import KafkaError, Message, Producer

from crmscore.clients import producer
from crmscore.settings import Settings
from flows.kafka_source import SINGLE_PROCESS, ProcessShare
from flows.own_sink import OwnPartitionSink

KeyValue = tuple[bytes | None, bytes]
FLUSH_TIMEOUT_S = 60.0


class KafkaTopicSink(OwnPartitionSink[KeyValue]):
    def __init__(self, settings: Settings, topic: str,
                 share: ProcessShare = SINGLE_PROCESS) -> None:
        super().__init__(share)
        self._settings = settings
        self._topic = topic

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _TopicPartition:
        return _TopicPartition(self._settings, self._topic)


class _TopicPartition(StatefulSinkPartition[KeyValue, None]):
    """One sink partition; its producer is made by the first write (most partitions of a
    process are never written: see flows/own_sink.py SINK_PARTS)."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self._settings = settings
        self._topic = topic
        self._producer_: Producer | None = None
        self._failures: list[str] = []

    @property
    def _producer(self) -> Producer:
        if self._producer_ is None:
            self._producer_ = producer(self._settings)
        return self._producer_

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._failures.append(str(err))

    def write_batch(self, items: list[KeyValue]) -> None:
        for key, value in items:
            while True:
                try:
                    self._producer.produce(
                        self._topic, value=value, key=key, on_delivery=self._on_delivery
                    )
                    break
                except BufferError:  # the local queue is full: let it drain
                    self._producer.poll(0.1)
        self._producer.poll(0)  # serve delivery reports: fail early on a refusal
        self._raise_failures(0)

    def snapshot(self) -> None:
        """The end of an epoch: return once every message is acknowledged."""
        if self._producer_ is not None:
            self._raise_failures(self._producer_.flush(FLUSH_TIMEOUT_S))

    def _raise_failures(self, unsent: int) -> None:
        if unsent or self._failures:
            failures, self._failures = self._failures, []
            raise RuntimeError(
                f"topic {self._topic!r}: {unsent} messages unsent, "
                f"{len(failures)} failed ({'; '.join(failures[:3])})"
            )

    def close(self) -> None:
        if self._producer_ is not None:
            self._producer_.flush(10)
