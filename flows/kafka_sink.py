"""A bytewax sink that writes ``(key, value)`` items to one Kafka topic, losing nothing.

``write_batch`` returns only once every message of the batch is acknowledged, so a
message is never lost: if Kafka refuses, the flow stops and, on restart, replays from
its last snapshot (at-least-once: consumers see a crash's repeats and drop them by their
ids). The flow writes dead letters and its own event-time wake-ups with it.
"""

from __future__ import annotations

from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import KafkaError, Message

from crmscore.clients import producer
from crmscore.settings import Settings

KeyValue = tuple[bytes | None, bytes]


class KafkaTopicSink(DynamicSink[KeyValue]):
    def __init__(self, settings: Settings, topic: str) -> None:
        self._settings = settings
        self._topic = topic

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _TopicPartition:
        return _TopicPartition(self._settings, self._topic)


class _TopicPartition(StatelessSinkPartition[KeyValue]):
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
                except BufferError:
                    self._producer.poll(0.1)
        remaining = self._producer.flush(60)
        if remaining or self._failures:
            failures, self._failures = self._failures, []
            raise RuntimeError(
                f"topic {self._topic!r}: {remaining} messages unsent, "
                f"{len(failures)} failed ({'; '.join(failures[:3])})"
            )

    def close(self) -> None:
        self._producer.flush(10)
