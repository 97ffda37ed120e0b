"""A bytewax sink that writes ``(key, value)`` items to one Kafka topic, losing nothing.

Writes do not wait for Kafka: ``write_batch`` hands the messages to the producer and
returns. The wait is at the end of each epoch instead: bytewax snapshots every sink
partition written in the epoch before it commits the epoch, and the snapshot flushes the
producer. So an epoch is committed only once every message it wrote is acknowledged; if
Kafka refuses one, the flow stops and, on restart, replays from its last commit
(at-least-once: consumers see a crash's repeats and drop them by their ids). Waiting per
batch instead held the whole worker for a broker round trip in every batch that wrote.

The flow writes dead letters, alerts and its own event-time wake-ups with it. Each
process of a cluster writes what it emits itself: its items go to a sink partition that
only it lists (:class:`flows.kafka_source.ProcessShare`), so they never cross to another
process (when the sink had a single partition, every alert and wake-up of the other
process crossed: 38,588 items in a 71,000-event replay). The producer picks the Kafka
partition by the message key, as before; a customer's alerts all come from the process
that holds the customer.
"""

from __future__ import annotations

import bytewax.operators as op
from bytewax.dataflow import Stream
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition
from confluent_kafka import KafkaError, Message, Producer

from crmscore.clients import producer
from crmscore.settings import Settings
from flows.kafka_source import SINGLE_PROCESS, ProcessShare

KeyValue = tuple[bytes | None, bytes]
FLUSH_TIMEOUT_S = 60.0
# Sink partitions "0".."63", partition i listed by process i % processes. bytewax stops a
# flow whose recovery store holds a partition no process lists, so the set stays the
# same whatever the process count (a cluster of more processes lists one each).
SINK_PARTS = 64


def kafka_output(step_id: str, stream: Stream[KeyValue], sink: KafkaTopicSink) -> None:
    """Write ``stream`` to ``sink`` (a partitioned sink takes ``(routing key, item)``)."""
    part = sink.own_part
    op.output(step_id, op.map(f"{step_id}_route", stream, lambda kv: (part, kv)), sink)


class KafkaTopicSink(FixedPartitionedSink[KeyValue, None]):
    def __init__(self, settings: Settings, topic: str,
                 share: ProcessShare = SINGLE_PROCESS) -> None:
        self._settings = settings
        self._topic = topic
        self._share = share

    @property
    def own_part(self) -> str:
        """The partition this process writes through: its index."""
        return str(self._share.index)

    def list_parts(self) -> list[str]:
        parts = max(SINK_PARTS, self._share.processes)
        return [str(i) for i in range(parts) if i % self._share.processes == self._share.index]

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _TopicPartition:
        return _TopicPartition(self._settings, self._topic)


class _TopicPartition(StatefulSinkPartition[KeyValue, None]):
    """One sink partition; its producer is made by the first write (most partitions of a
    process are never written: see SINK_PARTS)."""

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
