"""A bytewax sink that writes ``(key, value)`` items to one Kafka topic, losing nothing.

Writes do not wait for Kafka: ``write_batch`` hands the messages to the producer and
returns. The wait is at the end of each epoch instead: bytewax snapshots every sink
partition written in the epoch before it commits the epoch, and the snapshot flushes the
producer. So an epoch is committed only once every message it wrote is acknowledged; if
Kafka refuses one, the flow stops and, on restart, replays from its last commit
(at-least-once: consumers see a crash's repeats and drop them by their ids). Waiting per
batch instead held the whole worker for a broker round trip in every batch that wrote.

The sink has one partition: items from every worker of a cluster go to the worker that
owns it. The flow writes dead letters, alerts and its own event-time wake-ups with it.
"""

from __future__ import annotations

import bytewax.operators as op
from bytewax.dataflow import Stream
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition
from confluent_kafka import KafkaError, Message

from crmscore.clients import producer
from crmscore.settings import Settings

KeyValue = tuple[bytes | None, bytes]
FLUSH_TIMEOUT_S = 60.0
PART = "0"


def kafka_output(step_id: str, stream: Stream[KeyValue], sink: KafkaTopicSink) -> None:
    """Write ``stream`` to ``sink`` (a partitioned sink takes ``(routing key, item)``)."""
    op.output(step_id, op.map(f"{step_id}_route", stream, lambda kv: (PART, kv)), sink)


class KafkaTopicSink(FixedPartitionedSink[KeyValue, None]):
    def __init__(self, settings: Settings, topic: str) -> None:
        self._settings = settings
        self._topic = topic

    def list_parts(self) -> list[str]:
        return [PART]

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _TopicPartition:
        return _TopicPartition(self._settings, self._topic)


class _TopicPartition(StatefulSinkPartition[KeyValue, None]):
    def __init__(self, settings: Settings, topic: str) -> None:
        self._topic = topic
        self._producer = producer(settings)
        self._failures: list[str] = []

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
        self._raise_failures(self._producer.flush(FLUSH_TIMEOUT_S))

    def _raise_failures(self, unsent: int) -> None:
        if unsent or self._failures:
            failures, self._failures = self._failures, []
            raise RuntimeError(
                f"topic {self._topic!r}: {unsent} messages unsent, "
                f"{len(failures)} failed ({'; '.join(failures[:3])})"
            )

    def close(self) -> None:
        self._producer.flush(10)
