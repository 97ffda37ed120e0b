"""bytewax's Kafka input, made never to block the worker on an empty partition.

bytewax 0.21's Kafka partitions poll with ``consumer.consume(batch_size, 0.001)``: each
empty partition holds the worker for a millisecond, every time it is polled, and bytewax
polls an empty partition again a millisecond later. The flow reads eight partitions
(four of transactions, four of wake-ups, mostly empty while it runs live): a live flow
spent a fifth of its thread asleep in those polls, with scoring waiting behind them.

Here each poll takes only what librdkafka's background fetcher has already buffered
(timeout 0). An empty poll costs microseconds; bytewax's own one-millisecond pause
after an empty batch keeps the worker from spinning. Offsets, recovery, end-of-partition
and error handling stay bytewax's: only the consumers' settings change. Each partition
has its own consumer (bytewax's), and some topics' consumers can be set apart (the
flow's wake-ups wait longer per fetch). Step ids are those
of ``bytewax.connectors.kafka.operators.input``, so snapshots of either resume in the
other. Relies on bytewax internals of the pinned version (pyproject.toml).
"""

from __future__ import annotations

from typing import Any

import bytewax.operators as op
from bytewax.connectors.kafka import KafkaSource
from bytewax.connectors.kafka import operators as kop
from bytewax.dataflow import Dataflow, operator
from confluent_kafka import Consumer


class _NoWaitConsumer:
    """A consumer whose ``consume`` returns at once with what is buffered."""

    def __init__(self, consumer: Consumer) -> None:
        self._consumer = consumer

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        return self._consumer.consume(num_messages, 0)

    def close(self) -> None:
        self._consumer.close()


class NoWaitKafkaSource(KafkaSource):
    """bytewax's source with consumers that never wait (:class:`_NoWaitConsumer`).

    ``add_config`` goes to the consumers and to the admin client that lists the
    partitions, so it holds only settings both take (librdkafka warns of the others);
    ``consumer_config`` goes to every consumer, ``topic_config`` to those of some topics.
    ``add_config`` (the user's settings) wins over both.
    """

    def __init__(self, *args: Any, consumer_config: dict[str, str],
                 topic_config: dict[str, dict[str, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._consumer_config = consumer_config
        self._topic_config = topic_config

    def config_for(self, for_part: str) -> dict[str, Any]:
        """The settings of a partition's consumer ("3-topic" is topic's partition 3)."""
        topic = for_part.split("-", 1)[1]
        return {**self._consumer_config, **self._topic_config.get(topic, {}),
                **self._add_config}

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> Any:
        # bytewax builds every partition's consumer from ``_add_config``: swap in this
        # partition's settings for the duration of the call.
        shared = self._add_config
        self._add_config = self.config_for(for_part)
        try:
            part = super().build_part(step_id, for_part, resume_state)
        finally:
            self._add_config = shared
        # Duck-typed: bytewax's partition calls only consume() and close() on it.
        part._consumer = _NoWaitConsumer(part._consumer)  # type: ignore[assignment]
        return part


@operator
def kafka_input(step_id: str, flow: Dataflow, *, brokers: list[str], topics: list[str],
                tail: bool, add_config: dict[str, str], consumer_config: dict[str, str],
                topic_config: dict[str, dict[str, str]] | None = None) -> kop.KafkaOpOut:
    """As ``bytewax.connectors.kafka.operators.input``, from the start of the topics
    (settings as in :class:`NoWaitKafkaSource`)."""
    source = NoWaitKafkaSource(brokers, topics, tail, add_config=add_config,
                               raise_on_errors=False, consumer_config=consumer_config,
                               topic_config=topic_config or {})
    return op.input("kafka_input", flow, source).then(kop._kafka_error_split, "split_err")
